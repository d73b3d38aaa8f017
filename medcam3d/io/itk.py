"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK.

One concept: the SimpleITK calls and what they print. Their headers are checked first
(:mod:`medcam3d.io.itk_headers`: detached data files, line ends, dimensions, direction, the size
the header claims); SimpleITK's LPS+ geometry becomes RAS+ with
:func:`medcam3d.orientation.lps_to_ras`; what ITK's C++ readers print goes into the messages. Also
SimpleITK images for writing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import ImageReadError, UnwritableImageError
from ..orientation import lps_to_ras, ras_to_lps
from ..space import Space
from ._common import _suffix, _volume_index, _without_extra_singletons
from .itk_headers import DataFile, check_direction, data_file
from .limits import (MAX_VOXEL_MM, _DEFLATE_MAX_RATIO, _DEFLATE_SLACK, _Limits, _check_allocation, _check_voxel_sizes,
                     _out_itemsize, _too_large_for_file)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ItkInfo:
    reader: Any
    dim: int
    size: tuple[int, ...]
    components: int
    component_bytes: int
    affine: np.ndarray
    data: DataFile


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
    """Collect what the C++ readers print while ``p`` is read; log it as one warning at the end.

    When the read fails, medcam3d's one-line error says what is wrong: the readers' messages are
    then logged at debug level only (stderr holds the error's line alone).
    """
    collected: dict[str, int] = {}
    token = _COLLECTED.set(collected)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _COLLECTED.reset(token)
        shown = [f"{line} (x{n})" if n > 1 else line for line, n in collected.items()
                 if not any(h in line for h in _HANDLED)]
        if shown and not failed:
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

    data = data_file(p, trust)  # before SimpleITK opens anything
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
    check_direction(p, direction[:sd, :sd], "TransformMatrix" if _suffix(p) in (".mha", ".mhd") else "space directions")
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


def _itk_dtype(pixel_id: int) -> str:
    import SimpleITK as sitk

    for base in ("UInt8", "Int8", "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64", "Float32", "Float64"):
        for prefix in ("sitk", "sitkVector", "sitkLabel"):
            if getattr(sitk, prefix + base, None) == pixel_id:
                return base.lower()
    return str(sitk.GetPixelIDValueAsString(pixel_id))


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
