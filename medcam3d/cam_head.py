"""CAM's head: the ``nn.Linear`` that turns the target layer's output into the logits.

One concept: find the Linear head CAM needs (:func:`find_cam_head`), and check on a batch that the
logits are exactly ``Linear(features)`` of the target layer's output, with the features its
global average (``"gap+linear"``, CAM's setting) or its flattened voxels (``"flatten+linear"``,
HiResCAM's) (:func:`linear_head`, to the tolerance :func:`head_tolerance`). Scripted ``Linear``
modules inside TorchScript models count too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from .errors import LayerError
from .torchscript import is_scripted, module_type_name

__all__ = ["HEAD_KINDS", "find_cam_head", "head_tolerance", "linear_head"]

logger = logging.getLogger(__name__)


def find_cam_head(model: nn.Module, channels: int) -> nn.Linear:
    """The last ``nn.Linear`` of the model that takes ``channels`` features (CAM's head).

    A scripted ``Linear`` inside a TorchScript model counts too (it has ``weight`` and ``bias``).

    Raises
    ------
    LayerError
        When there is none.
    """
    heads = _linears(model, channels)
    if not heads:
        message = (
            f"CAM needs the target layer ({channels} channels) to be followed by global average "
            f"pooling and one nn.Linear with in_features={channels}; {type(model).__name__} has none. "
            "Use method='hirescam' (or 'gradcam'), which work on any head."
        )
        raise LayerError(message)
    logger.info("CAM head: Linear(%d -> %d)", heads[-1].weight.shape[1], heads[-1].weight.shape[0])
    return heads[-1]


def _linears(model: nn.Module, in_features: int) -> list[nn.Linear]:
    """``nn.Linear`` modules (also scripted ones) taking ``in_features`` features, in module order."""
    found: list[nn.Linear] = []
    for module in model.modules():
        if isinstance(module, nn.Linear) or (is_scripted(module) and module_type_name(module) == "Linear"):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == in_features:
                # a scripted Linear is not an nn.Linear, but has the same ``weight`` and ``bias``
                found.append(cast(nn.Linear, module))
    return found


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
            linears = _linears(model, features.shape[1])
            for linear in reversed(linears):
                bias = None if linear.bias is None else linear.bias.detach().float()
                expected = nn.functional.linear(features, linear.weight.detach().float(), bias)
                if expected.shape == logits.shape and torch.allclose(expected, logits, rtol=tolerance, atol=tolerance * scale):
                    return kind, linear
    return None
