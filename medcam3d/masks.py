"""Weakly-supervised localization and segmentation: masks, boxes and peaks from a heatmap.

Everything works on one map on one grid (usually the scan's, after
:func:`medcam3d.heatmap.to_scanner_space`), in 3D (2D as a special case), and reports positions
both as voxel indices and in world millimetres (RAS).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ._files import atomic_write_text
from ._json import json_values
from .io.nifti import nifti_header
from .io.streaming import Volume, slab_ranges, write_nifti_files
from .space import Resampler, Space, SpaceError

__all__ = ["threshold_mask", "largest_component", "BoundingBox", "bounding_box", "peak", "otsu_threshold", "save_box",
           "Runs", "superlevel_runs", "labels_present", "largest_component_runs", "top_mass_runs", "save_runs"]

_METHODS = ("fraction", "percentile", "otsu")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (:func:`skimage.filters.threshold_otsu` on a ``bins``-bin histogram):
    maximizes the between-class variance; the upper class is ``values > threshold``.

    Constant ``values`` have no threshold to find: their value is returned (nothing lies above it).
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    return float(threshold_otsu(values, nbins=bins))


def threshold_mask(
    heat: np.ndarray,
    method: str = "fraction",
    value: float = 0.5,
    *,
    keep_largest: bool = False,
) -> np.ndarray:
    """Binary mask from a heatmap.

    Parameters
    ----------
    heat : (*shape) ndarray
        One map (raw or normalized).
    method : {"fraction", "percentile", "otsu"}
        ``fraction``: voxels ≥ ``value`` × max (value in (0, 1]); ``percentile``: voxels ≥ the
        ``value``-th percentile (0–100); ``otsu``: Otsu's threshold (``value`` unused).
    value : float
    keep_largest : bool
        Keep only the largest connected component (26-connectivity in 3D).

    Returns
    -------
    (*shape) bool ndarray
        All False for a map whose maximum is ≤ 0 (nothing to localize).
    """
    heat = np.asarray(heat, dtype=np.float32)
    if not np.all(np.isfinite(heat)):
        raise ValueError("The heatmap contains NaN/Inf values; cannot threshold it.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, not {method!r}.")
    top = float(heat.max()) if heat.size else 0.0
    if top <= 0:
        return np.zeros(heat.shape, dtype=bool)
    if method == "fraction":
        if not 0 < value <= 1:
            raise ValueError(f"A fraction threshold must be in (0, 1], not {value}.")
        mask = heat >= value * top
    elif method == "percentile":
        if not 0 <= value <= 100:
            raise ValueError(f"A percentile threshold must be in [0, 100], not {value}.")
        mask = heat >= np.percentile(heat, value)
        mask &= heat > 0
    else:
        mask = heat > otsu_threshold(heat)
    return largest_component(mask) if keep_largest else mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity) of a binary mask."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


@dataclass(frozen=True)
class BoundingBox:
    """An axis-aligned box on the voxel grid, and where it lies in the world.

    Attributes
    ----------
    voxel_min, voxel_max : tuple of int
        Inclusive voxel index bounds (i, j, k).
    world_min, world_max : tuple of float
        RAS mm extent of the box's outer voxel edges (an oblique grid's box is the
        axis-aligned world extent of its eight corners).
    world_corners : list of list of float
        The eight outer corners in RAS mm.
    centre_mm : tuple of float
    size_mm : tuple of float
        Edge lengths along the voxel axes, in mm.
    voxels : int
        Number of mask voxels inside.
    """

    voxel_min: tuple[int, ...]
    voxel_max: tuple[int, ...]
    world_min: tuple[float, ...]
    world_max: tuple[float, ...]
    world_corners: list[list[float]]
    centre_mm: tuple[float, ...]
    size_mm: tuple[float, ...]
    voxels: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def bounding_box(mask: np.ndarray, space: Space) -> BoundingBox | None:
    """Bounding box of a binary mask in voxel indices and world mm; None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if tuple(mask.shape) != tuple(space.shape):
        raise ValueError(f"The mask has shape {mask.shape} but the space has shape {space.shape}.")
    where = np.argwhere(mask)
    if where.size == 0:
        return None
    return _box(where.min(0), where.max(0), int(len(where)), space)


