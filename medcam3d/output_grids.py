"""The model output's grid on the input, and volumes carried between grids by nearest neighbour.

One concept: where a segmentation network's output voxels lie (:func:`output_grid`: the input
grid, or for a coarser output the grid whose cells tile it, as for a layer's feature map), and the
exact lookup that carries masks and label maps from one grid to another (:func:`nearest_resample`:
no value interpolated, so a mask stays binary). :func:`medcam3d.targets.region_from_scan_mask`
brings a scan-grid region onto the output grid with both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch

from .errors import SpaceError
from .space import Space, feature_space, resample

__all__ = ["nearest_resample", "output_grid"]


def output_grid(input_space: object, output_shape: Sequence[int] | None = None, receptive_field: object = None):
    """The grid of a segmentation network's output.

    The input grid itself when ``output_shape`` is None or the input's shape; otherwise (an output
    at a lower resolution) the grid of the output's voxels on the input grid, as for a layer's
    feature map (:func:`medcam3d.space.feature_space`): each output voxel at the centre of its
    receptive field when ``receptive_field`` (the model output's,
    :func:`medcam3d.layers.receptive_field`) is given, else by the ``align_corners=False``
    convention (which can be off by up to half an output voxel).

    Parameters
    ----------
    input_space : Space or anything :meth:`medcam3d.space.Space.of` accepts
    output_shape : sequence of int, optional
        The output's spatial shape (default: the input's).
    receptive_field : ReceptiveField, optional
        Per-axis ``step`` and ``offset`` of the output's voxels in input voxels.

    Returns
    -------
    Space
    """
    space = Space.of(input_space)
    if output_shape is None or tuple(int(s) for s in output_shape) == space.shape:
        return space
    return feature_space(space, tuple(int(s) for s in output_shape), receptive_field=receptive_field)


def nearest_resample(data: object, source: object, target: object, *, fill: object = 0,
                     chunk_voxels: int = 2**20) -> np.ndarray:
    """Nearest-neighbour pull-resampling of ``data`` from grid ``source`` onto grid ``target``.

    A thin call to :func:`medcam3d.space.resample` with ``mode="nearest"`` (one implementation for
    the whole package), for one volume on the source grid. Each target voxel takes the value of the
    source voxel whose centre is nearest to it in the source's voxel coordinates: the target voxel
    centre is mapped to world mm by the target's affine and back by the source's inverse affine
    (composed in float64), and rounded (``floor(c + 0.5)``: a centre exactly half-way goes to the
    higher index). Target voxels whose centre lies outside the source's field of view get ``fill``.

    The field of view is the closed interval ``[-0.5, n - 0.5]`` of the outer cell edges on every
    axis (with a slack of 1e-5 voxel for rounding), the same as for trilinear resampling: a target
    centre exactly on the far edge of the last source cell (``c = n - 0.5``) is inside and takes the
    last voxel, ``n - 1``, just as one exactly on the near edge (``c = -0.5``) takes voxel 0. Both
    edges are treated alike, so flipping an axis of either grid (LPS vs RAS) selects the same
    voxels, and a mask resampled with nearest neighbour covers exactly the voxels a heatmap
    resampled linearly covers.

    This is exact for labels and masks: no value is interpolated, so a mask stays binary. When the
    grids' axes are parallel (the usual case after Orientation, Spacing, crop, pad and resize) the
    lookup is separable and costs the output's size; otherwise the target is processed in slabs of
    about ``chunk_voxels`` voxels.

    Parameters
    ----------
    data : (*source.shape) array or Tensor
    source, target : Space or anything :meth:`medcam3d.space.Space.of` accepts
        Both 3D or both 2D.
    fill : scalar
        Value outside the source's field of view (cast to ``data``'s dtype).
    chunk_voxels : int
        Oblique grids: target voxels looked up per step.

    Returns
    -------
    (*target.shape) ndarray of ``data``'s dtype
    """
    src, dst = Space.of(source), Space.of(target)
    values = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if tuple(values.shape) != src.shape:
        raise SpaceError(f"The data have shape {tuple(values.shape)}, but the source grid is {src.shape}.")
    if src.ndim != dst.ndim:
        raise SpaceError(f"Cannot resample a {src.ndim}D grid onto a {dst.ndim}D grid.")
    return np.asarray(resample(values, src, dst, fill=cast(Any, fill), chunk_voxels=chunk_voxels, mode="nearest"))
