"""Grids whose axes are parallel: which source axis each target axis runs along, and the linear
interpolation weights along one axis (what makes resampling separable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .grid import Space

# Tolerance (in source voxels) of the field-of-view test, so that rounding does not flip voxels
# that lie exactly on the outer cell edge of the source grid.
FOV_TOL = 1e-5


# A target axis counts as parallel to a source axis when the terms that would mix in the other
# source axes move a point by at most this much (source voxels) anywhere on the target grid.
_PARALLEL_TOL = 1e-6


@dataclass(frozen=True)
class AxisMap:
    """How one target voxel axis runs through the source grid when the grids' axes are parallel.

    Target index ``t`` along this axis sits at source voxel coordinate ``scale * t + offset``
    along source axis ``source_axis`` (``scale < 0``: the axis is flipped).
    """

    source_axis: int
    scale: float
    offset: float

    def coordinates(self, indices: np.ndarray) -> np.ndarray:
        """Source coordinates (float64) of target ``indices`` along this axis."""
        return self.scale * np.asarray(indices, dtype=np.float64) + self.offset


@dataclass(frozen=True)
class AxisWeights:
    """Linear interpolation along one axis, as :func:`resample` defines it (see there).

    Attributes
    ----------
    lower, upper : (T,) int64 ndarray
        The two source voxels each target index reads (equal on a 1-voxel axis).
    weight : (T,) float64 ndarray
        Weight of ``upper``; ``lower`` gets ``1 - weight``. Beyond the outermost voxel centres
        (inside the field of view) the edge voxel gets weight 1.
    inside : (T,) bool ndarray
        Within ``[-0.5, n - 0.5]`` (the outer cell edges): elsewhere the value is the fill.
    """

    lower: np.ndarray
    upper: np.ndarray
    weight: np.ndarray
    inside: np.ndarray

    @classmethod
    def along(cls, coordinates: np.ndarray, n_source: int) -> AxisWeights:
        """Weights for source coordinates ``(T,)`` on an axis of ``n_source`` voxels."""
        c = np.asarray(coordinates, dtype=np.float64)
        inside = (c >= -0.5 - FOV_TOL) & (c <= n_source - 0.5 + FOV_TOL)
        clamped = np.clip(c, 0.0, n_source - 1.0)
        if n_source == 1:
            lower = np.zeros(c.shape, dtype=np.int64)
            weight = np.zeros(c.shape)
        else:
            lower = np.minimum(np.floor(clamped), n_source - 2).astype(np.int64)
            weight = clamped - lower
        upper = np.minimum(lower + 1, n_source - 1)
        return cls(lower, upper, weight, inside)

    def matrix(self, n_source: int) -> np.ndarray:
        """Dense ``(T, n_source)`` float64 interpolation matrix; rows outside the field of view are 0."""
        rows = np.arange(len(self.lower))
        out = np.zeros((len(rows), n_source))
        np.add.at(out, (rows, self.lower), (1.0 - self.weight) * self.inside)
        np.add.at(out, (rows, self.upper), self.weight * self.inside)
        return out


def axis_parallel_maps(source: Any, target: Any) -> tuple[AxisMap, ...] | None:
    """Per target axis, the source axis it runs along, when the two grids' axes are parallel.

    That is the case when ``inv(source.affine) @ target.affine`` is a permutation with scaling
    (any signs) plus a translation, as after Orientation, Spacing, crop, pad and resize; then
    trilinear resampling is separable (three 1D interpolations). Terms that would mix axes are
    ignored when they move no target voxel by more than 1e-6 source voxels.

    Returns
    -------
    tuple of AxisMap (one per target axis) or None
        None for oblique grids (or grids of different dimensions).
    """
    src, dst = Space.of(source), Space.of(target)
    if src.ndim != dst.ndim:
        return None
    nd = src.ndim
    m = voxel_map(src, dst)
    block = m[:nd, :nd]
    perm = [int(np.argmax(np.abs(block[:, a]))) for a in range(nd)]
    if sorted(perm) != list(range(nd)):
        return None
    for a in range(nd):
        reach = max(dst.shape[a] - 1, 1)
        for r in range(nd):
            if r != perm[a] and abs(block[r, a]) * reach > _PARALLEL_TOL:
                return None
    return tuple(AxisMap(perm[a], float(block[perm[a], a]), float(m[perm[a], nd])) for a in range(nd))


def voxel_map(src: Space, dst: Space) -> np.ndarray:
    """Target voxel -> source voxel, ``(nd + 1, nd + 1)`` (2D grids: the i, j axes and translation)."""
    nd = src.ndim
    m = np.linalg.inv(src.affine) @ dst.affine
    axes = list(range(nd)) + [3]
    return m[np.ix_(axes, axes)]