def _box(low: np.ndarray, high: np.ndarray, voxels: int, space: Space) -> BoundingBox:
    """The box of voxel bounds ``low..high`` (inclusive) holding ``voxels`` mask voxels."""
    low, high = np.asarray(low), np.asarray(high)
    edges = [(lo - 0.5, hi + 0.5) for lo, hi in zip(low, high)]
    corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(len(edges), -1).T
    world = space.voxel_to_world(corners)
    centre = space.voxel_to_world((low + high) / 2.0)
    size = (high - low + 1) * np.asarray(space.spacing)
    return BoundingBox(
        voxel_min=tuple(int(v) for v in low),
        voxel_max=tuple(int(v) for v in high),
        world_min=tuple(float(v) for v in world.min(0)),
        world_max=tuple(float(v) for v in world.max(0)),
        world_corners=world.tolist(),
        centre_mm=tuple(float(v) for v in centre),
        size_mm=tuple(float(v) for v in size),
        voxels=int(voxels),
    )


def peak(heat: np.ndarray, space: Space) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """Voxel index of the heatmap's maximum (the first in C order) and its world position (RAS mm).

    ``None`` for a flat map (e.g. all zero, a ReLU'd negative map): it has no peak.
    """
    heat = np.asarray(heat)
    if heat.size == 0 or not np.nanmax(heat) > np.nanmin(heat):
        return None
    voxel = np.unravel_index(int(np.nanargmax(heat)), heat.shape)
    world = space.voxel_to_world(np.asarray(voxel, dtype=float))
    return tuple(int(v) for v in voxel), tuple(float(v) for v in world)


def save_box(path: str | Path, box: BoundingBox | None, **extra: object) -> Path:
    """Write a box (and any extra fields, e.g. the peak) as strict JSON, atomically.

    NaN and infinities (a box or peak of a degenerate map) are written as ``null``, as in the
    package's other JSON files; numpy scalars and arrays as numbers and lists.
    """
    payload = {"box": None if box is None else box.to_dict(), **extra}
    return atomic_write_text(path, json.dumps(json_values(payload), indent=2, allow_nan=False))


