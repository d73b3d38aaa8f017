"""The target layer's output captured in one forward pass, and its gradient: the lean forward pass.

One concept (docs/architecture.md §5): the backbone runs without autograd; at the target layer a
forward hook re-enables autograd for the rest of the network, keeps its own leaf copy of the
layer's output (``activations``) and hands the network a non-leaf clone, which later in-place
operations (e.g. DenseNet's ``ReLU(inplace=True)`` after ``norm5``) may modify freely. The graph
then covers only the head, and gradients are taken with respect to the layer's own output, not a
later version of it (:class:`ActivationCapture`; :class:`InputCapture` for the input-level
methods; :func:`check_layer_output`: which outputs can be explained).

TorchScript: a ``ScriptModule`` has no forward hooks, and the submodules of a scripted network
are called from C++. A hook on a scripted module that Python calls (a scripted submodule of a plain
model) is a global forward hook that answers for that module and this thread only. A target layer
*inside* a scripted module is captured by splitting a copy of its graph at the layer
(:mod:`medcam3d.torchscript`): :meth:`ActivationCapture.run` runs the two halves directly when the
model itself is scripted; when a plain model calls a scripted submodule, that call is intercepted
and recomputed as the two halves (one extra pass through that submodule). The hooks, locks and the
model view the captures run on: :mod:`medcam3d.hooks`.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from .errors import LayerError
from .hooks import forward_hooks
from .torchscript import TrailingActivation, is_scripted, script_logits, script_split, scripted_ancestor

__all__ = ["ActivationCapture", "InputCapture", "check_layer_output"]


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
    keep_graph : bool
        For one of several captures in one pass (multi-layer maps): when the layer's output already
        depends on an earlier captured layer (autograd is on there), keep that output as a node of
        the graph instead of detaching it, so that gradients with respect to the earlier layer still
        flow through this one. The network gets a clone either way.

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
        keep_graph: bool = False,
    ) -> None:
        self.module = module
        self.keep_graph = keep_graph
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

    @property
    def intercepted(self) -> nn.Module | None:
        """The scripted submodule whose calls this capture recomputes through a split (None: none)."""
        if self._script is None or self._script[1] is self.model:
            return None
        return self._script[1]

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
            if self.keep_graph and output.requires_grad:  # after an earlier captured layer: stay in its graph
                self.activations = output
            else:
                self.activations = output.detach().requires_grad_(True)
        else:
            self.activations = output.detach()
        return self.activations.clone()

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if self.activations is not None:
            self._more_than_once()
        return self._accept(output)


class InputCapture:
    """The model's input as the "target layer" of a pass (input-level maps; a context manager).

    The same interface as :class:`ActivationCapture`, for a capture at the very start of the
    network: :meth:`run` keeps a leaf copy of the input that requires grad (:attr:`activations`),
    hands the model a non-leaf clone (which it may modify in place) and runs it with autograd on,
    so that gradients of the outputs with respect to the input can be taken. Nothing is hooked:
    any model, TorchScript included, runs as it is.

    Parameters
    ----------
    model : nn.Module
    track_gradients : bool
        False: a plain forward (perturbation passes), the input kept without grad.

    Attributes
    ----------
    activations : (B, C_in, *spatial) Tensor
        The input (a leaf that requires grad when tracking).
    logits, trailing, produced
        As for :class:`ActivationCapture`, for a TorchScript model whose graph ends in a softmax or
        sigmoid (None otherwise; a plain model's trailing activation is found by
        :class:`medcam3d.model_io.OutputActivationWatch`).
    """

    name = "input"

    def __init__(self, model: nn.Module, *, track_gradients: bool) -> None:
        self.model = model
        self.track_gradients = track_gradients
        self.activations: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.trailing: TrailingActivation | None = None
        self.produced: object = None

    def __enter__(self) -> InputCapture:
        self.activations = None
        self.logits = None
        self.trailing = None
        self.produced = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def run(self, inputs: torch.Tensor) -> object:
        """``model(inputs)``, with autograd from the input on when tracking gradients.

        A TorchScript model whose graph ends in a softmax/sigmoid runs as its graph with that
        activation's input as a second output (:func:`medcam3d.torchscript.script_logits`; one pass):
        :attr:`logits` and :attr:`trailing` are then set, as :class:`ActivationCapture` sets them.
        """
        self.activations = inputs.detach().requires_grad_(True) if self.track_gradients else inputs.detach()
        with torch.set_grad_enabled(self.track_gradients):
            peeled = script_logits(self.model) if is_scripted(self.model) else None
            if peeled is None:
                return self.model(self.activations.clone())
            outputs, logits = peeled(self.model, (self.activations.clone(),))
            self.logits, self.trailing, self.produced = logits, peeled.trailing, outputs
            return outputs
