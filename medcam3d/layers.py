"""Target layers: resolve a name or module, select one automatically, list candidates,
and find the Linear head that CAM needs."""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerError, LayerNotFoundError, ModelOutputError
from .hooks import forward_hooks, model_lock, preserved_model_state
from .modeling import model_device_dtype, model_output

__all__ = [
    "LayerInfo",
    "resolve_layer",
    "list_layers",
    "select_auto_layer",
    "find_cam_head",
    "linear_head",
    "head_tolerance",
    "spatial_dims_of",
]

logger = logging.getLogger(__name__)

_CONV_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@dataclass(frozen=True)
class LayerInfo:
    """A candidate target layer.

    Attributes
    ----------
    name : str
        Dotted name in ``model.named_modules()``.
    type : str
        Class name of the module.
    output_shape : tuple of int
        Output shape ``(B, K, *spatial)`` for the probed input.
    """

    name: str
    type: str
    output_shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name:<40} {self.type:<24} {tuple(self.output_shape)}"


def spatial_dims_of(model: nn.Module) -> int | None:
    """Spatial dimensionality (2 or 3 ...) of the model's first convolution, or None."""
    for module in model.modules():
        for conv_type, dims in _CONV_SPATIAL_DIMS.items():
            if isinstance(module, conv_type):
                return dims
    return None


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Find a target layer by dotted name or by module.

    Parameters
    ----------
    model : nn.Module
    layer : str or nn.Module
        A name from ``model.named_modules()`` (e.g. ``"layer4"``,
        ``"features.norm5"``) or a submodule of ``model``.

    Returns
    -------
    (name, module)

    Raises
    ------
    LayerNotFoundError
        The name or module is not part of the model; the message lists the
        closest names.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        message = (
            f"The module {type(layer).__name__} passed as layer is not a submodule of this "
            f"{type(model).__name__}. Pass a module taken from this model, or its name."
        )
        raise LayerNotFoundError(message)
    if not isinstance(layer, str):
        message = f"layer must be a name (str), a module, or 'auto', not {type(layer).__name__}."
        raise TypeError(message)
    if layer in modules and layer != "":
        return layer, modules[layer]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    message = (
        f"Layer {layer!r} not found in {type(model).__name__}.{hint} "
        "List candidate layers with medcam3d.list_layers(model, input_shape) or `medcam3d layers`."
    )
    raise LayerNotFoundError(message)


def list_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> list[LayerInfo]:
    """Candidate target layers: modules with a spatial output, in execution order.

    Runs one forward pass on zeros, without gradients, in eval mode (the
    model's flags are restored afterwards).

    Parameters
    ----------
    model : nn.Module
    input_shape : sequence of int
        ``(C_in, *spatial)`` or ``(B, C_in, *spatial)``.
    device : optional
        Defaults to the device of the model's parameters.

    Returns
    -------
    list of LayerInfo
        The last entry is what ``layer="auto"`` selects for that input size.
    """
    shape = tuple(int(s) for s in input_shape)
    dims = spatial_dims_of(model)
    if dims is not None and len(shape) == dims + 1:
        shape = (1, *shape)
    elif dims is None and len(shape) < 3:
        message = f"input_shape must be (C_in, *spatial) or (B, C_in, *spatial), not {shape}."
        raise ValueError(message)
    model_device, dtype = model_device_dtype(model)
    device = device if device is not None else model_device or torch.device("cpu")
    x = torch.zeros((1, *shape[1:]), device=device, dtype=dtype or torch.float32)
    return _probe(model, x)


def _probe(model: nn.Module, x: torch.Tensor) -> list[LayerInfo]:
    """Record modules whose output is spatial like ``x``, in completion order."""
    return _probe_with_output(model, x)[0]


def _probe_with_output(model: nn.Module, x: torch.Tensor) -> tuple[list[LayerInfo], tuple[int, ...] | None]:
    """Spatial-output modules in completion order, and the model's output shape."""
    records: list[LayerInfo] = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == x.ndim and _spatial_size(output) > 1:
                records.append(LayerInfo(name, type(module).__name__, tuple(output.shape)))

        return hook

    hooks = [(module, make_hook(name)) for name, module in model.named_modules() if name]
    with model_lock(model), preserved_model_state(model), forward_hooks(hooks), torch.no_grad():
        try:
            output_shape: tuple[int, ...] | None = tuple(model_output(model, x).shape)
        except ModelOutputError:
            output_shape = None
    # A module called several times (a shared activation, say) has no single output: not a candidate.
    calls = Counter(record.name for record in records)
    last = {record.name: record for record in records if calls[record.name] == 1}
    return list(last.values()), output_shape


