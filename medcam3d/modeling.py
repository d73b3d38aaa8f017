"""Model plumbing shared by the engine, the metrics and the jobs: where a model lives, how an
input gets there, and which tensor of its output holds the logits.

One implementation of each, so that every caller agrees:

* :func:`model_device_dtype` — the device and floating dtype of a model's parameters;
* :func:`to_model_input` — a tensor (or MONAI ``MetaTensor``/ndarray) checked, moved to the
  model's device and cast to its dtype;
* :func:`first_tensor` — the logits tensor of whatever the model returned (a tensor, the first
  entry of a tuple/list such as deep supervision, ``["logits"]`` of a dict);
* :func:`model_output` — ``first_tensor(model(x))``.

Hooks, locks and train/eval hygiene live in :mod:`medcam3d.hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .errors import InputError, ModelOutputError

__all__ = ["first_tensor", "model_device_dtype", "model_output", "to_model_input"]

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
    if check_finite:
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