# --------------------------------------------------------------------------------------------
# Masks as runs: thresholds of a separable (feature-grid) map without the whole volume
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """A binary mask on a grid, stored as runs of set voxels along the grid's first axis.

    Run ``n`` sets voxels ``lo[n] .. hi[n]`` (inclusive) along axis 0 of the row ``row[n]``: the
    C-order flat index over the other axes. Cheap to build from a feature-grid map
    (:func:`superlevel_runs`), to label (:meth:`largest`), to box (:meth:`box`) and to write in
    slabs (:meth:`slab`), without the grid-sized boolean array.

    Attributes
    ----------
    shape : tuple of int
        The grid's shape.
    row, lo, hi : (N,) int64 ndarray
        Sorted by row, then ``lo``; runs of one row neither overlap nor touch.
    """

    shape: tuple[int, ...]
    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def from_array(cls, mask: np.ndarray) -> Runs:
        """The runs of a boolean array."""
        mask = np.asarray(mask, dtype=bool)
        rows = np.moveaxis(mask, 0, -1).reshape(-1, mask.shape[0])  # (rows, n0), rows in C order of axes 1..
        padded = np.zeros((rows.shape[0], rows.shape[1] + 2), dtype=np.int8)
        padded[:, 1:-1] = rows
        step = np.diff(padded, axis=1)
        starts = np.argwhere(step == 1)
        stops = np.argwhere(step == -1)
        return cls(tuple(mask.shape), starts[:, 0].astype(np.int64), starts[:, 1].astype(np.int64),
                   stops[:, 1].astype(np.int64) - 1)

    @property
    def voxels(self) -> int:
        """Number of set voxels."""
        return int(np.sum(self.hi - self.lo + 1))

    def to_array(self) -> np.ndarray:
        """The mask as a boolean ``(*shape)`` array."""
        out = np.zeros((math.prod(self.shape[1:]), self.shape[0]), dtype=bool)
        for r, a, b in zip(self.row, self.lo, self.hi):
            out[r, a:b + 1] = True
        return np.moveaxis(out.reshape(*self.shape[1:], self.shape[0]), -1, 0)

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs per row as dense tables ``(*box, m)`` over the bounding box of the rows that hold
        runs (rows outside it hold none): run id (-1 for none), lo, hi."""
        position = np.array(np.unravel_index(self.row, self.shape[1:]))  # (ndim - 1, N)
        low = position.min(axis=1)
        box = tuple(int(v) for v in position.max(axis=1) - low + 1)
        row = np.ravel_multi_index(tuple(position - low[:, None]), box)
        count = np.bincount(row, minlength=math.prod(box))
        m = max(int(count.max()), 1)
        starts = np.concatenate([[0], np.cumsum(count)[:-1]])
        rank = np.arange(len(row)) - starts[row]  # runs are sorted by row
        ids = np.full((count.size, m), -1, dtype=np.int64)
        lo = np.ones((count.size, m), dtype=np.int64)
        hi = np.zeros((count.size, m), dtype=np.int64)
        ids[row, rank] = np.arange(len(row))
        lo[row, rank] = self.lo
        hi[row, rank] = self.hi
        grid = (*box, m)
        return ids.reshape(grid), lo.reshape(grid), hi.reshape(grid)

    def components(self) -> np.ndarray:
        """Label (0, 1, ...) of each run's connected component, full connectivity (26 in 3D, 8 in 2D)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.row)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        ids, lo, hi = self._table()
        m = ids.shape[-1]
        first, second = [], []
        rest = len(self.shape) - 1
        for offset in itertools.product((-1, 0, 1), repeat=rest):
            nonzero = [d for d in offset if d]
            if not nonzero or nonzero[0] < 0:
                continue  # each neighbouring pair of rows once
            a = tuple(slice(0, -1) if d == 1 else slice(1, None) if d == -1 else slice(None) for d in offset)
            b = tuple(slice(1, None) if d == 1 else slice(0, -1) if d == -1 else slice(None) for d in offset)
            for x in range(m):
                for y in range(m):
                    id_a, id_b = ids[a][..., x], ids[b][..., y]
                    touch = (id_a >= 0) & (id_b >= 0) & (lo[a][..., x] <= hi[b][..., y] + 1) & (lo[b][..., y] <= hi[a][..., x] + 1)
                    first.append(id_a[touch])
                    second.append(id_b[touch])
        i = np.concatenate(first) if first else np.zeros(0, dtype=np.int64)
        j = np.concatenate(second) if second else np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        return labels.astype(np.int64)

    def subset(self, keep: np.ndarray) -> Runs:
        """The runs where ``keep`` (boolean, one per run) is set."""
        return Runs(self.shape, self.row[keep], self.lo[keep], self.hi[keep])

    def largest(self) -> Runs:
        """The largest connected component (full connectivity), as :func:`largest_component` picks it.

        Ties go to the component whose first voxel comes first in C order (``ndimage.label``'s
        numbering).
        """
        labels = self.components()
        if labels.size == 0:
            return self
        sizes = np.bincount(labels, weights=self.hi - self.lo + 1)
        first_voxel = self.lo * math.prod(self.shape[1:]) + self.row
        first = np.full(sizes.size, np.iinfo(np.int64).max)
        np.minimum.at(first, labels, first_voxel)
        best = np.flatnonzero(sizes == sizes.max())
        chosen = best[np.argmin(first[best])]
        return self.subset(labels == chosen)

    def box(self, space: Space) -> BoundingBox | None:
        """Bounding box in voxels and world mm (as :func:`bounding_box` of the mask); None when empty."""
        if len(self.row) == 0:
            return None
        others = np.array(np.unravel_index(self.row, self.shape[1:]))  # (ndim - 1, N)
        low = np.concatenate([[self.lo.min()], others.min(axis=1)])
        high = np.concatenate([[self.hi.max()], others.max(axis=1)])
        return _box(low, high, self.voxels, space)

    def slab(self, start: int, stop: int) -> Any:
        """The mask for indices ``start:stop`` of the last axis, uint8, in column-major (NIfTI) order.

        Returns
        -------
        (shape[0], ..., stop - start) uint8 ndarray, Fortran-contiguous; or, when no voxel of the
        slab is set, a :class:`medcam3d.io.streaming.Constant`-like ``(value=b"\\0", count)`` record.
        """
        shape = (*self.shape[:-1], stop - start)
        others = np.unravel_index(self.row, self.shape[1:]) if len(self.row) else [np.zeros(0, np.int64)]
        last = others[-1]
        chosen = (last >= start) & (last < stop)
        if not chosen.any():
            return _Zeros(b"\0", math.prod(shape))
        out = np.zeros(shape[::-1], dtype=np.uint8).T  # Fortran order: axis 0 fastest
        lo, hi = self.lo[chosen], self.hi[chosen]
        position = [o[chosen] for o in others]
        position[-1] = position[-1] - start
        base = lo + self.shape[0] * np.ravel_multi_index(tuple(position), shape[1:], order="F")
        lengths = hi - lo + 1
        starts = np.repeat(base - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        flat = out.T.reshape(-1)  # a view: the C order of the transpose is the F order of ``out``
        flat[starts + np.arange(int(lengths.sum()))] = 1
        return out


@dataclass(frozen=True)
class _Zeros:
    """An all-zero slab (the shape of :class:`medcam3d.io.streaming.Constant`, without importing it)."""

    value: bytes
    count: int


def superlevel_runs(resampler: Resampler, data: Any, threshold: float, *, fill: float = 0.0) -> Runs:
    """The voxels of the target grid where the resampled map is ``>= threshold``, as runs.

    The map is ``resampler(data, fill=fill)`` (trilinear, see :func:`medcam3d.space.resample`),
    but it is never formed: along axis 0 each row of the target grid is a piecewise-linear
    function of the voxel index with a piece per source voxel, so where it crosses the threshold
    is solved per piece and checked at the run ends. The work is proportional to the number of
    rows times the source length along that axis, not to the number of voxels. Separable
    (axis-parallel) grids only.

    Parameters
    ----------
    resampler : Resampler
        From the map's grid to the target grid; ``resampler.separable`` must hold.
    data : (*source.shape) ndarray or Tensor
        One map.
    threshold : float
    fill : float
        Value outside the source field of view.

    Returns
    -------
    Runs
        The same voxels as ``resample(data, ...) >= threshold`` (a voxel whose value is within
        float32 rounding of the threshold may differ).
    """
    if resampler.axes is None:  # not separable
        raise SpaceError("superlevel_runs needs grids with parallel axes; resample the map and threshold it instead.")
    shape = resampler.target.shape
    spec = resampler.axes[0]
    values = resampler.rows(data, 0, fill=fill)
    values = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    n = values.shape[-1]
    every = values.reshape(-1, n)
    # only rows that reach the threshold somewhere can hold runs (all of them if the fill does)
    active = np.flatnonzero(every.max(axis=1) >= threshold) if not fill >= threshold else np.arange(len(every))
    h = every[active]
    rows = h.shape[0]
    first, last = resampler.inside_range(0)
    n0 = shape[0]
    s, o = spec.scale, spec.offset

    def value(r: np.ndarray, t: np.ndarray) -> np.ndarray:
        c = np.clip(s * t + o, 0.0, n - 1.0)
        a = np.minimum(np.floor(c), max(n - 2, 0)).astype(np.int64)
        w = c - a
        upper = np.minimum(a + 1, n - 1)
        v = h[r, a] * (1.0 - w) + h[r, upper] * w
        return np.where((t >= first) & (t <= last), v, fill)

    # pieces of the row function in source coordinates: (-inf, 0], [a, a + 1] ..., [n - 1, inf)
    lows, highs = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = h[:, 0] >= threshold
        lows.append(np.where(ok, -np.inf, np.nan))
        highs.append(np.where(ok, 0.0, np.nan))
        for a in range(n - 1):
            ha, hb = h[:, a], h[:, a + 1]
            ok_a, ok_b = ha >= threshold, hb >= threshold
            cross = a + (threshold - ha) / (hb - ha)
            lo = np.where(ok_a, float(a), np.where(ok_b, cross, np.nan))
            hi = np.where(ok_b, float(a + 1), np.where(ok_a, cross, np.nan))
            lows.append(lo)
            highs.append(hi)
        ok = h[:, -1] >= threshold
        lows.append(np.where(ok, n - 1.0, np.nan))
        highs.append(np.where(ok, np.inf, np.nan))
        c_lo, c_hi = np.stack(lows, axis=1), np.stack(highs, axis=1)  # (rows, pieces); NaN: empty
        valid = ~np.isnan(c_lo) & ~np.isnan(c_hi)
        t_lo, t_hi = (c_lo - o) / s, (c_hi - o) / s
        if s < 0:  # the axis runs backwards through the source: pieces in increasing voxel order
            t_lo, t_hi, valid = t_hi[:, ::-1], t_lo[:, ::-1], valid[:, ::-1]
        lo = np.ceil(np.clip(t_lo - 1e-9, first - 1, last + 1))
        hi = np.floor(np.clip(t_hi + 1e-9, first - 1, last + 1))
    lo = np.clip(np.nan_to_num(lo, nan=1), first, last + 1).astype(np.int64)
    hi = np.clip(np.nan_to_num(hi, nan=0), first - 1, last).astype(np.int64)
    valid &= lo <= hi
    # check the ends against the map itself: float rounding of a crossing point can only move an
    # end by one voxel, where the map is within rounding of the threshold
    at = np.nonzero(valid)
    r, a, b = at[0], lo[at], hi[at]
    a = np.where(value(r, a) < threshold, a + 1, a)
    b = np.where(value(r, b) < threshold, b - 1, b)
    kept = a <= b
    a = np.where(kept & (a - 1 >= first) & (value(r, np.maximum(a - 1, 0)) >= threshold), a - 1, a)
    b = np.where(kept & (b + 1 <= last) & (value(r, np.minimum(b + 1, n0 - 1)) >= threshold), b + 1, b)
    lo[at], hi[at] = a, b
    valid[at] = kept
    # outside the field of view along axis 0
    if fill >= threshold:
        before = np.stack([np.zeros(rows, np.int64), np.full(rows, first - 1)], axis=1)
        after = np.stack([np.full(rows, last + 1), np.full(rows, n0 - 1)], axis=1)
        lo = np.concatenate([before[:, :1], lo, after[:, :1]], axis=1)
        hi = np.concatenate([before[:, 1:], hi, after[:, 1:]], axis=1)
        valid = np.concatenate([(before[:, 1] >= before[:, 0])[:, None], valid, (after[:, 1] >= after[:, 0])[:, None]],
                               axis=1)
    runs = _merge_pieces(shape, lo, hi, valid)
    return Runs(runs.shape, active[runs.row], runs.lo, runs.hi)


def _merge_pieces(shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray, valid: np.ndarray) -> Runs:
    """Runs from per-row intervals ``(rows, pieces)`` given in increasing order; touching ones are merged."""
    rows = lo.shape[0]
    out_row, out_lo, out_hi = [], [], []
    current = valid[:, 0].copy()
    cur_lo, cur_hi = lo[:, 0].copy(), hi[:, 0].copy()
    index = np.arange(rows)
    for p in range(1, lo.shape[1]):
        v = valid[:, p]
        touch = v & current & (lo[:, p] <= cur_hi + 1)
        cur_hi = np.where(touch, np.maximum(cur_hi, hi[:, p]), cur_hi)
        new = v & ~touch
        emit = new & current
        out_row.append(index[emit])
        out_lo.append(cur_lo[emit])
        out_hi.append(cur_hi[emit])
        cur_lo = np.where(new, lo[:, p], cur_lo)
        cur_hi = np.where(new, hi[:, p], cur_hi)
        current |= v
    out_row.append(index[current])
    out_lo.append(cur_lo[current])
    out_hi.append(cur_hi[current])
    row, lo_all, hi_all = (np.concatenate(x).astype(np.int64) for x in (out_row, out_lo, out_hi))
    order = np.lexsort((lo_all, row))
    return Runs(tuple(shape), row[order], lo_all[order], hi_all[order])


# --------------------------------------------------------------------------------------------
# Localising a scan-grid map (:class:`~medcam3d.scan_maps.ScanGridMap`): its masks as runs, written in slabs
# --------------------------------------------------------------------------------------------


def labels_present(labels: np.ndarray | None) -> set[int]:
    """The label values present in a ground-truth label map (one pass; none for no map)."""
    if labels is None:
        return set()
    values = np.asarray(labels)
    if values.dtype.kind in "iub" and values.size and values.min() >= 0 and values.max() < 2**16:
        return {int(v) for v in np.flatnonzero(np.bincount(values.ravel().astype(np.int64, copy=False)))}
    return {int(v) for v in np.unique(values) if float(v).is_integer()}


def largest_component_runs(heat, method: str, value: float) -> Runs:
    """Runs of the largest connected component of the thresholded scan-grid map (see ``threshold_mask``).

    On grids with parallel axes a fraction threshold is solved on the map's rows without forming
    the map; otherwise the whole map is resampled and thresholded.

    Parameters
    ----------
    heat : ScanGridMap
        A map on the scan's grid (:class:`medcam3d.scan_maps.ScanGridMap`, shape ``heat.space.shape``).
    method, value
        The threshold, as :func:`threshold_mask` takes it.
    """
    if method == "fraction" and not heat.dense:
        top = heat.value_range()[1]
        if not 0 < value <= 1:
            raise ValueError(f"A fraction threshold must be in (0, 1], not {value}.")
        if not top > 0:  # nothing to localize (threshold_mask gives an empty mask too)
            return Runs(tuple(heat.space.shape), *(np.zeros(0, dtype=np.int64),) * 3)
        return superlevel_runs(heat.resampler, heat.heatmap.data, value * top, fill=heat.fill).largest()
    mask = threshold_mask(heat.array(), method, value, keep_largest=True)
    return Runs.from_array(mask)


def top_mass_runs(heat, region: np.ndarray, fraction: float) -> Runs:
    """Runs of the smallest set of voxels inside ``region`` (boolean, scan grid) holding ``fraction``
    of the scan-grid map's positive mass there, highest values first (ties at the threshold all kept).

    Only the region's bounding box of the map is sampled. Empty when the region is empty or the map
    has no positive value inside it.

    Parameters
    ----------
    heat : ScanGridMap
        A map on the scan's grid (:class:`medcam3d.scan_maps.ScanGridMap`, shape ``(*S)``).
    region : (*S) bool ndarray
    fraction : float in (0, 1]
    """
    shape = tuple(heat.space.shape)
    found = np.nonzero(region)
    if found[0].size == 0:
        return Runs(shape, *(np.zeros(0, dtype=np.int64),) * 3)
    low = [int(f.min()) for f in found]
    high = [int(f.max()) + 1 for f in found]
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    values = heat.sample([np.arange(lo, hi) for lo, hi in zip(low, high)]).numpy()  # float32, the crop only
    inside = np.asarray(region[crop], dtype=bool) & (values > 0)
    chosen = np.zeros(shape, dtype=bool)
    if inside.any():
        ranked = np.sort(values[inside])[::-1]
        mass = np.cumsum(ranked, dtype=np.float64)
        k = min(int(np.searchsorted(mass, fraction * mass[-1] * (1 - 1e-12))), ranked.size - 1)
        chosen[crop] = inside & (values >= ranked[k])
    return Runs.from_array(chosen)


def save_runs(path: str | Path, runs: Runs, space: Space, *, like: Any = None, descrip: str | None = None,
              compress: bool = True) -> Path:
    """The mask of ``runs`` as a uint8 NIfTI on ``space`` (the runs' grid), streamed in slabs.

    ``like`` is the source NIfTI's header (its sform/qform codes and units are kept,
    :func:`medcam3d.io.nifti.nifti_header`); ``compress`` is for the streamed writer (a ``.nii.gz`` path).
    """
    shape = tuple(space.shape)
    header = nifti_header(shape, "uint8", space, like_header=like, descrip=descrip)
    volume = Volume(shape, lambda: (runs.slab(start, stop) for start, stop in slab_ranges(shape)), background=0)
    return write_nifti_files([(Path(path), header)], [volume], compress=compress)[0]
