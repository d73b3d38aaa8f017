"""Read and write medical images as ``(array, Space)`` pairs in RAS+ world coordinates.

Formats
-------
- NIfTI (``.nii``, ``.nii.gz``) goes through nibabel; its affine (the sform when its code is
  > 0, else the qform, as nibabel chooses) is already voxel -> RAS+ mm. When the sform and the
  qform both have codes > 0 but place the grid differently, reading logs a warning naming both
  (viewers built on ITK, such as 3D Slicer, may use the qform and show the image elsewhere).
- DICOM series (a directory), NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``)
  go through SimpleITK, which works in LPS+. The affine is built from SimpleITK's direction,
  spacing and origin and converted to RAS+ with :func:`medcam3d.orientation.lps_to_ras`;
  :mod:`medcam3d.orientation` is the only module of medcam3d that converts between LPS and RAS
  (:func:`lps_to_ras` and :func:`ras_to_lps` are re-exported here).

Arrays are in NIfTI ``(i, j, k)`` order for every format (SimpleITK's ``(z, y, x)`` arrays are
transposed). By default :func:`read` returns float32 data (``dtype=None`` keeps the stored type,
e.g. integer label maps). :func:`write` is atomic: a temporary file in the target directory is
renamed over ``path`` only once it is complete. :func:`describe` lists what a file or DICOM folder
holds (format, grid, number of volumes, each DICOM series) from its headers, without reading voxels.

Untrusted files
---------------
A scan from someone else must never run code, read files elsewhere, or give silently wrong
geometry. :func:`read` therefore checks every file before it loads voxels:

- **Detached data files.** The data file named by a MetaImage (``ElementDataFile``) or NRRD
  (``data file``) header must lie in the header's own folder (or below it); absolute paths,
  ``..`` traversal, symbolic links leading out of the folder, and lists or patterns of several
  data files are refused unless ``trust=True``. The header text is parsed here, before
  SimpleITK opens anything. DICOM files reached through links leading out of the folder are
  refused the same way.
- **Size.** The voxel bytes a header claims are compared with what the file can hold (its size
  for raw data, 1032 times its size for gzip/zlib data, the most deflate can expand) before
  anything is allocated, and reading more than ``max_bytes`` (16 GiB by default) is refused:
  :class:`ImageTooLargeError`.
- **Geometry.** DICOM slices must share one orientation, one in-plane size and spacing, and lie
  evenly spaced along the slice normal, without duplicates, gaps or in-plane drift (tolerance 1 %
  of the slice spacing plus 1e-3 mm); otherwise :class:`GeometryError`, unless
  ``allow_uneven_slices=True``. Voxel sizes must be finite, positive and between
  :data:`MIN_VOXEL_MM` and :data:`MAX_VOXEL_MM`; NIfTI ``pixdim`` values that nibabel would
  silently replace (0, -0, negative) are refused when the qform or the default affine uses them.
- **Voxel types.** Complex and RGB (structured) voxels are refused (:class:`ImageReadError`):
  medcam3d explains scalar intensity images.

NIfTI header codes written
--------------------------
:func:`write` stores the grid's affine in both the sform and the qform, so that every viewer
(nibabel prefers the sform, ITK-based viewers may read the qform) places the image in the same
place. The codes are chosen in one place (:func:`_output_codes`):

- without ``like`` (or a ``like`` that is not NIfTI): sform code 1 and qform code 1 (scanner);
- with a NIfTI ``like``: its codes are copied; a code of 0 in the source takes the other code
  (an affine stored under code 0 is ignored by viewers); both 0 become 1 and 1;
- the qform cannot hold shear: for a sheared grid (or one the quaternion cannot reproduce within
  1e-3 mm plus 1 % of a voxel) the qform code is 0 and only the sform carries the affine.

The same rule applies to every image written (heatmaps, masks, copies of scans).
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from .errors import _IMAGE_ERRORS
from .errors import ImageReadError, ImageNotFoundError, UnsupportedFormatError, VolumeError, VolumeIndexError, NonFiniteError, ImageWriteError, UnwritableImageError, OutputPermissionError, OutputDirectoryError, ShearWarning, SpaceError, GeometryError, ImageTooLargeError, UntrustedFileError  # noqa: F401  (re-exported)
from .orientation import lps_to_ras, ras_to_lps
from .space import Space

__all__ = [
    "read",
    "read_space",
    "describe",
    "ImageInfo",
    "SeriesInfo",
    "write",
    "lps_to_ras",
    "ras_to_lps",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "DEFAULT_MAX_BYTES",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "ShearWarning",
    *_IMAGE_ERRORS,
]

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
_ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File extensions :func:`read` accepts (and a directory holding a DICOM series).
READ_FORMATS = _NIFTI + _ITK
#: File extensions :func:`write` accepts (detached-header formats .nhdr/.mhd cannot be renamed
#: atomically, since the header names its data file).
WRITE_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")

#: Default ceiling on the memory :func:`read` may allocate for voxel data (16 GiB).
DEFAULT_MAX_BYTES = 16 * 1024**3
#: Smallest voxel size (mm) accepted on reading (0.1 micrometre).
MIN_VOXEL_MM = 1e-4
#: Largest voxel size (mm) accepted on reading (10 metres).
MAX_VOXEL_MM = 1e4

# deflate (gzip, zlib) cannot expand data more than 1032:1; a little slack for headers.
_DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 4096
# how much of a MetaImage/NRRD file is searched for the end of its header
_MAX_HEADER_BYTES = 1024 * 1024
# DICOM geometry tolerances: along the normal, 1 % of the spacing plus 1e-3 mm; orientation
# cosines 1e-4.
_SLICE_REL_TOL = 0.01
_SLICE_ABS_TOL_MM = 1e-3
_IOP_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (binary units)."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _check_max_bytes(max_bytes: Any) -> int | None:
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int (bytes) or None, got {max_bytes!r}")
    return int(max_bytes)


def _out_itemsize(dtype: Any, stored_itemsize: int) -> int:
    return stored_itemsize if dtype is None else np.dtype(dtype).itemsize


def _check_allocation(p: Path, need: int, what: str, max_bytes: int | None) -> None:
    """Refuse to read when about ``need`` bytes would be allocated and that exceeds ``max_bytes``."""
    if max_bytes is None or need <= max_bytes:
        return
    suggestion = 1 << max(int(need - 1).bit_length(), 0)
    raise ImageTooLargeError(
        f"reading '{p}' would allocate about {need} bytes ({_fmt_bytes(need)}) for {what}, more than "
        f"max_bytes={max_bytes} ({_fmt_bytes(max_bytes)}). If the image is that large and you have the "
        f"memory, pass a larger max_bytes to medcam3d.io.read (e.g. max_bytes={suggestion}), or "
        "max_bytes=None for no limit; otherwise the header is wrong: export the image again."
    )


def _too_large_for_file(p: Path, claimed: int, what: str, holds: int, expands_to: int | None = None) -> ImageTooLargeError:
    """The error for a header claiming more voxel bytes than the file can hold."""
    if expands_to is not None:
        holds_text = f"{holds} bytes of compressed data, which expand to at most {expands_to} bytes"
    else:
        holds_text = f"{holds} bytes"
    return ImageTooLargeError(
        f"'{p}': the header claims {claimed} bytes of voxel data ({what}); the file holds "
        f"{holds_text}. Expected the data to fit the file: it is truncated, or its header is wrong "
        "or forged. Export it again (or copy it again if a transfer was interrupted)."
    )


def _check_voxel_sizes(p: Path, sizes: Any, source: str) -> None:
    """Refuse voxel sizes that are not finite, not positive, or outside the accepted range."""
    for axis, v in enumerate(np.asarray(sizes, dtype=np.float64).ravel()):
        if not math.isfinite(v):
            reason = f"is {v}"
        elif v == 0.0:
            reason = "is 0" + (" (-0.0)" if math.copysign(1.0, v) < 0 else "")
        elif v < 0:
            reason = f"is negative ({v:g}); a voxel size must be positive (the direction carries the sign)"
        elif v < MIN_VOXEL_MM:
            reason = f"is {v:g} mm, below {MIN_VOXEL_MM:g} mm"
        elif v > MAX_VOXEL_MM:
            reason = f"is {v:g} mm, above {MAX_VOXEL_MM:g} mm"
        else:
            continue
        raise GeometryError(
            f"'{p}': the voxel size along axis {axis} ({source}) {reason}. Expected a finite size "
            f"between {MIN_VOXEL_MM:g} and {MAX_VOXEL_MM:g} mm, so positions in mm cannot be trusted "
            "(a voxel size of 0 also makes the voxel -> world matrix singular: determinant 0). "
            "Fix the spacing in the header or export the image again."
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in READ_FORMATS:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _check_exists(path: Any) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        alt = p.with_name(p.name[:-3] if p.name.endswith(".gz") else p.name + ".gz")
        hint = f" Did you mean '{alt}'?" if alt.name and alt.exists() else ""
        raise ImageNotFoundError(f"no such image file or DICOM directory: '{p}'.{hint}")
    return p


def _kind(p: Path) -> str:
    if p.is_dir():
        return "dicom"
    ext = _suffix(p)
    if ext in _NIFTI:
        return "nifti"
    if ext in _ITK:
        return "itk"
    hint = " For a DICOM series pass the directory that holds its files." if ext in (".dcm", ".ima") else ""
    raise UnsupportedFormatError(
        f"cannot read '{p}': unsupported extension '{ext}'. Supported: "
        f"{', '.join(READ_FORMATS)}, or a directory holding a DICOM series.{hint}"
    )


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
) -> tuple[np.ndarray, Space]:
    """Read an image as an ``(i, j, k)`` array and its voxel -> RAS+ mm grid.

    Every file is checked before its voxels are loaded (see the module docstring): detached data
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
        geometry is good enough for their purpose.
    trust : bool
        MetaImage/NRRD only: allow a header whose data file lies outside the header's folder (an
        absolute path, ``..``, a link leading out) or that names a list or pattern of data files;
        DICOM: allow files reached through links leading out of the folder. Only for files from a
        source you trust: such a header can make medcam3d read any file the user can read.
    max_bytes : int or None
        Largest amount of memory (bytes) the voxel data may need, 16 GiB by default
        (:data:`DEFAULT_MAX_BYTES`); ``None`` for no limit. The comparison of the header's claim
        with the file's size is always made.

    Returns
    -------
    array : numpy.ndarray, shape (I, J, K) (or (I, J) for a 2D image)
    space : Space
        ``space.shape == array.shape``; ``space.affine`` maps voxel (i, j, k) to RAS+ mm.

    Raises
    ------
    ImageNotFoundError
        (FileNotFoundError) the path does not exist.
    UnsupportedFormatError
        (ValueError) unknown extension; the message lists the supported ones.
    ImageReadError
        (ValueError) corrupt or truncated file, unreadable header, singular affine, complex or
        RGB voxels, 4D image without ``volume`` (:class:`VolumeError`), NaN voxels
        (:class:`NonFiniteError`).
    GeometryError
        (ImageReadError) uneven, duplicated or missing DICOM slices, mixed orientations, voxel
        sizes that are 0, negative, not finite or absurd.
    ImageTooLargeError
        (ImageReadError, MemoryError) the header claims more voxel data than the file holds, or
        more than ``max_bytes``.
    UntrustedFileError
        (PermissionError) a detached header points outside its folder, or at several files,
        without ``trust=True``.

    Warns
    -----
    ShearWarning
        The affine is sheared (allowed for NIfTI, but not representable in SimpleITK formats).
    """
    max_bytes = _check_max_bytes(max_bytes)
    p = _check_exists(path)
    kind = _kind(p)
    logger.debug("reading %s (%s)", p, kind)
    if kind == "nifti":
        arr, affine = _read_nifti(p, dtype, max_bytes)
    elif kind == "dicom":
        arr, affine = _read_dicom(p, dtype, series, allow_uneven_slices, trust, max_bytes)
    else:
        arr, affine = _read_itk_file(p, dtype, trust, max_bytes)
    arr = _select_volume(arr, volume, p)
    space = _space_for(p, arr.shape, affine)
    if arr.dtype.kind in "fc" and not allow_nan and not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise NonFiniteError(
            f"'{p}' contains {n_nan} NaN and {n_inf} infinite voxel(s) out of {arr.size}; expected "
            "finite values. Pass allow_nan=True to read them anyway (then replace them, e.g. with "
            "numpy.nan_to_num)."
        )
    return arr, space


def read_space(
    path: str | os.PathLike,
    *,
    series: str | None = None,
    allow_uneven_slices: bool = False,
    trust: bool = False,
) -> Space:
    """The grid of an image file without loading its voxels (4D files: the spatial grid).

    The same header checks as :func:`read` apply (DICOM series are read in full, with the
    default ``max_bytes``).

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

    Returns
    -------
    Space
    """
    p = _check_exists(path)
    kind = _kind(p)
    if kind == "nifti":
        img = _load_nifti(p)
        affine = _nifti_affine(p, img)
        return _space_for(p, _spatial_shape(img.shape), affine)
    if kind == "dicom":
        arr, affine = _read_dicom(p, None, series, allow_uneven_slices, trust, DEFAULT_MAX_BYTES)
        return _space_for(p, _spatial_shape(arr.shape), affine)
    info = _itk_info(p, trust)
    return _space_for(p, info.size[: min(info.dim, 3)], info.affine)


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) >= 3 else tuple(shape)


def _space_for(p: Path, shape: tuple[int, ...], affine: np.ndarray) -> Space:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4) and np.all(np.isfinite(a)):
        _check_voxel_sizes(p, np.linalg.norm(a[:3, : min(len(shape), 3)], axis=0), "from the voxel -> world matrix")
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


# ------------------------------------------------------------------------------ describe


def _plain_affine(affine: np.ndarray | None) -> list | None:
    return None if affine is None else [[float(v) for v in row] for row in np.asarray(affine)]


def _axcodes(affine: np.ndarray | None, ndim: int) -> tuple[str, ...] | None:
    if affine is None:
        return None
    import nibabel.orientations as nio

    try:
        codes = nio.aff2axcodes(np.asarray(affine, dtype=np.float64))
    except Exception:  # a singular affine: no orientation to name
        return None
    return tuple(str(c) for c in codes[:ndim]) if all(c is not None for c in codes[:ndim]) else None


def _voxel_sizes(affine: np.ndarray | None, ndim: int) -> tuple[float, ...] | None:
    if affine is None:
        return None
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :ndim], axis=0))


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)


def _fmt_size(values: Any) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """One DICOM series of a folder, from its files' headers (see :func:`describe`).

    Attributes
    ----------
    uid : str
        SeriesInstanceUID: pass it as ``series=`` to :func:`read`.
    description : str or None
        SeriesDescription.
    modality : str or None
        Modality (CT, MR, PT ...).
    slices : int
        Number of files (slices) in the series.
    shape : tuple of int
        Grid size ``(I, J, K)``: columns, rows, slices.
    spacing : tuple of float or None
        Voxel size in mm along i, j, k (k from the slice positions).
    orientation : tuple of str or None
        Axis codes of i, j, k in RAS terms (``("L", "P", "S")`` for a plain axial LPS series).
    affine : numpy.ndarray or None
        Voxel -> RAS+ mm ``(4, 4)``, from ImagePositionPatient, ImageOrientationPatient and
        PixelSpacing (None when the headers cannot place the slices).
    problem : str or None
        Why :func:`read` would refuse the series (uneven or duplicated slices, colour pixels ...),
        or None. With a problem the grid above is approximate.
    """

    uid: str
    description: str | None
    modality: str | None
    slices: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    orientation: tuple[str, ...] | None
    affine: np.ndarray | None
    problem: str | None = None

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (the affine as a nested list)."""
        return {
            "uid": self.uid, "description": self.description, "modality": self.modality, "slices": self.slices,
            "shape": list(self.shape), "spacing": list(self.spacing) if self.spacing else None,
            "orientation": "".join(self.orientation) if self.orientation else None,
            "affine": _plain_affine(self.affine), "problem": self.problem,
        }

    def __str__(self) -> str:
        name = f' "{self.description}"' if self.description else ""
        spacing = f", {_fmt_size(self.spacing)} mm" if self.spacing else ""
        orientation = f", {''.join(self.orientation)}" if self.orientation else ""
        text = f"series {self.uid}{name} ({self.modality or 'modality ?'}): {self.slices} slices, {_fmt_shape(self.shape)} voxels{spacing}{orientation}"
        return text + (f"\n    problem: {self.problem}" if self.problem else "")


