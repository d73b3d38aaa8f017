"""Stream volumes into NIfTI files: float32, or integers with ``scl_slope``/``scl_inter``
(:class:`Scaling`), slab by slab along the last axis (:class:`Volume`), gzip-compressed in worker
threads as a sequence of gzip members, written atomically (:func:`write_nifti_files`).

The scan-grid maps and masks of :mod:`medcam3d.heatmap` and the CLI jobs are written this way,
without ever holding the whole scan-grid volume; their headers come from the one header rule,
:func:`medcam3d.io.nifti.nifti_header`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._files import atomic_paths

__all__ = ["STORAGE_DTYPES", "COMPRESS_LEVEL", "Scaling", "Constant", "Volume", "slab_ranges", "write_nifti_files"]

STORAGE_DTYPES = ("uint8", "int16", "float32")

#: zlib level of ``.nii.gz`` outputs: level 1 is several times faster than the default 6 and,
#: on smooth maps, nearly as small.
COMPRESS_LEVEL = 1

# Voxels per slab when streaming a volume to a file.
_SLAB_VOXELS = 2**22


@dataclass(frozen=True)
class Scaling:
    """How a map's values are stored: ``value = stored * slope + inter`` (NIfTI ``scl_slope``/``scl_inter``).

    For ``uint8`` the stored range 0..255 spans the map's [min, max]; for ``int16``
    -32767..32767. Values are rounded to the nearest step, so they are kept to within
    :attr:`precision` (half a step: (max − min) / 510 for uint8, / 131068 for int16).
    ``float32`` stores the values themselves (no scaling).
    """

    dtype: str
    slope: float = 1.0
    inter: float = 0.0

    @classmethod
    def for_range(cls, low: float, high: float, dtype: str) -> Scaling:
        """The scaling of ``dtype`` that covers ``[low, high]``."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, not {dtype!r}.")
        if dtype == "float32":
            return cls(dtype)
        first, last = cls._stored_range(dtype)
        if not (np.isfinite(low) and np.isfinite(high)) or not high > low:
            return cls(dtype, 1.0, float(low) if np.isfinite(low) else 0.0)
        slope = (high - low) / (last - first)
        return cls(dtype, float(slope), float(low - first * slope))

    @staticmethod
    def _stored_range(dtype: str) -> tuple[int, int]:
        return (0, 255) if dtype == "uint8" else (-32767, 32767)

    @property
    def precision(self) -> float:
        """Largest difference between a value and its stored, rescaled copy (0 for float32)."""
        return 0.0 if self.dtype == "float32" else self.slope / 2

    def affine_to_stored(self) -> tuple[float, float]:
        """``(a, b)`` such that the stored value is ``trunc(a * value + b) + first`` (integers) or ``value`` (float32)."""
        if self.dtype == "float32":
            return 1.0, 0.0
        first, _ = self._stored_range(self.dtype)
        return 1.0 / self.slope, -self.inter / self.slope - first + 0.5

    def encode(self, shifted) -> np.ndarray:
        """Stored values from ``a * value + b`` (see :meth:`affine_to_stored`), same shape and memory order."""
        values = shifted.detach().cpu().numpy() if hasattr(shifted, "detach") else np.asarray(shifted)  # a torch tensor
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        if self.dtype == "uint8":
            return values.astype(np.uint8)  # values in [0.5, 255.5]: truncation rounds to nearest
        return (values.astype(np.int32) - 32767).astype(np.int16)


@dataclass(frozen=True)
class Constant:
    """A slab whose voxels all hold one stored value: ``count`` copies of the bytes ``value``."""

    value: bytes
    count: int


class Volume:
    """One volume of a NIfTI file, produced in slabs along its last spatial axis (file order).

    Parameters
    ----------
    shape : tuple of int
        Spatial shape.
    slabs : callable
        Returns an iterator over the slabs in order along the last axis: arrays
        ``(*shape[:-1], n)`` of the stored dtype, column-major (Fortran-contiguous), or
        :class:`Constant` (or any record with ``value`` bytes and a ``count``) for a slab of one
        value, written without being formed.
    background : scalar, optional
        A value that fills much of the volume (the fill outside the model's view, a mask's 0):
        each plane of a 3D slab is then written as its rows that differ from it, between two
        constant runs, so that only those rows are compressed.
    """

    def __init__(self, shape: tuple[int, ...], slabs, background=None) -> None:
        self.shape = shape
        self._slabs = slabs
        self.background = background

    def chunks(self) -> Iterator[memoryview | Constant]:
        """Segments in file order: buffers of stored bytes, or Constants (consecutive ones merged)."""
        waiting: Constant | None = None
        for slab in self._slabs():
            for segment in self._segments(slab):
                if _is_constant(segment):
                    if waiting is not None and waiting.value == segment.value:
                        waiting = Constant(waiting.value, waiting.count + segment.count)
                        continue
                    if waiting is not None:
                        yield waiting
                    waiting = Constant(segment.value, segment.count)
                    continue
                if waiting is not None:
                    yield waiting
                    waiting = None
                yield segment
        if waiting is not None:
            yield waiting

    def _segments(self, slab):
        if _is_constant(slab):
            yield slab
            return
        if self.background is None or slab.ndim != 3:
            yield np.ascontiguousarray(slab.T).data
            return
        value = np.asarray(self.background, dtype=slab.dtype)
        constant = value.tobytes()
        plane = slab.shape[0] * slab.shape[1]
        differs = (slab != value).any(axis=0) if not np.isnan(value) else ~np.isnan(slab).all(axis=0)  # (J, k)
        for k in range(slab.shape[2]):
            rows = np.flatnonzero(differs[:, k])
            if rows.size == 0:
                yield Constant(constant, plane)
                continue
            first, last = int(rows[0]), int(rows[-1])
            if first:
                yield Constant(constant, first * slab.shape[0])
            yield np.ascontiguousarray(slab[:, first:last + 1, k].T).data  # contiguous already: F order
            if last + 1 < slab.shape[1]:
                yield Constant(constant, (slab.shape[1] - 1 - last) * slab.shape[0])


