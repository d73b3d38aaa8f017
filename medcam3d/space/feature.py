"""The grid of a CNN layer's output (``feature_space``), derived from the grid of the model's input."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import SpaceError
from .grid import Space


def feature_space(input_space: Any, feature_shape: Sequence[int], receptive_field: Any = None) -> Space:
    """The grid of a layer output of spatial size ``feature_shape`` computed from ``input_space``.

    With the layer's receptive field (:func:`medcam3d.layers.receptive_field`), cell ``u`` sits at
    the centre of its receptive field, input voxel ``offset + step * u`` per axis::

        feature_affine = input_affine @ [[diag(step), offset], [0, 1]]

    Without one (an array with no model), the ``F.interpolate(mode="trilinear",
    align_corners=False)`` convention, MONAI's ``scale_affine(centered=True)`` (used here): with ``s =
    input_shape / feature_shape`` per axis, cell ``u`` covers input voxels ``[u*s, (u+1)*s)`` and
    is placed at ``u*s + (s-1)/2``. That is not where a network's cells look: it can be off by up
    to half a cell (8 voxels on MONAI resnet18's ``layer4``).

    Parameters
    ----------
    input_space : Space or anything :meth:`Space.of` accepts
        Grid of the model input, spatial shape ``(I, J, K)``.
    feature_shape : sequence of int
        Spatial shape ``(D, V, U)`` of the layer output (no batch or channel axis).
    receptive_field : ReceptiveField, optional
        Anything with per-axis ``step`` and ``offset`` in input voxels
        (:class:`medcam3d.receptive_field.ReceptiveField`); None: the convention above.

    Returns
    -------
    Space
        Shape ``feature_shape``.

    Warns
    -----
    UserWarning
        Without a receptive field, when a stride is not an integer (the cells are then placed by
        scaling).
    """
    src = Space.of(input_space)
    fshape = tuple(int(n) for n in feature_shape)
    if len(fshape) != src.ndim:
        raise SpaceError(
            f"feature_shape {fshape} has {len(fshape)} axes but the input grid {src.shape} has "
            f"{src.ndim}; pass the spatial shape only, e.g. activations.shape[2:]."
        )
    if any(n < 1 for n in fshape):
        raise SpaceError(f"feature_shape must be positive, got {fshape}")
    scale = np.eye(4)
    if receptive_field is not None:
        step = tuple(float(v) for v in receptive_field.step)
        offset = tuple(float(v) for v in receptive_field.offset)
        if len(step) != src.ndim or len(offset) != src.ndim:
            raise SpaceError(
                f"The receptive field has {len(step)} axes (step {step}) but the input grid {src.shape} has {src.ndim}; "
                "give the receptive field of this model's layer for this input (medcam3d.layers.receptive_field)."
            )
        for ax, (s, o) in enumerate(zip(step, offset)):
            scale[ax, ax] = s
            scale[ax, 3] = o
        return Space(fshape, src.affine @ scale)
    stride = np.array(src.shape, dtype=np.float64) / np.array(fshape, dtype=np.float64)
    if not np.allclose(stride, np.round(stride), rtol=0, atol=1e-9):
        warnings.warn(
            f"input shape {src.shape} is not an integer multiple of feature shape {fshape} "
            f"(stride {tuple(round(float(s), 4) for s in stride)}); without a model the feature grid is placed by the "
            "align_corners=False convention, which can be off by up to half a cell. Pass the layer's receptive field "
            "(medcam3d.layers.receptive_field) for the network's own placement.",
            stacklevel=2,
        )
    from monai.transforms.utils import scale_affine  # MONAI's own matrix for this convention (imported when used)

    axes = [*range(src.ndim), 3]  # a 2D grid: the i, j axes and the translation of the 4x4 affine
    scale[np.ix_(axes, axes)] = scale_affine(src.shape, fshape, centered=True)
    return Space(fshape, src.affine @ scale)
