"""From the model's forward pass to the logits the engine explains: the model's own failure as one line,
its output checked, and a trailing softmax/log-softmax/sigmoid undone (``output_activation``, see
:class:`medcam3d.explainer.Explainer`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from .errors import InputError, LayerError, Medcam3dError, ModelForwardError, ModelOutputError, ProbabilityOutputWarning
from .capture import ActivationCapture, InputCapture
from .model_io import OutputActivation, OutputActivationWatch, first_tensor, logits_from_probabilities, looks_like_probabilities
from .torchscript import script_error_reason

__all__ = ["forward_errors", "checked_outputs", "logits_to_explain"]


@contextlib.contextmanager
def forward_errors(model: torch.nn.Module, inputs: torch.Tensor) -> Iterator[None]:
    """The model's own failure in its forward pass (a ``RuntimeError``, ``ValueError`` or TorchScript's
    ``torch.jit.Error``) as a one-line :class:`~medcam3d.errors.ModelForwardError` that names the input's
    shape and what to check. Out-of-memory errors and medcam3d's own errors pass through unchanged."""
    try:
        yield
    except (Medcam3dError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, ValueError, torch.jit.Error) as error:
        if isinstance(error, RuntimeError) and "allocate" in str(error):  # the CPU allocator: out of memory
            raise
        scripted = isinstance(error, torch.jit.Error) or "Traceback of TorchScript" in str(error)
        reason = script_error_reason(error) if scripted else " ".join(str(error).split())  # without the graph's traceback
        message = (f"{type(model).__name__} failed on an input of shape {tuple(inputs.shape)} "
                   f"({inputs.dtype}, {inputs.device}): {reason[:400]}. Check that the preprocessing gives the "
                   "input the model was built for (its spatial size, e.g. ResizeWithPadOrCrop's spatial_size, "
                   "and its channels), and the device.")
        raise ModelForwardError(message) from error


def checked_outputs(outputs: object, layer: str, track: bool) -> torch.Tensor:
    """The model's output tensor (:func:`medcam3d.model_io.first_tensor`), checked: finite, and, with
    ``track``, differentiable with respect to ``layer`` (:class:`~medcam3d.errors.InputError` or
    :class:`~medcam3d.errors.LayerError` otherwise)."""
    tensor = first_tensor(outputs)
    if not bool(torch.isfinite(tensor.detach()).all()):
        message = "The model produced NaN/Inf outputs for this input; check the weights and the preprocessing."
        raise InputError(message)
    if track and not tensor.requires_grad:
        message = (
            f"The model's output does not depend on layer {layer!r} through differentiable operations "
            "(or the model detaches it), so there is no gradient to explain. Choose a layer on the path "
            "to the output."
        )
        raise LayerError(message)
    return tensor


def _first(output: object) -> torch.Tensor | None:
    try:
        return first_tensor(output)
    except ModelOutputError:
        return None


def logits_to_explain(outputs: torch.Tensor, capture: ActivationCapture | InputCapture, watch: object, mode: str,
                      track: bool, *, stacklevel: int = 2) -> tuple[torch.Tensor, str]:
    """The tensor to score, and the activation undone (``"none"`` when the output is kept).

    Parameters
    ----------
    outputs : (B, C) or (B, C, *spatial) Tensor
        The checked output (:func:`checked_outputs`).
    capture : ActivationCapture or InputCapture
        The pass's first capture (a TorchScript graph's trailing activation is found by it).
    watch : OutputActivationWatch or other
        The watch over the pass's activation modules and calls (anything else: none watched).
    mode : {"auto", "none", "softmax", "sigmoid"}
        The explainer's ``output_activation``.
    track : bool
        Gradients are taken: a trailing activation whose input does not require grad is not used.
    stacklevel : int
        Of the warnings, from this function's caller.

    Returns
    -------
    (Tensor, str)
        The logits (same shape as ``outputs``) and ``"none"``, ``"softmax"``, ``"log_softmax"`` or
        ``"sigmoid"``.
    """
    level = stacklevel + 1
    if mode == "none":
        return outputs, "none"
    found: OutputActivation | None = None
    if capture.trailing is not None and capture.logits is not None and _first(capture.produced) is outputs:
        found = OutputActivation(capture.trailing.kind, capture.trailing.name, capture.logits)
    elif isinstance(watch, OutputActivationWatch):
        found = watch.trailing(outputs)
    usable = found is not None and (found.logits.requires_grad or not track)
    if found is not None and usable:
        logits = first_tensor(found.logits)
        if mode == "auto":
            message = (
                f"The model's output comes from a {found.kind} ({found.name!r}), so it holds probabilities, not "
                f"logits; medcam3d explains the {found.kind}'s input (the logits) instead. Pass "
                "output_activation='none' to explain the probabilities as they are."
            )
            warnings.warn(message, ProbabilityOutputWarning, stacklevel=level)
        elif not found.kind.endswith(mode):
            message = (
                f"output_activation={mode!r}, but the model's output comes from a {found.kind} ({found.name!r}); "
                f"medcam3d explains that {found.kind}'s input (the logits)."
            )
            warnings.warn(message, ProbabilityOutputWarning, stacklevel=level)
        return logits, found.kind
    if mode == "auto":
        guess = looks_like_probabilities(outputs)
        if guess is not None:
            message = (
                f"The model's outputs look like {guess} probabilities (all in [0, 1]"
                f"{', summing to 1 over the classes' if guess == 'softmax' else ''}), but no {guess} "
                f"module or function call produced them, so they are explained as they are. If the model applies a {guess}, "
                f"pass output_activation={guess!r} (the activation is then inverted) or explain the model "
                "without it; if these are logits, pass output_activation='none'."
            )
            warnings.warn(message, ProbabilityOutputWarning, stacklevel=level)
        return outputs, "none"
    logits, clamped = logits_from_probabilities(outputs, mode)
    inverse = "logit(p)" if mode == "sigmoid" else "log(p), the logits up to a constant per sample"
    message = (
        f"output_activation={mode!r} and no {mode} module or function call produced the output: the model's output was inverted "
        f"({inverse}) and that is explained."
    )
    if mode == "softmax":
        message += (
            " Each class map is then relative to the other classes (its logit's map minus the "
            "probability-weighted mean of all classes' maps); differences between classes are exact."
        )
    if clamped > 0:
        message += (
            f" {clamped:.1%} of the values were saturated (clamped before the inverse): their gradient is zero."
        )
    warnings.warn(message, ProbabilityOutputWarning, stacklevel=level)
    return logits.to(outputs.dtype) if outputs.dtype == torch.float64 else logits, mode