def select_auto_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module]:
    """The last module (in execution order) whose output is spatial with size > 1.

    Raises
    ------
    LayerError
        When no module has a spatial output (e.g. a model without convolutions).
    """
    candidates, output_shape = _probe_with_output(model, x[:1])
    if output_shape is not None and len(output_shape) == x.ndim:
        # Segmentation output: the layers that produce the logits themselves make trivial maps.
        candidates = [c for c in candidates if c.output_shape != output_shape]
    if not candidates:
        message = (
            f"layer='auto' found no module of {type(model).__name__} with a spatial output "
            f"(shape (B, K, *spatial) with more than one voxel) for input {tuple(x.shape)}. "
            "CAM methods need a convolutional layer: pass layer=<name> of one, or use a larger input."
        )
        raise LayerError(message)
    chosen = candidates[-1]
    logger.info("layer='auto' selected %r (%s, output %s)", chosen.name, chosen.type, chosen.output_shape)
    return chosen.name, dict(model.named_modules())[chosen.name]


def find_cam_head(model: nn.Module, channels: int) -> nn.Linear:
    """The last ``nn.Linear`` of the model that takes ``channels`` features (CAM's head).

    Raises
    ------
    LayerError
        When there is none.
    """
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
    if not heads:
        message = (
            f"CAM needs the target layer ({channels} channels) to be followed by global average "
            f"pooling and one nn.Linear with in_features={channels}; {type(model).__name__} has none. "
            "Use method='hirescam' (or 'gradcam'), which work on any head."
        )
        raise LayerError(message)
    logger.info("CAM head: Linear(%d -> %d)", heads[-1].in_features, heads[-1].out_features)
    return heads[-1]


#: Heads whose logits are exactly ``Linear(features(A))``, with the features of each kind.
HEAD_KINDS = ("gap+linear", "flatten+linear")


def head_tolerance(*tensors: torch.Tensor) -> float:
    """Relative tolerance of the numerical head check: 1e-4, or 3e-2 when any tensor is
    float16/bfloat16 (autocast)."""
    return 3e-2 if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) else 1e-4


def linear_head(
    model: nn.Module,
    activations: torch.Tensor,
    outputs: torch.Tensor,
    *,
    kinds: Sequence[str] = HEAD_KINDS,
    rtol: float | None = None,
) -> tuple[str, nn.Linear] | None:
    """The ``nn.Linear`` that turns the target layer's output into the logits, checked on this batch.

    A head of kind ``"gap+linear"`` computes ``logits = Linear(mean over voxels of A)`` (CAM's
    setting; CAM = Grad-CAM · voxels there), ``"flatten+linear"`` computes
    ``logits = Linear(flatten(A))`` (HiResCAM's; its map then sums to ``logit − bias``).

    Parameters
    ----------
    model : nn.Module
    activations : (B, K, *spatial) Tensor
        The target layer's output for this batch.
    outputs : (B, C) Tensor
        The model's logits for the same batch.
    kinds : sequence of {"gap+linear", "flatten+linear"}
        Which heads to accept, tried in this order.
    rtol : float, optional
        Relative tolerance (default :func:`head_tolerance`); the absolute tolerance is
        ``rtol · (1 + max |logits|)``.

    Returns
    -------
    (kind, nn.Linear) or None
        None when the logits are not ``Linear(features)`` for any ``nn.Linear`` of the model
        with the right ``in_features`` (the last such module is tried first).
    """
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, not {kind!r}.")
    if outputs.ndim != 2 or activations.ndim < 3:
        return None
    tolerance = head_tolerance(activations, outputs) if rtol is None else rtol
    with torch.no_grad(), torch.autocast(outputs.device.type, enabled=False):
        values = activations.detach().float()
        logits = outputs.detach().float()
        scale = 1.0 + float(logits.abs().max())
        for kind in kinds:
            features = values.flatten(start_dim=2).mean(dim=2) if kind == "gap+linear" else values.flatten(start_dim=1)
            linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == features.shape[1]]
            for linear in reversed(linears):
                bias = None if linear.bias is None else linear.bias.detach().float()
                expected = nn.functional.linear(features, linear.weight.detach().float(), bias)
                if expected.shape == logits.shape and torch.allclose(expected, logits, rtol=tolerance, atol=tolerance * scale):
                    return kind, linear
    return None


def _spatial_size(tensor: torch.Tensor) -> int:
    size = 1
    for s in tensor.shape[2:]:
        size *= int(s)
    return size
