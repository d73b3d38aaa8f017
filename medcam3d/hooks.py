"""Hooks, locks and state hygiene: the user's model is used, never changed.

The lean forward pass (DESIGN §5): the backbone runs without autograd; at the
target layer a forward hook re-enables autograd for the rest of the network,
keeps its own leaf copy of the layer's output (``activations``) and hands the
network a non-leaf clone, which later in-place operations (e.g. DenseNet's
``ReLU(inplace=True)`` after ``norm5``) may modify freely. The graph then
covers only the head, and gradients are taken with respect to the layer's own
output, not a later version of it.

Concurrency: everything that installs hooks on a model or flips its flags holds
:func:`model_lock` for the whole forward/backward/restore, so calls from several
threads on one model (or on models that share submodules) run one after the
other, and each restores exactly the state it found.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .errors import LayerError

__all__ = ["preserved_model_state", "ActivationCapture", "forward_hooks", "model_lock"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold the model for one use: its hooks, flags and buffers are ours until exit.

    One re-entrant lock per module, taken for every module of ``model`` in one global order
    (by ``id``), so that two models sharing submodules (a wrapper and the network inside it)
    exclude each other too, without deadlock. Re-entrant: a call that holds the model may call
    another function that takes it (``completeness`` runs an ``Explainer``).

    Examples
    --------
    >>> with model_lock(model):   # doctest: +SKIP
    ...     with preserved_model_state(model), forward_hooks([(layer, hook)]):
    ...         model(x)
    """
    modules = sorted(model.modules(), key=id)
    with _LOCKS_GUARD:
        locks = []
        for module in modules:
            lock = _LOCKS.get(module)
            if lock is None:
                lock = _LOCKS[module] = threading.RLock()
            locks.append(lock)
    held: list[threading.RLock] = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Register forward hooks for the duration of a ``with`` block; all removed on exit.

    Parameters
    ----------
    hooks : iterable of (module, hook)
        ``hook(module, inputs, output)`` as for ``nn.Module.register_forward_hook``.

    Yields
    ------
    list of RemovableHandle
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()


@contextmanager
def preserved_model_state(model: nn.Module, *, eval_mode: bool = True, restore_buffers: bool = True) -> Iterator[None]:
    """Optionally put the model in eval mode; on exit restore every module's ``training`` flag
    and, by default, the buffers of the modules that run in training mode.

    Parameters
    ----------
    model : nn.Module
    eval_mode : bool
        ``model.eval()`` for the block (False: the flags stay as the user set them).
    restore_buffers : bool
        For every module in training mode during the block, snapshot its buffers (BatchNorm
        ``running_mean``/``running_var``/``num_batches_tracked``, and any other) and write them
        back on exit, bitwise, into the same tensor objects (a buffer the forward replaced is put
        back). Modules in eval mode do not update their statistics, so with ``eval_mode=True``
        nothing is copied. False: train-mode updates are kept.

    Parameters' ``requires_grad`` and ``.grad`` are not touched. Hold :func:`model_lock`
    around it when other threads may use the model.
    """
    flags = [(module, module.training) for module in model.modules()]
    buffers = []
    try:
        if eval_mode and any(training for _, training in flags):
            model.eval()
        if restore_buffers:
            buffers = [
                (module, name, tensor, tensor.detach().clone())
                for module in model.modules() if module.training
                for name, tensor in module._buffers.items() if tensor is not None
            ]
        yield
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training
        with torch.no_grad():
            for module, name, tensor, saved in buffers:
                module._buffers[name] = tensor
                tensor.copy_(saved)


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
        self._stack: ExitStack | None = None

    def __enter__(self) -> ActivationCapture:
        self.activations = None
        self._stack = ExitStack()
        self._stack.enter_context(forward_hooks([(self.module, self._hook)]))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

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
