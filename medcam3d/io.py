"""Read and write medical images as ``(array, Space)`` pairs in RAS+ world coordinates.

- NIfTI (``.nii``, ``.nii.gz``) goes through nibabel; its affine (sform or qform, as nibabel
  chooses) is already voxel -> RAS+ mm.
- DICOM series (a directory), NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``)
  go through SimpleITK, which works in LPS+. The affine is built from SimpleITK's direction,
  spacing and origin and converted to RAS+ here; **this module is the only place in medcam3d that
  converts between LPS and RAS** (:func:`lps_to_ras`, :func:`ras_to_lps`).

Arrays are in NIfTI ``(i, j, k)`` order for every format (SimpleITK's ``(z, y, x)`` arrays are
transposed). By default :func:`read` returns float32 data (``dtype=None`` keeps the stored type,
e.g. integer label maps). :func:`write` is atomic: a temporary file in the target directory is
renamed over ``path`` only once it is complete.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError, ImageNotFoundError, UnsupportedFormatError, VolumeError, VolumeIndexError, NonFiniteError, ImageWriteError, UnwritableImageError, OutputPermissionError, OutputDirectoryError, ShearWarning, SpaceError  # noqa: F401  (re-exported)
from .space import Space

__all__ = [
    "read",
    "read_space",
    "write",
    "lps_to_ras",
    "ras_to_lps",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "ImageReadError",
    "ImageNotFoundError",
    "UnsupportedFormatError",
    "VolumeError",
    "VolumeIndexError",
    "NonFiniteError",
    "ImageWriteError",
    "UnwritableImageError",
    "OutputPermissionError",
    "OutputDirectoryError",
    "ShearWarning",
]

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
_ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File extensions :func:`read` accepts (and a directory holding a DICOM series).
READ_FORMATS = _NIFTI + _ITK
#: File extensions :func:`write` accepts (detached-header formats .nhdr/.mhd cannot be renamed
#: atomically, since the header names its data file).
WRITE_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# LPS <-> RAS
# --------------------------------------------------------------------------------------------


def lps_to_ras(affine: Any) -> np.ndarray:
    """Convert a voxel -> LPS+ mm affine to voxel -> RAS+ mm (negate the x and y world rows).

    Parameters
    ----------
    affine : array_like, shape (4, 4)

    Returns
    -------
    numpy.ndarray, shape (4, 4), float64
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise SpaceError(f"expected a 4x4 affine, got shape {a.shape}")
    return _LPS_RAS @ a


def ras_to_lps(affine: Any) -> np.ndarray:
    """Convert a voxel -> RAS+ mm affine to voxel -> LPS+ mm (the same flip as :func:`lps_to_ras`)."""
    return lps_to_ras(affine)


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
) -> tuple[np.ndarray, Space]:
    """Read an image as an ``(i, j, k)`` array and its voxel -> RAS+ mm grid.

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
        (ValueError) corrupt or truncated file, unreadable header, singular affine, 4D image
        without ``volume`` (:class:`VolumeError`), NaN voxels (:class:`NonFiniteError`).

    Warns
    -----
    ShearWarning
        The affine is sheared (allowed for NIfTI, but not representable in SimpleITK formats).
    """
    p = _check_exists(path)
    kind = _kind(p)
    logger.debug("reading %s (%s)", p, kind)
    if kind == "nifti":
        arr, affine = _read_nifti(p, dtype)
    else:
        arr, affine = _read_itk(p, dtype, series)
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
    path: str | os.PathLike, *, series: str | None = None
) -> Space:
    """The grid of an image file without loading its voxels (4D files: the spatial grid).

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`read`.
    series : str, optional
        DICOM only, as for :func:`read`.

    Returns
    -------
    Space
    """
    p = _check_exists(path)
    kind = _kind(p)
    if kind == "nifti":
        img = _load_nifti(p)
        shape, affine = img.shape, img.affine
        return _space_for(p, _spatial_shape(shape), affine)
    if kind == "dicom":
        arr, affine = _read_itk(p, None, series)
        return _space_for(p, _spatial_shape(arr.shape), affine)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"could not read the header of '{p}': {_itk_reason(e)}") from None
    dim = reader.GetDimension()
    size = tuple(reader.GetSize())
    affine = _itk_affine(dim, reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    return _space_for(p, size[: min(dim, 3)], affine)


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) >= 3 else tuple(shape)


def _space_for(p: Path, shape: tuple[int, ...], affine: np.ndarray) -> Space:
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


def _read_nifti(p: Path, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    img = _load_nifti(p)
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
    return np.asarray(arr), np.asarray(img.affine, dtype=np.float64)


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


def _read_itk(p: Path, dtype: Any, series: str | None) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        if p.is_dir():
            img = _read_dicom_series(p, series)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            img = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(
            f"could not read '{p}': {_itk_reason(e)}. The file may be truncated, corrupt, or not "
            "in the format its extension says."
        ) from None
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) / (t, z, y, x), vector pixels: (..., c)
    order = list(range(dim))[::-1]
    if img.GetNumberOfComponentsPerPixel() > 1:
        order.append(dim)
    arr = arr.transpose(order)  # -> (x, y, z[, t][, c]) = (i, j, k, ...)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    affine = _itk_affine(dim, img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    return arr, affine


def _read_dicom_series(p: Path, series: str | None) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(p)))
    if not ids:
        raise ImageReadError(
            f"'{p}' is a directory but holds no DICOM series; expected a directory of DICOM files "
            f"of one series, or an image file ({', '.join(READ_FORMATS)})."
        )
    if series is None:
        if len(ids) > 1:
            raise ImageReadError(
                f"'{p}' holds {len(ids)} DICOM series: {', '.join(ids)}; pass series=<uid> to pick one."
            )
        series = ids[0]
    elif series not in ids:
        raise ImageReadError(f"series '{series}' is not in '{p}'; found: {', '.join(ids)}")
    files = reader.GetGDCMSeriesFileNames(str(p), series)
    reader.SetFileNames(files)
    return reader.Execute()


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


def _nifti_image(arr: np.ndarray, space: Space, like: Any, descrip: str | None) -> Any:
    import nibabel as nib

    affine = space.affine
    img = nib.Nifti1Image(arr, affine)
    hdr = img.header
    scode, qcode = 1, 1
    units: tuple[Any, Any] = ("mm", None)
    lh = _like_header(like)
    if lh is not None:
        scode, qcode = int(lh["sform_code"]), int(lh["qform_code"])
        units = lh.get_xyzt_units()
    if scode == 0 and (qcode == 0 or space.is_sheared):
        # the affine would be lost (both codes 0) or approximated (qform cannot hold shear)
        scode = max(qcode, 1)
        logger.info("sform code 0 in like=; storing the affine in the sform with code %d", scode)
    img.set_sform(affine, code=scode)
    img.set_qform(affine, code=qcode)
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
        Grid of ``array``; its affine becomes both sform and qform.
    like : str, os.PathLike or nibabel image, optional
        NIfTI whose sform/qform codes and xyzt units are copied (its affine is not used). Without
        it, both codes are 1 (scanner) and units mm. If ``like`` has sform code 0 and qform code
        0 (or the grid is sheared), the sform gets code ``max(qform code, 1)`` so the affine is
        kept.
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