def slab_ranges(shape: tuple[int, ...]):
    """``(start, stop)`` slabs along the last axis of a grid, about 4 M voxels each."""
    plane = math.prod(shape[:-1])
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    for start in range(0, shape[-1], step):
        yield start, min(start + step, shape[-1])


def _header_bytes(header) -> bytes:
    """348 bytes, the extension flag and the extensions (none: ``\\0\\0\\0\\0``), up to ``vox_offset``."""
    buffer = BytesIO()
    header.write_to(buffer)
    return buffer.getvalue()


def write_nifti_files(targets: Sequence[tuple[Path, Any]], volumes: Sequence[Volume], *, compress: bool = True) -> list[Path]:
    """Stream ``volumes`` (in order: the 4th axis) into one or more NIfTI files, atomically.

    Every target ``(path, header)`` gets the same voxel bytes under its own header, so a map and
    a rescaled view of it (a different ``scl_slope``) cost one pass. Compressed files are a
    sequence of gzip members, the header's and then one per slab (RFC 1952: readers such as
    gzip, Python's gzip, nibabel, indexed_gzip and ITK/SimpleITK read concatenated members as
    one stream, as they do pigz's and bgzip's output); slabs are compressed at
    :data:`COMPRESS_LEVEL` in worker threads while the next ones are computed, and a slab of
    one value is compressed once per file set.
    """
    handles: list[IO[bytes]] = []
    pending: collections.deque = collections.deque()

    def write(data) -> None:
        for stream in handles:
            stream.write(data)

    # Closed (streams first), then renamed onto the targets; removed on any error.
    with atomic_paths([path for path, _ in targets], suffix=".tmp") as temporaries, contextlib.ExitStack() as streams:
        for temporary, (_, header) in zip(temporaries, targets):
            stream: IO[bytes] = streams.enter_context(open(temporary, "wb"))
            handles.append(stream)
            raw = _header_bytes(header)
            stream.write(_gzip_member(raw) if compress else raw)
        with concurrent.futures.ThreadPoolExecutor(max_workers=_COMPRESS_THREADS) as pool:
            for volume in volumes:
                for chunk in volume.chunks():  # merged: Constant or memoryview
                    if not compress:
                        write(chunk.value * chunk.count if isinstance(chunk, Constant) else chunk)
                        continue
                    if isinstance(chunk, Constant):
                        pending.append(_constant_members(chunk.value, chunk.count))
                    else:
                        pending.append(pool.submit(_gzip_member, chunk))  # a memoryview keeps its array alive
                    while len(pending) > _COMPRESS_THREADS + 1 or (pending and not _is_running(pending[0])):
                        done = pending.popleft()
                        write(done if isinstance(done, bytes) else done.result())
            while pending:
                done = pending.popleft()
                write(done if isinstance(done, bytes) else done.result())
    return [path for path, _ in targets]


# Threads compressing slabs (zlib releases the GIL while it works).
_COMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))


def _is_constant(slab) -> bool:
    """A slab of one value: a :class:`Constant`, or any record with ``value`` (bytes) and ``count``."""
    return isinstance(slab, Constant) or (not isinstance(slab, (np.ndarray, memoryview))
                                           and hasattr(slab, "value") and hasattr(slab, "count"))


def _is_running(item) -> bool:
    return not isinstance(item, bytes) and not item.done()


# gzip members of 2**m copies of a value, shared by every file written (deterministic: mtime 0)
_CONSTANT_MEMBERS: dict[tuple[bytes, int], bytes] = {}
_LARGEST_CONSTANT = 22


def _constant_members(value: bytes, count: int) -> bytes:
    """gzip members that decompress to ``count`` copies of ``value``: cached runs of 2**m copies
    (at most 4 M per member), so a constant region costs no compression after the first."""
    parts = []
    largest = 1 << _LARGEST_CONSTANT
    for _ in range(count // largest):
        parts.append(_constant_member(value, _LARGEST_CONSTANT))
    rest = count % largest
    for power in range(_LARGEST_CONSTANT - 1, -1, -1):
        if rest >> power & 1:
            parts.append(_constant_member(value, power))
    return b"".join(parts)


def _constant_member(value: bytes, power: int) -> bytes:
    key = (value, power)
    if key not in _CONSTANT_MEMBERS:
        _CONSTANT_MEMBERS[key] = _gzip_member(value * (1 << power))
    return _CONSTANT_MEMBERS[key]


def _gzip_member(data) -> bytes:
    """One complete gzip member (header, deflate stream at COMPRESS_LEVEL, trailer) of ``data``."""
    compressor = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()
