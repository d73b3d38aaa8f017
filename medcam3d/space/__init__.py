"""Voxel grids in world coordinates, the feature grid of a CNN layer, and resampling between grids.

A :class:`Space` is a grid: a spatial ``shape`` in NIfTI ``(i, j, k)`` order and a 4x4 ``affine``
mapping voxel indices to RAS+ millimetres (the nibabel / MONAI convention). Three grids matter
(see docs/architecture.md §3): the scan on disk (``scanner_space``), the tensor the model sees
(``input_space``) and the target layer's output (``feature_space``). :func:`feature_space` derives
the last from the second, and :func:`resample` moves a map from any grid onto any other in one
trilinear interpolation, so a heatmap goes straight from the feature grid to the scan's grid.

Two-dimensional grids are supported: ``shape`` has two entries and ``affine`` is still 4x4 with
the third voxel axis unused (a 3x3 2D affine, as MONAI produces for 2D images, is embedded).

One concept per module, each importing only those before it: ``grid`` (:class:`Space`),
``feature`` (:func:`feature_space`), ``axes`` (parallel axes and 1D interpolation weights),
``resampling`` (:func:`resample`, :class:`Resampler`).
"""

from __future__ import annotations

from ..errors import SpaceError
from .axes import AxisMap, AxisWeights, axis_parallel_maps
from .feature import feature_space
from .grid import Space
from .resampling import Resampler, resample

__all__ = ["Space", "SpaceError", "feature_space", "resample", "Resampler", "AxisMap", "AxisWeights", "axis_parallel_maps"]
