"""What the readers and writers of :mod:`medcam3d.io` share: the file formats, finding a file and
its kind, the volume of a 4D file to read, the geometry tolerances and a few formatters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ImageNotFoundError, ImageReadError, UnsupportedFormatError, VolumeError, VolumeIndexError


_NIFTI = (".nii.gz", ".nii")
_ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File extensions :func:`read` accepts (and a directory holding a DICOM series).
READ_FORMATS = _NIFTI + _ITK
#: File extensions :func:`write` accepts (detached-header formats .nhdr/.mhd cannot be renamed
#: atomically, since the header names its data file).
WRITE_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")

# Geometry tolerances: 1 % of the spacing plus 1e-3 mm (DICOM slices along the normal, and the
# sform and qform of one NIfTI grid).
_SLICE_REL_TOL = 0.01
_SLICE_ABS_TOL_MM = 1e-3


def _fmt_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (binary units)."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _fmt_mm(values: Any) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


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
    if not p.is_file():  # opening a FIFO waits for a writer forever; a device never ends
        raise ImageReadError(
            f"'{p}' is not a regular file (a FIFO, socket or device); expected an image file "
            f"({', '.join(READ_FORMATS)}) or a DICOM folder."
        )
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


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) >= 3 else tuple(shape)


def _without_extra_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop axes of size 1 beyond the third, as :func:`read` does (NIfTI ``(I, J, K, 1, C)``)."""
    return tuple(shape[:3]) + tuple(n for n in shape[3:] if n != 1)


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
