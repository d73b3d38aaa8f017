"""Build and load models safely.

Weights are read with ``torch.load(weights_only=True)``: a state_dict cannot run code. Anything
that executes code from a file (a MONAI bundle's config expressions, TorchScript, a weights file
that is a full pickle) needs ``trust=True`` (CLI ``--trust``).

A config is code unless constrained. Without trust, ``model.network`` must name a class that
subclasses ``torch.nn.Module`` and is defined in :data:`NETWORK_NAMESPACES` (MONAI's
``monai.networks.nets``, ``torch.nn``, medcam3d's demo networks), or one of MONAI's plain network
factories (:data:`NETWORK_FACTORIES`, e.g. ``monai.networks.nets.resnet50``). Its arguments must be
plain data (:func:`medcam3d.config.plain_data_problem`), may not make it download or read files
(:data:`ARGUMENTS_NEEDING_TRUST`), and it may have at most :data:`MAX_PARAMETERS` parameters
(counted on the ``meta`` device before anything is allocated). With trust, any importable callable
that returns an ``nn.Module`` is built, as before.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import pickle
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UntrustedModelError, UntrustedNetworkError  # noqa: F401  (re-exported)
from .config import Config, ModelConfig, _short, plain_data_problem

__all__ = [
    "ModelLoadError",
    "UntrustedModelError",
    "UntrustedNetworkError",
    "NETWORK_NAMESPACES",
    "NETWORK_FACTORIES",
    "NETWORKS_NEEDING_TRUST",
    "ARGUMENTS_NEEDING_TRUST",
    "MAX_PARAMETERS",
    "MAX_MODULES",
    "MAX_BUILD_SECONDS",
    "MAX_ARGUMENT_INT",
    "build_network",
    "load_weights",
    "load_model",
]

#: Modules (and their submodules) whose ``nn.Module`` classes a config may name without trust.
#: Both the configured path and the class's ``__module__`` must lie inside one of them.
NETWORK_NAMESPACES = ("monai.networks.nets", "torch.nn", "medcam3d.demo")

#: MONAI functions in ``monai.networks.nets`` that only call a network class's constructor (so that
#: ``configs/resnet50.yaml`` needs no trust). Names in ``monai.networks.nets``.
NETWORK_FACTORIES = frozenset(
    {f"resnet{depth}" for depth in (10, 18, 34, 50, 101, 152, 200)}
    | {f"MedNe{x}t{size}" for x in ("X", "x") for size in ("S", "B", "M", "L", "Small", "Base", "Medium", "Large")}
)

#: Classes of ``monai.networks.nets`` that download or pick third-party models by name when built
#: (Hugging Face, torchvision); they need trust.
NETWORKS_NEEDING_TRUST = frozenset({"Transchex", "TorchVisionFCModel", "MILModel"})

#: Constructor arguments that make a network download or read weights (some with full pickles).
#: Without trust they must be false, null or absent; load weights with ``model.weights`` instead.
ARGUMENTS_NEEDING_TRUST = frozenset(
    {"pretrained", "pretrained_url", "pretrained_path", "weights", "path_or_repo_id", "filename", "checkpoint", "model_dir", "cache_dir"}
)

#: Most parameters (and buffers) a network built from an untrusted config may have (2 GB in
#: float32; MONAI's largest 3D networks have about 100 million).
MAX_PARAMETERS = 500_000_000

#: Most submodules a network built from an untrusted config may register while it is built
#: (MONAI's 3D networks register a few hundred to a few thousand).
MAX_MODULES = 50_000

#: Longest a network from an untrusted config may take to build (checked whenever it registers a
#: parameter, buffer or submodule; MONAI's networks take a few seconds at most).
MAX_BUILD_SECONDS = 60.0

#: Largest integer (in absolute value) an untrusted config may give as a network argument; a
#: small config must not make a constructor loop or allocate without bound.
MAX_ARGUMENT_INT = 1 << 20

_TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"


def _inside(module_name: str, namespaces=NETWORK_NAMESPACES) -> bool:
    return any(module_name == ns or module_name.startswith(ns + ".") for ns in namespaces)


def _where(source) -> str:
    return f"{source}: " if source else ""


def _refuse(source, key: str, reason: str, fix: str) -> UntrustedNetworkError:
    return UntrustedNetworkError(f"{_where(source)}{key}: {reason}. {fix} {_TRUST_HINT}.")


def _resolve_untrusted(network: str, source) -> object:
    """Import and return what ``network`` names, checking the rule before and after importing."""
    allowed = (
        "a torch.nn.Module class from " + ", ".join(NETWORK_NAMESPACES) + " (e.g. monai.networks.nets.DenseNet121, "
        "torch.nn.Conv3d)"
    )
    module_name, _, name = network.rpartition(".")
    if not module_name or not _inside(module_name):
        raise _refuse(
            source, "model.network", f"{network!r} is outside the network namespaces, so building it could run any code",
            f"Without --trust a config may only name {allowed}.",
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or a module path that names a class
        raise ModelLoadError(f"{_where(source)}model.network: cannot import {module_name!r} for {network!r}: {error}. Expected {allowed}.") from None
    obj = getattr(module, name, None) if name.isidentifier() and not name.startswith("_") else None
    if obj is None:
        candidates = [n for n in dir(module) if inspect.isclass(getattr(module, n, None)) and issubclass(getattr(module, n), nn.Module)]
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f" Did you mean {' or '.join(repr(f'{module_name}.{c}') for c in close)}?" if close else ""
        raise ModelLoadError(f"{_where(source)}model.network: {module_name!r} has no network class {name!r}.{hint}")
    if module_name == "monai.networks.nets" and name in NETWORK_FACTORIES and inspect.isfunction(obj):
        return obj
    if not inspect.isclass(obj):
        raise _refuse(
            source, "model.network", f"{network!r} is a {type(obj).__name__}, not a class; calling it could do anything",
            f"Without --trust a config may only name {allowed}.",
        )
    if not issubclass(obj, nn.Module):
        raise _refuse(
            source, "model.network", f"{network!r} is a class but not a torch.nn.Module",
            f"Without --trust a config may only name {allowed}.",
        )
    if not _inside(obj.__module__ or ""):
        raise _refuse(
            source, "model.network", f"{network!r} is defined in {obj.__module__!r}, outside the network namespaces",
            f"Without --trust a config may only name {allowed}.",
        )
    if obj.__module__.startswith("monai.networks.nets") and obj.__name__ in NETWORKS_NEEDING_TRUST:
        raise _refuse(
            source, "model.network", f"{network!r} downloads or picks third-party models by name when it is built",
            "Without --trust, use another network class.",
        )
    return obj


def _check_untrusted_args(args: Mapping, source) -> None:
    problem = plain_data_problem(dict(args), "model.args")
    if problem:
        raise _refuse(
            source, *problem,
            "Without --trust, model.args may only hold plain data: numbers, strings, booleans, null, lists and "
            "mappings (no _target_-style keys, no $expressions, @references or %macros).",
        )
    big = _big_int(args, "model.args")
    if big is not None:
        key, value = big
        message = (
            f"{_where(source)}{key}: {_short(value)} is larger than {MAX_ARGUMENT_INT:,}, the largest number a config "
            f"may give a network without --trust. Check the value against how the model was trained. {_TRUST_HINT}."
        )
        raise ModelLoadError(message)
    for name, value in args.items():
        if name in ARGUMENTS_NEEDING_TRUST and value not in (None, False, "", 0):
            raise _refuse(
                source, f"model.args.{name}", f"{name}: {_short(value)} makes the network download or read weights when it is built",
                "Without --trust, set it to false and give a state_dict file as model.weights (read with "
                "torch.load(weights_only=True)).",
            )


def _big_int(value: object, key: str) -> tuple[str, int] | None:
    """The first int in plain data ``value`` above :data:`MAX_ARGUMENT_INT` in absolute value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (key, value) if abs(value) > MAX_ARGUMENT_INT else None
    if isinstance(value, Mapping):
        items = ((f"{key}.{name}", item) for name, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for item_key, item in items:
        found = _big_int(item, item_key)
        if found:
            return found
    return None


class _OverBudget(Exception):
    """Raised from torch's registration hooks when a build registers too much."""


class _Budget:
    def __init__(self, max_elements: int, max_modules: int, to_meta: bool = False):
        self.max_elements, self.max_modules, self.to_meta = max_elements, max_modules, to_meta
        self.elements = self.modules = 0
        self.exceeded: str | None = None
        self.deadline = time.monotonic() + MAX_BUILD_SECONDS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.over(f"more than {MAX_BUILD_SECONDS:g} s of construction")

    def over(self, what: str) -> _OverBudget:
        self.exceeded = what
        return _OverBudget(what)


_BUDGET = threading.local()
_HOOKS: list = []
_HOOKS_LOCK = threading.Lock()


def _on_tensor(module, name, tensor):
    budget = getattr(_BUDGET, "current", None)
    if budget is None or tensor is None:
        return None
    budget.elements += int(tensor.numel())
    if budget.elements > budget.max_elements:
        raise budget.over(f"more than {budget.max_elements:,} parameters and buffers")
    budget.check_time()
    if budget.to_meta and tensor.device.type != "meta":  # keep the shape, free the memory
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(tensor.detach().to("meta"), requires_grad=tensor.requires_grad)
        return tensor.detach().to("meta")
    return None


def _on_module(module, name, submodule):
    budget = getattr(_BUDGET, "current", None)
    if budget is not None and submodule is not None:
        budget.modules += 1
        if budget.modules > budget.max_modules:
            raise budget.over(f"more than {budget.max_modules:,} submodules")
        budget.check_time()


@contextlib.contextmanager
def _budget(max_elements: int, *, to_meta: bool = False):
    """Abort a network's constructor (in this thread) once it registers too many tensors or modules.

    With ``to_meta``, every parameter and buffer is moved to the meta device as it is registered
    (its memory is freed at once). torch's global registration hooks are installed once; they do
    nothing outside this context.
    """
    from torch.nn.modules import module as torch_module

    with _HOOKS_LOCK:
        if not _HOOKS:
            _HOOKS.append(torch_module.register_module_parameter_registration_hook(_on_tensor))
            _HOOKS.append(torch_module.register_module_buffer_registration_hook(_on_tensor))
            _HOOKS.append(torch_module.register_module_module_registration_hook(_on_module))
    previous = getattr(_BUDGET, "current", None)
    budget = _BUDGET.current = _Budget(max_elements, MAX_MODULES, to_meta)
    try:
        yield budget
    finally:
        _BUDGET.current = previous


def _count_parameters(factory, args: dict, max_parameters: int) -> int | None:
    """Parameters and buffers of ``factory(**args)``, counted without keeping them in memory.

    The network is built on the meta device (nothing allocated); if its constructor cannot run
    there (it reads a tensor's value, as SwinUNETR does), on the CPU with every parameter and buffer
    moved to the meta device as it is registered. Either build stops as soon as it registers more
    than ``max_parameters`` elements or :data:`MAX_MODULES` submodules, or runs longer than
    :data:`MAX_BUILD_SECONDS`.

    Returns
    -------
    int or None
        The count, or None if the constructor fails both ways (the real build then reports the
        error).

    Raises
    ------
    _OverBudget
        The build was stopped.
    """
    for to_meta in (False, True):
        try:
            with _budget(max_parameters, to_meta=to_meta) as budget:
                with torch.device("meta") if not to_meta else contextlib.nullcontext():
                    model = factory(**args)
        except _OverBudget:
            raise
        except Exception:
            if budget.exceeded:  # the constructor caught and replaced our exception
                raise _OverBudget(budget.exceeded) from None
            continue
        if budget.exceeded:
            raise _OverBudget(budget.exceeded)
        if not isinstance(model, nn.Module):
            return None
        return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return None


def _over_budget(network: str, error: _OverBudget, source, max_parameters: int) -> ModelLoadError:
    message = (
        f"{_where(source)}model.args: building {network} with these arguments was stopped: it needed {error}. "
        f"Without --trust a network may have at most {max_parameters:,} parameters and buffers and "
        f"{MAX_MODULES:,} submodules, and take at most {MAX_BUILD_SECONDS:g} s to build. Check model.args "
        f"(channels, features, depths, block sizes) against how the model was trained. {_TRUST_HINT}."
    )
    return ModelLoadError(message)


def build_network(
    network: str,
    args: Mapping | None = None,
    *,
    trust: bool = False,
    source: str | Path | None = None,
    max_parameters: int | None = MAX_PARAMETERS,
) -> nn.Module:
    """Instantiate ``network`` (a dotted class path) with ``args``.

    Parameters
    ----------
    network : str
        Dotted path, e.g. ``monai.networks.nets.DenseNet121``.
    args : mapping, optional
        Constructor keyword arguments.
    trust : bool
        Build any importable callable with any arguments (the config's author is trusted). Without
        it, the rule in this module's docstring applies.
    source : str or Path, optional
        The config file, named in error messages.
    max_parameters : int or None
        Without trust, refuse networks with more parameters (and buffers) than this, counted before
        anything is allocated, and stop builds that register more than :data:`MAX_MODULES`
        submodules or take longer than :data:`MAX_BUILD_SECONDS`. None: no limits.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    UntrustedNetworkError
        Without ``trust``: a name outside the rule, arguments that are not plain data or that
        download weights. Subclasses :class:`UntrustedModelError`.
    ModelLoadError
        Unknown module/class, invalid arguments (any error of the constructor), a number above
        :data:`MAX_ARGUMENT_INT`, a build over the limits above, or a result that is not an
        ``nn.Module``.
    """
    if not isinstance(network, str) or "." not in network:
        raise ModelLoadError(f"{_where(source)}model.network must be a dotted class path like 'monai.networks.nets.DenseNet121', not {network!r}.")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ModelLoadError(f"{_where(source)}model.args must be a mapping of constructor arguments, not {type(args).__name__}.")
    args = dict(args)
    if not trust:
        factory = _resolve_untrusted(network, source)
        _check_untrusted_args(args, source)
        if max_parameters is not None:
            try:
                count = _count_parameters(factory, args, max_parameters)
            except _OverBudget as error:
                raise _over_budget(network, error, source, max_parameters) from None
            if count is not None and count > max_parameters:
                message = (
                    f"{_where(source)}model.args: {network} with these arguments has {count:,} or more parameters, "
                    f"more than the {max_parameters:,} allowed from an untrusted config. Check model.args (channels, "
                    f"features, block sizes) against how the model was trained. {_TRUST_HINT}."
                )
                raise ModelLoadError(message)
    else:
        module_name, _, class_name = network.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ModelLoadError(f"{_where(source)}model.network: cannot import {module_name!r} for {network!r}: {error}") from None
        factory = getattr(module, class_name, None)
        if factory is None or not callable(factory):
            raise ModelLoadError(f"{_where(source)}model.network: {module_name!r} has no class {class_name!r} (network {network!r}).")
    budget = _budget(max_parameters) if not trust and max_parameters is not None else contextlib.nullcontext()
    limits = None
    try:
        with budget as limits:
            model = factory(**args)
        if limits is not None and limits.exceeded:
            raise _OverBudget(limits.exceeded)
    except _OverBudget as error:
        raise _over_budget(network, error, source, max_parameters) from None
    except Exception as error:  # TypeError, ValueError, IndexError (e.g. spatial_dims: 4), ...
        if limits is not None and limits.exceeded:
            raise _over_budget(network, _OverBudget(limits.exceeded), source, max_parameters) from None
        message = (
            f"{_where(source)}model.args: cannot build {network} with args {_short(args)}: "
            f"{type(error).__name__}: {error}. Check the argument names and values against the class's documentation."
        )
        raise ModelLoadError(message) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{_where(source)}model.network: {network} did not build a torch.nn.Module (got {type(model).__name__}).")
    return model


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
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"Weights file {str(path)!r} does not exist.") from None
    except Exception as error:  # pickle errors, corrupt zip, code objects refused by weights_only
        if trust and isinstance(error, pickle.UnpicklingError):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as full_error:
                raise ModelLoadError(f"Cannot read weights from {path} (full unpickling, trusted): {full_error}") from None
        else:
            message = (
                f"Cannot read weights from {path} safely (torch.load(weights_only=True)): {error}. Save weights with "
                "torch.save(model.state_dict(), path)"
                + (
                    "; or, if the file is a full pickle you trust (unpickling runs code from it), pass --trust "
                    "(Python: trust=True)."
                    if isinstance(error, pickle.UnpicklingError) else "."
                )
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
    try:
        model.load_state_dict(state, strict=strict)
    except Exception as error:  # e.g. a tensor that cannot be copied into the parameter
        raise ModelLoadError(f"Cannot load the weights in {path} into {type(model).__name__}: {error}") from None
    return model


def _load_bundle(directory: Path, *, trust: bool, source=None) -> nn.Module:
    if not trust:
        message = (
            f"{_where(source)}model.bundle: {directory} is a MONAI bundle; its configs can run Python expressions. "
            f"Give model.network, model.args and a state_dict as model.weights instead, or: {_TRUST_HINT}."
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
        load_weights(model, weights, trust=trust)
    return model


def load_model(config: Config | ModelConfig, *, trust: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """Build the configured model, load its weights, move it to ``device``, in eval mode.

    Parameters
    ----------
    config : Config or ModelConfig
        From :func:`medcam3d.config.load_config`.
    trust : bool
        Allow what runs code: MONAI bundles, TorchScript, weights files that are full pickles, and
        any importable class with any arguments as ``model.network`` (see :func:`build_network` for
        the rule without it).
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    torch.nn.Module
        In eval mode.

    Raises
    ------
    UntrustedModelError
        Without ``trust``: a bundle, TorchScript, or a network outside the rule
        (:class:`UntrustedNetworkError`).
    ModelLoadError
        A network that cannot be built, or weights that cannot be read or do not fit.
    """
    spec = config.model if isinstance(config, Config) else config
    if spec.bundle is not None:
        model = _load_bundle(spec.bundle, trust=trust, source=spec.source)
    elif spec.torchscript is not None:
        if not trust:
            message = (
                f"{_where(spec.source)}model.torchscript: {spec.torchscript} is TorchScript, which runs code when "
                f"loaded. Give model.network, model.args and a state_dict as model.weights instead, or: {_TRUST_HINT}."
            )
            raise UntrustedModelError(message)
        model = torch.jit.load(str(spec.torchscript), map_location="cpu")
    else:
        if spec.network is None:
            raise ModelLoadError("The model config names no network, bundle or torchscript file.")
        model = build_network(spec.network, spec.args, trust=trust, source=spec.source)
        if spec.weights is not None:
            load_weights(model, spec.weights, trust=trust)
    return model.to(device).eval()
