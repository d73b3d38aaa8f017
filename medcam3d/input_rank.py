"""Which spatial rank and input channels a model takes, told from its layers, and the message when an input differs.

One concept: a model's input rank (2D or 3D ...) and channels read from its module types and
attributes, no forward pass (:func:`expected_spatial_dims`, :func:`expected_input_channels`), and
the refusal of an input of another rank, with what to do instead (:func:`rank_mismatch_message`,
:func:`check_spatial_rank`). TorchScript modules are matched by the name of the class they were
made from (see :mod:`medcam3d.torchscript`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError
from .torchscript import module_type_name

__all__ = ["axis_names", "check_spatial_rank", "expected_input_channels", "expected_spatial_dims", "rank_mismatch_message"]

_CONV_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
                      nn.ConvTranspose3d: 3}
#: Class names of the layers whose type tells the input rank (TorchScript modules are matched by name).
_RANK_LAYER = re.compile(
    r"^(Lazy)?(Conv|ConvTranspose|MaxPool|AvgPool|AdaptiveAvgPool|AdaptiveMaxPool|LPPool|FractionalMaxPool|"
    r"MaxUnpool)([123])d$"
)


def expected_spatial_dims(model: nn.Module) -> int | None:
    """The number of spatial axes the model takes (2 or 3 ...), from its first convolution or pooling.

    Reads module types only (no forward pass): ``Conv3d``, ``ConvTranspose3d``, ``MaxPool3d``,
    ``AdaptiveAvgPool3d`` ... (subclasses too), also inside TorchScript modules.

    Returns
    -------
    int or None
        None when the model has no such layer (then the rank is not checked).
    """
    for module in model.modules():
        for conv_type, dims in _CONV_SPATIAL_DIMS.items():
            if isinstance(module, conv_type):
                return dims
        found = _RANK_LAYER.match(module_type_name(module))
        if found:
            return int(found.group(3))
    return None


_CONV_BY_NAME = re.compile(r"^(Lazy)?Conv([123])d$")


def expected_input_channels(model: nn.Module) -> int | None:
    """The number of input channels the model takes: its first convolution's ``in_channels``.

    Reads module attributes only (no forward pass); TorchScript modules (matched by the name of
    their original class) from their weight's shape. "First" is the first convolution in
    ``model.modules()`` order, the order the network registers its layers in (its stem comes first
    in MONAI's and torchvision's networks).

    Returns
    -------
    int or None
        None when the model has no convolution before another rank layer (then nothing is checked),
        or a lazy convolution (it takes any number).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if isinstance(module, nn.modules.lazy.LazyModuleMixin):
                return None
            return int(module.in_channels)
        name = module_type_name(module)
        if _CONV_BY_NAME.match(name):
            weight = getattr(module, "weight", None)
            groups = getattr(module, "groups", 1)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 3 and isinstance(groups, int):
                return int(weight.shape[1]) * groups
            return None
        if _RANK_LAYER.match(name) or isinstance(module, tuple(_CONV_SPATIAL_DIMS)):
            return None  # a pooling or transposed convolution first: the channels are not told
    return None

_AXES = {1: "W", 2: "H, W", 3: "D, H, W"}


def axis_names(dims: int) -> str:
    """How messages name the spatial axes of a ``dims``-D input: ``"D, H, W"``, ``"H, W"``, ``"W"`` (else ``"S0, S1, ..."``)."""
    return _AXES.get(dims, ", ".join(f"S{i}" for i in range(dims)))


def rank_mismatch_message(model_dims: int, shape: Sequence[int], *, batched: bool) -> str | None:
    """What is wrong when an input of ``shape`` does not have the model's spatial rank (None if it does).

    Parameters
    ----------
    model_dims : int
        :func:`expected_spatial_dims` of the model.
    shape : sequence of int
        ``(B, C_in, *spatial)`` when ``batched``, else the spatial shape of an image ``(*spatial)``.
    batched : bool
    """
    shape = tuple(int(s) for s in shape)
    wanted = f"{model_dims}D inputs (C, {axis_names(model_dims)})"
    if not batched:
        if len(shape) == model_dims:
            return None
        return (
            f"This is a {len(shape)}D image ({axis_names(len(shape))}) of shape {shape}, but the model takes {wanted}. "
            f"Give a {model_dims}D image, or a model made for {len(shape)}D images."
        )
    if len(shape) == model_dims + 2:
        return None
    if len(shape) == model_dims + 1:
        other = model_dims - 1
        batch_of = (
            f"; if it is a batch of {other}D images (B, C_in, {axis_names(other)}), give {model_dims}D images or a model "
            f"made for {other}D images" if other >= 1 else ""
        )
        return (
            f"x has shape {shape}, but this model takes {model_dims}D inputs of shape (B, C_in, {axis_names(model_dims)}). "
            f"If x is one image (C_in, {axis_names(model_dims)}), add the batch axis with x[None]{batch_of}."
        )
    image_dims = len(shape) - 2
    if image_dims >= 1:
        return (
            f"x has shape {shape}: a batch of {image_dims}D images (B, C_in, {axis_names(image_dims)}), but the model "
            f"takes {wanted} batched as (B, C_in, {axis_names(model_dims)}). Give {model_dims}D images, or a model made "
            f"for {image_dims}D images."
        )
    return f"x has shape {shape}, but this model takes {model_dims}D inputs of shape (B, C_in, {axis_names(model_dims)})."


def check_spatial_rank(model: nn.Module, spatial_shape: Sequence[int]) -> None:
    """Refuse an image whose spatial rank is not the model's, before any preprocessing or forward.

    Parameters
    ----------
    model : nn.Module
    spatial_shape : sequence of int
        The image's spatial shape, e.g. ``(H, W)`` of a 2D slice or ``(X, Y, Z)`` of a volume.

    Raises
    ------
    InputError
        E.g. "This is a 2D image (H, W) of shape (256, 256), but the model takes 3D inputs
        (C, D, H, W) ...". Nothing is raised when the model's rank is unknown.
    """
    dims = expected_spatial_dims(model)
    message = None if dims is None else rank_mismatch_message(dims, spatial_shape, batched=False)
    if message is not None:
        raise InputError(message)
