"""Where the engine's grids sit on the input: a layer's maps and a segmentation output's voxels placed
by their receptive fields (or by the ``align_corners=False`` convention), and the input grid a
``Region`` mask on the scan's grid is brought onto (§3, §4)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import LayerError, PlacementWarning
from .layers import receptive_field
from .receptive_field import ReceptiveField
from .space import Space, SpaceError
from .targets import Region

__all__ = ["layer_placement", "output_placement", "region_input_space"]


def layer_placement(model: nn.Module, layer: str, inputs: torch.Tensor, placement: str, *,
                    stacklevel: int = 2) -> tuple[str, ReceptiveField | None]:
    """The placement of a layer's maps, and its receptive field (cached per model, layer and shape).

    Parameters
    ----------
    model : nn.Module
    layer : str
        The target layer's name in ``model``.
    inputs : (B, C_in, *spatial) Tensor
        The model's input (its shape and device).
    placement : {"receptive_field", "align_corners"}
        The explainer's choice.
    stacklevel : int
        Of the warning, from this function's caller.

    Returns
    -------
    (str, ReceptiveField or None)
        ``("receptive_field", field)``, or ``("align_corners", None)`` when asked for or where the
        receptive field cannot be found (the layer's output does not depend on the input through
        gradients; a :class:`~medcam3d.errors.PlacementWarning` says so).
    """
    if placement == "align_corners":
        return "align_corners", None
    try:
        found = receptive_field(model, layer, tuple(inputs.shape[1:]), device=inputs.device)
    except LayerError as error:
        message = (
            f"The receptive field of layer {layer!r} could not be found ({error}); its maps are placed by the "
            "align_corners=False convention, which can be off by up to half a cell. Pass "
            "placement='align_corners' to choose that explicitly."
        )
        warnings.warn(message, PlacementWarning, stacklevel=stacklevel + 1)
        return "align_corners", None
    return "receptive_field", found


def output_placement(model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, placement: str, *,
                     stacklevel: int = 2) -> ReceptiveField | None:
    """The receptive field of the model's output voxels, for a segmentation output whose spatial shape
    is not the input's (e.g. a network that ends at half resolution), with
    ``placement="receptive_field"``; None otherwise (cached per model and input shape).

    Parameters
    ----------
    model : nn.Module
    inputs : (B, C_in, *spatial) Tensor
    logits : (B, C) or (B, C, *output_spatial) Tensor
    placement : {"receptive_field", "align_corners"}
    stacklevel : int
        Of the warning, from this function's caller.

    Returns
    -------
    ReceptiveField or None
        None also where the field cannot be found: the output is then placed by the convention,
        with a :class:`~medcam3d.errors.PlacementWarning`.
    """
    if placement != "receptive_field" or logits.ndim <= 2 or tuple(logits.shape[2:]) == tuple(inputs.shape[2:]):
        return None
    try:
        return receptive_field(model, model, tuple(inputs.shape[1:]), device=inputs.device)
    except LayerError as error:
        message = (
            f"The model's output ({tuple(logits.shape[2:])}) is not on the input's grid "
            f"({tuple(inputs.shape[2:])}) and its receptive field could not be found ({error}); its voxels are placed "
            "by the align_corners=False convention, which can be off by up to half an output voxel."
        )
        warnings.warn(message, PlacementWarning, stacklevel=stacklevel + 1)
        return None


def region_input_space(x: object, target: object, inputs: torch.Tensor) -> Space | None:
    """The input grid, when the target needs it and ``x`` carries it.

    Parameters
    ----------
    x : object
        What the user passed; a MONAI ``MetaTensor`` carries the input grid's affine.
    target : object
        The user's target; only a :class:`~medcam3d.targets.Region` whose mask is on another grid
        (``space`` given) needs the input grid.
    inputs : (B, C_in, *spatial) Tensor
        The prepared input.

    Returns
    -------
    Space or None
        None where the target does not need it, ``x`` has no affine, or the affine does not describe
        the input's grid (:func:`medcam3d.targets.resolve_target` then says what to pass).
    """
    if not isinstance(target, Region) or target.space is None or getattr(x, "affine", None) is None:
        return None
    try:
        space = Space.of(x, batch=True)
    except SpaceError:
        return None
    return space if space.shape == tuple(inputs.shape[2:]) else None
