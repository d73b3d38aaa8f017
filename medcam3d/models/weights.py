"""Read weights safely: a state_dict file with ``torch.load(weights_only=True)`` (a full pickle only
with trust), and copy it into a network or say exactly which keys do not fit."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, cause_line

__all__ = ["load_weights", "read_state", "load_state"]

def _state_dict(loaded: object, path: Path) -> Mapping:
    if isinstance(loaded, nn.Module):  # a whole pickled model (read only with trust)
        return loaded.state_dict()
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "network"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
    raise ModelLoadError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors).")


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True, trust: bool = False) -> nn.Module:
    """Load a state_dict file into ``model`` with ``torch.load(weights_only=True)``.

    ``module.`` prefixes (from DataParallel) are removed. A mismatch between the file and the
    network raises :class:`ModelLoadError` listing missing, unexpected and mis-shaped keys.

    Parameters
    ----------
    model : torch.nn.Module
        The network to fill.
    path : str or Path
        A file written by ``torch.save(model.state_dict(), path)`` (or a checkpoint dict holding
        one under ``state_dict``, ``model``, ``model_state_dict`` or ``network``).
    strict : bool
        Refuse missing or unexpected keys.
    trust : bool
        If the file is not readable with ``weights_only=True`` (a full pickle: a whole model, or a
        checkpoint with other objects), unpickle it in full. Unpickling runs code from the file.

    Raises
    ------
    ModelLoadError
        Missing or unreadable file, a full pickle without ``trust``, or weights that do not fit.
    """
    path = Path(path)
    return load_state(model, read_state(path, trust=trust), path, strict=strict)


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _weights_only_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line (torch's message spans 8)."""
    text = str(error)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return (
            f"the file holds a pickled object of type {found.group(1)}, not only tensors, and torch.load(weights_only=True) "
            "refuses it because unpickling it could run code"
        )
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return f"it is not a PyTorch weights file (pickle opcode {operand.group(1)} is not one torch.save writes)"
    return f"torch.load(weights_only=True) refused it ({cause_line(error)})"


def read_state(path: Path, *, trust: bool) -> Mapping:
    """The state_dict in ``path``, read with ``weights_only=True`` (in full only with ``trust``)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"Weights file {str(path)!r} does not exist.") from None
    except Exception as error:  # pickle errors, corrupt zip, code objects refused by weights_only
        if trust and isinstance(error, pickle.UnpicklingError):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as full_error:
                raise ModelLoadError(f"Cannot read weights from {path} (full unpickling, trusted): {cause_line(full_error)}") from None
        elif isinstance(error, pickle.UnpicklingError) and not re.search(r"Unsupported operand \d+", str(error)):
            message = (
                f"Cannot read weights from {path}: {_weights_only_reason(error)}. Save the weights with "
                "torch.save(model.state_dict(), path); or, if you trust the file (unpickling runs code from it), pass "
                "--trust (Python: trust=True)."
            )
            raise ModelLoadError(message) from None
        elif isinstance(error, pickle.UnpicklingError):  # not a pickle torch.save writes: --trust would not help
            message = (
                f"Cannot read weights from {path}: {_weights_only_reason(error)}. Give the state_dict file written by "
                "torch.save(model.state_dict(), path)."
            )
            raise ModelLoadError(message) from None
        else:
            message = (
                f"Cannot read weights from {path} (torch.load(weights_only=True)): {cause_line(error)}. Save the weights "
                "with torch.save(model.state_dict(), path)."
            )
            raise ModelLoadError(message) from None
    return _state_dict(loaded, path)


_CHECK_ARGS = "Check model.network and model.args (e.g. out_channels, spatial_dims) against how the model was trained."


def load_state(model: nn.Module, state: Mapping, path: Path, *, strict: bool = True, hint: str = _CHECK_ARGS) -> nn.Module:
    """Copy ``state`` (read from ``path``) into ``model``, or say exactly which keys do not fit."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:2]})")
        raise ModelLoadError(f"The weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}. {hint}")
    try:
        model.load_state_dict(state, strict=strict)
    except Exception as error:  # e.g. a tensor that cannot be copied into the parameter
        raise ModelLoadError(f"Cannot load the weights in {path} into {type(model).__name__}: {cause_line(error)}") from None
    return model
