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
  SimpleITK opens anything. Lines end where the readers end them (``\n`` or ``\r\n``); a header
  holding a bare carriage return (``\r``, which ends a line for the NRRD reader and for MetaIO's
  keys but not for MetaIO's values) or a NUL byte is refused: readers would disagree on its lines,
  so no check could see every line each reader sees. DICOM files reached through links leading
  out of the folder are refused the same way.
- **Size.** The voxel bytes a header claims are compared with what the file can hold before
  anything is allocated: its size for raw data (NIfTI, MetaImage, NRRD, each file of a DICOM
  series in a native transfer syntax), 1032 times its size for gzip/zlib data (the most deflate
  can expand). Reading more than ``max_bytes`` (16 GiB by default) is refused, and so is a
  compressed file (gzip NIfTI, compressed MetaImage/NRRD, DICOM in a compressed transfer syntax)
  that would make reading allocate more than ``max_expansion`` (100) times its own size, beyond
  the first :data:`EXPANSION_FREE_BYTES` (1 GiB): a tiny file that expands to gigabytes is a
  decompression bomb far more often than a scan. A DICOM folder may hold at most ``max_slices``
  (5000) files, counted before any is opened (every file's header is read, a few ms each). A
  4D file read with ``volume=`` loads only that volume. All: :class:`ImageTooLargeError`.
- **Geometry.** DICOM slices must share one orientation, one in-plane size and spacing, and lie
  evenly spaced along the slice normal, without duplicates, gaps or in-plane drift (tolerance 1 %
  of the slice spacing plus 1e-3 mm); otherwise :class:`GeometryError`, unless
  ``allow_uneven_slices=True``. Each file's PixelSpacing must hold two positive sizes, and its
  ImageOrientationPatient six numbers: two unit vectors (within 1e-3) at right angles (cosine
  within 1e-3), never silently replaced or orthonormalised (:class:`GeometryError` always). The
  grid of a DICOM series is built from these headers by one function, for :func:`read` and
  :func:`describe` alike. Voxel sizes must be finite, positive and between :data:`MIN_VOXEL_MM`
  and ``max_voxel_mm`` (:data:`MAX_VOXEL_MM`, 100 mm: real scans have slices of at most a few
  cm); NIfTI ``pixdim`` values that nibabel would silently replace (0, -0, negative) are refused
  when the qform or the default affine uses them. A singular voxel -> world matrix (a zero
  TransformMatrix or NRRD space directions) is refused by name.
- **Voxel types.** Complex and RGB (structured) voxels are refused (:class:`ImageReadError`):
  medcam3d explains scalar intensity images.

NIfTI header codes written
--------------------------
:func:`write` stores the grid's affine in both the sform and the qform, so that every viewer
(nibabel prefers the sform, ITK-based viewers may read the qform) places the image in the same
place. The affine, the codes and the units are set in one place, :func:`set_nifti_geometry`, which
every NIfTI writer of medcam3d calls (the codes come from :func:`_output_codes`):

- without ``like`` (or a ``like`` that is not NIfTI): sform code 1 and qform code 1 (scanner);
- with a NIfTI ``like``: its codes are copied; a code of 0 in the source takes the other code
  (an affine stored under code 0 is ignored by viewers); both 0 become 1 and 1;
- the qform cannot hold shear: for a sheared grid (or one the quaternion cannot reproduce within
  1e-3 mm plus 1 % of a voxel) the qform code is 0 and only the sform carries the affine;
- the xyzt units are copied from a NIfTI ``like``, else mm.

The same rule applies to every image written (heatmaps streamed by
:func:`medcam3d.heatmap.save_scan_maps` and their ``_norm`` copies, feature-grid maps, masks,
segmentations, copies of scans, the napari writers, :class:`medcam3d.monai.SaveHeatmapsd`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import numpy as np

from ._files import atomic_write, is_inside
from .errors import _IMAGE_ERRORS, UsageError
from .errors import ImageReadError, ImageNotFoundError, UnsupportedFormatError, VolumeError, VolumeIndexError, NonFiniteError, ImageWriteError, UnwritableImageError, OutputPermissionError, OutputDirectoryError, ShearWarning, SpaceError, GeometryError, ImageTooLargeError, UntrustedFileError  # noqa: F401  (re-exported)
from .orientation import lps_to_ras, ras_to_lps
from .space import Space

__all__ = [
    "read",
    "read_space",
    "read_volumes",
    "describe",
    "ImageInfo",
    "SeriesInfo",
    "write",
    "set_nifti_geometry",
    "lps_to_ras",
    "ras_to_lps",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "DEFAULT_MAX_BYTES",
    "LIMIT_FLAGS",
    "set_read_limits",
    "DEFAULT_MAX_EXPANSION",
    "EXPANSION_FREE_BYTES",
    "DEFAULT_MAX_SLICES",
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
#: Default ceiling on the memory reading a compressed file may take, as a multiple of the file's
#: size (beyond :data:`EXPANSION_FREE_BYTES`).
DEFAULT_MAX_EXPANSION = 100.0
#: Memory any compressed file may take whatever its size (1 GiB): empty masks and maps compress
#: more than 100:1 and are read without question up to this size.
EXPANSION_FREE_BYTES = 1024**3
#: Default ceiling on the number of files in a DICOM folder (each file's header is read).
DEFAULT_MAX_SLICES = 5000
#: Smallest voxel size (mm) accepted on reading (0.1 micrometre).
MIN_VOXEL_MM = 1e-4
#: Default largest voxel size (mm) accepted on reading: 100 mm. Clinical scans have voxels of at
#: most ~10-20 mm (thick CT slices), thick MR slabs reach a few cm.
MAX_VOXEL_MM = 100.0

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
# each ImageOrientationPatient vector must have length 1 and the two a dot product of 0, within this
_IOP_UNIT_TOL = 1e-3


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


@dataclass(frozen=True)
class _Limits:
    """The ceilings of one :func:`read` (see its parameters); ``None`` lifts one."""

    max_bytes: int | None = DEFAULT_MAX_BYTES
    max_expansion: float | None = DEFAULT_MAX_EXPANSION
    max_voxel_mm: float | None = MAX_VOXEL_MM
    max_slices: int | None = DEFAULT_MAX_SLICES


#: The command-line flag that sets each reading limit for a whole run (:func:`set_read_limits`).
LIMIT_FLAGS = {"max_bytes": "--max-image-bytes", "max_expansion": "--max-expansion",
               "max_voxel_mm": "--max-voxel-mm", "max_slices": "--max-slices"}
_DEFAULTS = {"max_bytes": DEFAULT_MAX_BYTES, "max_expansion": DEFAULT_MAX_EXPANSION,
             "max_voxel_mm": MAX_VOXEL_MM, "max_slices": DEFAULT_MAX_SLICES}
# Limits set for this process (the CLI's flags); they replace the defaults, not explicit arguments.
_RUN_LIMITS: dict[str, Any] = {}


def set_read_limits(**limits: Any) -> dict[str, Any]:
    """Set this process's default reading limits (what the CLI's ``--max-image-bytes``,
    ``--max-expansion``, ``--max-voxel-mm`` and ``--max-slices`` do).

    Every later :func:`read`, :func:`read_space`, :func:`describe` and :func:`read_volumes` call of
    this process (and of the DataLoader workers it forks) that leaves a limit at its default uses the
    value given here; ``None`` lifts that limit. Call with no arguments to go back to the defaults.

    Parameters
    ----------
    **limits
        Any of ``max_bytes``, ``max_expansion``, ``max_voxel_mm``, ``max_slices``.

    Returns
    -------
    dict
        The limits set before (pass them back to restore them).

    Raises
    ------
    UsageError
        An unknown name or a value that is not positive (or None).
    """
    unknown = sorted(set(limits) - set(_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown reading limit(s) {unknown}; expected any of {sorted(_DEFAULTS)}.")
    _limits(**limits)  # validates
    before = dict(_RUN_LIMITS)
    _RUN_LIMITS.clear()
    _RUN_LIMITS.update(limits)
    return before


def _run_limit(name: str, value: Any) -> Any:
    """``value``, or this run's limit where ``value`` is the default (:func:`set_read_limits`)."""
    if name in _RUN_LIMITS and value is not None and not isinstance(value, bool) and value == _DEFAULTS[name]:
        return _RUN_LIMITS[name]
    return value


def _lift(name: str) -> str:
    """How to lift one limit: the CLI flag and the Python argument."""
    return f"{LIMIT_FLAGS[name]} on the command line, {name}= to medcam3d.io.read"


def _limits(max_bytes: Any = DEFAULT_MAX_BYTES, max_expansion: Any = DEFAULT_MAX_EXPANSION,
            max_voxel_mm: Any = MAX_VOXEL_MM, max_slices: Any = DEFAULT_MAX_SLICES) -> _Limits:
    """Check the limit arguments of :func:`read` (a :class:`UsageError` names a wrong one)."""
    max_bytes, max_expansion = _run_limit("max_bytes", max_bytes), _run_limit("max_expansion", max_expansion)
    max_voxel_mm, max_slices = _run_limit("max_voxel_mm", max_voxel_mm), _run_limit("max_slices", max_slices)

    def positive(name: str, value: Any, integer: bool) -> Any:
        if value is None:
            return None
        kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
            what = "a positive int" if integer else "a positive number"
            raise UsageError(f"{name} must be {what} or None (no limit), got {value!r}.")
        return int(value) if integer else float(value)

    voxel = positive("max_voxel_mm", max_voxel_mm, False)
    if voxel is not None and voxel < MIN_VOXEL_MM:
        raise UsageError(f"max_voxel_mm must be at least MIN_VOXEL_MM={MIN_VOXEL_MM:g}, got {max_voxel_mm!r}.")
    return _Limits(positive("max_bytes", max_bytes, True), positive("max_expansion", max_expansion, False),
                   voxel, positive("max_slices", max_slices, True))


def _out_itemsize(dtype: Any, stored_itemsize: int) -> int:
    return stored_itemsize if dtype is None else np.dtype(dtype).itemsize


def _check_allocation(p: Path, need: int, what: str, limits: _Limits, compressed: int | None = None) -> None:
    """Refuse to read when about ``need`` bytes would be allocated and that exceeds a limit.

    ``compressed`` is the size (bytes) of the compressed data the voxels come from (None for raw
    data): reading it may take at most ``max(EXPANSION_FREE_BYTES, max_expansion * compressed)``.
    """
    max_bytes = limits.max_bytes
    if max_bytes is not None and need > max_bytes:
        suggestion = 1 << max(int(need - 1).bit_length(), 0)
        raise ImageTooLargeError(
            f"reading '{p}' would allocate about {need} bytes ({_fmt_bytes(need)}) for {what}, more than "
            f"max_bytes={max_bytes} ({_fmt_bytes(max_bytes)}). If the image is that large and you have the "
            f"memory, raise the limit ({_lift('max_bytes')}; e.g. {suggestion}), or set it to none for no "
            "limit; otherwise the header is wrong: export the image again."
        )
    ratio = limits.max_expansion
    if compressed is None or ratio is None or need <= max(EXPANSION_FREE_BYTES, ratio * max(compressed, 1)):
        return
    factor = need / max(compressed, 1)
    raise ImageTooLargeError(
        f"reading '{p}' would allocate about {_fmt_bytes(need)} for {what} from {_fmt_bytes(compressed)} of "
        f"compressed data ({factor:.0f} times its size), more than max_expansion={ratio:g} times its size "
        f"(and more than {_fmt_bytes(EXPANSION_FREE_BYTES)}): such a small file that expands this much is "
        "more often a decompression bomb than a scan. If you trust the file and have the memory, pass "
        f"raise the limit to {math.ceil(factor)} or none ({_lift('max_expansion')})."
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


def _check_voxel_sizes(p: Path, sizes: Any, source: str, max_mm: float | None = MAX_VOXEL_MM) -> None:
    """Refuse voxel sizes that are not finite, not positive, or outside the accepted range."""
    max_mm = _run_limit("max_voxel_mm", max_mm)
    top = math.inf if max_mm is None else float(max_mm)
    for axis, v in enumerate(np.asarray(sizes, dtype=np.float64).ravel()):
        if not math.isfinite(v):
            reason = f"is {v}"
        elif v == 0.0:
            reason = "is 0" + (" (-0.0)" if math.copysign(1.0, v) < 0 else "")
        elif v < 0:
            reason = f"is negative ({v:g}); a voxel size must be positive (the direction carries the sign)"
        elif v < MIN_VOXEL_MM:
            reason = f"is {v:g} mm, below {MIN_VOXEL_MM:g} mm"
        elif v > top:
            raise GeometryError(
                f"'{p}': the voxel size along axis {axis} ({source}) is {v:g} mm, more than max_voxel_mm={top:g}. "
                f"Expected a finite size between {MIN_VOXEL_MM:g} and {top:g} mm: real scans have voxels of at most "
                "a few cm, so the header is wrong (or not in mm). Fix the spacing in the header, or if the size "
                f"is right raise the limit ({_lift('max_voxel_mm')}; none lifts it)."
            )
        else:
            continue
        raise GeometryError(
            f"'{p}': the voxel size along axis {axis} ({source}) {reason}. Expected a finite size "
            f"between {MIN_VOXEL_MM:g} and {top:g} mm, so positions in mm cannot be trusted "
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
    if isinstance(path, (str, bytes)) and not path.strip():
        raise ImageNotFoundError(
            f"no image path given (the path is {'empty' if not path else repr(path)}); expected an image "
            f"file ({', '.join(READ_FORMATS)}) or a DICOM folder."
        )
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
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
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


def _volume_index(p: Path, shape: tuple[int, ...], volume: int | str, max_volumes: int | None = None) -> int | None:
    """Check ``volume`` against a header's full shape before any voxel is read.

    Parameters
    ----------
    shape : tuple of int
        ``(I, J[, K][, ...])`` with any axes beyond the third (4D volumes, vector components).
    volume : int, "one" or "all"
        An index, "one" (``read(volume=None)``: a single volume is required) or "all".

    Returns
    -------
    int or None
        The non-negative index of the volume to read, or None for a single volume (or "all").
    """
    extra = [n for n in shape[3:] if n != 1]
    if len(extra) > 1:
        raise ImageReadError(
            f"'{p}' has shape {tuple(shape)}; expected a 3D image or a 4D image (I, J, K, T)."
        )
    n = extra[0] if extra else 1
    if volume == "all":
        if max_volumes is not None and n > max_volumes:
            raise VolumeError(
                f"'{p}' holds {n} volumes, more than max_volumes={max_volumes}; expected at most {max_volumes}. "
                "Read one volume with medcam3d.io.read(path, volume=<index>), or pass a larger max_volumes."
            )
        return None
    if extra:
        if volume == "one":
            raise VolumeError(
                f"'{p}' is 4D with shape {tuple(shape)} ({n} volumes) but a 3D image is needed; "
                f"pass volume=<index> (0 to {n - 1}) to choose one."
            )
        assert isinstance(volume, int)
        if not -n <= volume < n:
            raise VolumeIndexError(
                f"volume={volume} is out of range for '{p}', which has {n} volumes "
                f"(shape {tuple(shape)}); expected 0 to {n - 1}."
            )
        return volume % n
    if volume not in ("one", 0, -1):
        raise VolumeIndexError(
            f"volume={volume} was given but '{p}' is a single volume of shape {tuple(shape)}; "
            "omit volume= (or pass 0)."
        )
    return None


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


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) >= 3 else tuple(shape)


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


def _series_info(p: Path, uid: str, slices: list[_Slice], max_voxel_mm: float | None, alone: bool) -> SeriesInfo:
    """One series for :func:`describe`: its grid from :func:`_dicom_geometry` (what :func:`read` uses).

    A series whose headers :func:`read` would refuse outright (malformed tags, absurd voxel sizes)
    raises when it is the folder's only series (``alone``), else its ``problem`` says why.
    """
    first = slices[0]
    depth = sum(int(s.size[2]) if len(s.size) > 2 else 1 for s in slices)
    shape = (int(first.size[0]), int(first.size[1]), depth)
    colour = next((s.colour for s in slices if s.colour), None)
    try:
        _, affine, problem = _dicom_geometry(p, uid, slices, max_voxel_mm)
        if affine is not None:
            _check_voxel_sizes(p, np.linalg.norm(affine[:3, :3], axis=0), f"series {uid}, from its headers", max_voxel_mm)
    except GeometryError as e:
        if alone and colour is None:
            raise
        affine, problem = None, str(e)
    return SeriesInfo(uid, first.description, first.modality, len(slices), shape, _voxel_sizes(affine, 3),
                      _axcodes(affine, 3), affine, colour or problem)


def _series_reader(p: Path, limits: _Limits) -> tuple[Any, list[str]]:
    """SimpleITK's series reader for the DICOM folder ``p``, and the UIDs of the series it holds (at least one)."""
    import SimpleITK as sitk

    _check_dicom_folder_size(p, limits.max_slices)
    reader = sitk.ImageSeriesReader()
    ids = list(_sitk_run(lambda: reader.GetGDCMSeriesIDs(str(p))))
    if not ids:
        raise ImageReadError(
            f"'{p}' is a directory but holds no DICOM series; expected a directory of DICOM files "
            f"of one series, or an image file ({', '.join(READ_FORMATS)})."
        )
    return reader, ids


def _series_files(reader: Any, p: Path, uid: str) -> list[str]:
    """The files of series ``uid`` in folder ``p``, as GDCM sorts them."""
    return list(_sitk_run(lambda: reader.GetGDCMSeriesFileNames(str(p), uid)))


def _check_dicom_folder_size(p: Path, max_slices: int | None) -> None:
    """Refuse a folder of more than ``max_slices`` files before GDCM opens each of them."""
    if max_slices is None:
        return
    count = 0
    try:
        with os.scandir(p) as entries:
            for entry in entries:
                try:
                    count += entry.is_file()
                except OSError:
                    continue
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ImageReadError(f"could not list the DICOM folder '{p}': {e.strerror or e}") from None
    if count > max_slices:
        raise ImageTooLargeError(
            f"'{p}' holds {count} files, more than max_slices={max_slices}: reading a DICOM folder opens "
            "every file in it (a few ms each), and a 3D series has at most a few thousand slices. Put each "
            "series in its own folder; if this really is one series, raise the limit "
            f"({_lift('max_slices')}; none lifts it)."
        )


def _describe_dicom(p: Path, trust: bool, limits: _Limits) -> ImageInfo:
    reader, ids = _series_reader(p, limits)
    header_reader = _dicom_header_reader()
    series = []
    for uid in ids:
        files = _series_files(reader, p, uid)
        _check_dicom_links(p, files, trust)
        slices = [_dicom_slice(p, f, header_reader, False, limits.max_voxel_mm) for f in files]
        _check_dicom_sizes(p, uid, slices, None, limits)
        series.append(_series_info(p, uid, slices, limits.max_voxel_mm, alone=len(ids) == 1))
    if len(series) == 1:
        one = series[0]
        return ImageInfo(p, "DICOM", one.shape, None, 1, one.spacing, one.orientation, one.affine, tuple(series))
    return ImageInfo(p, "DICOM", None, None, 1, None, None, None, tuple(series))


def describe(
    path: str | os.PathLike,
    *,
    trust: bool = False,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> ImageInfo:
    """What an image file or DICOM folder holds, from its headers, without reading voxels.

    The header checks of :func:`read` that guard against hostile files apply (detached data
    files must stay in the header's folder, the header may not claim more data than the file
    holds, a compressed file may not expand beyond ``max_expansion``, DICOM files may not be links
    out of the folder, DICOM folders hold at most ``max_slices`` files, voxel sizes must make
    sense), so a file that passes can be handed to another reader (a MONAI bundle's
    ``LoadImaged``). A DICOM series' grid is built by the same code as :func:`read`'s. Problems
    that only stop :func:`read` from assembling a DICOM series (uneven slices, colour pixels) are
    reported in :attr:`SeriesInfo.problem` instead of raised, and so are malformed headers of one
    series of a folder that holds several (a folder of one such series raises, as :func:`read`).

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`read`.
    trust, max_expansion, max_voxel_mm, max_slices : optional
        As for :func:`read` (``max_expansion`` counts the stored voxels plus a float32 copy).

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
    limits = dataclasses.replace(_limits(None, max_expansion, max_voxel_mm, max_slices), max_bytes=None)
    p = _check_exists(path)
    kind = _kind(p)
    with _native_messages(p):
        if kind == "dicom":
            return _describe_dicom(p, trust, limits)
        if kind == "nifti":
            img = _load_nifti(p)
            affine = _nifti_affine(p, img, limits.max_voxel_mm)
            _check_nifti_size(p, img, np.float32, limits, None)
            _space_for(p, _spatial_shape(tuple(img.shape)), affine, limits.max_voxel_mm)
            return _image_info(p, "NIfTI", tuple(img.shape), str(np.dtype(img.header.get_data_dtype())), affine)
        info = _itk_info(p, trust, limits.max_voxel_mm)
        _check_itk_size(p, info, np.float32, limits, None)
        _space_for(p, info.size[: min(info.dim, 3)], info.affine, limits.max_voxel_mm)
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


def _nifti_affine(p: Path, img: Any, max_voxel_mm: float | None = MAX_VOXEL_MM) -> np.ndarray:
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
        _check_voxel_sizes(p, np.asarray(raw["pixdim"], dtype=np.float64)[1 : 1 + nd], source, max_voxel_mm)
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
                    "qform (ITK-based ones such as 3D Slicer) place the image elsewhere (sform %s, "
                    "qform %s). Rewrite the file with medcam3d.io.write (or fix the header) so that "
                    "both hold the same affine.",
                    p, scode, qcode, dist, _fmt_matrix(sform), _fmt_matrix(qform),
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


def _fmt_matrix(matrix: np.ndarray) -> str:
    """A matrix on one line: ``[[1, 0, 0, 0]; [0, 1, 0, 0]; ...]``."""
    return "[" + "; ".join("[" + ", ".join(f"{float(v):.4g}" for v in row) + "]" for row in np.asarray(matrix)) + "]"


def _check_nifti_size(p: Path, img: Any, dtype: Any, limits: _Limits, volume: int | None) -> None:
    """Refuse a header that claims more voxel bytes than the file can hold or than the limits allow.

    ``volume`` is the one volume of a 4D file that will be read (None: all of it).
    """
    from nibabel.spatialimages import HeaderDataError

    hdr = img.header
    stored = np.dtype(hdr.get_data_dtype())
    n = math.prod(int(v) for v in img.shape)
    claimed = n * stored.itemsize
    what = f"shape {tuple(img.shape)}, {stored}"
    offset = int(hdr.get_data_offset())
    size = p.stat().st_size
    compressed = _suffix(p) == ".nii.gz"
    if compressed:
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
    if volume is not None:  # one volume of a 4D file is read (nibabel slices the file)
        n = math.prod(int(v) for v in img.shape[:3])
        what = f"volume {volume} of shape {tuple(img.shape)}, {stored}"
    read = n * stored.itemsize
    # the stored bytes, plus the converted copy when the type changes or scaling applies (in float64 for a slice)
    if out_dtype == stored and not scaled:
        need = read
    else:
        need = read + n * out_dtype.itemsize + (n * 8 if scaled and volume is not None else 0)
    _check_allocation(p, need, what, limits, size if compressed else None)


def _nifti_volume_slicer(shape: tuple[int, ...], index: int) -> tuple[Any, ...]:
    """The index of volume ``index`` along the one non-singleton axis beyond the third."""
    return (slice(None),) * 3 + tuple(index if n != 1 else 0 for n in shape[3:])


def _read_nifti(p: Path, dtype: Any, volume: int | str, limits: _Limits,
                max_volumes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (one volume, or every volume channel-first for ``volume="all"``) and the affine."""
    img = _load_nifti(p)
    shape = tuple(int(n) for n in img.shape)
    _check_nifti_voxel_type(p, np.dtype(img.header.get_data_dtype()))
    affine = _nifti_affine(p, img, limits.max_voxel_mm)
    index = _volume_index(p, shape, volume, max_volumes)
    _check_nifti_size(p, img, dtype, limits, index)
    try:
        if index is not None:
            part = img.dataobj[_nifti_volume_slicer(shape, index)]
            arr = np.asanyarray(part) if dtype is None else np.asarray(part, dtype=np.dtype(dtype))
        elif dtype is None:
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
    arr = np.asarray(arr)
    if index is None and arr.ndim > 3:  # drop singleton axes beyond the spatial ones, e.g. (I, J, K, 1, C)
        arr = arr.reshape(arr.shape[:3] + tuple(n for n in arr.shape[3:] if n != 1))
    if volume == "all":
        arr = arr[..., np.newaxis] if arr.ndim == 3 else arr
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[np.newaxis]
    return arr, affine


# ------------------------------------------------------------------------------ MetaImage / NRRD headers


@dataclass(frozen=True)
class _DataFile:
    """Where the voxel data of a MetaImage/NRRD file is, as its header says."""

    path: Path | None  # the data file (None: in the header file itself, or several files)
    offset: int  # bytes of header before the data, when the data is in the header file
    multiple: bool  # a list or pattern of data files
    encoding: str  # "raw", "deflate" (gzip/zlib), "bzip2", "ascii", "hex" or "other"


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
        if not is_inside(target, p.parent):
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


def _ambiguous_header(p: Path, what: str, expected: str = "one plain data-file line") -> ImageReadError:
    return ImageReadError(
        f"'{p}': {what}. Expected {expected}; a header that different readers could "
        "understand differently is refused. Export the image again (or write it as .nii.gz)."
    )


_BARE_CR = re.compile(rb"\r(?!\n)")


def _check_line_ends(p: Path, header: bytes) -> None:
    """Refuse a header holding a bare CR or a NUL byte (see the module docstring)."""
    cr = _BARE_CR.search(header)
    if cr is not None:
        line = header.count(b"\n", 0, cr.start()) + 1
        raise _ambiguous_header(
            p, f"line {line} of its header holds a bare carriage return (CR, byte {cr.start()}), not followed by "
            "a line feed; the NRRD reader ends a line there, MetaIO ends a key but not a value there, and "
            "medcam3d's check would see other lines than the reader", "lines ending in LF or CR LF")
    if b"\0" in header:
        raise _ambiguous_header(p, f"its header holds a NUL byte (byte {header.index(0)})",
                                "a text header: C readers end a value at a NUL byte, medcam3d would not")


# MetaIO reads keys case-sensitively, skips any run of '=', ':', spaces and tabs after the key and
# takes the rest of that line as the value; it stops reading the header at ElementDataFile.
_META_DATAFILE = re.compile(rb"(?i)elementdatafile")
_META_VALUE = re.compile(rb"[ \t]*[=:][ \t=:]*([^\r\n]*)")
_META_FIELD = re.compile(r"\s*(\w+)\s*[=:][\s=:]*(.*)$")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# MetaIO fields holding one number per dimension, or a dimension x dimension matrix
_META_PER_AXIS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation")
_META_MATRIX = ("TransformMatrix", "Rotation", "Orientation")


def _metaimage_fields(header: bytes) -> dict[str, str]:
    fields = {}
    for line in header.decode("latin-1").split("\n"):
        m = _META_FIELD.match(line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def _check_metaimage_fields(p: Path, fields: dict[str, str]) -> None:
    """Name what is wrong with NDims, per-axis fields and the direction matrix (MetaIO only says
    'No such file or directory' when it cannot parse a header)."""
    text = fields.get("NDims")
    if text is None:
        raise ImageReadError(f"'{p}' has no NDims line; expected a MetaImage header with 'NDims = 3' (or 2, 4).")
    if not re.fullmatch(r"\d+", text) or not 2 <= int(text) <= 5:
        raise ImageReadError(
            f"'{p}': NDims = {text[:40]}; expected 2 to 5 dimensions (medcam3d reads 2D and 3D images and "
            "4D stacks of volumes). The header is corrupt or not a MetaImage image header."
        )
    ndims = int(text)
    for key in _META_PER_AXIS + _META_MATRIX:
        if key not in fields:
            continue
        values = fields[key].split()
        expected = ndims * ndims if key in _META_MATRIX else ndims
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = []
        if len(values) != expected or len(numbers) != expected:  # (finiteness: the voxel size and direction checks)
            raise ImageReadError(
                f"'{p}': {key} = {fields[key][:80]!r} but NDims = {ndims}; expected {expected} numbers "
                f"({'a ' + str(ndims) + ' x ' + str(ndims) + ' matrix' if key in _META_MATRIX else 'one per dimension'}). "
                "The header is corrupt: export the image again."
            )
        if key == "DimSize" and not all(math.isfinite(v) and v >= 1 and v == int(v) for v in numbers):
            raise ImageReadError(f"'{p}': DimSize = {fields[key][:80]!r}; expected {ndims} positive whole numbers.")
        if key in _META_MATRIX:
            _check_direction(p, np.array(numbers).reshape(ndims, ndims), f"{key} = {fields[key][:80]}")


def _check_direction(p: Path, direction: np.ndarray, what: str) -> None:
    """Refuse a singular direction matrix (a zero or repeated axis): no voxel -> world mapping."""
    d = np.asarray(direction, dtype=np.float64)
    norms = np.linalg.norm(d, axis=0)
    if not np.all(np.isfinite(d)) or np.any(norms < 1e-6) or abs(np.linalg.det(d / np.where(norms > 0, norms, 1))) < 1e-6:
        raise GeometryError(
            f"'{p}': the direction matrix ({what}) is singular (determinant 0): some voxel axis has no "
            "direction or repeats another, so voxels have no place in space. Expected independent axis "
            "directions (e.g. the identity, '1 0 0 0 1 0 0 0 1'); fix the header or export the image again."
        )


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
    line_end = head.find(b"\n", match.end())
    offset = len(head) if line_end < 0 else line_end + 1
    _check_line_ends(p, head[:offset])  # MetaIO reads no further than the ElementDataFile line
    line_start = head.rfind(b"\n", 0, match.start()) + 1
    if head[match.start() : match.end()] != b"ElementDataFile" or head[line_start : match.start()].strip():
        shown = head[line_start : match.end()].decode("latin-1").strip()
        raise _ambiguous_header(p, f"'{shown}' is not a plain 'ElementDataFile' key at the start of a line")
    value_match = _META_VALUE.match(head, match.end())
    if value_match is None:
        raise _ambiguous_header(p, "the ElementDataFile key has no '=' on its line")
    raw = value_match.group(1)
    if _CONTROL.search(raw):
        raise _ambiguous_header(p, f"the ElementDataFile value {raw.decode('latin-1')!r} holds control characters")
    value = os.fsdecode(raw.strip(b" \t"))
    fields = _metaimage_fields(head[:line_start])
    _check_metaimage_fields(p, fields)
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
# teem (airOneLine) ends a line at LF, CR LF or a bare CR
_LINE_END = re.compile(rb"\r\n|\n|\r")


def _nrrd_lines(p: Path, head: bytes) -> Iterator[tuple[str, int]]:
    """The header lines of a NRRD file as teem reads them, each with the offset after its line end.

    A bare CR (which teem takes as a line end) or a NUL byte in a line is refused, so every line
    seen here is a line teem sees, and the other way round.
    """
    pos = 0
    while pos < len(head):
        m = _LINE_END.search(head, pos)
        if m is None:
            if len(head) > _MAX_HEADER_BYTES:
                raise _too_long_header(p, "end of the NRRD header (a blank line)")
            line, end = head[pos:], len(head)
        else:
            line, end = head[pos : m.start()], m.end()
            if m.group() == b"\r":
                _check_line_ends(p, head[: m.end() + 1])
        _check_line_ends(p, line)
        yield line.decode("latin-1"), end
        pos = end


def _parse_nrrd(p: Path, trust: bool) -> _DataFile:
    head = _header_bytes(p)
    if not head.startswith(b"NRRD"):
        raise ImageReadError(f"'{p}' does not start with 'NRRD'; expected a NRRD header. The file is corrupt or not NRRD.")
    lines = _nrrd_lines(p, head)
    _, pos = next(lines)  # the magic line, NRRD000<n>
    encoding = "raw"
    colour: str | None = None
    values: list[str] = []
    for line, pos in lines:
        if not line:
            break  # the blank line ending the header; attached data follows
        if line.startswith("#"):
            continue
        m = _NRRD_DATAFILE.match(line)
        if m:
            if _CONTROL.search(m.group(1).encode("latin-1")):
                raise _ambiguous_header(p, f"the 'data file' value {m.group(1)!r} holds control characters")
            values.append(os.fsdecode(m.group(1).encode("latin-1").strip(b" \t\x0b\x0c")))
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


# ------------------------------------------------------------------------------ what the C++ readers print


class _NativeStderr:
    """The process's stderr (file descriptor 2) sent to a temporary file while SimpleITK runs.

    ITK, GDCM and MetaIO print warnings and errors straight to stderr (``std::cerr``), unseen by
    Python's logging and several lines each. While one or more threads are inside
    :func:`_sitk_run`, fd 2 points to one temporary file, and each call reads back what was
    written while it ran. Re-entrant and thread-safe: the first call in redirects, the last one
    out restores (Python's own logging between calls goes to the real stderr).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: int | None = None
        self._file: Any = None  # the temporary file, kept open for the life of the process
        self._fd: int | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:  # a child forked mid-call: give it its stderr back
        self._lock = threading.Lock()
        if self._saved is not None:
            try:
                os.dup2(self._saved, 2)
                os.close(self._saved)
            except OSError:  # pragma: no cover
                pass
        self._saved, self._depth = None, 0

    def enter(self) -> int | None:
        """Start (or join) the redirection: the file offset where this call's output starts (None: not captured)."""
        with self._lock:
            if self._depth == 0:
                self._start()
            self._depth += 1
            if self._saved is None or self._fd is None:
                return None
            return os.lseek(self._fd, 0, os.SEEK_END)

    def leave(self, mark: int | None) -> str:
        """What was written since ``mark``; the last call out restores stderr."""
        with self._lock:
            text = b""
            if mark is not None and self._saved is not None and self._fd is not None:
                end = os.lseek(self._fd, 0, os.SEEK_END)
                os.lseek(self._fd, mark, os.SEEK_SET)
                while len(text) < end - mark:
                    chunk = os.read(self._fd, end - mark - len(text))
                    if not chunk:
                        break
                    text += chunk
                os.lseek(self._fd, end, os.SEEK_SET)
            self._depth -= 1
            if self._depth == 0:
                self._stop()
            return text.decode("utf-8", "replace")

    def _start(self) -> None:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            if self._fd is None:
                self._file = tempfile.TemporaryFile(prefix="medcam3d-itk-")  # deleted when closed
                self._fd = self._file.fileno()
            self._saved = os.dup(2)
            os.dup2(self._fd, 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. pythonw): messages stay where they go
            if self._saved is not None:
                os.close(self._saved)
            self._saved = None

    def _stop(self) -> None:
        if self._saved is None:
            return
        try:
            os.dup2(self._saved, 2)
        finally:
            os.close(self._saved)
            self._saved = None
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)


_STDERR = _NativeStderr()
# messages of the C++ readers collected while one image is read (see _native_messages)
_COLLECTED: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("medcam3d_io_native", default=None)
# what ITK says about things medcam3d checks itself (and warns about in its own words)
_HANDLED = ("Non uniform sampling or missing slices detected",)
_LOCATION_LINE = re.compile(r"^(?:WARNING|Warning|ERROR|Error|Debug)\s*:\s*In\s+\S.*\bline\s+\d+")
_ADDRESS = re.compile(r"\s*\(0x[0-9a-fA-F]+\)")
_T = TypeVar("_T")


def _native_lines(text: str) -> list[str]:
    """The messages in what ITK/GDCM/MetaIO printed, one line each (source locations and addresses dropped)."""
    lines = []
    for raw in text.splitlines():
        if _LOCATION_LINE.match(raw.strip()):
            continue
        line = " ".join(_ADDRESS.sub("", raw).split())
        if line and line not in lines:
            lines.append(line)
    return lines


def _sitk_run(call: Callable[[], _T]) -> _T:
    """Run one SimpleITK call with its stderr captured.

    A ``RuntimeError`` is raised again with a one-line message that includes what the C++ readers
    printed; after a successful call their messages are kept for :func:`_native_messages` (or
    logged as one warning when no image read is under way).
    """
    mark = _STDERR.enter()
    try:
        result = call()
    except RuntimeError as e:
        raise RuntimeError(_itk_reason(e, _native_lines(_STDERR.leave(mark)))) from None
    except BaseException:
        _STDERR.leave(mark)
        raise
    lines = _native_lines(_STDERR.leave(mark))
    if lines:
        collected = _COLLECTED.get()
        if collected is None:
            logger.warning("SimpleITK: %s", "; ".join(lines))
        else:
            for line in lines:
                collected[line] = collected.get(line, 0) + 1
    return result


@contextlib.contextmanager
def _native_messages(p: Path) -> Iterator[None]:
    """Collect what the C++ readers print while ``p`` is read; log it as one warning at the end."""
    collected: dict[str, int] = {}
    token = _COLLECTED.set(collected)
    try:
        yield
    finally:
        _COLLECTED.reset(token)
        shown = [f"{line} (x{n})" if n > 1 else line for line, n in collected.items()
                 if not any(h in line for h in _HANDLED)]
        if shown:
            logger.warning("'%s': the image reader (ITK/GDCM/MetaIO) said: %s", p, "; ".join(shown)[:2000])
        elif collected:
            logger.debug("'%s': the image reader said: %s", p, "; ".join(collected))


def _itk_reason(e: BaseException, printed: list[str] | tuple[str, ...] = ()) -> str:
    """One line from a SimpleITK exception (and what the readers printed), without the C++ trace."""
    text = str(e)
    m = re.search(r"ITK ERROR:\s*(?:[\w:]+\s*\(0x[0-9a-fA-F]+\)\s*:\s*)?(.*)", text, re.S)
    if m:
        reason = m.group(1)
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(e).__name__
    reason = " ".join(reason.split()).rstrip(".")
    if printed:
        said = "; ".join(ln.rstrip(".") for ln in printed)
        if "No such file or directory" in reason and "Cannot parse file" in said:  # MetaIO's errno is stale
            reason = "MetaIO could not parse the header"
        reason = f"{reason} (the reader said: {said})"
    return reason if len(reason) <= 600 else reason[:597] + "..."


def _itk_affine(dim: int, direction: Any, spacing: Any, origin: Any) -> np.ndarray:
    sd = min(dim, 3)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:sd, :sd]
    lps = np.eye(4)
    lps[:sd, :sd] = d * np.asarray(spacing, dtype=np.float64)[:sd]
    lps[:sd, 3] = np.asarray(origin, dtype=np.float64)[:sd]
    return lps_to_ras(lps)


@functools.lru_cache(maxsize=64)
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


def _itk_info(p: Path, trust: bool, max_voxel_mm: float | None = MAX_VOXEL_MM) -> _ItkInfo:
    """Check a MetaImage/NRRD header (data file, voxel type, sizes, direction) without loading voxels."""
    import SimpleITK as sitk

    data = _data_file(p, trust)  # before SimpleITK opens anything
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        _sitk_run(reader.ReadImageInformation)
    except RuntimeError as e:
        raise ImageReadError(
            f"could not read the header of '{p}': {e}. The file may be truncated, "
            "corrupt, or not in the format its extension says."
        ) from None
    dim = int(reader.GetDimension())
    size = tuple(int(v) for v in reader.GetSize())
    if dim > 5 or len(_without_extra_singletons(size)) > 4:
        raise ImageReadError(
            f"'{p}' has {dim} dimensions of sizes {size}; expected a 2D or 3D image or a 4D image of "
            "volumes (I, J, K, T). Export one 3D volume (or a 4D stack) instead."
        )
    pixel_id = int(reader.GetPixelID())
    _check_itk_voxel_type(p, pixel_id)
    spacing = tuple(reader.GetSpacing())
    _check_voxel_sizes(p, spacing[: min(dim, 3)], "the header's spacing", max_voxel_mm)
    sd = min(dim, 3)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
    _check_direction(p, direction[:sd, :sd], "TransformMatrix" if _suffix(p) in (".mha", ".mhd") else "space directions")
    components = int(reader.GetNumberOfComponents())
    affine = _itk_affine(dim, reader.GetDirection(), spacing, reader.GetOrigin())
    return _ItkInfo(reader, dim, size, components, _itk_component_bytes(pixel_id, components), affine, data)


def _itk_shape(info: _ItkInfo) -> tuple[int, ...]:
    """The file's full shape as :func:`_sitk_to_numpy` orders it: ``(I, J, K[, T...][, C])``."""
    return info.size + ((info.components,) if info.components > 1 else ())


def _check_itk_size(p: Path, info: _ItkInfo, dtype: Any, limits: _Limits, volume: int | None) -> None:
    """Refuse a header claiming more bytes than its data file can hold, or than the limits allow.

    ``volume`` is the one volume of a 4D file that will be handed back (None: all of it).
    """
    n_values = math.prod(info.size) * max(info.components, 1)
    claimed = n_values * info.component_bytes
    what = f"size {info.size}, {max(info.components, 1)} x {info.component_bytes}-byte values per voxel"
    data = info.data
    compressed: int | None = None
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
        if data.encoding in ("deflate", "bzip2", "other"):
            compressed = holds
    # SimpleITK's buffer (the whole file: not every reader can read one volume) plus the numpy array
    handed = n_values if volume is None else math.prod(info.size[:3])
    need = claimed + handed * (_out_itemsize(dtype, info.component_bytes) + (0 if volume is None else info.component_bytes))
    _check_allocation(p, need, what, limits, compressed)


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


def _read_itk_file(p: Path, dtype: Any, volume: int | str, trust: bool, limits: _Limits,
                   max_volumes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (one volume, or every volume channel-first for ``volume="all"``) and the affine."""
    info = _itk_info(p, trust, limits.max_voxel_mm)
    index = _volume_index(p, _itk_shape(info), volume, max_volumes)
    _check_itk_size(p, info, dtype, limits, index)
    extract = index is not None and info.components == 1 and info.dim > 3
    if extract:  # one volume: SimpleITK extracts it (collapsing the axes beyond the third)
        info.reader.SetExtractSize([n if axis < 3 else 0 for axis, n in enumerate(info.size)])
        info.reader.SetExtractIndex([0, 0, 0] + [index if n != 1 else 0 for n in info.size[3:]])
    img, affine = _execute(info.reader, f"'{p}'",
                           "The file may be truncated, corrupt, or not in the format its extension says.")
    arr = _sitk_to_numpy(img, dtype)
    if arr.ndim > 3:  # drop singleton axes beyond the spatial ones
        arr = arr.reshape(arr.shape[:3] + tuple(n for n in arr.shape[3:] if n != 1))
    if index is not None and not extract:
        arr = np.ascontiguousarray(arr[..., index]) if arr.ndim == 4 else arr
    if volume == "all":
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[np.newaxis]
    return arr, affine if not extract else info.affine


def _execute(reader: Any, what: str, hint: str) -> tuple[Any, np.ndarray]:
    """Run a SimpleITK reader: the image and its voxel -> RAS affine (``ImageReadError`` naming ``what``)."""
    try:
        img = _sitk_run(reader.Execute)
    except RuntimeError as e:
        raise ImageReadError(f"could not read {what}: {e}. {hint}") from None
    return img, _itk_affine(img.GetDimension(), img.GetDirection(), img.GetSpacing(), img.GetOrigin())


# ------------------------------------------------------------------------------ DICOM series


@dataclass(frozen=True)
class _Slice:
    file: str
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row and column cosines), orthonormalised
    size: tuple[int, ...]
    spacing: tuple[float, ...]  # SimpleITK's (x, y[, z])
    components: int
    component_bytes: int
    modality: str | None = None  # (0008,0060)
    description: str | None = None  # SeriesDescription (0008,103e)
    colour: str | None = None  # why the pixels are not greyscale (read only with strict=False)
    pixel_spacing: tuple[float, float] | None = None  # PixelSpacing as (between columns, between rows) = (x, y)
    malformed: str | None = None  # why a geometry tag cannot be used (GeometryError)
    itk_affine: np.ndarray | None = None  # SimpleITK's voxel -> RAS for this file alone
    pixel_bytes: int = 0  # bytes of pixel data the header claims
    file_bytes: int = 0  # the file's size
    native: bool = True  # an uncompressed transfer syntax (the pixel data must fit the file)


# Uncompressed transfer syntaxes: implicit VR little endian, explicit little endian, explicit big endian.
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def _transfer_syntax(file: str) -> str | None:
    """The TransferSyntaxUID (0002,0010) of a DICOM Part 10 file; ``""`` without a file meta header
    (implicit VR little endian, native), None when the meta header names none."""
    with open(file, "rb") as f:
        head = f.read(132 + 8192)
    if head[128:132] != b"DICM":
        return ""
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 2:
            break
        if head[pos + 4 : pos + 6] in _LONG_VRS:
            length, value = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if element == 0x0010:
            return head[value : value + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = value + length
    return None


def _ds_numbers(text: str, n: int, name: str) -> tuple[np.ndarray | None, str | None]:
    """``n`` finite numbers from a DICOM multi-value string, or None and what is wrong with it."""
    parts = [t.strip() for t in text.replace("\x00", "").strip().split("\\")]
    shown = "[" + ", ".join(parts) + "]"
    try:
        values = np.array([float(t) for t in parts], dtype=np.float64)
    except ValueError:
        return None, f"{name} is {shown[:80]}: expected {n} numbers"
    if values.size != n:
        return None, f"{name} is {shown[:80]}, {values.size} value(s): expected {n} numbers"
    if not np.all(np.isfinite(values)):
        return None, f"{name} is {shown[:80]}: expected {n} finite numbers"
    return values, None


def _orientation(text: str) -> tuple[np.ndarray | None, str | None]:
    """ImageOrientationPatient, checked (two unit vectors at right angles, within 1e-3) and orthonormalised."""
    name = "ImageOrientationPatient (0020,0037)"
    values, wrong = _ds_numbers(text, 6, name)
    if values is None:
        return None, f"{wrong} (the row and column direction cosines)"
    row, col = values[:3], values[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if max(abs(lengths[0] - 1.0), abs(lengths[1] - 1.0)) > _IOP_UNIT_TOL:
        return None, (f"{name} is ({_fmt_mm(values)}): the row and column directions have lengths "
                      f"{lengths[0]:.6g} and {lengths[1]:.6g}, expected unit vectors (length 1 within {_IOP_UNIT_TOL:g})")
    cosine = float(row @ col) / (lengths[0] * lengths[1])
    if abs(cosine) > _IOP_UNIT_TOL:
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
        return None, (f"{name} is ({_fmt_mm(values)}): the row and column directions are {angle:.4g} degrees apart "
                      f"(cosine {cosine:.3g}), expected a right angle (cosine within {_IOP_UNIT_TOL:g} of 0): the pixels "
                      "would be sheared, and SimpleITK would silently straighten them")
    row = row / lengths[0]
    col = col - (col @ row) * row
    return np.concatenate([row, col / np.linalg.norm(col)]), None


def _pixel_spacing(text: str, max_voxel_mm: float | None) -> tuple[tuple[float, float] | None, str | None]:
    """PixelSpacing as (x, y) = (between columns, between rows), checked, or None and what is wrong."""
    name = "PixelSpacing (0028,0030)"
    values, wrong = _ds_numbers(text, 2, name)
    if values is None:
        return None, f"{wrong} (between rows, between columns, in mm)"
    top = math.inf if max_voxel_mm is None else max_voxel_mm
    for v in values:
        if v <= 0 or v < MIN_VOXEL_MM or v > top:
            what = "0 (SimpleITK would read 1 mm)" if v == 0 else (
                f"negative ({v:g} mm)" if v < 0 else f"{v:g} mm, outside {MIN_VOXEL_MM:g} to {top:g} mm (max_voxel_mm)")
            return None, f"{name} is [{_fmt_mm(values)}]: a pixel size is {what}; expected two positive sizes in mm"
    return (float(values[1]), float(values[0])), None


def _dicom_header_reader() -> Any:
    """One SimpleITK reader for many DICOM headers (GDCM named at once: no search of every image IO)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        reader.SetImageIO("GDCMImageIO")
    except RuntimeError:  # pragma: no cover - a SimpleITK built without GDCM
        pass
    return reader


def _dicom_slice(p: Path, file: str, reader: Any = None, strict: bool = True,
                 max_voxel_mm: float | None = MAX_VOXEL_MM) -> _Slice:
    """The header of one DICOM file; colour pixels raise, or with ``strict=False`` are recorded.

    Malformed geometry tags are recorded in ``malformed`` (:func:`_dicom_geometry` raises).
    """
    reader = _dicom_header_reader() if reader is None else reader
    reader.SetFileName(file)
    try:
        _sitk_run(reader.ReadImageInformation)
    except RuntimeError as e:
        raise ImageReadError(f"could not read the DICOM header of '{file}' in '{p}': {e}") from None

    def tag(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    ipp, iop, pixel_spacing = tag("0020|0032"), tag("0020|0037"), tag("0028|0030")
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
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    text = {key: (value.replace("\x00", "").strip() or None) if value is not None else None
            for key, value in (("modality", tag("0008|0060")), ("description", tag("0008|103e")))}
    problems = []
    position = orientation = None
    if ipp is not None:
        position, wrong = _ds_numbers(ipp, 3, "ImagePositionPatient (0020,0032)")
        problems.append(wrong)
    if iop is not None:
        orientation, wrong = _orientation(iop)
        problems.append(wrong)
    ps = None
    if pixel_spacing is not None:
        ps, wrong = _pixel_spacing(pixel_spacing, max_voxel_mm)
        problems.append(wrong)
    elif ipp is not None and iop is not None:
        problems.append("there is no PixelSpacing (0028,0030), so the pixel size in mm is unknown (SimpleITK would "
                        "assume 1 mm); expected it with ImagePositionPatient and ImageOrientationPatient")
    malformed = next((f"'{os.path.basename(file)}': {w}" for w in problems if w), None)
    component_bytes = _itk_component_bytes(pixel_id, components)
    bits = tag("0028|0100")
    try:
        bits_allocated = int(bits.strip()) if bits is not None else component_bytes * 8
    except ValueError:
        bits_allocated = component_bytes * 8
    values = math.prod(size) * max(components, 1)
    try:
        syntax = _transfer_syntax(file)
        file_bytes = os.path.getsize(file)
    except OSError as e:
        raise ImageReadError(f"could not read '{file}' in '{p}': {e.strerror or e}") from None
    try:
        itk_affine = _itk_affine(len(size), reader.GetDirection(), spacing, reader.GetOrigin())
    except (ValueError, SpaceError):  # pragma: no cover - SimpleITK's own geometry is always complete
        itk_affine = None
    return _Slice(
        file=file,
        position=position,
        orientation=orientation,
        size=size,
        spacing=spacing,
        components=components,
        component_bytes=component_bytes,
        modality=text["modality"],
        description=text["description"],
        colour=colour,
        pixel_spacing=ps,
        malformed=malformed,
        itk_affine=itk_affine,
        pixel_bytes=(values * max(bits_allocated, 1) + 7) // 8,
        file_bytes=file_bytes,
        native=syntax == "" or syntax in _NATIVE_SYNTAXES,
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
        if s.size[:2] != first.size[:2] or not np.allclose(s.pixel_spacing or s.spacing[:2],
                                                           first.pixel_spacing or first.spacing[:2], rtol=1e-4, atol=1e-6):
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


def _dicom_geometry(p: Path, uid: str, slices: list[_Slice],
                    max_voxel_mm: float | None = MAX_VOXEL_MM) -> tuple[list[_Slice], np.ndarray | None, str | None]:
    """The one place a DICOM series' grid is built from its headers (:func:`read`, :func:`read_space`
    and :func:`describe` all use it).

    Returns
    -------
    slices : list of _Slice
        Sorted along the slice normal (as given when they cannot be sorted).
    affine : (4, 4) ndarray or None
        Voxel -> RAS mm: columns along the row direction times the spacing between columns, rows
        along the column direction times the spacing between rows, slices along the normal at
        the mean step between the first and last slice (one file: SimpleITK's slice spacing), the
        origin at the first slice's ImagePositionPatient. A file without position tags has
        SimpleITK's own geometry; None when several files cannot be placed.
    problem : str or None
        Why the stack is not evenly spaced (see :func:`_check_dicom_geometry`), or None.

    Raises
    ------
    GeometryError
        A file with a malformed PixelSpacing, ImageOrientationPatient or ImagePositionPatient.
    """
    bad = next((s.malformed for s in slices if s.malformed), None)
    if bad is not None:
        raise GeometryError(
            f"'{p}' (series {uid}): {bad}. The geometry of this series cannot be trusted; export the series "
            "again from the scanner or PACS (or fix the tag)."
        )
    ordered, problem = _check_dicom_geometry(p, slices) if len(slices) > 1 else (list(slices), None)
    first = ordered[0]
    if not all(s.position is not None and s.orientation is not None and s.pixel_spacing is not None for s in ordered):
        return ordered, (first.itk_affine if len(ordered) == 1 else None), problem
    orientation, origin, last = cast(np.ndarray, first.orientation), cast(np.ndarray, first.position), ordered[-1]
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    if len(ordered) > 1:
        step = normal * float((cast(np.ndarray, last.position) - origin) @ normal) / (len(ordered) - 1)
    else:
        step = normal * (float(first.spacing[2]) if len(first.spacing) > 2 else 1.0)
    x, y = cast(tuple, first.pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * x, col * y, step, origin
    return ordered, lps_to_ras(lps), problem


def _check_dicom_links(p: Path, files: list[str], trust: bool) -> None:
    if trust:
        return
    folder = os.path.realpath(p)
    plain: dict[str, bool] = {}  # directory as given -> it is the folder itself (no link on the way)
    for f in files:
        parent = os.path.dirname(f)
        if parent not in plain:
            plain[parent] = os.path.realpath(parent) == folder
        if plain[parent] and not os.path.islink(f):
            continue  # a plain file of the folder
        if not is_inside(f, p):
            raise UntrustedFileError(
                f"'{f}' in '{p}' is a link to '{os.path.realpath(f)}', outside the DICOM folder; "
                "expected the series' files inside the folder you named. Copy the files into the "
                "folder, or pass trust=True to medcam3d.io.read if you trust where the links lead."
            )


def _check_dicom_sizes(p: Path, uid: str, slices: list[_Slice], dtype: Any, limits: _Limits) -> None:
    """Each file must hold the pixel data its header claims (uncompressed files), and the series
    must fit ``limits`` (``max_bytes``; ``max_expansion`` for compressed files)."""
    for s in slices:
        if s.native and s.pixel_bytes > s.file_bytes:
            what = f"{' x '.join(str(n) for n in s.size)} pixels x {max(s.components, 1)} samples"
            raise _too_large_for_file(Path(s.file), s.pixel_bytes, what, s.file_bytes)
    n_values = sum(math.prod(s.size) * max(s.components, 1) for s in slices)
    stored = sum(math.prod(s.size) * max(s.components, 1) * s.component_bytes for s in slices)
    out = n_values * _out_itemsize(dtype, max(s.component_bytes for s in slices))
    compressed = [s.file_bytes for s in slices if not s.native]
    what = f"{len(slices)} DICOM slices of {slices[0].size[:2]} pixels (series {uid})"
    _check_allocation(p, stored + out, what, limits, sum(compressed) if compressed else None)


def _dicom_series(p: Path, series: str | None, allow_uneven: bool, trust: bool, limits: _Limits,
                  dtype: Any) -> tuple[Any, str, list[_Slice], np.ndarray | None, str | None]:
    """Find one series, check its files and headers, build its grid: (reader, uid, ordered slices, affine, problem)."""
    reader, ids = _series_reader(p, limits)
    if series is None:
        if len(ids) > 1:
            raise ImageReadError(
                f"'{p}' holds {len(ids)} DICOM series: {', '.join(ids)}; pass series=<uid> to pick one."
            )
        series = ids[0]
    elif series not in ids:
        raise ImageReadError(f"series '{series}' is not in '{p}'; found: {', '.join(ids)}")
    uid = series
    files = _series_files(reader, p, uid)
    _check_dicom_links(p, files, trust)
    header_reader = _dicom_header_reader()
    slices = [_dicom_slice(p, f, header_reader, True, limits.max_voxel_mm) for f in files]
    _check_dicom_sizes(p, uid, slices, dtype, limits)
    slices, affine, problem = _dicom_geometry(p, uid, slices, limits.max_voxel_mm)
    if problem is not None:
        if not allow_uneven:
            raise GeometryError(f"'{p}' (series {uid}): {problem}{_dicom_fix_hint()}")
        logger.warning(
            "'%s' (series %s): %s Reading it as is because allow_uneven_slices=True: slice "
            "positions in mm are approximate.", p, uid, problem
        )
    return reader, uid, slices, affine, problem


def _read_dicom(
    p: Path, dtype: Any, series: str | None, allow_uneven: bool, trust: bool, limits: _Limits
) -> tuple[np.ndarray, np.ndarray]:
    reader, uid, slices, affine, problem = _dicom_series(p, series, allow_uneven, trust, limits, dtype)
    try:
        reader.SetImageIO("GDCMImageIO")
    except RuntimeError:  # pragma: no cover - a SimpleITK built without GDCM
        pass
    reader.SetFileNames([s.file for s in slices])
    img, itk_affine = _execute(reader, f"the DICOM series in '{p}'", "The files may be truncated or corrupt.")
    arr = _sitk_to_numpy(img, dtype)
    if problem is not None or affine is None:
        return arr, itk_affine  # allow_uneven_slices: as SimpleITK assembles the series
    _check_dicom_placement(p, uid, slices, ras_to_lps(itk_affine), ras_to_lps(affine))
    return arr, affine


def _check_dicom_placement(p: Path, series: str, slices: list[_Slice], lps: np.ndarray, header_lps: np.ndarray) -> None:
    """SimpleITK's volume must lie where the headers put it: slice k at its ImagePositionPatient, the
    in-plane axes as :func:`_dicom_geometry` built them (guards SimpleITK's sorting and GDCM's fixes)."""
    spacing = float(np.linalg.norm(header_lps[:3, 2]))
    tol = _SLICE_REL_TOL * spacing + _SLICE_ABS_TOL_MM
    for k, s in enumerate(slices):
        if s.position is None:
            continue
        placed = lps[:3, 3] + k * lps[:3, 2]
        if np.linalg.norm(placed - s.position) > tol:
            raise GeometryError(
                f"'{p}' (series {series}): SimpleITK placed slice {k} ('{os.path.basename(s.file)}') at "
                f"({_fmt_mm(placed)}) mm (LPS) but its ImagePositionPatient is ({_fmt_mm(s.position)}); "
                f"expected them to agree within {tol:.3g} mm.{_dicom_fix_hint()}"
            )
    extent = np.asarray(slices[0].size[:2], dtype=np.float64)
    for axis in range(2):  # the far edge of the slice, along each in-plane axis
        gap = float(np.linalg.norm((lps[:3, axis] - header_lps[:3, axis]) * extent[axis]))
        if gap > _SLICE_REL_TOL * float(np.linalg.norm(header_lps[:3, axis])) + _SLICE_ABS_TOL_MM:
            raise GeometryError(
                f"'{p}' (series {series}): SimpleITK's voxel axis {axis} ({_fmt_mm(lps[:3, axis])}) differs from the "
                f"one PixelSpacing and ImageOrientationPatient give ({_fmt_mm(header_lps[:3, axis])}) by {gap:.3g} mm "
                f"across the slice; expected the same grid.{_dicom_fix_hint()}"
            )


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
    """The NIfTI header of ``like`` (a path, a nibabel image or header), or None when it has none."""
    if like is None:
        return None
    if hasattr(like, "get_xyzt_units"):  # a header already read (e.g. once per case)
        hdr = like
    elif hasattr(like, "header") and hasattr(like, "affine"):
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


def set_nifti_geometry(header: Any, space: Any, like_header: Any = None) -> tuple[int, int]:
    """Store ``space``'s affine in a NIfTI header with the codes and units of the one rule (module docstring).

    Every NIfTI medcam3d writes gets its sform, qform, their codes and its xyzt units from here
    (:func:`write`, the streamed maps and masks of :func:`medcam3d.heatmap.nifti_header`, and
    through them the napari writers and :class:`medcam3d.monai.SaveHeatmapsd`):

    - the affine goes to the sform, with the code :func:`_output_codes` gives (``like_header``'s
      codes, a 0 replaced by the other code, both 0 or no ``like_header`` giving 1);
    - the same affine goes to the qform with the other code, unless the qform cannot hold it (a
      sheared grid, or one the quaternion does not reproduce within 1e-3 mm plus 1 % of a voxel
      at the grid's corners): then the qform code is 0 and only the sform carries it;
    - the xyzt units are ``like_header``'s, else mm (and no time unit).

    Parameters
    ----------
    header : nibabel Nifti1Header (or Nifti2Header)
        Changed in place (an image's ``img.header``; ``img.affine`` should be ``space.affine``).
    space : Space or anything :meth:`Space.of` accepts
        The grid; its shape's first three axes give the corners checked.
    like_header : nibabel NIfTI header, optional
        The source's header (see :func:`write`'s ``like``).

    Returns
    -------
    (int, int)
        The ``(sform_code, qform_code)`` written.
    """
    space = Space.of(space)
    affine = np.asarray(space.affine, dtype=np.float64)
    if like_header is not None and "sform_code" not in like_header:
        like_header = None
    scode, qcode = _output_codes(like_header)
    header.set_sform(affine, code=scode)
    if not space.is_sheared:
        header.set_qform(affine, code=qcode)
        qform = np.asarray(header.get_qform(), dtype=np.float64)
        if _corner_distance(qform, affine, space.shape) > _placement_tolerance(affine, space.ndim):
            qcode = 0  # nearly sheared: the quaternion cannot reproduce the affine
    else:
        qcode = 0
    if qcode == 0:
        # the qform cannot hold this affine: only the sform carries it (viewers then use the sform)
        header.set_qform(None, code=0)
        logger.debug("sheared affine: stored in the sform only (qform code 0)")
    xyz, t = like_header.get_xyzt_units() if like_header is not None else ("mm", None)
    header.set_xyzt_units(xyz=xyz if xyz is not None else "unknown", t=t if t is not None else "unknown")
    return scode, qcode


def _nifti_image(arr: np.ndarray, space: Space, like: Any, descrip: str | None) -> Any:
    import nibabel as nib

    img = nib.Nifti1Image(arr, space.affine)
    set_nifti_geometry(img.header, space, _like_header(like))
    if descrip is not None:
        img.header["descrip"] = _descrip_bytes(descrip)
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
    like : str, os.PathLike, nibabel image or NIfTI header, optional
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

    created = False  # whether the temporary file was made (then a failure is the library's or the rename's)

    def save(temporary: str) -> None:
        nonlocal created
        created = True
        if ext in _NIFTI:
            import nibabel as nib

            nib.save(img, temporary)
        else:
            import SimpleITK as sitk

            sitk.WriteImage(img, temporary, True)

    try:
        atomic_write(p, save, suffix=ext)  # nibabel and SimpleITK pick the format from the suffix
    except BaseException as e:
        if not created:
            if isinstance(e, PermissionError):
                raise OutputPermissionError(
                    f"cannot write '{p}': no permission to create files in '{parent}' ({e.strerror}); "
                    "choose another output directory or fix its permissions."
                ) from None
            raise
        if isinstance(e, PermissionError):
            raise OutputPermissionError(f"cannot write '{p}': {e}") from e
        if isinstance(e, Exception) and not isinstance(e, ImageWriteError):
            reason = _itk_reason(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
            raise ImageWriteError(f"could not write '{p}': {reason}") from e
        raise
    logger.debug("wrote %s %s %s", p, arr.shape, arr.dtype)
    return p
