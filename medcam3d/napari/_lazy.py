"""A volume seen on another grid, resampled only where napari looks: oblique scans at CT size.

napari draws 2D slices of a layer only through the in-plane part of its affine (see
:mod:`._grid`), so an oblique scan is shown on an axis-aligned display grid. Resampling all of a
512 x 512 x 300 CT onto that grid takes a minute and several times the scan's memory. A
:class:`ResampledView` is an array-like napari slices like a NumPy array (``shape``, ``dtype``,
``ndim``, ``__getitem__``, ``__array__``): each request (one slice in 2D, a tile of it, or the
whole volume of a coarse level in 3D) is resampled from the scan's own voxels when asked for,
slab by slab, by gathering the 8 voxels around each point from the scan as it is stored (nothing
of it is converted to float or copied); the interpolation is :func:`medcam3d.space.resample`'s.
:func:`pyramid` gives the
levels of a napari multiscale image (full resolution, then halved), so that the 3D display, which
napari draws from the coarsest level, is resampled at a fraction of the cost.

Nothing is cached: a slice costs one small resampling (tens of milliseconds on an 800 x 800
plane), and memory stays at the scan's own voxels.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from ..space import Space

__all__ = ["ResampledView", "pyramid", "source_of", "shape_of"]

#: Output voxels resampled per step (bounds the work arrays of one request: about 60 bytes a voxel).
SLAB_VOXELS = 1 << 20
_TOL = 1e-5  # voxels: the field of view's edge, as medcam3d.space.resample


class ResampledView:
    """``source`` (on ``source_space``) seen on the grid ``target``, resampled on access.

    Parameters
    ----------
    source : (*source_space.shape) ndarray
        The scan's voxels in its file's order (not copied).
    source_space : Space
    target : Space
        The 3D grid to show the voxels on (e.g. :func:`._grid.axis_aligned_grid`).
    fill : float
        The value outside the scan (e.g. its minimum, air).
    mode : {"linear", "nearest"}
        Trilinear (integer scans are rounded back to their type) or nearest neighbour (labels).

    Attributes
    ----------
    shape, dtype, ndim, size
        As a NumPy array of ``target.shape`` in ``source``'s dtype (float64 becomes float32).
    held_nbytes : int
        The bytes this view keeps (the source's).
    """

    def __init__(self, source: np.ndarray, source_space: Space, target: Space, *, fill: float = 0.0,
                 mode: str = "linear") -> None:
        if source.ndim != 3 or target.ndim != 3 or tuple(source.shape) != tuple(source_space.shape):
            raise ValueError(f"ResampledView takes a 3D array on its 3D grid, not {source.shape} on {source_space.shape} "
                             f"-> {target.shape}.")
        self.source = source
        self.source_space = source_space
        self.target = target
        self.fill = float(fill)
        self.mode = mode
        self.dtype = np.dtype(np.float32) if source.dtype == np.float64 else source.dtype
        self.shape = tuple(int(n) for n in target.shape)
        self.ndim = 3
        self.size = math.prod(self.shape)
        self.held_nbytes = int(source.nbytes)
        # Target voxel -> source voxel (homogeneous 4x4).
        self._to_source = np.linalg.inv(source_space.affine) @ target.affine

    @property
    def nbytes(self) -> int:
        """The bytes of the whole view if it were made (napari reads this for memory hints)."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ResampledView(shape={self.shape}, dtype={self.dtype}, source={tuple(self.source.shape)})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._values([0, 0, 0], [1, 1, 1], list(self.shape))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> Any:
        """Ints and slices: an ndarray when an int picks a slice; slices alone give a lazy sub-view.

        napari crops a multiscale level to the visible tile with slices first and picks the slice
        with an int (or asks for the array) afterwards: the crop must not resample the whole volume.
        """
        starts, steps, counts, squeeze = _parse(key, self.shape)
        if not squeeze:
            if counts == list(self.shape) and steps == [1, 1, 1]:
                return self
            if 0 not in counts:
                sub = _subgrid(self.target.affine, starts, steps, (counts[0], counts[1], counts[2]), 0)
                return ResampledView(self.source, self.source_space, sub, fill=self.fill, mode=self.mode)
        out = self._values(starts, steps, counts)
        return out.squeeze(axis=squeeze) if squeeze else out

    def _values(self, starts: list[int], steps: list[int], counts: list[int]) -> np.ndarray:
        """The voxels ``start + step * index`` (per axis), resampled slab by slab."""
        out = np.empty(counts, dtype=self.dtype)
        if 0 in counts:
            return out
        # Slabs along the first axis, each of at most SLAB_VOXELS voxels.
        rows = max(1, SLAB_VOXELS // max(1, counts[1] * counts[2]))
        for first in range(0, counts[0], rows):
            n = min(rows, counts[0] - first)
            sub = _subgrid(self.target.affine, starts, steps, (n, counts[1], counts[2]), first)
            out[first:first + n] = self._resample(sub)
        return out

    def _resample(self, sub: Space) -> np.ndarray:
        """The source sampled at the voxel centres of ``sub`` (trilinear or nearest, as :func:`medcam3d.space.resample`).

        Gathers the 8 (or 1) source voxels around each point straight from the source array, in
        its own type and memory order: nothing of the source is converted or copied.
        """
        to_source = np.linalg.inv(self.source_space.affine) @ sub.affine
        grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in sub.shape), indexing="ij", copy=False)
        n_source = self.source.shape
        coords = []
        inside = np.ones(sub.shape, dtype=bool)
        for axis in range(3):
            row = to_source[axis]
            c = row[3] + sum(row[b] * grids[b] for b in range(3) if row[b] != 0.0)
            c = np.broadcast_to(np.asarray(c, dtype=np.float64), sub.shape)
            inside &= (c >= -0.5 - _TOL) & (c <= n_source[axis] - 0.5 + _TOL)
            coords.append(c)
        if self.mode == "nearest":
            index = tuple(np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp) for c, n in zip(coords, n_source))
            out = self.source[index].astype(self.dtype, copy=False)
            out[~inside] = self.fill
            return out
        lower, weight = [], []
        for c, n in zip(coords, n_source):
            clamped = np.clip(c, 0.0, max(n - 1, 0))
            low = np.minimum(np.floor(clamped), max(n - 2, 0)).astype(np.intp)
            lower.append(low)
            weight.append((clamped - low).astype(np.float32) if n > 1 else np.zeros(sub.shape, np.float32))
        del coords
        values = np.zeros(sub.shape, dtype=np.float32)
        for corner in range(8):
            bits = [(corner >> (2 - axis)) & 1 for axis in range(3)]
            index = tuple(np.minimum(low + bit, n - 1) for low, bit, n in zip(lower, bits, n_source))
            w = np.ones(sub.shape, dtype=np.float32)
            for axis, bit in enumerate(bits):
                w *= weight[axis] if bit else 1.0 - weight[axis]
            values += w * self.source[index]
        values[~inside] = self.fill
        if self.dtype.kind in "iub":
            np.rint(values, out=values)
            if self.dtype.kind in "iu":
                info = np.iinfo(cast(Any, self.dtype))
                np.clip(values, info.min, info.max, out=values)
        return values.astype(self.dtype, copy=False)


