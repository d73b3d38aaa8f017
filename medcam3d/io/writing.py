""":func:`write`: NIfTI (the header rule of :mod:`medcam3d.io.nifti`), NRRD and MetaImage, atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_write
from ..errors import (ImageWriteError, OutputDirectoryError, OutputPermissionError, UnsupportedFormatError,
                      UnwritableImageError)
from ..space import Space
from ._common import WRITE_FORMATS, _NIFTI, _suffix
from .nifti import _nifti_image
from .itk import _itk_image, _itk_reason

logger = logging.getLogger(__name__)


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
