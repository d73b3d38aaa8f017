"""Model input and output (model I/O), shared by the engine, the metrics and the jobs: where a model lives, how an
input gets there, and which tensor of its output holds the logits.

One implementation of each, so that every caller agrees:

* :func:`model_device_dtype` — the device and floating dtype of a model's parameters;
* :func:`to_model_input` — a tensor (or MONAI ``MetaTensor``/ndarray) checked, moved to the
  model's device and cast to its dtype;
* :func:`first_tensor` — the logits tensor of whatever the model returned (a tensor, the first
  entry of a tuple/list such as deep supervision, ``["logits"]`` of a dict);
* :func:`model_output` — ``first_tensor(model(x))``;
* outputs that are not logits (§4): :class:`OutputActivationWatch` finds a trailing
  ``nn.Softmax``/``nn.Sigmoid``/``nn.LogSoftmax`` module, or a softmax/sigmoid function called
  last in a ``forward``, and its input (the logits),
  :func:`looks_like_probabilities` recognises probabilities by their values, and
  :func:`logits_from_probabilities` inverts an activation the model applies functionally.

Hooks, locks and train/eval hygiene live in :mod:`medcam3d.hooks`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .errors import InputError, ModelOutputError
from .hooks import forward_hooks
from .torchscript import ACTIVATION_MODULES, ScriptLogits, is_scripted, script_logits

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "OUTPUT_ACTIVATIONS",
    "OutputActivation",
    "OutputActivationWatch",
    "first_tensor",
    "logits_from_probabilities",
    "looks_like_probabilities",
    "model_device_dtype",
    "model_output",
    "to_model_input",
]

#: Values of ``output_activation`` (:class:`medcam3d.Explainer`).
OUTPUT_ACTIVATIONS = ("auto", "none", "softmax", "sigmoid")

logger = logging.getLogger(__name__)

#: Keys of a dict output that hold the logits, in order of preference.
_LOGIT_KEYS = ("logits", "logit", "out", "output", "pred", "prediction")


def first_tensor(output: object) -> torch.Tensor:
    """The logits tensor of a model's output.

    Parameters
    ----------
    output : Tensor, tuple/list or mapping
        A tensor is returned as is. A tuple or list (deep supervision, ``(logits, features)``):
        its first entry, unwrapped again. A mapping (e.g. a Hugging Face ``ModelOutput``): the
        entry ``"logits"`` (or ``"out"``, ``"output"``, ``"pred"``), else its only tensor.

    Returns
    -------
    Tensor
        Usually ``(B, C)`` or ``(B, C, *spatial)`` logits.

    Raises
    ------
    ModelOutputError
        When no tensor can be found.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])  # the final output comes first (MONAI deep supervision)
    if isinstance(output, Mapping):
        for key in _LOGIT_KEYS:
            if key in output:
                return first_tensor(output[key])
        tensors = [value for value in output.values() if isinstance(value, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        keys = ", ".join(repr(k) for k in output)
        message = (
            f"The model returned a mapping with keys {keys}; expected a tensor of logits or a mapping with "
            "a 'logits' entry. Wrap the model so that its forward returns (B, C) or (B, C, *spatial) logits."
        )
        raise ModelOutputError(message)
    message = (
        f"The model returned {type(output).__name__}; expected a tensor of logits. Wrap the model "
        "so that its forward returns (B, C) or (B, C, *spatial) logits."
    )
    raise ModelOutputError(message)


def _first_or_none(output: object) -> torch.Tensor | None:
    try:
        return first_tensor(output)
    except ModelOutputError:
        return None


def model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``first_tensor(model(x))``: the model's logits for an input already on its device."""
    return first_tensor(model(x))


def model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Where the model computes: the device and dtype of its first floating parameter.

    Falls back to its floating buffers, then to any parameter's device.

    Returns
    -------
    (device or None, dtype or None)
        None for a model without parameters or buffers (it runs where its input is).
    """
    tensors = [*model.parameters(), *model.buffers()]
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return (tensors[0].device if tensors else None), None


def to_model_input(x: object, model: nn.Module, *, check_finite: bool = True) -> torch.Tensor:
    """An input checked, detached, on the model's device and in its floating dtype.

    Parameters
    ----------
    x : (B, C_in, *spatial) Tensor, MetaTensor or ndarray
        A MONAI ``MetaTensor`` becomes a plain tensor (read its affine before calling this).
    model : nn.Module
    check_finite : bool
        Refuse NaN/Inf values (after the cast).

    Returns
    -------
    (B, C_in, *spatial) Tensor
        Detached; on the device of the model's parameters, in their floating dtype (float32 for a
        model without floating parameters and a non-floating input). Floating inputs of another
        dtype (float64 into a float32 model) are cast, logged at DEBUG. Integer inputs (uint8,
        int16 CT, ...) are cast too when every value is exactly representable in the model's dtype
        (|v| ≤ 2^24 for float32, 2^11 for float16, 2^8 for bfloat16).

    Raises
    ------
    InputError
        Not a tensor; an empty tensor (a batch of size 0); a bool or complex dtype (no meaningful
        cast); integer values the model's dtype cannot hold exactly; NaN/Inf values.
    """
    if isinstance(x, np.ndarray):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        message = f"x must be a torch.Tensor or MONAI MetaTensor of shape (B, C_in, *spatial), not {type(x).__name__}."
        raise InputError(message)
    inputs = (x.as_tensor() if hasattr(x, "as_tensor") else x).detach()
    if inputs.numel() == 0:
        what = "a batch of size 0" if inputs.ndim and inputs.shape[0] == 0 else "an empty tensor"
        message = (
            f"x has shape {tuple(inputs.shape)}: {what}. Give at least one sample with a non-empty "
            "(B, C_in, *spatial) volume (check the data loader or the crop)."
        )
        raise InputError(message)
    if inputs.dtype == torch.bool or inputs.is_complex():
        message = (
            f"x has dtype {inputs.dtype}, which has no meaningful conversion to image intensities. Convert it "
            "yourself (e.g. x.float() for a mask, x.abs() for complex data)."
        )
        raise InputError(message)
    device, dtype = model_device_dtype(model)
    if dtype is None:
        dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    if not inputs.is_floating_point():
        _check_integers_fit(inputs, dtype)
    cast = inputs.dtype != dtype
    if cast:
        logger.debug("Input of dtype %s cast to the model's %s.", inputs.dtype, dtype)
    inputs = inputs.to(device=device if device is not None else inputs.device, dtype=dtype)
    # One sum first (NaN and Inf propagate into it; no mask is allocated); the exact check only when it is not
    # finite, which also catches finite values whose sum overflows.
    if check_finite and not bool(torch.isfinite(inputs.sum())):
        finite = torch.isfinite(inputs)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            after = f" after the cast from {x.dtype} to {dtype}" if cast else ""
            message = (
                f"x contains {bad} NaN/Inf value(s){after} (shape {tuple(inputs.shape)}). Replace them, e.g. "
                "torch.nan_to_num(x), or fix the preprocessing."
            )
            raise InputError(message)
    return inputs


def _check_integers_fit(inputs: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse integer values that ``dtype`` cannot represent exactly."""
    exact = round(2 / torch.finfo(dtype).eps)  # 2^(mantissa bits + 1): every integer up to it is exact
    if torch.iinfo(inputs.dtype).max <= exact and torch.iinfo(inputs.dtype).min >= -exact:
        return
    low, high = int(inputs.min()), int(inputs.max())
    if max(abs(low), abs(high)) > exact:
        message = (
            f"x has {inputs.dtype} values in [{low}, {high}], but the model computes in {dtype}, which holds "
            f"integers exactly only up to {exact}: the cast would change them. Rescale the intensities (as the "
            "model's preprocessing does) and pass a floating tensor."
        )
        raise InputError(message)


# ------------------------------------------------------------------------- outputs that are not logits
@dataclass(frozen=True)
class OutputActivation:
    """The activation that produced the model's output, and its input.

    Attributes
    ----------
    kind : {"softmax", "log_softmax", "sigmoid"}
    name : str
        Dotted module name (or the TorchScript operator, e.g. ``"aten::softmax"``).
    logits : Tensor
        The activation's input: the logits, ``(B, C)`` or ``(B, C, *spatial)``.
    """

    kind: str
    name: str
    logits: torch.Tensor


#: ``__name__`` of the torch functions (and ``Tensor`` methods) that apply an output activation, and its kind.
#: ``F.softmax``, ``torch.softmax`` and ``Tensor.softmax`` are all named ``softmax``; in-place forms
#: (``sigmoid_``) overwrite their input and are never taken.
ACTIVATION_FUNCTIONS = {"softmax": "softmax", "special_softmax": "softmax", "log_softmax": "log_softmax",
                        "special_log_softmax": "log_softmax", "sigmoid": "sigmoid", "special_expit": "sigmoid"}


def _function_name(func: object) -> str:
    """``torch.softmax``, ``Tensor.softmax``, ``torch.nn.functional.softmax`` ... for messages."""
    name = getattr(func, "__name__", "activation")
    if getattr(func, "__objclass__", None) is not None:  # a method of torch._C.TensorBase
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or "torch"
    if name.startswith("special_"):
        return f"torch.special.{name[len('special_'):]}"
    return f"{module if module.startswith('torch.') else 'torch'}.{name}"


class _ActivationCalls(TorchFunctionMode):
    """Sees every torch function called on this thread (a ``TorchFunctionMode`` is thread-local) and keeps
    the last softmax/log_softmax/sigmoid call: its kind, name, input and (weakly) output.

    The record lives only while that output does: an activation inside the network (an attention
    softmax) is dropped when its output is freed, so its input is not kept alive for nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[str, str, torch.Tensor, weakref.ref] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        kind = ACTIVATION_FUNCTIONS.get(getattr(func, "__name__", ""))
        if kind is not None and args and isinstance(args[0], torch.Tensor) and isinstance(result, torch.Tensor) \
                and result is not args[0]:
            self.last = (kind, _function_name(func), args[0], weakref.ref(result, self._forget))
        return result

    def _forget(self, dead: weakref.ref) -> None:
        if self.last is not None and self.last[3] is dead:
            self.last = None


class OutputActivationWatch:
    """Watches one forward pass for the softmax/sigmoid that produces the model's output (a context manager).

    Two watchers: forward hooks on the model's ``nn.Softmax``/``nn.Sigmoid``/``nn.LogSoftmax``
    modules (for their names), and a :class:`torch.overrides.TorchFunctionMode` that sees the
    functional calls too (``torch.softmax(y, 1)``, ``F.sigmoid``, ``y.log_softmax(1)`` ... in a
    ``forward``). Afterwards :meth:`trailing` says whether one of them produced the model's output
    (the very tensor the model returned, or the first entry of a tuple/list/dict output): only then,
    i.e. when the activation is the model's last operation, and gives its input (the logits). A
    softmax inside the network (attention) never produces the output and is never taken.

    Inside TorchScript no Python hook or mode sees a call. A scripted *submodule* of a plain model
    whose graph ends in a softmax/sigmoid is rerun, when called, as its graph with the activation's
    input as a second output (:func:`medcam3d.torchscript.script_logits`; one extra pass through that
    submodule). Function calls are not watched in a model with ``torch.compile``-d parts (Dynamo
    would trace the watcher itself, again and again): there only modules count. The model itself,
    when scripted, is left to the captures
    (:class:`medcam3d.capture.ActivationCapture` splits its graph, :class:`medcam3d.capture.InputCapture`
    runs it with that second output), and so are the submodules in ``skip``.

    Parameters
    ----------
    model : nn.Module
    skip : iterable of nn.Module
        Scripted submodules that a capture already recomputes (see
        :attr:`medcam3d.capture.ActivationCapture.intercepted`).
    """

    def __init__(self, model: nn.Module, skip: Iterable[nn.Module | None] = ()) -> None:
        self.model = model
        self._modules = [
            (name, module, ACTIVATION_MODULES[type(module).__name__])
            for name, module in model.named_modules()
            if not is_scripted(module) and type(module).__name__ in ACTIVATION_MODULES
        ]
        self._functions = not any(type(module).__name__ == "OptimizedModule"
                                  or module.__dict__.get("_compiled_call_impl") is not None for module in model.modules())
        skipped = {id(module) for module in skip if module is not None}
        self._scripts = []
        if not is_scripted(model):
            roots: list[str] = []
            for name, module in model.named_modules():
                if not name or not is_scripted(module) or any(name.startswith(root + ".") for root in roots):
                    continue
                roots.append(name)
                peeled = script_logits(module) if id(module) not in skipped else None
                if peeled is not None:
                    self._scripts.append((name, module, peeled))
        self._last: tuple[str, str, torch.Tensor, torch.Tensor] | None = None
        self._hooks: AbstractContextManager[list[RemovableHandle]] | None = None
        self._calls: _ActivationCalls | None = None

    def __enter__(self) -> OutputActivationWatch:
        self._last = None
        self._calls = None
        self._hooks = forward_hooks([(module, self._hook(name, kind)) for name, module, kind in self._modules]
                                    + [(module, self._rerun(name, peeled)) for name, module, peeled in self._scripts])
        self._hooks.__enter__()
        if not self._functions:
            return self
        try:
            self._calls = _ActivationCalls()
            self._calls.__enter__()
        except BaseException:
            self._calls = None
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if self._calls is not None:
                self._calls.__exit__(exc_type, exc, traceback)  # keeps its record for trailing()
        finally:
            if self._hooks is not None:
                self._hooks.__exit__(exc_type, exc, traceback)
                self._hooks = None

    def _hook(self, name: str, kind: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            # Only the last call is kept: only the last executed activation can produce the output,
            # and earlier (mid-network) ones must not be kept alive.
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                self._last = (name, kind, inputs[0], output)

        return hook

    def _rerun(self, name: str, peeled: ScriptLogits):
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            outputs, logits = peeled(module, inputs)
            produced = _first_or_none(outputs)
            if produced is not None:
                self._last = (f"{name}: {peeled.trailing.name}", peeled.trailing.kind, logits, produced)
            return outputs

        return hook

    def trailing(self, outputs: torch.Tensor) -> OutputActivation | None:
        """The activation whose output is ``outputs`` (the model's logits tensor), if any: a module
        (named by its dotted name) or a function call (named ``torch.softmax``, ``Tensor.sigmoid`` ...)."""
        if self._last is not None and self._last[3] is outputs:
            name, kind, logits, _ = self._last
            return OutputActivation(kind, name, logits)
        last = self._calls.last if self._calls is not None else None
        if last is not None and last[3]() is outputs:
            kind, name, logits, _ = last
            return OutputActivation(kind, name, logits)
        return None


def looks_like_probabilities(outputs: torch.Tensor, *, atol: float = 1e-3) -> str | None:
    """Whether a model's output looks like probabilities rather than logits, from its values.

    Parameters
    ----------
    outputs : (B, C) or (B, C, *spatial) Tensor
    atol : float
        Tolerance of the range and sum checks.

    Returns
    -------
    {"softmax", "sigmoid"} or None
        ``"softmax"``: C > 1, every value in [0, 1] and the class axis sums to 1 everywhere.
        ``"sigmoid"``: every value in [0, 1], at least 8 values, not summing to 1. A heuristic: logits
        of an untrained network can lie in [0, 1] too, so this only ever leads to a warning.
    """
    with torch.no_grad():
        values = outputs.detach().float()
        if values.ndim < 2 or values.numel() == 0:
            return None
        if float(values.min()) < -atol or float(values.max()) > 1 + atol:
            return None
        if values.shape[1] > 1 and bool(((values.sum(dim=1) - 1).abs() <= atol).all()):
            return "softmax"
        return "sigmoid" if values.numel() >= 8 else None


def logits_from_probabilities(probabilities: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    """Differentiable logits recovered from a model's probabilities.

    Parameters
    ----------
    probabilities : (B, C) or (B, C, *spatial) Tensor
    kind : {"softmax", "sigmoid"}
        ``"sigmoid"``: ``logit(p) = log p − log(1 − p)``, which *is* the logit; ``p`` is clamped to
        ``[ε, 1 − ε]`` (ε = float32 machine epsilon), so where the sigmoid saturated (|logit| above
        about 16) the value is clipped and its gradient is zero. ``"softmax"``: ``log p``, which is
        the logit minus ``logsumexp`` over the classes — the same for every class of a sample, so
        differences between classes are exact, but the gradient of ``log p_c`` is
        ``∇z_c − Σ_j p_j ∇z_j``: a class's map becomes its logit's map minus the probability-weighted
        mean of all classes' maps (evidence for c relative to the others). ``p`` is clamped to the
        smallest normal float (where it underflowed to 0 the gradient is zero).

    Returns
    -------
    (logits, clamped_fraction)
        float32 logits, and the fraction of values that were clamped (0 when none).
    """
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be 'softmax' or 'sigmoid', not {kind!r}.")
    values = probabilities.float()
    if kind == "sigmoid":
        eps = torch.finfo(torch.float32).eps
        clamped = values.clamp(eps, 1 - eps)
        logits = torch.log(clamped) - torch.log1p(-clamped)
    else:
        tiny = torch.finfo(torch.float32).tiny
        clamped = values.clamp_min(tiny)
        logits = torch.log(clamped)
    with torch.no_grad():
        fraction = float((clamped != values).float().mean()) if values.numel() else 0.0
    return logits, fraction