def _parse(key: Any, shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int], tuple[int, ...]]:
    """Starts, steps and counts per axis of a basic index (ints, slices, Ellipsis), and the int axes."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        at = next(n for n, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        raise IndexError(f"too many indices for a {len(shape)}D view: {key}")
    starts, steps, counts, squeeze = [], [], [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, (int, np.integer)):
            index = int(k) + n if k < 0 else int(k)
            if not 0 <= index < n:
                raise IndexError(f"index {k} is out of bounds for axis {axis} with size {n}")
            starts.append(index)
            steps.append(1)
            counts.append(1)
            squeeze.append(axis)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step <= 0:
                raise IndexError("ResampledView takes slices with a positive step")
            starts.append(start)
            steps.append(step)
            counts.append(len(range(start, stop, step)))
        else:
            raise IndexError(f"ResampledView takes ints and slices, not {type(k).__name__}")
    return starts, steps, counts, tuple(squeeze)


def _subgrid(affine: np.ndarray, starts: list[int], steps: list[int], shape: tuple[int, int, int], first: int) -> Space:
    """The grid of target voxels ``start + step * (first + i, j, k)``."""
    local = np.diag([float(s) for s in steps] + [1.0])
    local[:3, 3] = starts
    local[0, 3] += first * steps[0]
    return Space(shape, np.asarray(affine, dtype=np.float64) @ local)


def pyramid(source: np.ndarray, source_space: Space, target: Space, *, fill: float = 0.0,
            coarsest_voxels: int = 1 << 22) -> list[ResampledView]:
    """Levels of a napari multiscale image of ``source`` on ``target``: full resolution, then halved.

    Each level is a :class:`ResampledView` on ``target`` with voxels 2, 4, ... times larger
    (covering the same box), down to the first level of at most ``coarsest_voxels`` voxels (what
    napari's 3D display draws).

    Returns
    -------
    list of ResampledView
        Decreasing shapes; one level when ``target`` is already small.
    """
    levels = [ResampledView(source, source_space, target, fill=fill)]
    factor = 1
    while levels[-1].size > coarsest_voxels and min(levels[-1].shape) > 8:
        factor *= 2
        shape = tuple(max(1, math.ceil(n / factor)) for n in target.shape)
        # Level voxel i covers full-resolution voxels factor*i ... factor*i + factor - 1: its centre.
        local = np.diag([float(factor)] * 3 + [1.0])
        local[:3, 3] = (factor - 1) / 2.0
        levels.append(ResampledView(source, source_space, Space(shape, target.affine @ local), fill=fill))
    return levels


def source_of(data: Any) -> tuple[np.ndarray, Space] | None:
    """The scan voxels and their own grid behind a layer's data (a view or a pyramid of views), or None."""
    first = data[0] if isinstance(data, (list, tuple)) and data else data
    if not isinstance(first, ResampledView):
        levels = getattr(data, "_data", None)  # napari's MultiScaleData wraps the list of levels
        first = levels[0] if isinstance(levels, (list, tuple)) and levels else None
    if isinstance(first, ResampledView):
        return first.source, first.source_space
    return None


def shape_of(data: Any) -> tuple[int, ...]:
    """The shape of a layer's data: level 0's for a pyramid (a list of levels or napari's MultiScaleData)."""
    if isinstance(data, (list, tuple)) and data and hasattr(data[0], "shape"):
        return tuple(int(n) for n in data[0].shape)
    return tuple(int(n) for n in np.shape(data))