@dataclass(frozen=True, eq=False)
class ImageInfo:
    """What an image file or DICOM folder holds, read from headers only (see :func:`describe`).

    Attributes
    ----------
    path : Path
        The file or folder.
    format : str
        ``NIfTI``, ``NRRD``, ``MetaImage`` or ``DICOM``.
    shape : tuple of int or None
        ``(I, J[, K])`` for one volume, ``(I, J, K, T)`` for a 4D file (trailing axes of size 1
        dropped, as :func:`read` does); None for a folder of several DICOM series (see ``series``).
    dtype : str or None
        The stored voxel type (``int16``, ``float32`` ...); None for DICOM.
    volumes : int
        Volumes in the file: ``T`` of a 4D file (pass ``volume=`` to :func:`read`), else 1.
    spacing : tuple of float or None
        Voxel size in mm along each spatial axis.
    orientation : tuple of str or None
        Axis codes of the spatial axes in RAS terms (e.g. ``("L", "P", "S")``).
    affine : numpy.ndarray or None
        Voxel -> RAS+ mm ``(4, 4)`` of the spatial grid.
    series : tuple of SeriesInfo
        DICOM folders: every series (pass its ``uid`` as ``series=`` to :func:`read`).
    """

    path: Path
    format: str
    shape: tuple[int, ...] | None
    dtype: str | None
    volumes: int
    spacing: tuple[float, ...] | None
    orientation: tuple[str, ...] | None
    affine: np.ndarray | None
    series: tuple[SeriesInfo, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """The shape of one volume, ``(I, J[, K])`` (None for a folder of several series)."""
        return None if self.shape is None else _spatial_shape(self.shape)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (paths as str, the affine as a nested list)."""
        return {
            "path": str(self.path), "format": self.format, "shape": list(self.shape) if self.shape else None,
            "spatial_shape": list(self.spatial_shape) if self.spatial_shape else None, "dtype": self.dtype,
            "volumes": self.volumes, "spacing": list(self.spacing) if self.spacing else None,
            "orientation": "".join(self.orientation) if self.orientation else None,
            "affine": _plain_affine(self.affine), "series": [s.to_dict() for s in self.series],
        }

    def __str__(self) -> str:
        if self.format == "DICOM":
            lines = [f"{self.path}: DICOM folder with {len(self.series)} series"
                     + (" (pass series=<uid> to choose)" if len(self.series) > 1 else "")]
            lines += [f"  {s}" for s in self.series]
            return "\n".join(lines)
        spatial = self.spatial_shape
        assert spatial is not None, "only a folder of several DICOM series has no shape"
        what = (f"{self.volumes} volumes of {_fmt_shape(spatial)} voxels (pass volume=<index>, 0 to {self.volumes - 1})"
                if self.volumes > 1 else f"{_fmt_shape(spatial)} voxels")
        lines = [f"{self.path}: {self.format}, {len(spatial)}D, {what}, {self.dtype}"]
        if self.spacing:
            lines.append(f"  spacing {_fmt_size(self.spacing)} mm, orientation {''.join(self.orientation or '?')}")
        if self.affine is not None:
            lines.append("  voxel -> RAS mm: " + "; ".join(_fmt_mm(row) for row in np.asarray(self.affine)[:3]))
        return "\n".join(lines)


def _itk_dtype(pixel_id: int) -> str:
    import SimpleITK as sitk

    for base in ("UInt8", "Int8", "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64", "Float32", "Float64"):
        for prefix in ("sitk", "sitkVector", "sitkLabel"):
            if getattr(sitk, prefix + base, None) == pixel_id:
                return base.lower()
    return str(sitk.GetPixelIDValueAsString(pixel_id))


def _without_extra_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop axes of size 1 beyond the third, as :func:`read` does (NIfTI ``(I, J, K, 1, C)``)."""
    return tuple(shape[:3]) + tuple(n for n in shape[3:] if n != 1)


def _image_info(p: Path, fmt: str, shape: tuple[int, ...], dtype: str | None, affine: np.ndarray) -> ImageInfo:
    shape = _without_extra_singletons(tuple(int(n) for n in shape))
    ndim = len(_spatial_shape(shape))
    volumes = math.prod(shape[3:]) if len(shape) > 3 else 1
    affine = np.asarray(affine, dtype=np.float64)
    return ImageInfo(p, fmt, shape, dtype, int(volumes), _voxel_sizes(affine, ndim), _axcodes(affine, ndim), affine)


def _series_info(p: Path, uid: str, slices: list[_Slice]) -> SeriesInfo:
    first = slices[0]
    problem = next((s.colour for s in slices if s.colour), None)
    ordered, geometry = _check_dicom_geometry(p, slices) if len(slices) > 1 else (slices, None)
    problem = problem or geometry
    depth = sum(int(s.size[2]) if len(s.size) > 2 else 1 for s in slices)
    shape = (int(first.size[0]), int(first.size[1]), depth)
    affine = None
    placed = [s for s in ordered if s.position is not None and s.orientation is not None]
    if placed and len(first.spacing) >= 2:
        orientation, first_position, last_position = placed[0].orientation, placed[0].position, placed[-1].position
        assert orientation is not None and first_position is not None and last_position is not None  # filtered above
        row, col = orientation[:3], orientation[3:]
        normal = np.cross(row, col)
        if np.linalg.norm(normal) > 1e-6:
            normal = normal / np.linalg.norm(normal)
            if len(placed) > 1:
                step = normal * float((last_position - first_position) @ normal) / (len(placed) - 1)
            else:
                step = normal * (float(first.spacing[2]) if len(first.spacing) > 2 else 1.0)
            lps = np.eye(4)
            lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * first.spacing[0], col * first.spacing[1], step
            lps[:3, 3] = first_position
            affine = lps_to_ras(lps)
    return SeriesInfo(uid, first.description, first.modality, len(slices), shape, _voxel_sizes(affine, 3), _axcodes(affine, 3), affine, problem)


def _series_reader(p: Path) -> tuple[Any, list[str]]:
    """SimpleITK's series reader for the DICOM folder ``p``, and the UIDs of the series it holds (at least one)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(p)))
    if not ids:
        raise ImageReadError(
            f"'{p}' is a directory but holds no DICOM series; expected a directory of DICOM files "
            f"of one series, or an image file ({', '.join(READ_FORMATS)})."
        )
    return reader, ids


def _describe_dicom(p: Path, trust: bool) -> ImageInfo:
    reader, ids = _series_reader(p)
    series = []
    for uid in ids:
        files = list(reader.GetGDCMSeriesFileNames(str(p), uid))
        _check_dicom_links(p, files, trust)
        series.append(_series_info(p, uid, [_dicom_slice(p, f, strict=False) for f in files]))
    if len(series) == 1:
        one = series[0]
        return ImageInfo(p, "DICOM", one.shape, None, 1, one.spacing, one.orientation, one.affine, tuple(series))
    return ImageInfo(p, "DICOM", None, None, 1, None, None, None, tuple(series))


def describe(path: str | os.PathLike, *, trust: bool = False) -> ImageInfo:
    """What an image file or DICOM folder holds, from its headers, without reading voxels.

    The header checks of :func:`read` that guard against hostile files apply (detached data
    files must stay in the header's folder, the header may not claim more data than the file
    holds, DICOM files may not be links out of the folder, voxel sizes must make sense), so a
    file that passes can be handed to another reader (a MONAI bundle's ``LoadImaged``). Problems
    that only stop :func:`read` from assembling a DICOM series (uneven slices, colour pixels) are
    reported in :attr:`SeriesInfo.problem` instead of raised.

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`read`.
    trust : bool
        As for :func:`read`.

    Returns
    -------
    ImageInfo
        ``print(info)`` gives a readable summary; ``info.to_dict()`` JSON-ready values.

    Raises
    ------
    ImageNotFoundError, UnsupportedFormatError, ImageReadError, GeometryError,
    ImageTooLargeError, UntrustedFileError
        As :func:`read` would, for what a header shows (no size limit ``max_bytes``).
    """
    p = _check_exists(path)
    kind = _kind(p)
    if kind == "dicom":
        return _describe_dicom(p, trust)
    if kind == "nifti":
        img = _load_nifti(p)
        affine = _nifti_affine(p, img)
        _check_nifti_size(p, img, None, None)
        _space_for(p, _spatial_shape(tuple(img.shape)), affine)
        return _image_info(p, "NIfTI", tuple(img.shape), str(np.dtype(img.header.get_data_dtype())), affine)
    info = _itk_info(p, trust)
    _check_itk_size(p, info, None, None)
    _space_for(p, info.size[: min(info.dim, 3)], info.affine)
    shape = info.size + ((info.components,) if info.components > 1 else ())
    fmt = "MetaImage" if _suffix(p) in (".mha", ".mhd") else "NRRD"
    return _image_info(p, fmt, shape, _itk_dtype(int(info.reader.GetPixelID())), info.affine)


# ------------------------------------------------------------------------------ NIfTI


def _load_nifti(p: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(p))
    except PermissionError:
        raise
    except Exception as e:  # nibabel raises many types (ImageFileError, gzip/zlib errors, ...)
        raise ImageReadError(
            f"could not read the NIfTI header of '{p}': {type(e).__name__}: {e}. "
            "The file may be truncated, corrupt, or not a NIfTI file."
        ) from e


def _raw_nifti_header(p: Path, img: Any) -> Any:
    """The header as stored on disk (nibabel fixes some fields, e.g. zero pixdim, on loading)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(p)) as f:
            return type(img.header).from_fileobj(f, check=False)
    except PermissionError:
        raise
    except Exception as e:
        raise ImageReadError(f"could not read the NIfTI header of '{p}': {type(e).__name__}: {e}.") from e


def _corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the world positions of the grid's corners under ``a`` and ``b``."""
    ext = [max(int(n) - 1, 0) for n in shape[:3]] + [0] * (3 - min(len(shape), 3))
    corners = np.array([[i, j, k, 1.0] for i in (0, ext[0]) for j in (0, ext[1]) for k in (0, ext[2])])
    return float(np.max(np.linalg.norm((corners @ (np.asarray(a) - np.asarray(b)).T)[:, :3], axis=1)))


def _placement_tolerance(affine: np.ndarray, ndim: int) -> float:
    """1e-3 mm plus 1 % of the smallest voxel: how far two encodings of one grid may differ."""
    sizes = np.linalg.norm(np.asarray(affine)[:3, :ndim], axis=0)
    return _SLICE_ABS_TOL_MM + _SLICE_REL_TOL * float(np.min(sizes)) if sizes.size else _SLICE_ABS_TOL_MM


def _nifti_affine(p: Path, img: Any) -> np.ndarray:
    """nibabel's affine, after checking the pixdim it may use and the sform/qform agreement."""
    hdr = img.header
    shape = _spatial_shape(tuple(img.shape))
    nd = min(len(shape), 3)
    if "sform_code" not in hdr:  # pragma: no cover - every NIfTI header has it
        return np.asarray(img.affine, dtype=np.float64)
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    if scode == 0:  # nibabel uses the qform (pixdim + quaternion) or pixdim alone
        raw = _raw_nifti_header(p, img)
        source = "pixdim of the qform" if qcode > 0 else "pixdim; sform and qform codes are both 0"
        _check_voxel_sizes(p, np.asarray(raw["pixdim"], dtype=np.float64)[1 : 1 + nd], source)
    affine = np.asarray(img.affine, dtype=np.float64)
    if scode > 0 and qcode > 0:
        sform = np.asarray(hdr.get_sform(), dtype=np.float64)
        qform = np.asarray(hdr.get_qform(), dtype=np.float64)
        if np.all(np.isfinite(sform)) and np.all(np.isfinite(qform)):
            dist = _corner_distance(sform, qform, shape)
            if dist > _placement_tolerance(sform, nd):
                logger.warning(
                    "'%s': the sform (code %d) and the qform (code %d) disagree: the grid's corners "
                    "differ by up to %.3g mm. Using the sform, as nibabel does; viewers that read the "
                    "qform (ITK-based ones such as 3D Slicer) place the image elsewhere. "
                    "sform:\n%s\nqform:\n%s\nRewrite the file with medcam3d.io.write (or fix the "
                    "header) so that both hold the same affine.",
                    p, scode, qcode, dist, np.array2string(sform, precision=4), np.array2string(qform, precision=4),
                )
    return affine


def _check_nifti_voxel_type(p: Path, stored: np.dtype) -> None:
    if stored.fields is not None or stored.kind == "V":
        raise ImageReadError(
            f"'{p}' stores {stored} voxels (RGB/colour or another structured type); expected one "
            "scalar intensity per voxel. Convert it to a greyscale (or single-channel) scan first."
        )
    if stored.kind == "c":
        raise ImageReadError(
            f"'{p}' stores complex voxels ({stored}); expected real intensities. Convert it first, "
            "e.g. to the magnitude (numpy.abs) or the real part, and save that."
        )


def _check_nifti_size(p: Path, img: Any, dtype: Any, max_bytes: int | None) -> None:
    """Refuse a header that claims more voxel bytes than the file can hold or than ``max_bytes``."""
    from nibabel.spatialimages import HeaderDataError

    hdr = img.header
    stored = np.dtype(hdr.get_data_dtype())
    n = math.prod(int(v) for v in img.shape)
    claimed = n * stored.itemsize
    what = f"shape {tuple(img.shape)}, {stored}"
    offset = int(hdr.get_data_offset())
    size = p.stat().st_size
    if _suffix(p) == ".nii.gz":
        if offset + claimed > size * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
            raise _too_large_for_file(p, claimed, what, size, size * _DEFLATE_MAX_RATIO)
    elif offset + claimed > size:
        raise _too_large_for_file(p, claimed, what, max(size - offset, 0))
    try:
        slope, inter = hdr.get_slope_inter()
        scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    except (ValueError, TypeError, HeaderDataError):  # unusable scaling: assume a float copy
        scaled = True
    if dtype is None:
        out_dtype = np.dtype(np.float64) if scaled and stored.kind in "iub" else stored
    else:
        out_dtype = np.dtype(dtype)
    # the stored bytes, plus the converted copy when the type changes or scaling applies
    need = claimed if (out_dtype == stored and not scaled) else claimed + n * out_dtype.itemsize
    _check_allocation(p, need, what, max_bytes)


def _read_nifti(p: Path, dtype: Any, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    img = _load_nifti(p)
    _check_nifti_voxel_type(p, np.dtype(img.header.get_data_dtype()))
    affine = _nifti_affine(p, img)
    _check_nifti_size(p, img, dtype, max_bytes)
    try:
        if dtype is None:
            arr = np.asanyarray(img.dataobj)
        elif np.dtype(dtype).kind == "f":
            arr = img.get_fdata(dtype=np.dtype(dtype))
        else:
            arr = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    except PermissionError:
        raise
    except Exception as e:
        raise ImageReadError(
            f"could not read the voxel data of '{p}' (shape {img.shape}, "
            f"{img.get_data_dtype()}): {type(e).__name__}: {e}. The file may be truncated or corrupt."
        ) from e
    return np.asarray(arr), affine


# ------------------------------------------------------------------------------ MetaImage / NRRD headers


@dataclass(frozen=True)
class _DataFile:
    """Where the voxel data of a MetaImage/NRRD file is, as its header says."""

    path: Path | None  # the data file (None: in the header file itself, or several files)
    offset: int  # bytes of header before the data, when the data is in the header file
    multiple: bool  # a list or pattern of data files
    encoding: str  # "raw", "deflate" (gzip/zlib), "bzip2", "ascii", "hex" or "other"


def _inside(folder: Path, target: Path) -> bool:
    try:
        folder_real = os.path.realpath(folder)
        target_real = os.path.realpath(target)
        return os.path.commonpath([folder_real, target_real]) == folder_real
    except ValueError:  # different drives (Windows)
        return False


def _untrusted_data_file(p: Path, value: str, reason: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"'{p}' names its voxel data file as '{value}', {reason}. Expected a data file in the "
        f"header's own folder ('{p.parent}'), since a header from someone else could otherwise make "
        "medcam3d read any file you can read. If you trust this file, pass trust=True to "
        "medcam3d.io.read; otherwise put the data next to the header and name it without a folder."
    )


def _resolve_data_file(p: Path, value: str, multiple: bool, trust: bool) -> Path | None:
    if multiple:
        if not trust:
            raise _untrusted_data_file(p, value, "a list or pattern of several data files")
        return None
    target = p.parent / value
    if not trust:
        if os.path.isabs(value) or value.startswith("\\") or re.match(r"^[A-Za-z]:", value):
            raise _untrusted_data_file(p, value, "an absolute path")
        if not _inside(p.parent, target):
            raise _untrusted_data_file(p, value, "which leads out of the header's folder ('..' or a link)")
    return target


def _header_bytes(p: Path) -> bytes:
    """The first :data:`_MAX_HEADER_BYTES` (+1) bytes of ``p``."""
    with open(p, "rb") as f:
        return f.read(_MAX_HEADER_BYTES + 1)


def _too_long_header(p: Path, what: str) -> ImageReadError:
    return ImageReadError(
        f"'{p}': no {what} in the first {_fmt_bytes(_MAX_HEADER_BYTES)}; expected a complete "
        "MetaImage/NRRD header before the data. The file is corrupt or not in the format its "
        "extension says."
    )


def _ambiguous_header(p: Path, what: str) -> ImageReadError:
    return ImageReadError(
        f"'{p}': {what}. Expected one plain data-file line; a header that different readers could "
        "understand differently is refused. Export the image again (or write it as .nii.gz)."
    )


# MetaIO reads keys case-sensitively, skips any run of '=', ':', spaces and tabs after the key and
# takes the rest of that line as the value; it stops reading the header at ElementDataFile.
_META_DATAFILE = re.compile(rb"(?i)elementdatafile")
_META_VALUE = re.compile(rb"[ \t]*[=:][ \t=:]*([^\r\n]*)")


def _parse_metaimage(p: Path, trust: bool) -> _DataFile:
    head = _header_bytes(p)
    match = _META_DATAFILE.search(head)
    if match is None:
        if len(head) > _MAX_HEADER_BYTES:
            raise _too_long_header(p, "ElementDataFile line")
        raise ImageReadError(
            f"'{p}' has no ElementDataFile line; expected a MetaImage header ending with "
            "'ElementDataFile = LOCAL' or the name of its data file."
        )
    line_start = head.rfind(b"\n", 0, match.start()) + 1
    if head[match.start() : match.end()] != b"ElementDataFile" or head[line_start : match.start()].strip():
        shown = head[line_start : match.end()].decode("latin-1").strip()
        raise _ambiguous_header(p, f"'{shown}' is not a plain 'ElementDataFile' key at the start of a line")
    value_match = _META_VALUE.match(head, match.end())
    if value_match is None:
        raise _ambiguous_header(p, "the ElementDataFile key has no '=' on its line")
    value = value_match.group(1).decode("latin-1").strip()
    line_end = head.find(b"\n", value_match.end())
    offset = len(head) if line_end < 0 else line_end + 1
    fields = {}
    for line in head[:line_start].decode("latin-1").splitlines():
        m = re.match(r"\s*(\w+)\s*[=:][\s=:]*(.*)$", line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    encoding = "deflate" if fields.get("CompressedData", "").lower() in ("true", "1") else "raw"
    if value.upper() == "LOCAL":
        return _DataFile(None, offset, False, encoding)
    if not value:
        raise ImageReadError(f"'{p}': ElementDataFile is empty; expected LOCAL or the name of the data file.")
    if len(_META_DATAFILE.findall(head)) > 1:  # a detached header is all text: one data-file line only
        raise _ambiguous_header(p, "it has more than one ElementDataFile line")
    tokens = value.split()
    multiple = value.upper().startswith("LIST") or "%" in value or (
        len(tokens) >= 4 and all(re.fullmatch(r"-?\d+", t) for t in tokens[-3:])
    )
    return _DataFile(_resolve_data_file(p, value, multiple, trust), 0, multiple, encoding)


_NRRD_ENCODINGS = {
    "raw": "raw",
    "gzip": "deflate",
    "gz": "deflate",
    "bzip2": "bzip2",
    "bz2": "bzip2",
    "ascii": "ascii",
    "text": "ascii",
    "txt": "ascii",
    "hex": "hex",
}
# teem reads field names case-insensitively ("data file" or "datafile"); any such line counts.
_NRRD_DATAFILE = re.compile(r"(?i)^\s*data\s*file\s*:[\s=]*(.*)$")


def _parse_nrrd(p: Path, trust: bool) -> _DataFile:
    head = _header_bytes(p)
    if not head.startswith(b"NRRD"):
        raise ImageReadError(f"'{p}' does not start with 'NRRD'; expected a NRRD header. The file is corrupt or not NRRD.")
    pos = head.find(b"\n") + 1 if b"\n" in head else len(head)
    encoding = "raw"
    colour: str | None = None
    values: list[str] = []
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            if len(head) > _MAX_HEADER_BYTES:
                raise _too_long_header(p, "end of the NRRD header (a blank line)")
            end = len(head)
        line = head[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        if not line:
            break  # the blank line ending the header; attached data follows
        if line.startswith("#"):
            continue
        m = _NRRD_DATAFILE.match(line)
        if m:
            values.append(m.group(1).strip())
            if values[-1].upper().startswith("LIST"):
                break  # file names follow, one per line, to the end of the file
            continue
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "encoding":
            encoding = _NRRD_ENCODINGS.get(value.strip(" =").lower(), "other")
        elif sep and key.strip().lower() == "kinds":
            colour = next((k for k in value.strip(" =").split() if k.lower().endswith("-color")), colour)
    offset = min(pos, len(head))
    if colour is not None:
        raise ImageReadError(
            f"'{p}' stores colour voxels (NRRD kind '{colour}'); expected one scalar intensity per "
            "voxel. Convert it to a greyscale (or single-channel) image first."
        )
    if not values:
        return _DataFile(None, offset, False, encoding)
    if len(values) > 1:
        raise _ambiguous_header(p, f"it has {len(values)} 'data file' lines")
    value = values[0]
    if not value:
        raise ImageReadError(f"'{p}': 'data file' is empty; expected the name of the data file.")
    tokens = value.split()
    multiple = value.upper().startswith("LIST") or "%" in value or (
        len(tokens) >= 4 and all(re.fullmatch(r"-?\d+", t) for t in tokens[1:4])
    )
    return _DataFile(_resolve_data_file(p, value, multiple, trust), 0, multiple, encoding)


def _data_file(p: Path, trust: bool) -> _DataFile:
    ext = _suffix(p)
    try:
        return _parse_metaimage(p, trust) if ext in (".mha", ".mhd") else _parse_nrrd(p, trust)
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ImageReadError(f"could not read the header of '{p}': {e}") from None


# ------------------------------------------------------------------------------ SimpleITK files


@dataclass(frozen=True)
class _ItkInfo:
    reader: Any
    dim: int
    size: tuple[int, ...]
    components: int
    component_bytes: int
    affine: np.ndarray
    data: _DataFile


def _itk_reason(e: BaseException) -> str:
    # ITK messages are long multi-line traces; keep the informative tail line.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _itk_affine(dim: int, direction: Any, spacing: Any, origin: Any) -> np.ndarray:
    sd = min(dim, 3)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:sd, :sd]
    lps = np.eye(4)
    lps[:sd, :sd] = d * np.asarray(spacing, dtype=np.float64)[:sd]
    lps[:sd, 3] = np.asarray(origin, dtype=np.float64)[:sd]
    return lps_to_ras(lps)


def _itk_component_bytes(pixel_id: int, components: int) -> int:
    import SimpleITK as sitk

    try:
        return int(sitk.Image([1, 1], pixel_id, max(int(components), 1)).GetSizeOfPixelComponent())
    except (RuntimeError, TypeError, ValueError):  # an unusual pixel type: assume the widest
        return 8


def _check_itk_voxel_type(p: Path, pixel_id: int) -> None:
    import SimpleITK as sitk

    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise ImageReadError(
            f"'{p}' stores complex voxels ({sitk.GetPixelIDValueAsString(pixel_id)}); expected real "
            "intensities. Convert it first, e.g. to the magnitude, and save that."
        )


def _itk_info(p: Path, trust: bool) -> _ItkInfo:
    """Check a MetaImage/NRRD header (data file, voxel type, sizes) without loading voxels."""
    import SimpleITK as sitk

    data = _data_file(p, trust)  # before SimpleITK opens anything
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(
            f"could not read the header of '{p}': {_itk_reason(e)}. The file may be truncated, "
            "corrupt, or not in the format its extension says."
        ) from None
    dim = int(reader.GetDimension())
    size = tuple(int(v) for v in reader.GetSize())
    pixel_id = int(reader.GetPixelID())
    _check_itk_voxel_type(p, pixel_id)
    spacing = tuple(reader.GetSpacing())
    _check_voxel_sizes(p, spacing[: min(dim, 3)], "the header's spacing")
    components = int(reader.GetNumberOfComponents())
    affine = _itk_affine(dim, reader.GetDirection(), spacing, reader.GetOrigin())
    return _ItkInfo(reader, dim, size, components, _itk_component_bytes(pixel_id, components), affine, data)


def _check_itk_size(p: Path, info: _ItkInfo, dtype: Any, max_bytes: int | None) -> None:
    n_values = math.prod(info.size) * max(info.components, 1)
    claimed = n_values * info.component_bytes
    what = f"size {info.size}, {max(info.components, 1)} x {info.component_bytes}-byte values per voxel"
    data = info.data
    if not data.multiple:
        if data.path is None:
            holds = max(p.stat().st_size - data.offset, 0)
        else:
            try:
                holds = data.path.stat().st_size
            except FileNotFoundError:
                raise ImageReadError(
                    f"'{p}' names the data file '{data.path.name}', which does not exist in "
                    f"'{data.path.parent}'; expected it next to the header. Copy it there."
                ) from None
        if data.encoding == "raw" and claimed > holds:
            raise _too_large_for_file(p, claimed, what, holds)
        if data.encoding == "deflate" and claimed > holds * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
            raise _too_large_for_file(p, claimed, what, holds, holds * _DEFLATE_MAX_RATIO)
        if data.encoding == "hex" and 2 * claimed > holds:  # two characters per byte
            raise _too_large_for_file(p, claimed, what, holds)
        if data.encoding == "ascii" and n_values > holds:  # at least one character per value
            raise _too_large_for_file(p, claimed, what, holds)
    # SimpleITK's buffer plus the numpy array handed back
    need = claimed + n_values * _out_itemsize(dtype, info.component_bytes)
    _check_allocation(p, need, what, max_bytes)


def _sitk_to_numpy(img: Any, dtype: Any) -> np.ndarray:
    import SimpleITK as sitk

    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) / (t, z, y, x), vector pixels: (..., c)
    order = list(range(dim))[::-1]
    if img.GetNumberOfComponentsPerPixel() > 1:
        order.append(dim)
    arr = arr.transpose(order)  # -> (x, y, z[, t][, c]) = (i, j, k, ...)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def _read_itk_file(p: Path, dtype: Any, trust: bool, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    info = _itk_info(p, trust)
    _check_itk_size(p, info, dtype, max_bytes)
    img, affine = _execute(info.reader, f"'{p}'",
                           "The file may be truncated, corrupt, or not in the format its extension says.")
    return _sitk_to_numpy(img, dtype), affine


def _execute(reader: Any, what: str, hint: str) -> tuple[Any, np.ndarray]:
    """Run a SimpleITK reader: the image and its voxel -> RAS affine (``ImageReadError`` naming ``what``)."""
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(f"could not read {what}: {_itk_reason(e)}. {hint}") from None
    return img, _itk_affine(img.GetDimension(), img.GetDirection(), img.GetSpacing(), img.GetOrigin())


# ------------------------------------------------------------------------------ DICOM series


@dataclass(frozen=True)
class _Slice:
    file: str
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row and column cosines)
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    components: int
    component_bytes: int
    modality: str | None = None  # (0008,0060)
    description: str | None = None  # SeriesDescription (0008,103e)
    colour: str | None = None  # why the pixels are not greyscale (read only with strict=False)


def _ds_values(text: str, n: int) -> np.ndarray | None:
    parts = [t for t in (s.strip() for s in text.replace("\x00", "").split("\\")) if t]
    try:
        values = np.array([float(t) for t in parts], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == n and np.all(np.isfinite(values)) else None


def _dicom_slice(p: Path, file: str, strict: bool = True) -> _Slice:
    """The header of one DICOM file; colour pixels raise, or with ``strict=False`` are recorded."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"could not read the DICOM header of '{file}' in '{p}': {_itk_reason(e)}") from None

    def tag(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    ipp, iop = tag("0020|0032"), tag("0020|0037")
    samples = tag("0028|0002")
    photometric = (tag("0028|0004") or "").strip().upper()
    colour = None
    if (samples is not None and samples.strip() not in ("", "1")) or photometric.startswith(("RGB", "YBR", "PALETTE")):
        colour = (
            f"'{file}' in '{p}' holds colour pixels (PhotometricInterpretation {photometric or '?'}, "
            f"SamplesPerPixel {(samples or '?').strip()}); expected a greyscale series (CT, MR, PET). "
            "Pick the right series with series=<uid>, or export the images as greyscale."
        )
        if strict:
            raise ImageReadError(colour)
    pixel_id = int(reader.GetPixelID())
    if strict:
        _check_itk_voxel_type(Path(file), pixel_id)
    components = int(reader.GetNumberOfComponents())
    text = {key: (value.replace("\x00", "").strip() or None) if value is not None else None
            for key, value in (("modality", tag("0008|0060")), ("description", tag("0008|103e")))}
    return _Slice(
        file=file,
        position=_ds_values(ipp, 3) if ipp is not None else None,
        orientation=_ds_values(iop, 6) if iop is not None else None,
        size=tuple(int(v) for v in reader.GetSize()),
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        components=components,
        component_bytes=_itk_component_bytes(pixel_id, components),
        modality=text["modality"],
        description=text["description"],
        colour=colour,
    )


def _dicom_fix_hint() -> str:
    return (
        " Export the series again from the scanner or PACS (all slices, one series per folder), or "
        "pick the intended series with series=<uid>. If you know the geometry is good enough, pass "
        "allow_uneven_slices=True to read it as is."
    )


def _fmt_mm(values: Any) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


def _check_dicom_geometry(p: Path, slices: list[_Slice]) -> tuple[list[_Slice], str | None]:
    """Sort the slices along their normal and check the stack; returns (sorted slices, problem)."""
    names = [os.path.basename(s.file) for s in slices]
    first = slices[0]
    for s, name in zip(slices, names):
        if s.size[:2] != first.size[:2] or not np.allclose(s.spacing[:2], first.spacing[:2], rtol=1e-4, atol=1e-6):
            return slices, (
                f"slice '{name}' has {s.size[0]}x{s.size[1]} pixels of {_fmt_mm(s.spacing[:2])} mm but "
                f"'{names[0]}' has {first.size[0]}x{first.size[1]} pixels of {_fmt_mm(first.spacing[:2])} mm; "
                "expected one in-plane grid for the whole series."
            )
    missing = [n for s, n in zip(slices, names) if s.position is None or s.orientation is None]
    if missing:
        return slices, (
            f"{len(missing)} of {len(slices)} files have no readable ImagePositionPatient / "
            f"ImageOrientationPatient (e.g. '{missing[0]}'), so the slices cannot be placed in space."
        )
    iop0 = cast(np.ndarray, first.orientation)  # every slice has one (checked above)
    for s, name in zip(slices, names):
        if np.max(np.abs(cast(np.ndarray, s.orientation) - iop0)) > _IOP_TOL:
            return slices, (
                f"slices have different orientations: '{name}' has ImageOrientationPatient "
                f"({_fmt_mm(s.orientation)}) but '{names[0]}' has ({_fmt_mm(iop0)}); expected one "
                "orientation for the whole series (a localizer or a reformatted plane mixed in?)."
            )
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return slices, f"ImageOrientationPatient ({_fmt_mm(iop0)}) has parallel row and column directions."
    normal /= norm
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    names = [names[i] for i in order]
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    positive = gaps[gaps > _SLICE_ABS_TOL_MM]
    typical = float(np.median(positive)) if positive.size else 0.0
    tol = _SLICE_REL_TOL * typical + _SLICE_ABS_TOL_MM
    listing = _fmt_mm(along) if len(along) <= 12 else f"{_fmt_mm(along[:6])}, ..., {_fmt_mm(along[-3:])}"
    for k, g in enumerate(gaps):
        if g <= tol:
            return slices, (
                f"duplicated slice: '{names[k]}' and '{names[k + 1]}' are both at {along[k]:.6g} mm "
                "along the slice normal (two acquisitions or time points in one series, or a file copied twice)."
            )
    for k, g in enumerate(gaps):
        if abs(g - typical) > tol:
            ratio = g / typical if typical else math.inf
            if math.isfinite(ratio) and ratio > 1.5 and abs(ratio - round(ratio)) * typical <= tol:
                what = (
                    f"{round(ratio) - 1} missing slice(s) between '{names[k]}' ({along[k]:.6g} mm) "
                    f"and '{names[k + 1]}' ({along[k + 1]:.6g} mm): that gap is {g:.6g} mm, "
                    f"{round(ratio)} times the spacing of {typical:.6g} mm"
                )
            else:
                what = (
                    f"uneven slice spacing: the gap between '{names[k]}' ({along[k]:.6g} mm) and "
                    f"'{names[k + 1]}' ({along[k + 1]:.6g} mm) is {g:.6g} mm, but the median gap is "
                    f"{typical:.6g} mm"
                )
            return slices, (
                f"{what} (positions along the slice normal: {listing} mm; tolerance {tol:.3g} mm). "
                "Expected evenly spaced slices; SimpleITK would use one average spacing and put "
                "slices in the wrong places."
            )
    drift = positions - positions[:1] - np.outer(along - along[0], normal)
    worst = int(np.argmax(np.linalg.norm(drift, axis=1)))
    in_plane_tol = _SLICE_REL_TOL * float(min(first.spacing[:2])) + _SLICE_ABS_TOL_MM
    if np.linalg.norm(drift[worst]) > max(in_plane_tol, tol):
        return slices, (
            f"the slices are not stacked along their normal: '{names[worst]}' is shifted by "
            f"{np.linalg.norm(drift[worst]):.4g} mm in plane relative to '{names[0]}' (gantry tilt or a "
            "sheared stack), which a SimpleITK image cannot describe. Expected slice positions along "
            "the normal of ImageOrientationPatient; resample the series (e.g. gantry-tilt correction) first."
        )
    return slices, None


def _check_dicom_links(p: Path, files: list[str], trust: bool) -> None:
    if not trust:
        for f in files:
            if not _inside(p, Path(f)):
                raise UntrustedFileError(
                    f"'{f}' in '{p}' is a link to '{os.path.realpath(f)}', outside the DICOM folder; "
                    "expected the series' files inside the folder you named. Copy the files into the "
                    "folder, or pass trust=True to medcam3d.io.read if you trust where the links lead."
                )


def _read_dicom(
    p: Path, dtype: Any, series: str | None, allow_uneven: bool, trust: bool, max_bytes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    reader, ids = _series_reader(p)
    if series is None:
        if len(ids) > 1:
            raise ImageReadError(
                f"'{p}' holds {len(ids)} DICOM series: {', '.join(ids)}; pass series=<uid> to pick one."
            )
        series = ids[0]
    elif series not in ids:
        raise ImageReadError(f"series '{series}' is not in '{p}'; found: {', '.join(ids)}")
    files = list(reader.GetGDCMSeriesFileNames(str(p), series))
    _check_dicom_links(p, files, trust)
    slices = [_dicom_slice(p, f) for f in files]
    n_values = sum(math.prod(s.size) * max(s.components, 1) for s in slices)
    stored = sum(math.prod(s.size) * max(s.components, 1) * s.component_bytes for s in slices)
    out = n_values * _out_itemsize(dtype, max(s.component_bytes for s in slices))
    _check_allocation(p, stored + out, f"{len(slices)} DICOM slices of {slices[0].size[:2]} pixels", max_bytes)
    problem = None
    if len(slices) > 1:
        slices, problem = _check_dicom_geometry(p, slices)
        if problem is not None:
            if not allow_uneven:
                raise GeometryError(f"'{p}' (series {series}): {problem}{_dicom_fix_hint()}")
            logger.warning(
                "'%s' (series %s): %s Reading it as is because allow_uneven_slices=True: slice "
                "positions in mm are approximate.", p, series, problem
            )
    reader.SetFileNames([s.file for s in slices])
    img, affine = _execute(reader, f"the DICOM series in '{p}'", "The files may be truncated or corrupt.")
    if len(slices) > 1 and problem is None:
        _check_dicom_placement(p, series, slices, ras_to_lps(affine))
    return _sitk_to_numpy(img, dtype), affine


def _check_dicom_placement(p: Path, series: str, slices: list[_Slice], lps: np.ndarray) -> None:
    """The assembled volume must put slice k where its own header says (guards SimpleITK's sorting)."""
    spacing = float(np.linalg.norm(lps[:3, 2]))
    tol = _SLICE_REL_TOL * spacing + _SLICE_ABS_TOL_MM
    for k, s in enumerate(slices):
        placed = lps[:3, 3] + k * lps[:3, 2]
        if np.linalg.norm(placed - s.position) > tol:
            raise GeometryError(
                f"'{p}' (series {series}): SimpleITK placed slice {k} ('{os.path.basename(s.file)}') at "
                f"({_fmt_mm(placed)}) mm (LPS) but its ImagePositionPatient is ({_fmt_mm(s.position)}); "
                f"expected them to agree within {tol:.3g} mm.{_dicom_fix_hint()}"
            )


def _select_volume(arr: np.ndarray, volume: int | None, p: Path) -> np.ndarray:
    if arr.ndim > 3:  # drop singleton axes beyond the spatial ones, e.g. NIfTI (I, J, K, 1, C)
        arr = arr.reshape(arr.shape[:3] + tuple(n for n in arr.shape[3:] if n != 1))
    if arr.ndim > 4:
        raise ImageReadError(
            f"'{p}' has shape {arr.shape}; expected a 3D image or a 4D image (I, J, K, T)."
        )
    if arr.ndim == 4:
        n = arr.shape[3]
        if volume is None:
            raise VolumeError(
                f"'{p}' is 4D with shape {arr.shape} ({n} volumes) but a 3D image is needed; "
                f"pass volume=<index> (0 to {n - 1}) to choose one."
            )
        if not -n <= int(volume) < n:
            raise VolumeIndexError(
                f"volume={volume} is out of range for '{p}', which has {n} volumes "
                f"(shape {arr.shape}); expected 0 to {n - 1}."
            )
        return arr[..., int(volume)]
    if volume not in (None, 0, -1):
        raise VolumeIndexError(
            f"volume={volume} was given but '{p}' is a single volume of shape {arr.shape}; "
            "omit volume= (or pass 0)."
        )
    return arr


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_suffix(p: Path) -> str:
    name = p.name.lower()
    for ext in WRITE_FORMATS:
        if name.endswith(ext):
            return ext
    ext = _suffix(p)
    raise UnsupportedFormatError(
        f"cannot write '{p}': unsupported extension '{ext}'. Supported: {', '.join(WRITE_FORMATS)}."
    )


def _to_numpy(array: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(array, torch.Tensor):
            return array.detach().as_subclass(torch.Tensor).cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(array)


def _layout(arr: np.ndarray, space: Space, p: Path) -> np.ndarray:
    """Return ``(*shape)`` or, for channel-first multi-volume input, ``(*shape, T)``."""
    if arr.shape == space.shape:
        return arr
    if arr.ndim == space.ndim + 1 and arr.shape[1:] == space.shape:
        if arr.shape[0] == 1:
            return arr[0]
        return np.moveaxis(arr, 0, -1)
    raise UnwritableImageError(
        f"cannot write '{p}': array of shape {arr.shape} does not fit the grid of shape "
        f"{space.shape}; expected {space.shape} or channel-first (T, *{space.shape})."
    )


def _cast(arr: np.ndarray, dtype: Any, p: Path) -> np.ndarray:
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(np.uint8)
    if kind == "f":
        return arr.astype(np.float32, copy=False)
    if kind in "iu" and arr.dtype.itemsize == 8:
        if arr.size == 0 or (arr.min() >= np.iinfo(np.int32).min and arr.max() <= np.iinfo(np.int32).max):
            return arr.astype(np.int32)
        raise UnwritableImageError(
            f"cannot write '{p}': {arr.dtype} values exceed the int32 range; pass dtype= explicitly."
        )
    if kind in "iu":
        return arr
    raise UnwritableImageError(
        f"cannot write '{p}': unsupported array dtype {arr.dtype}; expected numbers or booleans."
    )


def _like_header(like: Any) -> Any:
    """The NIfTI header of ``like`` (a path or nibabel image), or None when it has none."""
    if like is None:
        return None
    if hasattr(like, "header") and hasattr(like, "affine"):
        hdr = like.header
    else:
        p = _check_exists(like)
        if p.is_dir() or _suffix(p) not in _NIFTI:
            logger.debug("like=%s is not NIfTI; using default sform/qform codes", p)
            return None
        hdr = _load_nifti(p).header
    return hdr if "sform_code" in hdr else None


def _descrip_bytes(descrip: str) -> bytes:
    raw = str(descrip).encode("utf-8")
    if len(raw) > 80:
        raw = raw[:80].decode("utf-8", errors="ignore").encode("utf-8")  # no broken characters
        logger.debug("descrip truncated to 80 bytes: %r", raw)
    return raw


def _output_codes(like_header: Any) -> tuple[int, int]:
    """The sform and qform codes of a written NIfTI, before the shear rule (see the module docstring).

    Parameters
    ----------
    like_header : nibabel NIfTI header or None
        The source's header (``like=``), or None.

    Returns
    -------
    (int, int)
        ``(sform_code, qform_code)``: the source's codes, a 0 replaced by the other code, both 0
        (or no source) giving ``(1, 1)``.
    """
    if like_header is None:
        return 1, 1
    scode, qcode = int(like_header["sform_code"]), int(like_header["qform_code"])
    if scode == 0 and qcode == 0:
        logger.info("like= has sform and qform codes 0; writing codes 1 (scanner) so the affine is used")
        return 1, 1
    if scode == 0 or qcode == 0:
        logger.debug("like= has codes (%d, %d); a code 0 takes the other code", scode, qcode)
    return (scode or qcode), (qcode or scode)


def _nifti_image(arr: np.ndarray, space: Space, like: Any, descrip: str | None) -> Any:
    import nibabel as nib

    affine = space.affine
    img = nib.Nifti1Image(arr, affine)
    hdr = img.header
    units: tuple[Any, Any] = ("mm", None)
    lh = _like_header(like)
    if lh is not None:
        units = lh.get_xyzt_units()
    scode, qcode = _output_codes(lh)
    img.set_sform(affine, code=scode)
    if not space.is_sheared:
        img.set_qform(affine, code=qcode)
        qform = np.asarray(hdr.get_qform(), dtype=np.float64)
        if _corner_distance(qform, affine, space.shape) > _placement_tolerance(affine, space.ndim):
            qcode = 0  # nearly sheared: the quaternion cannot reproduce the affine
    else:
        qcode = 0
    if qcode == 0:
        # the qform cannot hold this affine: only the sform carries it (viewers then use the sform)
        img.set_qform(None, code=0)
        logger.debug("sheared affine: stored in the sform only (qform code 0)")
    xyz, t = units
    hdr.set_xyzt_units(xyz=xyz if xyz is not None else "unknown", t=t if t is not None else "unknown")
    if descrip is not None:
        hdr["descrip"] = _descrip_bytes(descrip)
    return img


def _itk_image(arr: np.ndarray, space: Space, p: Path) -> Any:
    import SimpleITK as sitk

    if space.is_sheared:
        raise UnwritableImageError(
            f"cannot write '{p}': the grid's affine is sheared (voxel axes not orthogonal), which "
            "SimpleITK formats cannot store; write NIfTI (.nii.gz) instead."
        )
    nd = space.ndim
    lps = ras_to_lps(space.affine)
    if nd == 2 and not (np.allclose(lps[2, :2], 0) and np.allclose(lps[:2, 2], 0)):
        raise UnwritableImageError(
            f"cannot write '{p}': the 2D grid is not in the x-y world plane, which a 2D SimpleITK "
            "image cannot describe; write NIfTI instead."
        )
    multi = arr.ndim == nd + 1
    order = list(range(nd))[::-1] + ([nd] if multi else [])
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(order)), isVector=multi)
    spacing = np.linalg.norm(lps[:nd, :nd], axis=0)
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in lps[:nd, 3]])
    img.SetDirection([float(v) for v in (lps[:nd, :nd] / spacing).ravel()])
    return img


