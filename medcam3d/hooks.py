"""Hooks that capture the target layer's output without mutating the model.

The lean forward pass (DESIGN §5): the backbone runs without autograd; at the
target layer a forward hook re-enables autograd for the rest of the network,
keeps its own leaf copy of the layer's output (``activations``) and hands the
network a non-leaf clone, which later in-place operations (e.g. DenseNet's
``ReLU(inplace=True)`` after ``norm5``) may modify freely. The graph then
covers only the head, and gradients are taken with respect to the layer's own
output, not a later version of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import LayerError

__all__ = ["preserved_model_state", "ActivationCapture"]


@contextmanager
def preserved_model_state(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Put the model in eval mode and restore each module's ``training`` flag on exit.

    Parameters' ``requires_grad`` are not touched.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


class ActivationCapture:
    """Forward hook on one module for one forward pass (a context manager).

    Parameters
    ----------
    module : nn.Module
        Target layer.
    name : str
        Its name, for messages.
    track_gradients : bool
        Re-enable autograd after the layer, so that gradients of the outputs
        with respect to :attr:`activations` can be taken.
    spatial_ndim : int or None
        Expected ``ndim`` of the output (that of the input), checked.

    Attributes
    ----------
    activations : (B, K, *spatial) Tensor
        The layer's output (a leaf that requires grad when tracking).
    """

    def __init__(self, module: nn.Module, name: str, *, track_gradients: bool, spatial_ndim: int | None) -> None:
        self.module = module
        self.name = name
        self.track_gradients = track_gradients
        self.spatial_ndim = spatial_ndim
        self.activations: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> ActivationCapture:
        self.activations = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if self.activations is not None:
            message = (
                f"Layer {self.name!r} runs more than once in one forward pass (a shared module), so its "
                "output is ambiguous. Choose a layer that runs once."
            )
            raise LayerError(message)
        if not isinstance(output, torch.Tensor):
            message = (
                f"Layer {self.name!r} returns {type(output).__name__}, not a tensor. Choose a layer whose "
                "output is a (B, K, *spatial) feature map (see medcam3d.list_layers)."
            )
            raise LayerError(message)
        if self.spatial_ndim is not None and output.ndim != self.spatial_ndim:
            message = (
                f"Layer {self.name!r} outputs shape {tuple(output.shape)}, which is not a spatial feature "
                f"map (expected {self.spatial_ndim} dims: (B, K, *spatial)). Choose a convolutional layer "
                "before the pooling/flatten (see medcam3d.list_layers, or use layer='auto')."
            )
            raise LayerError(message)
        if output.ndim < 3 or output[0, 0].numel() <= 1:
            message = (
                f"Layer {self.name!r} outputs shape {tuple(output.shape)}: one voxel per channel, so a map "
                "would be a single value. Choose an earlier layer, or give a larger input."
            )
            raise LayerError(message)
        if self.track_gradients:
            # Function form: stays on for the rest of this forward; the caller's
            # `torch.no_grad()` block restores the previous mode when it exits.
            torch.set_grad_enabled(True)
            self.activations = output.detach().requires_grad_(True)
        else:
            self.activations = output.detach()
        return self.activations.clone()
