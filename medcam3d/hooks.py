"""Hooks, locks and state hygiene: the user's model is used, never changed.

The lean forward pass (docs/architecture.md §5): the backbone runs without autograd; at the
target layer a forward hook re-enables autograd for the rest of the network,
keeps its own leaf copy of the layer's output (``activations``) and hands the
network a non-leaf clone, which later in-place operations (e.g. DenseNet's
``ReLU(inplace=True)`` after ``norm5``) may modify freely. The graph then
covers only the head, and gradients are taken with respect to the layer's own
output, not a later version of it.

TorchScript: a ``ScriptModule`` has no forward hooks, and the submodules of a scripted network
are called from C++. A hook on a scripted module that Python calls (a scripted submodule of a plain
model) is a global forward hook that answers for that module and this thread only. A target layer
*inside* a scripted module is captured by splitting a copy of its graph at the layer
(:mod:`medcam3d.torchscript`): :meth:`ActivationCapture.run` runs the two halves directly when the
model itself is scripted; when a plain model calls a scripted submodule, that call is intercepted
and recomputed as the two halves (one extra pass through that submodule).

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
from .torchscript import TrailingActivation, bind_arguments, is_scripted, script_split, scripted_ancestor

__all__ = ["preserved_model_state", "ActivationCapture", "forward_hooks", "model_lock", "check_layer_output"]

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
        ``hook(module, inputs, output)`` as for ``nn.Module.register_forward_hook``. A TorchScript
        module gets a global forward hook that calls ``hook`` for that module on this thread only:
        it fires when Python calls the module (a scripted submodule of a plain model, or a scripted
        model), never for the submodules a scripted module calls itself.

    Yields
    ------
    list of RemovableHandle
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, hook in hooks:
            handles.append(_scripted_hook(module, hook) if is_scripted(module) else module.register_forward_hook(hook))
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()


def _scripted_hook(module: nn.Module, hook: Callable) -> torch.utils.hooks.RemovableHandle:
    """A global forward hook that calls ``hook(module, args, output)`` for ``module`` on this thread;
    keyword arguments of the call are bound into ``args`` (positional, defaults filled in)."""
    owner = threading.get_ident()

    def answer(called: nn.Module, inputs: tuple, kwargs: dict, output: object) -> object:
        if called is module and threading.get_ident() == owner:
            return hook(called, bind_arguments(called, inputs, kwargs) if kwargs else inputs, output)
        return None

    # torch annotates the hook as returning None, but its docstring (and the call) let a returned value
    # replace the module's output, which ActivationCapture relies on.
    return nn.modules.module.register_module_forward_hook(answer, with_kwargs=True)  # type: ignore[arg-type]


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


def check_layer_output(name: str, output: object, spatial_ndim: int | None) -> torch.Tensor:
    """The target layer's output, if it can be explained: a ``(B, K, *spatial)`` tensor with more
    than one voxel per channel (and ``spatial_ndim`` dims when given).

    Raises
    ------
    LayerError
        With what to choose instead.
    """
    if not isinstance(output, torch.Tensor):
        message = (
            f"Layer {name!r} returns {type(output).__name__}, not a tensor. Choose a layer whose "
            "output is a (B, K, *spatial) feature map (see medcam3d.list_layers)."
        )
        raise LayerError(message)
    if spatial_ndim is not None and output.ndim != spatial_ndim:
        message = (
            f"Layer {name!r} outputs shape {tuple(output.shape)}, which is not a spatial feature "
            f"map (expected {spatial_ndim} dims: (B, K, *spatial)). Choose a convolutional layer "
            "before the pooling/flatten (see medcam3d.list_layers, or use layer='auto')."
        )
        raise LayerError(message)
    if output.ndim < 3 or output[0, 0].numel() <= 1:
        message = (
            f"Layer {name!r} outputs shape {tuple(output.shape)}: one voxel per channel, so a map "
            "would be a single value. Choose an earlier layer, or give a larger input."
        )
        raise LayerError(message)
    return output


class ActivationCapture:
    """The target layer's output for one forward pass (a context manager).

    Parameters
    ----------
    module : nn.Module
        Target layer.
    name : str
        Its dotted name in ``model`` (for messages, and to find it inside a TorchScript module).
    track_gradients : bool
        Re-enable autograd after the layer, so that gradients of the outputs
        with respect to :attr:`activations` can be taken.
    spatial_ndim : int or None
        Expected ``ndim`` of the output (that of the input), checked.
    model : nn.Module, optional
        The model that :meth:`run` calls. Needed for a layer inside a TorchScript module (no hooks
        exist there; see :mod:`medcam3d.torchscript`); without it only a layer that Python calls
        (any plain module, or a scripted module called by a plain parent) can be captured.

    Attributes
    ----------
    activations : (B, K, *spatial) Tensor
        The layer's output (a leaf that requires grad when tracking).
    logits : Tensor or None
        For a scripted module whose graph ends in a softmax/sigmoid (see :attr:`trailing`): that
        activation's input, computed from :attr:`activations` (None otherwise).
    trailing : TrailingActivation or None
    produced : object
        What that scripted module returned (the model's output only if the model returns it as is).

    Examples
    --------
    >>> capture = ActivationCapture(layer, "features.norm5", track_gradients=True, spatial_ndim=5, model=model)  # doctest: +SKIP
    >>> with capture, torch.no_grad():            # doctest: +SKIP
    ...     outputs = capture.run(x)              # the model's output; capture.activations is set
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        track_gradients: bool,
        spatial_ndim: int | None,
        model: nn.Module | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.track_gradients = track_gradients
        self.spatial_ndim = spatial_ndim
        self.model = model
        self.activations: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.trailing: TrailingActivation | None = None
        self.produced: object = None
        self._stack: ExitStack | None = None
        # A layer inside a scripted module: (root name, root module, name relative to it).
        self._script: tuple[str, nn.Module, str] | None = None
        found = scripted_ancestor(model, name) if model is not None and name else None
        if found is not None and found[1] is not module:
            root_name, root = found
            self._script = (root_name, root, name[len(root_name) + 1 :] if root_name else name)

    def __enter__(self) -> ActivationCapture:
        self.activations = None
        self.logits = None
        self.trailing = None
        self.produced = None
        self._stack = ExitStack()
        try:
            if self._script is None:
                self._stack.enter_context(forward_hooks([(self.module, self._hook)]))
            else:
                root_name, root, local = self._script
                try:
                    self._split = script_split(root, local)
                except LayerError as error:
                    if not root_name:
                        raise
                    raise LayerError(f"{error} (names relative to the scripted submodule {root_name!r})") from None
                if root is not self.model:  # a scripted submodule that the plain model calls
                    self._stack.enter_context(forward_hooks([(root, self._intercept)]))
        except BaseException:
            self._stack.close()
            self._stack = None
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def run(self, inputs: torch.Tensor) -> object:
        """``model(inputs)`` with the layer captured: the model's output.

        A scripted model runs as the two halves of its graph split at the layer (one pass); any
        other model is called as usual, with its hooks in place. Call inside the ``with`` block,
        under ``torch.no_grad()`` for the lean pass (autograd is re-enabled after the layer).
        """
        if self.model is None:
            raise ValueError("ActivationCapture.run needs the model: pass model= to the constructor.")
        if self._script is not None and self._script[1] is self.model:
            return self._run_split(self.model, (inputs,))
        return self.model(inputs)

    def _intercept(self, module: nn.Module, inputs: tuple, output: object) -> object:
        """Global hook on a scripted submodule: its output recomputed through the split."""
        if not self.track_gradients:
            self._run_split(module, inputs, suffix=False)
            return None  # the output already computed is the right one
        return self._run_split(module, inputs)

    def _run_split(self, root: nn.Module, args: tuple, *, suffix: bool = True) -> object:
        if self.activations is not None:
            self._more_than_once()
        with torch.no_grad():
            activations, carry = self._split.prefix(root, args)
        handed = self._accept(activations)
        if not suffix:
            return None
        if not self.track_gradients:
            with torch.no_grad():
                outputs, logits = self._split.suffix(root, handed, carry, args)
        else:
            outputs, logits = self._split.suffix(root, handed, carry, args)
        if logits is not None:
            self.logits, self.trailing, self.produced = logits, self._split.trailing, outputs
        return outputs

    def _more_than_once(self) -> None:
        message = (
            f"Layer {self.name!r} runs more than once in one forward pass (a shared module), so its "
            "output is ambiguous. Choose a layer that runs once."
        )
        raise LayerError(message)

    def _accept(self, output: object) -> torch.Tensor:
        """Check and keep the layer's output; return the tensor the network continues with."""
        output = check_layer_output(self.name, output, self.spatial_ndim)
        if self.track_gradients:
            # Function form: stays on for the rest of this forward; the caller's
            # `torch.no_grad()` block restores the previous mode when it exits.
            torch.set_grad_enabled(True)
            self.activations = output.detach().requires_grad_(True)
        else:
            self.activations = output.detach()
        return self.activations.clone()

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if self.activations is not None:
            self._more_than_once()
        return self._accept(output)