def write(
    path: str | os.PathLike,
    array: Any,
    space: Any,
    *,
    like: Any = None,
    dtype: Any = None,
    descrip: str | None = None,
) -> Path:
    """Write ``array`` on grid ``space`` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii.gz`` / ``.nii`` (nibabel) or ``.nrrd`` / ``.mha`` (SimpleITK, converted to LPS).
    array : numpy.ndarray or torch.Tensor, shape (*space.shape) or (T, *space.shape)
        Channel-first multi-volume data (e.g. one map per class) is stored as a 4D NIfTI
        ``(I, J, K, T)`` (a multi-component image for SimpleITK formats); ``T == 1`` is stored
        as a single 3D volume.
    space : Space or anything :meth:`Space.of` accepts
        Grid of ``array``; its affine becomes both sform and qform (NIfTI), so that every viewer
        places the image in the same place. A sheared affine, which the qform cannot hold, is
        stored in the sform only (qform code 0).
    like : str, os.PathLike or nibabel image, optional
        NIfTI whose sform/qform codes and xyzt units are copied (its affine is not used). Without
        it (or for a ``like`` that is not NIfTI), both codes are 1 (scanner) and units mm. A code
        of 0 in ``like`` takes the other code (an affine under code 0 is ignored by viewers); both
        0 give 1 and 1. The same rule holds for every image written, heatmaps and masks alike.
    dtype : numpy dtype, optional
        Stored type. Default: float -> float32, bool -> uint8, int64 -> int32, other integers as is.
    descrip : str, optional
        NIfTI ``descrip`` field (e.g. method, layer, class); UTF-8, truncated to 80 bytes.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UnsupportedFormatError
        (ValueError) extension not in :data:`WRITE_FORMATS`.
    UnwritableImageError
        (ImageWriteError, ValueError) array shape does not fit ``space``; sheared grid for a
        SimpleITK format.
    OutputDirectoryError, OutputPermissionError
        (FileNotFoundError / PermissionError) missing or non-writable directory.
    ImageWriteError
        (OSError) the library failed to write. In every case no file (and no temporary file) is
        left at ``path``.
    """
    p = Path(os.fspath(path)).expanduser()
    ext = _write_suffix(p)
    space = Space.of(space)
    arr = _cast(_layout(_to_numpy(array), space, p), dtype, p)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputDirectoryError(
            f"cannot write '{p}': directory '{parent}' does not exist; create it first."
        )
    if p.is_dir():
        raise UnwritableImageError(f"cannot write '{p}': it is an existing directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPermissionError(
            f"cannot write '{p}': directory '{parent}' is not writable; choose another output "
            "directory or fix its permissions."
        )
    # Build the image first: invalid data fails before anything touches the disk.
    img = _nifti_image(arr, space, like, descrip) if ext in _NIFTI else _itk_image(arr, space, p)
    if like is not None and ext not in _NIFTI:
        logger.debug("like= is ignored for %s output", ext)

    tmp = parent / f".{p.name}.{secrets.token_hex(4)}.tmp{ext}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        os.close(fd)
    except PermissionError as e:
        raise OutputPermissionError(
            f"cannot write '{p}': no permission to create files in '{parent}' ({e.strerror}); "
            "choose another output directory or fix its permissions."
        ) from None
    try:
        if ext in _NIFTI:
            import nibabel as nib

            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            sitk.WriteImage(img, str(tmp), True)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, PermissionError):
            raise OutputPermissionError(f"cannot write '{p}': {e}") from e
        if isinstance(e, Exception) and not isinstance(e, ImageWriteError):
            reason = _itk_reason(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
            raise ImageWriteError(f"could not write '{p}': {reason}") from e
        raise
    logger.debug("wrote %s %s %s", p, arr.shape, arr.dtype)
    return p
