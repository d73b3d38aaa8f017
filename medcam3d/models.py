"""Build and load models safely.

Weights are read with ``torch.load(weights_only=True)``: a state_dict cannot run code. Anything
that executes code from a file (a MONAI bundle's config expressions, TorchScript, classes outside
MONAI/torch/medcam3d) needs ``trust=True`` (CLI ``--trust``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UntrustedModelError  # noqa: F401  (re-exported)
from .config import Config, ModelConfig

__all__ = ["ModelLoadError", "UntrustedModelError", "build_network", "load_weights", "load_model"]

#: Packages whose classes may be built from a config without --trust.
TRUSTED_PACKAGES = ("monai.", "torch.nn.", "medcam3d.")


def build_network(network: str, args: Mapping | None = None, *, trust: bool = False) -> nn.Module:
    """Instantiate ``network`` (a dotted class path) with ``args``.

    Raises
    ------
    UntrustedModelError
        For a class outside :data:`TRUSTED_PACKAGES` without ``trust``.
    ModelLoadError
        Unknown module/class or invalid arguments.
    """
    if not network.startswith(TRUSTED_PACKAGES) and not trust:
        message = (
            f"Building {network!r} imports code outside MONAI/torch/medcam3d. If you trust it, pass trust=True "
            "(CLI: --trust)."
        )
        raise UntrustedModelError(message)
    module_name, _, class_name = network.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"Cannot import {module_name!r} for network {network!r}: {error}") from None
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        raise ModelLoadError(f"{module_name!r} has no class {class_name!r} (network {network!r}).")
    try:
        model = cls(**dict(args or {}))
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"Cannot build {network} with args {dict(args or {})}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{network} did not build a torch.nn.Module (got {type(model).__name__}).")
    return model


def _state_dict(loaded: object, path: Path) -> Mapping:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "network"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
    raise ModelLoadError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors).")


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a state_dict file into ``model`` with ``torch.load(weights_only=True)``.

    ``module.`` prefixes (from DataParallel) are removed. A mismatch between the file and the
    network raises :class:`ModelLoadError` listing missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"Weights file {str(path)!r} does not exist.") from None
    except Exception as error:  # pickle errors, corrupt zip, code objects refused by weights_only
        message = (
            f"Cannot read weights from {path} safely (torch.load(weights_only=True)): {error}. Save weights with "
            "torch.save(model.state_dict(), path)."
        )
        raise ModelLoadError(message) from None
    state = {k.removeprefix("module."): v for k, v in _state_dict(loaded, path).items()}
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
        message = (
            f"The weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}. Check model.network "
            "and model.args (e.g. out_channels, spatial_dims) against how the model was trained."
        )
        raise ModelLoadError(message)
    model.load_state_dict(state, strict=strict)
    return model


def _load_bundle(directory: Path, *, trust: bool) -> nn.Module:
    if not trust:
        message = (
            f"{directory} is a MONAI bundle; its configs can run Python expressions. If you trust it, pass trust=True "
            "(CLI: --trust)."
        )
        raise UntrustedModelError(message)
    from monai.bundle import ConfigParser

    configs = [directory / "configs" / name for name in ("inference.json", "inference.yaml", "inference.yml")]
    config_file = next((c for c in configs if c.is_file()), None)
    if config_file is None:
        raise ModelLoadError(f"{directory} has no configs/inference.json or .yaml: not a MONAI bundle.")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(directory)
    key = "network_def" if "network_def" in parser else "network"
    try:
        model = parser.get_parsed_content(key)
    except Exception as error:
        raise ModelLoadError(f"Cannot build '{key}' from {config_file}: {error}") from None
    weights = directory / "models" / "model.pt"
    if weights.is_file():
        load_weights(model, weights)
    return model


def load_model(config: Config | ModelConfig, *, trust: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """Build the configured model, load its weights, move it to ``device``, in eval mode."""
    spec = config.model if isinstance(config, Config) else config
    if spec.bundle is not None:
        model = _load_bundle(spec.bundle, trust=trust)
    elif spec.torchscript is not None:
        if not trust:
            raise UntrustedModelError(f"{spec.torchscript} is TorchScript, which runs code. If you trust it, pass trust=True (CLI: --trust).")
        model = torch.jit.load(str(spec.torchscript), map_location="cpu")
    else:
        assert spec.network is not None
        model = build_network(spec.network, spec.args, trust=trust)
        if spec.weights is not None:
            load_weights(model, spec.weights)
    return model.to(device).eval()
