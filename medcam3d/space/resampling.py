"""Resampling a map from one grid onto another in world coordinates: :func:`resample` and :class:`Resampler`.

One trilinear interpolation, straight from the source grid to the target grid (docs/architecture.md
§3), separable (three 1D interpolations) where the grids' axes are parallel.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SpaceError
from .axes import FOV_TOL, AxisMap, AxisWeights, axis_parallel_maps, voxel_map
from .grid import Space

logger = logging.getLogger(__name__)

# Default work per resampling step: output values (voxels x channels). One step holds a float32
# grid (12 B per voxel), the float32 values (4 B per value) and a fill mask (1 B per voxel), about
# 2**20 x 20 B ~ 20 MB besides the output itself (measured: 512x512x400 output, 420 MB, peaks at
# ~445 MB). Coordinates are computed in float64 once per target slice, not per voxel.
DEFAULT_CHUNK_VOXELS = 2**20


# Source axes of at most this many voxels are contracted with a dense interpolation matrix
# (one small matrix product); longer ones gather their two neighbours per target voxel.
_DENSE_MAX = 32


class Resampler:
    """:func:`resample` from one grid onto another, planned once, evaluated on any part of the target.

    When the grids' axes are parallel (:func:`axis_parallel_maps`), trilinear interpolation is
    separable: it is evaluated as three 1D interpolations (small matrix products), so the work is
    proportional to the values produced and any product of target index sets (a slab, a plane, a
    few candidate voxels) costs only its own size. Oblique grids use ``grid_sample`` on the
    sub-grid asked for. Both give the same values (to float32 rounding, about 1e-6 of the data's
    range), with the field-of-view fill and edge behaviour of :func:`resample`.

    Parameters
    ----------
    source, target : Space or anything :meth:`Space.of` accepts
        Both 3D or both 2D.
    separable : bool, optional
        ``None`` (default): separable when the axes are parallel. ``False``: always
        ``grid_sample`` (for comparisons). ``True``: require parallel axes (raises otherwise).
    """

    def __init__(self, source: Any, target: Any, *, separable: bool | None = None) -> None:
        self.source = Space.of(source)
        self.target = Space.of(target)
        if self.source.ndim != self.target.ndim:
            raise SpaceError(
                f"source grid is {self.source.ndim}D but target grid is {self.target.ndim}D; expected the same"
            )
        self.matrix = voxel_map(self.source, self.target)
        self.identity = self.source.shape == self.target.shape and _max_displacement(self.matrix, self.target.shape) < 1e-4
        self.axes = axis_parallel_maps(self.source, self.target) if separable is not False else None
        if separable is False:
            self.identity = False
        if separable and self.axes is None:
            raise SpaceError("the grids' axes are not parallel (oblique): their resampling is not separable.")

    @property
    def separable(self) -> bool:
        """Whether the grids' axes are parallel (separable evaluation)."""
        return self.axes is not None

    def weights(self, axis: int, indices: Any = None) -> AxisWeights:
        """The 1D interpolation of target ``axis`` at ``indices`` (default: all); separable grids only."""
        if self.axes is None:
            raise SpaceError("the grids are oblique: their resampling is not separable into 1D interpolations.")
        index = np.arange(self.target.shape[axis]) if indices is None else np.asarray(indices, dtype=np.int64)
        spec = self.axes[axis]
        return AxisWeights.along(spec.coordinates(index), self.source.shape[spec.source_axis])

    def inside_range(self, axis: int) -> tuple[int, int]:
        """First and last target index along ``axis`` inside the source field of view (separable grids).

        ``first > last`` when none is.
        """
        inside = np.flatnonzero(self.weights(axis).inside)
        return (int(inside[0]), int(inside[-1])) if inside.size else (1, 0)

    def __call__(
        self,
        data: Any,
        *,
        fill: float = 0.0,
        indices: Sequence[Any] | None = None,
        layout: str = "C",
        chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
        mode: str = "linear",
    ) -> Any:
        """Resample ``data`` onto the target grid, or onto the product of target ``indices``.

        Parameters
        ----------
        data : numpy.ndarray or torch.Tensor, shape (..., *source.shape)
        fill : float
            Value outside the source field of view (NaN allowed; for ``mode="nearest"``, cast to
            the data's dtype).
        indices : sequence of (n_a,) int arrays, one per target axis, optional
            Evaluate only at these target indices along each axis (their product). Default: all.
        layout : {"C", "F"}
            Memory order of each map's spatial axes: ``"C"`` (row-major, the default) or ``"F"``
            (column-major: the last spatial axis varies slowest, as NIfTI stores voxels), a view
            of shape (..., *target) either way.
        chunk_voxels : int
            Oblique grids: output values computed per ``grid_sample`` step (target voxels per
            step for ``mode="nearest"``).
        mode : {"linear", "nearest"}
            ``"linear"`` (default): trilinear interpolation, as :func:`resample` defines it.
            ``"nearest"``: each target voxel takes the value of the source voxel whose cell holds
            its centre (index ``floor(c + 0.5)`` of its source coordinate ``c``, clipped to the
            grid), for label maps and masks: no value is blended and the dtype is kept. The field
            of view is the same as for ``"linear"``.

        Returns
        -------
        numpy.ndarray or torch.Tensor, shape (..., n_0, n_1[, n_2])
            Same kind as ``data``; a tensor stays on its device. float32 for ``"linear"``
            (differentiable for a tensor that requires grad), ``data``'s dtype for ``"nearest"``.
        """
        if layout not in ("C", "F"):
            raise ValueError(f"layout must be 'C' or 'F', not {layout!r}.")
        if mode not in ("linear", "nearest"):
            raise ValueError(f"mode must be 'linear' or 'nearest', not {mode!r}.")
        index = _target_indices(indices, self.target.shape)
        if mode == "nearest":
            return self._nearest(data, index, fill, layout, chunk_voxels)
        x, lead, is_numpy = _as_float_tensor(data, self.source)
        shape = tuple(len(i) for i in index)
        x = x.reshape(math.prod(lead), *self.source.shape)
        if self.identity:
            out = x.clone() if indices is None else _take(x, index)
            out = _with_layout(out, layout)
        elif self.axes is not None:
            out = _separable(x, self.source.shape, self.axes, index, fill, layout)
        else:
            starts = [int(i.min()) if len(i) else 0 for i in index]
            stops = [int(i.max()) + 1 if len(i) else 0 for i in index]
            if all(b > a for a, b in zip(starts, stops)):
                box = Space(tuple(b - a for a, b in zip(starts, stops)), _shifted(self.target, starts))
                full = _resample_grid(x, self.source, box, fill, chunk_voxels)
                local = [i - a for i, a in zip(index, starts)]
                contiguous = all(np.array_equal(i, np.arange(len(i))) for i in local)
                out = full if contiguous else _take(full, local)
            else:
                out = torch.empty((x.shape[0], *shape), dtype=torch.float32, device=x.device)
            out = _with_layout(out, layout)
        out = _split_lead(out, lead)
        return out.numpy() if is_numpy else out

    def _nearest(self, data: Any, index: list[np.ndarray], fill: float, layout: str, chunk_voxels: int) -> Any:
        """``mode="nearest"`` of :meth:`__call__`: values picked by index, in ``data``'s kind and dtype."""
        src, nd = self.source, self.source.ndim
        values = data.as_subclass(torch.Tensor) if isinstance(data, torch.Tensor) else np.asarray(data)
        lead = _check_trailing(tuple(values.shape), src)
        x = values.reshape(math.prod(lead), *src.shape)
        shape = tuple(len(i) for i in index)
        if self.axes is not None:  # one index array per axis: the output costs its own size
            coords = [spec.coordinates(i) for spec, i in zip(self.axes, index)]
            sizes = [src.shape[spec.source_axis] for spec in self.axes]
            order = (0, *[spec.source_axis + 1 for spec in self.axes])  # source axes in target order
            moved = np.transpose(x, order) if isinstance(x, np.ndarray) else x.permute(*order)
            out = _pick(moved, np.ix_(*[_nearest_index(c, n) for c, n in zip(coords, sizes)]))
            for a, (c, n) in enumerate(zip(coords, sizes)):
                outside = np.flatnonzero(~_in_view(c, n))
                if outside.size:
                    out[(slice(None),) * (a + 1) + (_like(out, outside),)] = fill
        else:
            m = voxel_map(src, self.target)
            out = _empty_like(x, shape)
            rows = max(1, int(chunk_voxels) // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], rows):
                grid = np.ix_(index[0][start : start + rows].astype(np.float64), *(i.astype(np.float64) for i in index[1:]))
                coords = [sum(m[p, b] * grid[b] for b in range(nd)) + m[p, nd] for p in range(nd)]
                inside = np.logical_and.reduce([_in_view(c, n) for c, n in zip(coords, src.shape)])
                part = _pick(x, tuple(_nearest_index(c, n) for c, n in zip(coords, src.shape)))
                part[:, _like(part, ~inside)] = fill
                out[:, start : start + rows] = part
        if layout == "F" and isinstance(out, np.ndarray):
            back = (0, *range(nd, 0, -1))
            out = np.ascontiguousarray(np.transpose(out, back)).transpose(back)
        elif layout == "F":
            out = _with_layout(out, layout)
        return out.reshape(*lead, *shape) if lead else out[0]

    def rows(self, data: Any, axis: int, *, fill: float = 0.0) -> Any:
        """Values along the source voxels of target ``axis``, for every target position on the other axes.

        Interpolates along every target axis except ``axis`` (separable grids only): the result
        holds, for each row of the target grid along ``axis``, the values at the source voxels the
        row runs through (source axis ``self.axes[axis].source_axis``), so that
        ``AxisWeights`` of ``axis`` finish the interpolation. Rows outside the field of view on
        the other axes hold ``fill``.

        Parameters
        ----------
        data : numpy.ndarray or torch.Tensor, shape (..., *source.shape)
        axis : int
        fill : float

        Returns
        -------
        numpy.ndarray or torch.Tensor, shape (..., *other target lengths, n_source), float32
        """
        if self.axes is None:
            raise SpaceError("the grids are oblique: their resampling is not separable into 1D interpolations.")
        x, lead, is_numpy = _as_float_tensor(data, self.source)
        nd = self.source.ndim
        y = x.reshape(math.prod(lead), *self.source.shape)
        others = [a for a in range(nd) if a != axis]
        for a in others:
            p = self.axes[a].source_axis
            weights = self.weights(a)
            y = _interpolate(y, p + 1, weights, self.source.shape[p])
            outside = np.flatnonzero(~weights.inside)
            if outside.size and y.device.type == "cpu" and not y.requires_grad:
                y.numpy()[(slice(None),) * (p + 1) + (outside,)] = fill  # y is a fresh result
            elif outside.size:
                y = y.index_fill(p + 1, torch.as_tensor(outside, device=y.device), fill)
        y = y.permute(0, *[self.axes[a].source_axis + 1 for a in others], self.axes[axis].source_axis + 1)
        out = _split_lead(y.contiguous(), lead)
        return out.numpy() if is_numpy else out


def resample(
    data: Any,
    source: Any,
    target: Any,
    *,
    fill: float = 0.0,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    mode: str = "linear",
) -> Any:
    """Trilinear (bilinear in 2D) pull-resampling of ``data`` from grid ``source`` onto ``target``.

    Each target voxel ``p`` takes the value at source voxel coordinate
    ``inv(source.affine) @ target.affine @ p``, interpolated linearly. Points outside the source
    grid's field of view, i.e. beyond ``[-0.5, n - 0.5]`` (outer cell edges) on any axis, get
    ``fill``; points inside that band but beyond the outermost voxel centres take the edge value,
    so a coarse feature map covers the whole grid it was computed from.

    Parameters
    ----------
    data : numpy.ndarray or torch.Tensor, shape (..., *source.shape)
        Any leading axes (channels, batch); the trailing axes must equal ``source.shape``.
    source, target : Space or anything :meth:`Space.of` accepts
        Grids of ``data`` and of the result; both 3D or both 2D (2D grids use the i, j axes of
        the affines only and ignore the third axis).
    fill : float
        Value outside the source field of view (NaN allowed).
    chunk_voxels : int
        Oblique grids: upper bound on output values (target voxels x leading channels) computed
        per step; the target is processed in slabs along its first axis.
    mode : {"linear", "nearest"}
        ``"nearest"``: nearest neighbour instead, for label maps and masks (the value of the
        source voxel whose cell holds the target voxel's centre; dtype kept, nothing blended;
        same field of view); see :meth:`Resampler.__call__`.

    Returns
    -------
    numpy.ndarray or torch.Tensor, shape (..., *target.shape)
        Same kind as ``data``; a tensor stays on ``data``'s device. float32, or ``data``'s dtype
        for ``mode="nearest"``.

    Notes
    -----
    When the grids' axes are parallel (the usual case after Orientation, Spacing, crop, pad and
    resize; see :func:`axis_parallel_maps`) the interpolation is separable and is computed as
    three 1D interpolations (:class:`Resampler`): small matrix products whose cost is that of
    writing the output. Otherwise it is implemented with
    ``torch.nn.functional.grid_sample(mode="bilinear", align_corners=True, padding_mode="border")``
    plus the fill mask; the voxel -> voxel map is composed in float64 and evaluated in float64 per
    target slice, and grid_sample's float32 grid then limits the position error to about 1e-7 x
    the source axis length (~5e-5 voxel on a 512-voxel axis). Both agree to float32 rounding.
    If both grids coincide (same shape, voxel centres within 1e-4 voxel) the data are copied.
    The result is differentiable with respect to a ``data`` tensor that requires grad.
    """
    return Resampler(source, target)(data, fill=fill, chunk_voxels=chunk_voxels, mode=mode)


def _as_float_tensor(data: Any, src: Space) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """``data`` as a plain float32 tensor (no copy when possible), its leading shape, and whether it was numpy."""
    is_numpy = not isinstance(data, torch.Tensor)
    if is_numpy:
        arr = np.asarray(data)
        if arr.dtype == np.float32:
            x = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        # plain tensor (a MetaTensor's metadata would only slow the interpolation down)
        x = data.as_subclass(torch.Tensor).to(torch.float32)
    return x, _check_trailing(tuple(x.shape), src), is_numpy


def _check_trailing(shape: tuple[int, ...], src: Space) -> tuple[int, ...]:
    """The leading shape of data of ``shape`` (..., *src.shape); raises when it does not end with the grid's."""
    nd = src.ndim
    if len(shape) < nd or shape[len(shape) - nd :] != src.shape:
        raise SpaceError(
            f"data of shape {shape} does not end with the source grid's shape {src.shape}; "
            "expected (..., *source.shape) with spatial axes last in (i, j, k) order."
        )
    return shape[: len(shape) - nd]


def _in_view(coordinates: np.ndarray, n_source: int) -> np.ndarray:
    """Source coordinates within the field of view ``[-0.5, n - 0.5]`` (as :class:`AxisWeights`)."""
    return (coordinates >= -0.5 - FOV_TOL) & (coordinates <= n_source - 0.5 + FOV_TOL)


def _nearest_index(coordinates: np.ndarray, n_source: int) -> np.ndarray:
    """The source voxel whose cell holds each coordinate (``floor(c + 0.5)``), clipped to the axis."""
    return np.clip(np.floor(coordinates + 0.5), 0, n_source - 1).astype(np.int64)


def _like(data: Any, index: np.ndarray) -> Any:
    """An index array for ``data``: itself for numpy, a tensor on ``data``'s device for a tensor."""
    return torch.as_tensor(index, device=data.device) if isinstance(data, torch.Tensor) else index


def _pick(x: Any, index: Sequence[np.ndarray]) -> Any:
    """``x`` (C, *spatial) at the (broadcast) voxel ``index`` arrays, one per spatial axis: (C, *broadcast shape)."""
    return x[(slice(None), *(_like(x, i) for i in index))]


def _empty_like(x: Any, shape: tuple[int, ...]) -> Any:
    """An uninitialised (C, *shape) array or tensor of ``x``'s kind, dtype (and device)."""
    if isinstance(x, torch.Tensor):
        return torch.empty((x.shape[0], *shape), dtype=x.dtype, device=x.device)
    return np.empty((x.shape[0], *shape), dtype=x.dtype)


def _target_indices(indices: Sequence[Any] | None, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Validated int64 index arrays, one per target axis (all indices when ``indices`` is None)."""
    if indices is None:
        return [np.arange(n, dtype=np.int64) for n in shape]
    if len(indices) != len(shape):
        raise SpaceError(f"indices must give one index array per target axis ({len(shape)}), got {len(indices)}.")
    out = []
    for axis, (index, n) in enumerate(zip(indices, shape)):
        index = np.atleast_1d(np.asarray(index)).astype(np.int64, casting="unsafe").ravel()
        if index.size and (index.min() < 0 or index.max() >= n):
            raise SpaceError(f"indices along target axis {axis} must lie in [0, {n - 1}].")
        out.append(index)
    return out


def _take(x: torch.Tensor, index: Sequence[np.ndarray]) -> torch.Tensor:
    """``x`` (C, *shape) at the product of ``index`` arrays (one per spatial axis)."""
    for axis, i in enumerate(index):
        x = x.index_select(axis + 1, torch.as_tensor(i, device=x.device))
    return x


def _shifted(space: Space, starts: Sequence[int]) -> np.ndarray:
    """Affine of the sub-grid of ``space`` whose voxel 0 is ``space``'s voxel ``starts``."""
    shift = np.eye(4)
    shift[: len(starts), 3] = starts
    return space.affine @ shift


def _with_layout(out: torch.Tensor, layout: str) -> torch.Tensor:
    """``out`` (C, *shape), row-major, or column-major per map for ``layout="F"`` (same shape)."""
    if layout == "C":
        return out.contiguous()
    nd = out.ndim - 1
    back = (0, *range(nd, 0, -1))
    return out.permute(*back).contiguous().permute(*back)


def _split_lead(out: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """``(C, *shape)`` -> ``(*lead, *shape)`` without touching the spatial strides."""
    return out[0] if not lead else out.unflatten(0, lead)


def _interpolate(y: torch.Tensor, dim: int, weights: AxisWeights, n_source: int) -> torch.Tensor:
    """Linear interpolation of ``y`` along ``dim`` (length ``n_source``) at the target indices of ``weights``."""
    device = y.device
    if n_source <= _DENSE_MAX:
        matrix = np.ascontiguousarray(weights.matrix(n_source).T, dtype=np.float32)  # (S, T)
        # one 2D product of a contiguous operand: torch's batched matmul sets up a new kernel for
        # every new shape (tens of ms) and is far slower still on some permuted views
        moved = y.movedim(dim, -1).contiguous()
        if device.type == "cpu" and not moved.requires_grad:
            # numpy's BLAS: no thread pool to wake for these thin products (OpenMP's costs more
            # than the product when the cores are busy)
            out = torch.from_numpy(np.matmul(moved.numpy().reshape(-1, n_source), matrix))
        else:
            out = torch.mm(moved.reshape(-1, n_source), torch.as_tensor(matrix, device=device))
        return out.reshape(*moved.shape[:-1], matrix.shape[1]).movedim(-1, dim)
    lower = torch.as_tensor(weights.lower, device=device)
    upper = torch.as_tensor(weights.upper, device=device)
    shape = [1] * y.ndim
    shape[dim] = -1
    weight = torch.as_tensor(weights.weight, dtype=torch.float32, device=device).view(shape)
    return torch.lerp(y.index_select(dim, lower), y.index_select(dim, upper), weight)


def _separable(
    x: torch.Tensor,
    src_shape: tuple[int, ...],
    axes: tuple[AxisMap, ...],
    index: list[np.ndarray],
    fill: float,
    layout: str,
) -> torch.Tensor:
    """Separable resampling of ``x`` (C, *src_shape) at the product of target ``index`` arrays.

    Only the part inside the source field of view is interpolated; the rest is filled. Returns
    (C, *lengths) in the requested memory layout.
    """
    nd = len(axes)
    ops = [AxisWeights.along(axes[a].coordinates(index[a]), src_shape[axes[a].source_axis]) for a in range(nd)]
    shape = tuple(len(i) for i in index)
    inside = [np.flatnonzero(op.inside) for op in ops]
    if x.shape[0] == 0 or any(n == 0 for n in shape):
        return _empty(x, shape, layout)
    if any(p.size == 0 for p in inside):
        out = _empty(x, shape, layout)
        if out.device.type == "cpu":
            out.numpy().fill(fill)
        else:
            out.fill_(fill)
        return out
    if not all(p[-1] - p[0] + 1 == p.size for p in inside):  # scattered indices: compute all, then fill
        out = _interpolate_axes(x, src_shape, axes, ops, layout)
        for a in range(nd):
            outside = np.flatnonzero(~ops[a].inside)
            if outside.size:
                out.index_fill_(a + 1, torch.as_tensor(outside, device=out.device), fill)
        return out
    box = [(int(p[0]), int(p[-1]) + 1) for p in inside]
    if all(lo == 0 and hi == n for (lo, hi), n in zip(box, shape)):
        return _interpolate_axes(x, src_shape, axes, ops, layout)
    part = [_subset(op, lo, hi) for op, (lo, hi) in zip(ops, box)]
    values = _interpolate_axes(x, src_shape, axes, part, layout)
    out = _empty(x, shape, layout)
    plain = out.device.type == "cpu" and not values.requires_grad  # numpy: no thread pool for memset/copy
    target = out.numpy() if plain else out
    view = target
    for a, (lo, hi) in enumerate(box):
        view = view[(slice(None),) * (a + 1) + (slice(lo, hi),)]
        target[(slice(None),) * (a + 1) + (slice(0, lo),)] = fill
        target[(slice(None),) * (a + 1) + (slice(hi, None),)] = fill
    if isinstance(view, np.ndarray):  # that is, plain
        view[...] = values.numpy()
    else:
        view.copy_(values)
    return out


def _empty(x: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """An uninitialised (C, *shape) float32 tensor on ``x``'s device, in ``layout`` memory order."""
    if layout == "C":
        return torch.empty((x.shape[0], *shape), dtype=torch.float32, device=x.device)
    back = (0, *range(len(shape), 0, -1))
    return torch.empty((x.shape[0], *shape[::-1]), dtype=torch.float32, device=x.device).permute(*back)


def _subset(weights: AxisWeights, lo: int, hi: int) -> AxisWeights:
    return AxisWeights(weights.lower[lo:hi], weights.upper[lo:hi], weights.weight[lo:hi], weights.inside[lo:hi])


def _interpolate_axes(
    x: torch.Tensor, src_shape: tuple[int, ...], axes: tuple[AxisMap, ...], ops: list[AxisWeights], layout: str
) -> torch.Tensor:
    """The 1D interpolations of every axis (no fill): the axes that grow least first, the last one
    written directly in the requested memory layout. Returns (C, *lengths)."""
    nd = len(axes)
    last = nd - 1 if layout == "C" else 0
    growth = {a: len(ops[a].lower) / src_shape[axes[a].source_axis] for a in range(nd)}
    y = x  # dim p + 1 holds source axis p until the target axis running along it replaces it
    for a in sorted((a for a in range(nd) if a != last), key=lambda a: growth[a]):
        y = _interpolate(y, axes[a].source_axis + 1, ops[a], src_shape[axes[a].source_axis])
    memory = [a for a in (range(nd) if layout == "C" else reversed(range(nd))) if a != last]
    y = y.permute(0, *[axes[a].source_axis + 1 for a in memory], axes[last].source_axis + 1)
    y = _interpolate(y, nd, ops[last], src_shape[axes[last].source_axis])
    return y if layout == "C" else y.permute(0, *range(nd, 0, -1))


def _resample_grid(x: torch.Tensor, src: Space, dst: Space, fill: float, chunk_voxels: int) -> torch.Tensor:
    """``grid_sample`` resampling of ``x`` (C, *src.shape) onto ``dst`` (oblique grids); (C, *dst.shape)."""
    nd = src.ndim
    channels = x.shape[0]
    device = x.device
    m = voxel_map(src, dst)
    out = torch.empty((channels, *dst.shape), dtype=torch.float32, device=device)
    if channels == 0:
        return out

    xin = x.reshape(1, channels, *src.shape)
    # MPS has no float64: build coordinates on the CPU there.
    cdev = device if device.type != "mps" else torch.device("cpu")

    # Source coordinate of target voxel (i, *rest) along source axis a is affine in i:
    #   c_a = m[a, 0] * i + plane_a(rest),  plane_a = m[a, 1:nd] . rest + m[a, nd].
    # The planes (one target slice) are built once in float64; per slab, grid = plane + i * step.
    rest = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64, device=cdev) for n in dst.shape[1:]], indexing="ij"
    )
    n_src = src.shape
    planes = []  # float64, shape dst.shape[1:], source voxel coordinate at i = 0
    for a in range(nd):
        p = torch.full(dst.shape[1:], float(m[a, nd]), dtype=torch.float64, device=cdev)
        for b in range(1, nd):
            p += float(m[a, b]) * rest[b - 1]
        planes.append(p)
    del rest

    # Field of view, per target column: rows [first, last] map inside [-0.5, n - 0.5] on all axes.
    first, last = _inside_rows(m, planes, n_src, dst.shape[0])
    if bool((first > last).all()):
        logger.debug("target grid lies entirely outside the source field of view; filling")
        out.fill_(fill)
        return out
    first_max, last_min = int(first.max()), int(last.min())

    # grid_sample (align_corners=True) takes voxel c as 2c/(n-1) - 1 (any value when n == 1),
    # with the last grid axis ordered (last source axis, ..., first source axis).
    scale = [2.0 / (n - 1) if n > 1 else 0.0 for n in n_src]
    shift = [1.0 if n > 1 else 0.0 for n in n_src]
    grid_plane = torch.stack(
        [planes[a] * scale[a] - shift[a] for a in reversed(range(nd))], dim=-1
    ).to(torch.float32)[None]  # (1, *dst.shape[1:], nd)
    step = torch.tensor([float(m[a, 0]) * scale[a] for a in reversed(range(nd))], dtype=torch.float64)
    del planes

    plane = math.prod(dst.shape[1:])
    rows = max(1, int(chunk_voxels) // max(1, plane * channels))
    view = (-1,) + (1,) * (nd - 1)
    for start in range(0, dst.shape[0], rows):
        stop = min(start + rows, dst.shape[0])
        i = torch.arange(start, stop, dtype=torch.float64)
        offset = (i[:, None] * step[None, :]).to(torch.float32).to(cdev)  # (rows, nd)
        grid = grid_plane + offset.view(*view, nd)  # (rows, *rest, nd), float32
        if cdev != device:
            grid = grid.to(device)
        vals = F.grid_sample(
            xin, grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]  # (C, rows, *rest)
        del grid
        if not (first_max <= start and last_min >= stop - 1):  # slab touches the FOV edge
            irows = torch.arange(start, stop, dtype=first.dtype, device=first.device).view(view)
            outside = (first > irows) | (last < irows)
            vals.masked_fill_(outside.to(device), fill)
            del outside
        out[:, start:stop] = vals
        del vals
    return out


def _max_displacement(m: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (source voxels) between target voxel p and m @ p over the grid's corners."""
    nd = len(shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), dtype=np.float64)
    corners = corners.reshape(nd, -1)
    mapped = m[:nd, :nd] @ corners + m[:nd, nd:]
    return float(np.max(np.abs(mapped - corners)))


def _inside_rows(
    m: np.ndarray, planes: list[torch.Tensor], n_src: tuple[int, ...], n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last target row (first axis) inside the source field of view, per column.

    Along source axis ``a`` the coordinate is ``m[a, 0] * i + planes[a]``; it must lie in
    ``[-0.5, n_a - 0.5]`` (plus a rounding tolerance). Returns int64 tensors of shape
    ``planes[0].shape``; ``first > last`` where no row is inside.
    """
    first = torch.zeros_like(planes[0])
    last = torch.full_like(planes[0], float(n_rows - 1))
    for a, p in enumerate(planes):
        lo, hi = -0.5 - FOV_TOL, n_src[a] - 0.5 + FOV_TOL
        slope = float(m[a, 0])
        if abs(slope) < 1e-12:  # independent of the row: all in or all out
            ok = (p >= lo) & (p <= hi)
            last = torch.where(ok, last, torch.full_like(last, -1.0))
            continue
        t_lo, t_hi = (lo - p) / slope, (hi - p) / slope
        if slope < 0:
            t_lo, t_hi = t_hi, t_lo
        first = torch.maximum(first, torch.ceil(t_lo - 1e-9))
        last = torch.minimum(last, torch.floor(t_hi + 1e-9))
    first = first.clamp(-1, n_rows).to(torch.int64)
    last = last.clamp(-1, n_rows).to(torch.int64)
    return first, last
