"""A volume seen on another grid, resampled only where napari looks: oblique scans at CT size.

napari draws 2D slices of a layer only through the in-plane part of its affine (see
:mod:`._grid`), so an oblique scan is shown on an axis-aligned display grid. Resampling all of a
512 x 512 x 300 CT onto that grid takes a minute and several times the scan's memory. A
:class:`ResampledView` is an array-like napari slices like a NumPy array (``shape``, ``dtype``,
``ndim``, ``__getitem__``, ``__array__``): each request (one slice in 2D, a tile of it, or the
whole volume of a coarse level in 3D) is resampled from the scan's own voxels when asked for,
slab by slab, straight from the scan as it is stored (one ``scipy.ndimage.affine_transform``
call per slab: nothing of the scan is converted to float or copied); the interpolation is
:func:`medcam3d.space.resample`'s.
:func:`pyramid` gives the
levels of a napari multiscale image (full resolution, then halved), so that the 3D display, which
napari draws from the coarsest level, is resampled at a fraction of the cost.

A slice costs one small resampling (about 0.1 s for a 917 x 966 plane of the benchmark CT).
napari asks for the same plane several times while it adds a layer, so the last few results
are kept (:class:`Recent`: at most 32 MB of float32); beyond that, memory stays at the scan's
own voxels.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, cast

import numpy as np

from ..space import Space

__all__ = ["ResampledView", "Recent", "pyramid", "source_of", "shape_of", "RECENT_REQUESTS", "RECENT_VOXELS"]

#: Output voxels resampled per step (bounds the work arrays of one request: about 60 bytes a voxel).
SLAB_VOXELS = 1 << 20
_TOL = 1e-5  # voxels: the field of view's edge, as medcam3d.space.resample
#: Resampled requests kept per view (with its sub-views and pyramid levels): napari slices the same plane
#: several times while it adds a layer (thumbnail, tiles, a redraw).
RECENT_REQUESTS = 8
#: The largest request kept (voxels): an axial slice of a 1024 x 1024 display grid.
RECENT_VOXELS = 1 << 20


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
                 mode: str = "linear", recent: Recent | None = None) -> None:
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
        self._recent = recent if recent is not None else Recent()  # shared with sub-views and pyramid levels
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
                return ResampledView(self.source, self.source_space, sub, fill=self.fill, mode=self.mode,
                                     recent=self._recent)
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

        Trilinear: one :func:`scipy.ndimage.affine_transform` call (order 1, edge values
        repeated up to the field of view's edge, then ``fill`` beyond it), reading the source
        as it is stored (its own type and memory order: nothing is converted or copied).
        Nearest: the source voxel whose cell holds each point.
        """
        key = (tuple(sub.shape), np.round(np.asarray(sub.affine, dtype=np.float64), 6).tobytes())
        with self._recent.lock:
            found = self._recent.get(key)
        if found is not None:
            return found.copy()
        to_source = np.linalg.inv(self.source_space.affine) @ sub.affine
        n_source = self.source.shape
        inside = np.ones(sub.shape, dtype=bool)
        coords = []
        ranges = [np.arange(n, dtype=np.float64).reshape([-1 if b == a else 1 for b in range(3)])
                  for a, n in enumerate(sub.shape)]
        for axis in range(3):
            row = to_source[axis]
            c = row[3] + sum(row[b] * ranges[b] for b in range(3) if row[b] != 0.0)
            c = np.broadcast_to(np.asarray(c, dtype=np.float64), sub.shape)
            inside &= (c >= -0.5 - _TOL) & (c <= n_source[axis] - 0.5 + _TOL)
            coords.append(c)
        if self.mode == "nearest":
            index = tuple(np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp) for c, n in zip(coords, n_source))
            out = self.source[index].astype(self.dtype, copy=False)
            out[~inside] = self.fill
            return self._recent.keep(key, out)
        del coords
        from scipy.ndimage import affine_transform

        values = affine_transform(self.source, to_source[:3, :3], offset=to_source[:3, 3], output_shape=sub.shape,
                                  output=np.float32, order=1, mode="nearest", prefilter=False)
        values[~inside] = self.fill
        if self.dtype.kind in "iub":
            np.rint(values, out=values)
            if self.dtype.kind in "iu":
                info = np.iinfo(cast(Any, self.dtype))
                np.clip(values, info.min, info.max, out=values)
        return self._recent.keep(key, values.astype(self.dtype, copy=False))


class Recent:
    """The last few resampled requests of a view and its sub-views (napari asks for a slice several times).

    At most :data:`RECENT_REQUESTS` results of at most :data:`RECENT_VOXELS` voxels each are kept
    (a few slices: at most 32 MB of float32); callers get copies. Thread-safe.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Any) -> np.ndarray | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def keep(self, key: Any, values: np.ndarray) -> np.ndarray:
        """Remember ``values`` for ``key`` (when small enough) and return them."""
        if values.size <= RECENT_VOXELS:
            with self.lock:
                self._items[key] = values.copy()
                while len(self._items) > RECENT_REQUESTS:
                    self._items.popitem(last=False)
        return values


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
    recent = levels[0]._recent
    factor = 1
    while levels[-1].size > coarsest_voxels and min(levels[-1].shape) > 8:
        factor *= 2
        shape = tuple(max(1, math.ceil(n / factor)) for n in target.shape)
        # Level voxel i covers full-resolution voxels factor*i ... factor*i + factor - 1: its centre.
        local = np.diag([float(factor)] * 3 + [1.0])
        local[:3, 3] = (factor - 1) / 2.0
        levels.append(ResampledView(source, source_space, Space(shape, target.affine @ local), fill=fill, recent=recent))
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
