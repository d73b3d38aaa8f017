"""NIfTI (``.nii``, ``.nii.gz``) through nibabel: reading (pixdim, sform/qform agreement, size
checks, one volume of a 4D file) and the one header rule of every NIfTI medcam3d writes.

NIfTI header codes written
--------------------------
:func:`medcam3d.io.write` stores the grid's affine in both the sform and the qform, so that every viewer
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
:func:`medcam3d.scan_maps.save_scan_maps` and their ``_norm`` copies, feature-grid maps, masks,
segmentations, copies of scans, the napari writers, :class:`medcam3d.monai.SaveHeatmapsd`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from ..space import Space
from ._common import _NIFTI, _SLICE_ABS_TOL_MM, _SLICE_REL_TOL, _check_exists, _spatial_shape, _suffix, _volume_index
from .limits import (MAX_VOXEL_MM, _DEFLATE_MAX_RATIO, _DEFLATE_SLACK, _Limits, _check_allocation, _check_voxel_sizes,
                     _too_large_for_file)
from .streaming import Scaling

logger = logging.getLogger(__name__)


def _load_nifti(p: Path, keep_file_open: bool = False) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(p), keep_file_open=True) if keep_file_open else nib.load(str(p))
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
        raise _voxel_read_error(p, img, e) from e
    arr = np.asarray(arr)
    if index is None and arr.ndim > 3:  # drop singleton axes beyond the spatial ones, e.g. (I, J, K, 1, C)
        arr = arr.reshape(arr.shape[:3] + tuple(n for n in arr.shape[3:] if n != 1))
    if volume == "all":
        arr = arr[..., np.newaxis] if arr.ndim == 3 else arr
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[np.newaxis]
    return arr, affine


def _voxel_read_error(p: Path, img: Any, error: Exception) -> ImageReadError:
    """The error for voxel data nibabel could not read (a truncated or corrupt file)."""
    return ImageReadError(f"could not read the voxel data of '{p}' (shape {img.shape}, {img.get_data_dtype()}): "
                          f"{type(error).__name__}: {error}. The file may be truncated or corrupt.")


def _read_nifti_slabs(p: Path, dtype: Any, limits: _Limits, slab_voxels: int
                      ) -> Generator[tuple[int, int], None, tuple[np.ndarray, np.ndarray]]:
    """:func:`_read_nifti` of a 3D file (``volume="one"``), slab by slab along the last axis.

    The same checks come first (voxel type, placement, size); then the voxels are read through
    nibabel's ``dataobj`` slicing, one slab of whole ``k`` slices (about ``slab_voxels`` voxels) at
    a time, the file kept open (a ``.nii.gz`` is decompressed once, front to back). Yields
    ``(slices read, slices)`` after each slab, so that a caller can report progress and stop between
    slabs (closing the generator reads no more). A file that is not 3D is read at once by
    :func:`_read_nifti` (its errors, e.g. a 4D file's :class:`VolumeError`, are the same).
    """
    img = _load_nifti(p, keep_file_open=True)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 3:
        return _read_nifti(p, dtype, "one", limits)
    _check_nifti_voxel_type(p, np.dtype(img.header.get_data_dtype()))
    affine = _nifti_affine(p, img, limits.max_voxel_mm)
    _check_nifti_size(p, img, dtype, limits, None)
    depth = shape[2]
    per = max(1, int(slab_voxels) // max(1, shape[0] * shape[1]))
    arr: np.ndarray | None = None
    for start in range(0, depth, per):
        stop = min(depth, start + per)
        try:
            part = np.asanyarray(img.dataobj[:, :, start:stop])
        except PermissionError:
            raise
        except Exception as e:
            raise _voxel_read_error(p, img, e) from e
        if arr is None:  # the type nibabel gives (scaled integers become float), or the one asked for
            arr = np.empty(shape, dtype=part.dtype if dtype is None else np.dtype(dtype))
        arr[:, :, start:stop] = part
        yield stop, depth
    assert arr is not None  # a NIfTI image has at least one slice
    return arr, affine


def like_header(like: Any) -> Any:
    """The NIfTI header of ``like`` (a path to a NIfTI file, a nibabel image or header), or None when it
    has none (another format, a folder, a path that is no file)."""
    if like is None:
        return None
    if hasattr(like, "get_xyzt_units"):  # a header already read (e.g. once per case)
        hdr = like
    elif hasattr(like, "header") and hasattr(like, "affine"):
        hdr = like.header
    else:
        p = Path(os.fspath(like)).expanduser()
        if not p.is_file() or _suffix(p) not in _NIFTI:
            logger.debug("like=%s is not a NIfTI file; using default sform/qform codes", p)
            return None
        hdr = _load_nifti(p).header
    return hdr if "sform_code" in hdr else None


def _like_header(like: Any) -> Any:
    """:func:`like_header`, for :func:`medcam3d.io.write`: a path given as ``like`` must exist."""
    if like is not None and not hasattr(like, "get_xyzt_units") and not (hasattr(like, "header") and hasattr(like, "affine")):
        _check_exists(like)
    return like_header(like)


def descrip_bytes(descrip: str) -> bytes:
    """The NIfTI ``descrip`` field for ``descrip``: UTF-8, cut to 80 bytes without breaking a character."""
    raw = str(descrip).encode("utf-8")
    if len(raw) > 80:
        raw = raw[:80].decode("utf-8", errors="ignore").encode("utf-8")  # no broken characters
        logger.debug("descrip truncated to 80 bytes: %r", raw)
    return raw


#: NIfTI extension code (NIFTI_ECODE_COMMENT) of the whole descrip when it is longer than the 80-byte field.
DESCRIP_ECODE = 6
_DESCRIP_KEY = "medcam3d_descrip"


def descrip_extensions(descrip: str | None) -> list[Any]:
    """NIfTI header extensions that keep a ``descrip`` longer than 80 bytes whole.

    The 80-byte ``descrip`` field holds its start (:func:`descrip_bytes`); the whole text goes into
    one comment extension (code :data:`DESCRIP_ECODE`) holding ``{"medcam3d_descrip": text}`` as
    UTF-8 JSON, which :func:`full_descrip` reads back (other tools skip extensions they do not
    know). A text that fits the field needs none.

    Parameters
    ----------
    descrip : str or None

    Returns
    -------
    list of nibabel.nifti1.Nifti1Extension
        Empty, or one extension.
    """
    import json

    from nibabel.nifti1 import Nifti1Extension

    if descrip is None or len(str(descrip).encode("utf-8")) <= 80:
        return []
    content = json.dumps({_DESCRIP_KEY: str(descrip)}, ensure_ascii=False).encode("utf-8")
    return [Nifti1Extension(DESCRIP_ECODE, content)]


def full_descrip(header: Any) -> str | None:
    """A NIfTI header's description, whole: the :func:`descrip_extensions` comment when there is one,
    else the ``descrip`` field (up to its first NUL, UTF-8).

    Parameters
    ----------
    header : nibabel NIfTI header

    Returns
    -------
    str or None
        None for an empty field, or bytes that are not UTF-8.
    """
    import json

    for extension in getattr(header, "extensions", None) or []:
        if extension.get_code() != DESCRIP_ECODE:
            continue
        try:
            value = json.loads(bytes(extension.get_content()).rstrip(b"\x00").decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # another program's comment
            continue
        if isinstance(value, dict) and isinstance(value.get(_DESCRIP_KEY), str):
            return value[_DESCRIP_KEY]
    try:
        raw = bytes(np.asarray(header["descrip"]).item()).split(b"\x00", 1)[0]
        return raw.decode("utf-8") or None
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


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
    (:func:`write`, the streamed maps and masks of :func:`nifti_header`, and
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
        img.header["descrip"] = descrip_bytes(descrip)
        img.header.extensions.extend(descrip_extensions(descrip))
    return img


def nifti_header(shape: tuple[int, ...], dtype: str, space: Space, *, like_header: Any = None, descrip: str | None = None,
                 scaling: Scaling | None = None, display: tuple[float, float] | None = None) -> Any:
    """A single-file NIfTI-1 header for voxels ``shape`` of ``dtype`` on ``space``.

    The affine, the sform/qform codes and the xyzt units are set by :func:`medcam3d.io.set_nifti_geometry`,
    the rule of every NIfTI medcam3d writes (:func:`medcam3d.io.write` included): the affine in both
    sform and qform (the sform only for a grid the qform cannot hold, e.g. a sheared one), with
    ``like_header``'s codes (a source NIfTI's header; a code 0 takes the other) or 1 (scanner), and
    its units or mm. ``scaling`` sets ``scl_slope``/``scl_inter`` (none for float32 or a slope of 1 and
    intercept of 0); ``display`` sets ``cal_min``/``cal_max``. A ``descrip`` longer than the 80-byte
    field (e.g. a 4D map's class list) is also kept whole in a header extension
    (:func:`medcam3d.io.descrip_extensions`; ``vox_offset`` follows it).
    """
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    header.set_data_shape(shape)
    set_nifti_geometry(header, space, like_header)
    if descrip is not None:
        header["descrip"] = descrip_bytes(descrip)
        header.extensions.extend(descrip_extensions(descrip))
    if scaling is not None and scaling.dtype != "float32" and (scaling.slope != 1.0 or scaling.inter != 0.0):
        header.set_slope_inter(scaling.slope, scaling.inter)
    else:
        header.set_slope_inter(None, None)
    if display is not None and all(np.isfinite(display)):
        header["cal_min"], header["cal_max"] = display
    header["vox_offset"] = 352 + header.extensions.get_sizeondisk()
    return header
