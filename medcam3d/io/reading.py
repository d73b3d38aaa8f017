""":func:`read`, :func:`read_volumes`, :func:`read_space` and :func:`read_in_slabs`: one entry for every
format (the checks are described in :mod:`medcam3d.io`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, NonFiniteError, ShearWarning, SpaceError, UsageError, VolumeError, VolumeIndexError
from ..space import Space
from ._common import _check_exists, _kind, _spatial_shape
from .limits import (DEFAULT_MAX_BYTES, DEFAULT_MAX_EXPANSION, DEFAULT_MAX_SLICES, MAX_VOXEL_MM, _Limits,
                     _check_voxel_sizes, _limits)
from .nifti import _load_nifti, _nifti_affine, _read_nifti, _read_nifti_slabs
from .itk import _itk_info, _native_messages, _read_itk_file
from .dicom import _dicom_series, _read_dicom

logger = logging.getLogger(__name__)


def read(
    path: str | os.PathLike,
    *,
    volume: int | None = None,
    dtype: Any = np.float32,
    allow_nan: bool = False,
    series: str | None = None,
    allow_uneven_slices: bool = False,
    trust: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> tuple[np.ndarray, Space]:
    """Read an image as an ``(i, j, k)`` array and its voxel -> RAS+ mm grid.

    Every file is checked before its voxels are loaded (see :mod:`medcam3d.io`): detached data
    files must stay in the header's folder, the header must not claim more data than the file
    holds, voxel sizes must make sense, and DICOM slices must be evenly spaced.

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, or a directory holding a
        DICOM series.
    volume : int, optional
        For a 4D image (``(I, J, K, T)``, e.g. several classes or time points), the volume to
        return. Required for 4D images with T > 1; trailing singleton axes are dropped first.
        Checked against the header before anything is read; only that volume is loaded (NIfTI,
        MetaImage; NRRD files are decoded whole). :func:`read_volumes` reads every volume at once.
    dtype : numpy dtype or None
        Type of the returned array, float32 by default (NIfTI scaling ``scl_slope/inter`` and
        DICOM rescale are applied). ``None`` keeps the stored type where possible (integer label
        maps stay integer; scaled NIfTI data becomes float as nibabel decides).
    allow_nan : bool
        Accept NaN or +-inf voxels; by default they raise :class:`NonFiniteError`.
    series : str, optional
        DICOM only: the SeriesInstanceUID to read when the directory holds several series.
    allow_uneven_slices : bool
        DICOM only: read a series whose slices are duplicated, missing, unevenly spaced, drift in
        plane or differ in orientation as SimpleITK assembles it (one average slice spacing), with
        a logged warning, instead of raising :class:`GeometryError`. Only for users who know the
        geometry is good enough for their purpose. Malformed PixelSpacing or orientation tags are
        refused even so.
    trust : bool
        MetaImage/NRRD only: allow a header whose data file lies outside the header's folder (an
        absolute path, ``..``, a link leading out) or that names a list or pattern of data files;
        DICOM: allow files reached through links leading out of the folder. Only for files from a
        source you trust: such a header can make medcam3d read any file the user can read.
    max_bytes : int or None
        Largest amount of memory (bytes) the voxel data may need, 16 GiB by default
        (:data:`DEFAULT_MAX_BYTES`); ``None`` for no limit. The comparison of the header's claim
        with the file's size is always made.
    max_expansion : float or None
        Compressed files (``.nii.gz``, compressed MetaImage/NRRD, compressed DICOM transfer
        syntaxes): the most memory reading may take as a multiple of the compressed data's size,
        beyond the first :data:`EXPANSION_FREE_BYTES` (1 GiB); 100 by default
        (:data:`DEFAULT_MAX_EXPANSION`), ``None`` for no limit.
    max_voxel_mm : float or None
        Largest voxel size (mm) accepted, 100 by default (:data:`MAX_VOXEL_MM`); ``None`` for no
        upper bound (sizes must still be finite, positive and at least :data:`MIN_VOXEL_MM`).
    max_slices : int or None
        DICOM only: the most files the folder may hold (each is opened to find the series), 5000
        by default (:data:`DEFAULT_MAX_SLICES`); ``None`` for no limit.

    Returns
    -------
    array : numpy.ndarray, shape (I, J, K) (or (I, J) for a 2D image)
    space : Space
        ``space.shape == array.shape``; ``space.affine`` maps voxel (i, j, k) to RAS+ mm.

    Raises
    ------
    ImageNotFoundError
        (FileNotFoundError) the path does not exist (or is empty).
    UnsupportedFormatError
        (ValueError) unknown extension; the message lists the supported ones.
    ImageReadError
        (ValueError) corrupt or truncated file, unreadable header, complex or RGB voxels, 4D image
        without ``volume`` (:class:`VolumeError`), NaN voxels (:class:`NonFiniteError`). Messages
        of the C++ readers (ITK, GDCM, MetaIO) are folded into the error's one-line message, or
        logged as one-line warnings when the file was read.
    GeometryError
        (ImageReadError) uneven, duplicated or missing DICOM slices, mixed orientations, malformed
        PixelSpacing or ImageOrientationPatient, a singular voxel -> world matrix, voxel sizes
        that are 0, negative, not finite or above ``max_voxel_mm``.
    ImageTooLargeError
        (ImageReadError, MemoryError) the header claims more voxel data than the file holds, or
        more than ``max_bytes`` or ``max_expansion`` allow, or a DICOM folder holds more than
        ``max_slices`` files.
    UntrustedFileError
        (PermissionError) a detached header points outside its folder, or at several files,
        without ``trust=True``.
    UsageError
        (ValueError) a limit that is not a positive number or None.

    Warns
    -----
    ShearWarning
        The affine is sheared (allowed for NIfTI, but not representable in SimpleITK formats).
    """
    limits = _limits(max_bytes, max_expansion, max_voxel_mm, max_slices)
    if isinstance(volume, str) or (volume is not None and not isinstance(volume, (int, np.integer))):
        raise UsageError(f"volume must be an int (0-based) or None, got {volume!r}.")
    return _read(path, "one" if volume is None else int(volume), dtype, allow_nan, series, allow_uneven_slices,
                 trust, limits)


#: Voxels per slab of :func:`read_in_slabs` (a 512 x 512 CT: 16 slices a slab).
SLAB_VOXELS = 1 << 22


def read_in_slabs(
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    allow_nan: bool = False,
    slab_voxels: int = SLAB_VOXELS,
    trust: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> Generator[tuple[int, int], None, tuple[np.ndarray, Space]]:
    """:func:`read` (one 3D volume) as a generator that reads a 3D NIfTI file slab by slab.

    Yields ``(done, total)`` after each slab of whole ``k`` slices of about ``slab_voxels`` voxels
    (NIfTI; other formats and 4D files are read at once and yield nothing), so that a caller can
    show progress and stop between slabs: closing the generator reads no more of the file. The
    checks, errors and result are :func:`read`'s (a 4D file raises :class:`VolumeError`).

    Parameters
    ----------
    path, dtype, allow_nan, trust, max_bytes, max_expansion, max_voxel_mm, max_slices
        As for :func:`read`.
    slab_voxels : int
        Voxels read per step (at least one ``k`` slice).

    Returns
    -------
    array : (I, J, K) ndarray
    space : Space
        The generator's return value (``StopIteration.value``), as :func:`read` returns them.
    """
    p = _check_exists(path)
    if _kind(p) != "nifti":
        return read(p, dtype=dtype, allow_nan=allow_nan, trust=trust, max_bytes=max_bytes,
                    max_expansion=max_expansion, max_voxel_mm=max_voxel_mm, max_slices=max_slices)
    limits = _limits(max_bytes, max_expansion, max_voxel_mm, max_slices)
    logger.debug("reading %s (nifti, in slabs)", p)
    arr, affine = yield from _read_nifti_slabs(p, dtype, limits, slab_voxels)
    space = _space_for(p, arr.shape, affine, limits.max_voxel_mm)
    if arr.dtype.kind in "fc" and not allow_nan:
        _check_finite(p, arr)
    return arr, space


def read_volumes(
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    allow_nan: bool = False,
    trust: bool = False,
    max_volumes: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
) -> tuple[np.ndarray, Space]:
    """Every volume of an image file, read once, channel-first.

    For a 4D file this reads the whole file once (instead of :func:`read` once per volume, which
    decodes a compressed file again each time); a 3D file gives one volume.

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` (a DICOM series is one
        volume: use :func:`read`).
    dtype, allow_nan, trust, max_bytes, max_expansion, max_voxel_mm
        As for :func:`read` (``max_bytes`` and ``max_expansion`` apply to all volumes together).
    max_volumes : int, optional
        Refuse (:class:`VolumeError`, before reading voxels) a file of more volumes than this.

    Returns
    -------
    array : numpy.ndarray, shape (T, I, J, K)
        ``array[t]`` is what ``read(path, volume=t)`` returns (a view into one array).
    space : Space
        The grid of one volume, ``space.shape == array.shape[1:]``.

    Raises
    ------
    As :func:`read`; :class:`VolumeError` for more than ``max_volumes`` volumes or a DICOM folder.
    """
    limits = _limits(max_bytes, max_expansion, max_voxel_mm)
    if max_volumes is not None and (isinstance(max_volumes, bool) or not isinstance(max_volumes, (int, np.integer))
                                    or max_volumes < 1):
        raise UsageError(f"max_volumes must be a positive int or None, got {max_volumes!r}.")
    p = _check_exists(path)
    if _kind(p) == "dicom":
        raise VolumeError(f"'{p}' is a DICOM folder, which holds one volume per series; read it with medcam3d.io.read.")
    arr, space = _read(p, "all", dtype, allow_nan, None, False, trust, limits, max_volumes=max_volumes)
    return arr, space


def _read(path: Any, volume: int | str, dtype: Any, allow_nan: bool, series: str | None, allow_uneven: bool,
          trust: bool, limits: _Limits, max_volumes: int | None = None) -> tuple[np.ndarray, Space]:
    """:func:`read` (``volume`` an index or ``"one"``) and :func:`read_volumes` (``"all"``)."""
    p = _check_exists(path)
    kind = _kind(p)
    logger.debug("reading %s (%s)", p, kind)
    with _native_messages(p):
        if kind == "nifti":
            arr, affine = _read_nifti(p, dtype, volume, limits, max_volumes)
        elif kind == "dicom":
            if volume not in ("one", 0, -1):
                raise VolumeIndexError(
                    f"volume={volume} was given but '{p}' is a DICOM folder, whose series is a single volume; "
                    "omit volume= (or pass 0)."
                )
            arr, affine = _read_dicom(p, dtype, series, allow_uneven, trust, limits)
        else:
            arr, affine = _read_itk_file(p, dtype, volume, trust, limits, max_volumes)
    spatial = arr.shape[1:] if volume == "all" else arr.shape
    space = _space_for(p, spatial, affine, limits.max_voxel_mm)
    if arr.dtype.kind in "fc" and not allow_nan:
        _check_finite(p, arr)
    return arr, space


def _check_finite(p: Path, arr: np.ndarray) -> None:
    if np.isfinite(arr).all():
        return
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    raise NonFiniteError(
        f"'{p}' contains {n_nan} NaN and {n_inf} infinite voxel(s) out of {arr.size}; expected "
        "finite values. Pass allow_nan=True to read them anyway (then replace them, e.g. with "
        "numpy.nan_to_num)."
    )


def read_space(
    path: str | os.PathLike,
    *,
    series: str | None = None,
    allow_uneven_slices: bool = False,
    trust: bool = False,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> Space:
    """The grid of an image file without loading its voxels (4D files: the spatial grid).

    The same header checks as :func:`read` apply. A DICOM series' grid comes from its files'
    headers, as :func:`read` builds it (no pixel data is read).

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`read`.
    series : str, optional
        DICOM only, as for :func:`read`.
    allow_uneven_slices : bool
        DICOM only, as for :func:`read`.
    trust : bool
        As for :func:`read`.
    max_voxel_mm, max_slices : optional
        As for :func:`read`.

    Returns
    -------
    Space
    """
    limits = _limits(max_voxel_mm=max_voxel_mm, max_slices=max_slices)
    p = _check_exists(path)
    kind = _kind(p)
    with _native_messages(p):
        if kind == "nifti":
            img = _load_nifti(p)
            affine = _nifti_affine(p, img, limits.max_voxel_mm)
            return _space_for(p, _spatial_shape(img.shape), affine, limits.max_voxel_mm)
        if kind == "dicom":
            headers_only = dataclasses.replace(limits, max_bytes=None, max_expansion=None)  # no pixels are read
            _, _, slices, grid, problem = _dicom_series(p, series, allow_uneven_slices, trust, headers_only, None)
            if problem is not None or grid is None:  # allow_uneven_slices: the grid SimpleITK assembles
                arr, assembled = _read_dicom(p, None, series, allow_uneven_slices, trust, limits)
                return _space_for(p, _spatial_shape(arr.shape), assembled, limits.max_voxel_mm)
            affine = grid
            depth = sum(int(s.size[2]) if len(s.size) > 2 else 1 for s in slices)
            return _space_for(p, (int(slices[0].size[0]), int(slices[0].size[1]), depth), affine, limits.max_voxel_mm)
        info = _itk_info(p, trust, limits.max_voxel_mm)
        return _space_for(p, info.size[: min(info.dim, 3)], info.affine, limits.max_voxel_mm)


def _space_for(p: Path, shape: tuple[int, ...], affine: np.ndarray, max_voxel_mm: float | None = MAX_VOXEL_MM) -> Space:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4) and np.all(np.isfinite(a)):
        _check_voxel_sizes(p, np.linalg.norm(a[:3, : min(len(shape), 3)], axis=0), "from the voxel -> world matrix",
                           max_voxel_mm)
    try:
        space = Space(tuple(shape), affine)
    except SpaceError as e:
        raise ImageReadError(f"'{p}' has an invalid voxel-to-world transform: {e}") from None
    if space.is_sheared:
        warnings.warn(
            f"'{p}' has a sheared affine (voxel axes not orthogonal); it is used as is, but "
            "SimpleITK formats (.nrrd, .mha) cannot store it: write results as NIfTI.",
            ShearWarning,
            stacklevel=3,
        )
    return space
