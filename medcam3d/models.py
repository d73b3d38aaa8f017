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
(counted on the ``meta`` device before anything is allocated). A constructor argument the config
leaves out whose default would download or read weights (``EfficientNetBN``'s and
``ResNetFeatures``' ``pretrained=True`` ...; found from the constructor's signature, see
:func:`download_defaults`) is set to false/None. With trust, any importable callable that returns an
``nn.Module`` is built, as before.

Activation limit (with or without trust): a network built from a config (or a bundle's
``network_def``) refuses an input whose layer outputs would need more than
:data:`MAX_ACTIVATION_BYTES` (4 GiB) at once, estimated before the first forward pass of each
input shape by a forward pass on PyTorch's meta device (:func:`estimate_activation_bytes`,
:func:`limit_activations`; ``max_activation_bytes=``, CLI ``--max-activation-memory``): a
``Conv3d`` with ``padding: 600`` has a few parameters and would need 7 GiB.

No silent random weights: a network without a weights file is refused unless the config says
``weights: none`` or the caller passes ``random_weights=True`` (:func:`load_model`).

MONAI bundles (:func:`load_bundle`, behind trust) are read with MONAI's own
``monai.bundle.ConfigParser``: the network is the bundle's ``network_def`` with the weights of
``models/model.pt`` (or of ``models/model.ts``), and the preprocessing is the bundle's
``preprocessing`` chain (:class:`BundlePreprocessing`), which returns the model input as a
MetaTensor with its affine, so maps go back to scanner space as with a medcam3d config.

:func:`check_input_rank` refuses a 2D image for a 3D model (and the reverse) before preprocessing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import pickle
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError, ModelLoadError, UntrustedModelError, UntrustedNetworkError  # noqa: F401  (re-exported)
from .config import DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_VOXELS, Config, ModelConfig, _one_line, _short, plain_data_problem

logger = logging.getLogger(__name__)

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
    "MAX_ACTIVATION_BYTES",
    "BUNDLE_CONFIGS",
    "Bundle",
    "BundlePreprocessing",
    "build_network",
    "download_defaults",
    "estimate_activation_bytes",
    "limit_activations",
    "check_activations",
    "load_weights",
    "load_model",
    "load_bundle",
    "ConfiguredModel",
    "load_configured",
    "bundle_preprocessing",
    "bundle_input_shape",
    "bundle_has_weights",
    "check_input_rank",
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

#: Most memory the outputs of a network's layers may need at once in one forward pass (estimated per
#: input shape on the meta device; default of ``max_activation_bytes``, CLI ``--max-activation-memory``).
MAX_ACTIVATION_BYTES = DEFAULT_MAX_ACTIVATION_BYTES

_TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"


def _inside(module_name: str, namespaces=NETWORK_NAMESPACES) -> bool:
    return any(module_name == ns or module_name.startswith(ns + ".") for ns in namespaces)


def _where(source) -> str:
    return f"{source}: " if source else ""


def _refuse(source, key: str, reason: str, fix: str) -> UntrustedNetworkError:
    return UntrustedNetworkError(f"{_where(source)}{key}: {reason}. {fix} {_TRUST_HINT}.")


def _resolve_untrusted(network: str, source) -> Callable[..., nn.Module]:
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


#: Constructor parameter names that may make a network download or read weights, besides
#: :data:`ARGUMENTS_NEEDING_TRUST`: any name with one of these words (``pretrained``, ``load_url``,
#: ``checkpoint_path``, ``hub_repo`` ...).
_DOWNLOAD_WORDS = re.compile(r"(^|_)(pretrained|pretrain|download|url|urls|hub|repo|checkpoint|ckpt|weights|path)(_|$)")


def _off(default: object) -> object:
    return False if isinstance(default, bool) else None


def download_defaults(factory: Callable[..., object], args: Mapping | None = None) -> dict[str, object]:
    """Constructor arguments that ``args`` leaves out and whose defaults could download or read weights.

    Read from the effective signature of ``factory`` (a class's ``__init__``, or a function): a
    parameter named in :data:`ARGUMENTS_NEEDING_TRUST` or with a word such as ``pretrained``,
    ``url``, ``hub``, ``repo``, ``checkpoint``, ``weights`` or ``path`` in its name, or whose default
    is a URL, and whose default is not false, None, empty or 0 (``EfficientNetBN``,
    ``ResNetFeatures`` ... default to ``pretrained=True``).

    Parameters
    ----------
    factory : callable
        A network class or factory function.
    args : mapping, optional
        The arguments the config gives (those are checked by themselves, not here).

    Returns
    -------
    dict of str to object
        Parameter name -> the value that turns it off (``False`` for a bool default, else
        ``None``); without trust, :func:`build_network` passes these.
    """
    given = set(args or ())
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature (a builtin): nothing to read
        return {}
    found: dict[str, object] = {}
    for name, parameter in parameters.items():
        if name in given or parameter.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty or default in (None, False, "", 0):
            continue
        url = isinstance(default, str) and re.match(r"^[a-z][a-z0-9+.-]*://", default, re.IGNORECASE) is not None
        if name in ARGUMENTS_NEEDING_TRUST or _DOWNLOAD_WORDS.search(name.lower()) or url:
            found[name] = _off(default)
    return found


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
_HOOK_USERS = 0  # builds under a budget now running, in any thread; the hooks exist only while > 0


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
    (its memory is freed at once). torch's registration hooks are process-wide: they are installed
    when the first build under a budget starts and removed when the last one ends (they do nothing
    for threads that are not building under a budget).
    """
    global _HOOK_USERS
    from torch.nn.modules import module as torch_module

    with _HOOKS_LOCK:
        if _HOOK_USERS == 0:
            _HOOKS.append(torch_module.register_module_parameter_registration_hook(_on_tensor))
            _HOOKS.append(torch_module.register_module_buffer_registration_hook(_on_tensor))
            _HOOKS.append(torch_module.register_module_module_registration_hook(_on_module))
        _HOOK_USERS += 1
    previous = getattr(_BUDGET, "current", None)
    try:
        budget = _BUDGET.current = _Budget(max_elements, MAX_MODULES, to_meta)
        yield budget
    finally:
        _BUDGET.current = previous
        with _HOOKS_LOCK:
            _HOOK_USERS -= 1
            if _HOOK_USERS == 0:
                while _HOOKS:
                    _HOOKS.pop().remove()


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


def _over_budget(network: str, error: _OverBudget, source, max_parameters: int | None) -> ModelLoadError:
    assert max_parameters is not None, "only a build under a parameter budget is stopped"
    message = (
        f"{_where(source)}model.args: building {network} with these arguments was stopped: it needed {error}. "
        f"Without --trust a network may have at most {max_parameters:,} parameters and buffers and "
        f"{MAX_MODULES:,} submodules, and take at most {MAX_BUILD_SECONDS:g} s to build. Check model.args "
        f"(channels, features, depths, block sizes) against how the model was trained. {_TRUST_HINT}."
    )
    return ModelLoadError(message)


# ----------------------------------------------------------------------------- activation limit

#: Per-module dicts of hooks that a meta copy must not share with the model (the explainer's own
#: hooks, user hooks holding locks or tensors).
_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class _NoEstimate(Exception):
    """The model cannot be run on the meta device (TorchScript, ...)."""


#: torch.nn classes (exactly these, not subclasses) whose output has their input's shape and dtype:
#: in a meta copy they return an empty tensor of that shape at once (PyTorch's meta batch norm is an
#: elementwise decomposition in Python, the slowest part of a meta forward pass).
_SAME_SHAPE = tuple(
    getattr(nn, name) for name in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm",
        "LayerNorm", "LocalResponseNorm", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
        "Mish", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Dropout", "Dropout1d",
        "Dropout2d", "Dropout3d", "AlphaDropout", "Identity",
    ) if hasattr(nn, name)
)


def _same_shape_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    inplace = bool(getattr(module, "inplace", False))

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x if inplace or type(module) is nn.Identity else torch.empty_like(x)

    return forward


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are on the meta device.

    Each module is a shallow copy (its other attributes are shared, nothing is copied but the
    tree) with meta versions of its tensors (no memory), no hooks, in eval mode. The model is left
    as it is.
    """
    copies: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def meta(tensor):
        if tensor is None:
            return None
        if id(tensor) not in tensors:
            moved = tensor.detach().to("meta")
            tensors[id(tensor)] = nn.Parameter(moved, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
        return tensors[id(tensor)]

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in copies:  # a module used twice stays one module
            return copies[id(module)]
        if isinstance(module, torch.jit.ScriptModule):
            raise _NoEstimate("TorchScript")
        new = copy.copy(module)
        copies[id(module)] = new
        state = new.__dict__
        for table in _HOOK_TABLES:
            if isinstance(state.get(table), dict):
                state[table] = type(state[table])()
        state["_parameters"] = type(module._parameters)((k, meta(v)) for k, v in module._parameters.items())
        state["_buffers"] = type(module._buffers)((k, meta(v)) for k, v in module._buffers.items())
        state["_modules"] = type(module._modules)((k, clone(v) if v is not None else None) for k, v in module._modules.items())
        state["training"] = False
        if type(module) in _SAME_SHAPE:
            state["forward"] = _same_shape_forward(new)
        return new

    return clone(model)


def estimate_activation_bytes(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int | None:
    """Memory the outputs of ``model``'s modules need at once in one forward pass, estimated without running it.

    The forward pass runs on a copy of the model on PyTorch's meta device (tensors with a shape and
    no data: nothing is allocated or computed), with a forward hook on every module. Each module
    output's storage counts from when it is made until it is freed (a tensor returned again by a
    container or an in-place op counts once), as in inference; the largest total is the estimate.
    The hooks live on the copy only and are removed when the pass ends, whatever happens. Measured
    against real runs: MONAI ResNet50 at 256^3 estimates 8.1 GiB (8.3 GB measured on a GPU).

    Parameters
    ----------
    model : nn.Module
        Not changed, not run (an eager module; TorchScript cannot run on the meta device).
    input_shape : sequence of int
        The full input shape ``(B, C, *spatial)``.
    dtype : torch.dtype
        The input's floating dtype.

    Returns
    -------
    int or None
        Bytes (the input included), or None when the model cannot run on the meta device (a
        TorchScript module, an operation without a meta implementation, a forward that reads
        tensor values).
    """
    try:
        meta_model = _meta_copy(model)
    except _NoEstimate:
        return None
    except Exception as error:  # a module that cannot be copied
        logger.debug("activation estimate: cannot copy %s to the meta device: %s", type(model).__name__, _one_line(error))
        return None
    live: dict[int, int] = {}
    totals = {"live": 0, "peak": 0}

    def release(key: int) -> None:
        totals["live"] -= live.pop(key, 0)

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in live:
            return
        live[key] = int(storage.nbytes())
        totals["live"] += live[key]
        totals["peak"] = max(totals["peak"], totals["live"])
        weakref.finalize(tensor, release, key)

    def walk(value: object, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            count(value)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for item in value:
                walk(item, depth + 1)
        elif depth < 4 and isinstance(value, Mapping):
            for item in value.values():
                walk(item, depth + 1)

    handles = []
    try:
        for module in meta_model.modules():
            handles.append(module.register_forward_hook(lambda _module, _args, output: walk(output)))
        x = torch.empty(tuple(int(n) for n in input_shape), dtype=dtype, device="meta")
        count(x)
        with torch.no_grad():
            meta_model(x)
    except Exception as error:  # no meta kernel, a forward that reads values (.item()), a shape the model refuses
        logger.debug("activation estimate: %s cannot run on the meta device for %s: %s", type(model).__name__,
                     tuple(input_shape), _one_line(error))
        return None
    finally:
        for handle in handles:
            handle.remove()
    return int(totals["peak"])


def _bytes_text(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class _ActivationGuard:
    """A forward pre-hook: before a model's first pass at each input shape, refuse one whose
    layer outputs would need more than ``max_bytes`` (:func:`estimate_activation_bytes`)."""

    def __init__(self, max_bytes: int, source: str | None = None) -> None:
        self.max_bytes, self.source = int(max_bytes), source
        self.checked: dict[tuple[int, ...], int | None] = {}  # shapes already accepted

    def _covered(self, shape: tuple[int, ...]) -> bool:
        # a network's outputs do not grow when its input shrinks: a smaller input than an accepted one passes
        return shape in self.checked or any(
            len(done) == len(shape) and done[:2] == shape[:2] and all(a >= b for a, b in zip(done[2:], shape[2:]))
            for done in list(self.checked)
        )

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.is_meta or x.ndim < 3:
            return None
        self.check(module, tuple(int(n) for n in x.shape), x.dtype if x.is_floating_point() else torch.float32)
        return None

    def check(self, module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        """Raise :class:`~medcam3d.errors.InputError` if an input of ``shape`` would need too much memory."""
        if self._covered(shape):
            return None
        needed = estimate_activation_bytes(module, shape, dtype)
        if needed is not None and needed > self.max_bytes:
            message = (
                f"{_where(self.source)}the network's layer outputs for an input of shape {shape} would need about "
                f"{_bytes_text(needed)} at once (estimated by a forward pass on PyTorch's meta device, which allocates "
                f"nothing), more than the {_bytes_text(self.max_bytes)} allowed. Check model.args (paddings, channels, "
                "upsampling) and the preprocessing's output size, use a smaller batch or sliding windows (--roi), or raise "
                "the limit with --max-activation-memory (Python: max_activation_bytes=...; none for no limit)."
            )
            raise InputError(message)
        self.checked[shape] = needed
        return None


def limit_activations(model: nn.Module, max_bytes: int | None = MAX_ACTIVATION_BYTES, *, source: str | Path | None = None) -> nn.Module:
    """Make ``model`` refuse inputs whose layer outputs would need more than ``max_bytes`` at once.

    A forward pre-hook on ``model`` estimates, before the first pass of each input shape, the
    memory its module outputs need (:func:`estimate_activation_bytes`, on the meta device: a few
    tenths of a second, once per shape; a shape no larger than an accepted one is not estimated
    again) and raises :class:`~medcam3d.errors.InputError` over ``max_bytes``. Models that cannot
    run on the meta device (TorchScript ...) are not limited. Calling it again replaces the limit;
    ``max_bytes=None`` removes it.

    Parameters
    ----------
    model : nn.Module
    max_bytes : int or None
        Default :data:`MAX_ACTIVATION_BYTES`; None: no limit.
    source : str or Path, optional
        The config the model came from (named in the error).

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ModelLoadError(f"max_activation_bytes must be a positive int (bytes) or None (no limit), not {_short(max_bytes)}.")
    if isinstance(model, torch.jit.ScriptModule):
        return model
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _ActivationGuard):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    if max_bytes is not None:
        model.register_forward_pre_hook(_ActivationGuard(max_bytes, str(source) if source else None))
    return model


def check_activations(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
    """Refuse, now, an input shape that ``model``'s activation limit would refuse at its forward pass.

    Lets a caller that knows the shape of the model's input before making it (the preprocessing's
    output, predicted from metadata: :func:`medcam3d.preprocess.predict_shape`) refuse it before
    allocating it. An accepted shape is remembered: the forward pass does not estimate it again.
    Nothing is checked for a model without a limit (see :func:`limit_activations`).

    Parameters
    ----------
    model : nn.Module
    input_shape : sequence of int
        The full input shape ``(B, C, *spatial)``.
    dtype : torch.dtype
        The input's floating dtype.

    Raises
    ------
    InputError
        The model's layer outputs for this shape would need more than its limit.
    """
    shape = tuple(int(n) for n in input_shape)
    for hook in list(getattr(model, "_forward_pre_hooks", {}).values()):
        if isinstance(hook, _ActivationGuard):
            hook.check(model, shape, dtype)


def build_network(
    network: str,
    args: Mapping | None = None,
    *,
    trust: bool = False,
    source: str | Path | None = None,
    max_parameters: int | None = MAX_PARAMETERS,
    max_activation_bytes: int | None = MAX_ACTIVATION_BYTES,
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
    max_activation_bytes : int or None
        The network refuses inputs whose layer outputs would need more memory at once
        (:func:`limit_activations`), with or without trust. None: no limit.

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
    factory: Callable[..., nn.Module] | None
    if not trust:
        factory = _resolve_untrusted(network, source)
        _check_untrusted_args(args, source)
        for name, value in download_defaults(factory, args).items():  # e.g. EfficientNetBN's pretrained=True
            logger.info("%smodel.args.%s is not given and %s's default would download or read weights; building with "
                        "%s=%r (give the weights as model.weights)", _where(source), name, network, name, value)
            args[name] = value
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
            f"{_one_line(error)}. Check the argument names and values against the class's documentation."
        )
        raise ModelLoadError(message) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{_where(source)}model.network: {network} did not build a torch.nn.Module (got {type(model).__name__}).")
    return limit_activations(model, max_activation_bytes, source=source)


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
    return _load_state(model, _read_state(path, trust=trust), path, strict=strict)


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
    return f"torch.load(weights_only=True) refused it ({_one_line(error)})"


def _read_state(path: Path, *, trust: bool) -> Mapping:
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
                raise ModelLoadError(f"Cannot read weights from {path} (full unpickling, trusted): {_one_line(full_error)}") from None
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
                f"Cannot read weights from {path} (torch.load(weights_only=True)): {_one_line(error)}. Save the weights "
                "with torch.save(model.state_dict(), path)."
            )
            raise ModelLoadError(message) from None
    return _state_dict(loaded, path)


_CHECK_ARGS = "Check model.network and model.args (e.g. out_channels, spatial_dims) against how the model was trained."


def _load_state(model: nn.Module, state: Mapping, path: Path, *, strict: bool = True, hint: str = _CHECK_ARGS) -> nn.Module:
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
        raise ModelLoadError(f"Cannot load the weights in {path} into {type(model).__name__}: {_one_line(error)}") from None
    return model




# ----------------------------------------------------------------------------- MONAI bundles

#: Where a MONAI bundle keeps its inference config, in ``configs/`` (the first that exists is read).
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")

_BUNDLE_LAYOUT = (
    "A MONAI bundle is a folder with configs/metadata.json, configs/inference.json (or .yaml) defining "
    "network_def and preprocessing, and models/model.pt (a state_dict) and/or models/model.ts (TorchScript)."
)
_BUNDLE_WEIGHTS_HINT = "Check that models/model.pt was saved from the bundle's network_def (torch.save(net.state_dict(), path))."


def _refuse_bundle(directory: Path, source) -> UntrustedModelError:
    message = (
        f"{_where(source)}model.bundle: {directory} is a MONAI bundle; its configs can run Python expressions. "
        f"Give model.network, model.args and a state_dict as model.weights instead, or: {_TRUST_HINT}."
    )
    return UntrustedModelError(message)


def _bundle_parser(directory: str | Path, *, source=None, device: str | torch.device = "cpu"):
    """MONAI's ``ConfigParser`` holding the bundle's metadata and inference config.

    ``bundle_root`` is set to ``directory``, and ``device`` (when the config has one) to ``device``,
    so that nothing in the bundle goes to another GPU than the one medcam3d was given.

    Returns
    -------
    (monai.bundle.ConfigParser, Path, dict)
        The parser, the inference config file, and the metadata (``{}`` without metadata.json).
    """
    from monai.bundle import ConfigParser

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{_where(source)}model.bundle: {str(directory)!r} is not a directory. {_BUNDLE_LAYOUT}")
    config_file = next((directory / "configs" / name for name in BUNDLE_CONFIGS if (directory / "configs" / name).is_file()), None)
    if config_file is None:
        raise ModelLoadError(f"{_where(source)}model.bundle: {directory} has no configs/inference.json or .yaml, so it is not a MONAI bundle. {_BUNDLE_LAYOUT}")
    parser = ConfigParser()
    meta_file = directory / "configs" / "metadata.json"
    try:
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser.read_config(str(config_file))
    except Exception as error:  # JSON/YAML syntax, unreadable files
        raise ModelLoadError(f"{_where(source)}model.bundle: cannot read {config_file} or {meta_file.name}: {_one_line(error)}") from None
    parser["bundle_root"] = str(directory)
    if "device" in parser:
        parser["device"] = torch.device(device)
    metadata = parser.get("_meta_") or {}
    return parser, config_file, dict(metadata) if isinstance(metadata, Mapping) else {}


def _class_names(metadata: Mapping) -> tuple[str, ...] | None:
    """Class names from the metadata's ``network_data_format.outputs.<first>.channel_def``, if complete."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not isinstance(outputs, Mapping) or not outputs:
        return None
    first = next(iter(outputs.values()))
    channels = first.get("channel_def") if isinstance(first, Mapping) else None
    if not isinstance(channels, Mapping) or not channels:
        return None
    try:
        named = {int(index): str(name) for index, name in channels.items()}
    except (TypeError, ValueError):
        return None
    if sorted(named) != list(range(len(named))):
        return None
    return tuple(named[index] for index in range(len(named)))


def bundle_input_shape(metadata: Mapping) -> tuple[int, ...] | None:
    """The network's input shape ``(C_in, *spatial)`` from a bundle's ``metadata.json``, if it gives one.

    Read from ``network_data_format.inputs.<first>``: ``num_channels`` (default 1) and
    ``spatial_shape``, when every entry of the latter is a whole number (a size such as ``"16*n"``,
    which only says what the network accepts, gives None).
    """
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    first = next(iter(inputs.values()), None) if isinstance(inputs, Mapping) else None
    if not isinstance(first, Mapping):
        return None
    spatial, channels = first.get("spatial_shape"), first.get("num_channels", 1)
    if not isinstance(spatial, (list, tuple)) or not spatial:
        return None
    try:
        shape = tuple(int(str(n).strip()) for n in (channels, *spatial))
    except (TypeError, ValueError):
        return None
    return shape if all(n > 0 for n in shape) else None


def bundle_has_weights(directory: str | Path) -> bool:
    """Whether a bundle folder holds trained weights (``models/model.pt`` or ``models/model.ts``)."""
    models = Path(directory) / "models"
    return (models / "model.pt").is_file() or (models / "model.ts").is_file()


@contextlib.contextmanager
def _bundle_imports(directory: Path) -> Any:
    """The bundle's root first on ``sys.path`` while its configs are parsed, as MONAI's own runner does
    (``monai.bundle`` workflows add it), so that ``$import scripts`` and ``scripts.net.Net`` in a
    bundle's configs find the bundle's own ``scripts/`` package.

    A ``scripts`` package already imported from elsewhere (another bundle, or a folder of that name
    on the path) is set aside for the load, so that the bundle gets its own; the modules the bundle
    imports stay loaded (its network and transforms need them), and the path entry is removed again.
    Only called for a trusted bundle (parsing its configs runs code anyway).
    """
    import sys

    root = str(directory.resolve())
    own = (directory / "scripts").is_dir()
    clashing = {}
    if own:
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            where = getattr(sys.modules[name], "__file__", None) or ""
            if not os.path.realpath(where).startswith(root + os.sep):
                clashing[name] = sys.modules.pop(name)
    sys.path.insert(0, root)
    try:
        yield
    finally:
        try:
            sys.path.remove(root)
        except ValueError:  # the bundle's code removed it itself
            pass
        for name, module in clashing.items():
            sys.modules.setdefault(name, module)


def _bundle_network(parser, directory: Path, config_file: Path, *, source, random_weights: bool) -> tuple[nn.Module, Path | None, bool]:
    """The bundle's network and where its weights came from.

    ``network_def`` (or ``network``) is built by MONAI's parser. Its weights come from
    ``models/model.pt`` (a state_dict); without one, from the parameters of ``models/model.ts``
    (MONAI exports it from ``network_def``), and if those do not fit ``network_def`` (or there is
    none) the TorchScript module itself is the network.

    Returns
    -------
    (nn.Module, Path or None, bool)
        The network, its weights file (None with ``random_weights``), and whether the network is
        the TorchScript module.
    """
    key = "network_def" if "network_def" in parser else "network" if "network" in parser else None
    network = None
    if key is not None:
        try:
            network = parser.get_parsed_content(key)
        except Exception as error:
            raise ModelLoadError(f"{_where(source)}model.bundle: cannot build {key!r} from {config_file}: {_one_line(error)}") from error
        if not isinstance(network, nn.Module):
            raise ModelLoadError(f"{_where(source)}model.bundle: {key!r} in {config_file} built a {type(network).__name__}, not a torch.nn.Module.")
    if random_weights:
        if network is None:
            raise ModelLoadError(f"{_where(source)}model.bundle: {config_file} defines no network_def to initialise at random. {_BUNDLE_LAYOUT}")
        return network, None, False
    weights, scripted_file = directory / "models" / "model.pt", directory / "models" / "model.ts"
    if weights.is_file():
        if network is None:
            message = (
                f"{_where(source)}model.bundle: {directory} has models/model.pt but {config_file} defines no "
                f"network_def to load it into. {_BUNDLE_LAYOUT}"
            )
            raise ModelLoadError(message)
        _load_state(network, _read_state(weights, trust=True), weights, hint=_BUNDLE_WEIGHTS_HINT)
        return network, weights, False
    if scripted_file.is_file():
        from monai.data import load_net_with_metadata

        try:
            scripted, _, _ = load_net_with_metadata(str(scripted_file), map_location=torch.device("cpu"))
        except Exception as error:
            raise ModelLoadError(f"{_where(source)}model.bundle: cannot load the TorchScript file {scripted_file}: {_one_line(error)}") from None
        if network is not None:
            try:
                _load_state(network, scripted.state_dict(), scripted_file, hint=_BUNDLE_WEIGHTS_HINT)
                return network, scripted_file, False
            except ModelLoadError as error:
                logger.warning("%s; explaining the TorchScript module itself instead of network_def.", error)
        return scripted, scripted_file, True
    message = (
        f"{_where(source)}model.bundle: {directory} has no models/model.pt or models/model.ts, so its network would "
        "have random parameters. Put the trained weights there, or pass random_weights=True (CLI --random-weights) "
        "to explain a randomly initialised network on purpose."
    )
    raise ConfigError(message)


class BundlePreprocessing:
    """A MONAI bundle's ``preprocessing`` chain, applied to one image file.

    The chain is the bundle's own, built by MONAI's ``ConfigParser`` (usually ``LoadImaged``,
    ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, intensity scaling, cropping). It is
    given ``{key: path}`` and its result under ``key`` is the model input. Before the bundle's
    reader opens the file, :func:`medcam3d.io.describe` checks its header as
    :func:`medcam3d.io.read` would (data files stay in the header's folder, the header claims no
    more data than the file holds); afterwards the grid the bundle's reader saw is compared with
    the one medcam3d reads, so that maps go back to the right place in the scan.

    Attributes
    ----------
    transform : callable
        The chain (usually a ``monai.transforms.Compose``).
    key : str
        The dictionary key of the image (``image`` in most bundles): the first key of the chain's
        ``LoadImaged`` that the metadata lists as a network input, else ``image``, else its first
        key.
    config_file : Path
        The bundle config it came from (named in errors).
    max_voxels : int or None
        The largest grid (voxels) a step of the chain may make unless its input is already larger
        (default :data:`medcam3d.preprocess.MAX_VOXELS`; None: no limit). The steps of a
        ``Compose`` run one at a time, as MONAI's ``Compose`` runs them, and each step's output
        grid is computed from metadata before it runs (see :mod:`medcam3d.preprocess`).
    """

    def __init__(self, transform, key: str, config_file: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
        self.transform, self.key, self.config_file = transform, key, Path(config_file)
        self.max_voxels = max_voxels

    def _apply(self, data: Any, where: str) -> Any:
        """The chain on ``data``, step by step (as MONAI's Compose runs it), refusing a grid over ``max_voxels``."""
        from monai.transforms import Compose, apply_transform

        from .preprocess import _check_grid, _lazy_shape, _working_shape

        chain = self.transform
        if not isinstance(chain, Compose) or chain.lazy:
            return chain(data)
        scan_voxels: int | None = None  # the image as the chain's loading step read it
        for index, step in enumerate(chain.flatten().transforms):
            image = data.get(self.key) if isinstance(data, Mapping) else None
            if image is not None:
                if scan_voxels is None and getattr(image, "ndim", 0) >= 2:
                    scan_voxels = int(np.prod(image.shape))  # all its values: with or without a channel axis
                label = f"step {index} ({type(step).__name__})"
                working = _working_shape(getattr(step, "zoomer", step), image)  # Zoomd zooms with a Zoom
                for shape in (working, _lazy_shape(step, data, self.key)):
                    if shape is not None:
                        _check_grid(shape, image, label, where + " ", self.max_voxels, made=False, scan_voxels=scan_voxels)
            data = apply_transform(step, data, chain.map_items, chain.unpack_items, lazy=chain.lazy,
                                   overrides=chain.overrides, log_stats=chain.log_stats)
        return data

    def __repr__(self) -> str:
        return f"BundlePreprocessing(key={self.key!r}, config_file={str(self.config_file)!r})"

    def __call__(self, image: str | Path, *, trust: bool = False):
        """Read and preprocess one image as the bundle does.

        Parameters
        ----------
        image : str or Path
            An image file or a folder holding one DICOM series.
        trust : bool
            As for :func:`medcam3d.io.read`: allow headers whose data files lie elsewhere.

        Returns
        -------
        (MetaTensor, Space)
            The model input ``(C, *input_shape)`` (add the batch axis with ``x[None]``), whose
            ``.affine`` is the input grid's voxel -> RAS mm affine, and the scan's own
            ``scanner_space``, as :func:`medcam3d.preprocess.preprocess` returns them.

        Raises
        ------
        ImageReadError
            The file's header is refused (see :func:`medcam3d.io.describe`), a folder holds
            several DICOM series (a bundle's reader takes one series per folder), or a series'
            slices cannot be placed (:class:`~medcam3d.errors.GeometryError`, as
            :func:`medcam3d.io.read` would raise).
        PreprocessingError
            The chain fails, returns several samples or no MetaTensor, or its reader placed the scan
            elsewhere than medcam3d's reader does.
        """
        from monai.data import MetaTensor

        from . import io
        from .errors import GeometryError, ImageReadError, PreprocessingError, SpaceError
        from .space import Space

        if not isinstance(image, (str, os.PathLike)):
            raise PreprocessingError(f"A bundle's preprocessing reads an image file or DICOM folder; got a {type(image).__name__}.")
        path = Path(image)
        info = io.describe(path, trust=trust)
        if len(info.series) > 1:
            uids = ", ".join(series.uid for series in info.series)
            message = (
                f"'{path}' holds {len(info.series)} DICOM series ({uids}); the bundle's reader takes one series per "
                "folder. Copy the series to explain into a folder of its own."
            )
            raise ImageReadError(message)
        if info.series and info.series[0].problem:  # what medcam3d.io.read refuses, the bundle's reader may not
            raise GeometryError(f"'{path}' (series {info.series[0].uid}): {info.series[0].problem}")
        if info.affine is None:
            raise GeometryError(f"'{path}': the headers do not say where the voxels are, so the maps could not be placed.")
        where = f"{self.config_file}: preprocessing"
        try:
            data = self._apply({self.key: str(path)}, where)
        except PreprocessingError:
            raise
        except Exception as error:  # MONAI wraps errors in RuntimeError with the transform's name
            raise PreprocessingError(f"{where} failed on '{path}': {_one_line(error)}") from error
        if isinstance(data, (list, tuple)):
            message = (
                f"{where} returned {len(data)} samples for '{path}' (a random or patch crop?); medcam3d explains one "
                "input per scan. Remove the cropping transform (large scans: use sliding_window)."
            )
            raise PreprocessingError(message)
        result = data.get(self.key) if isinstance(data, Mapping) else data
        if not isinstance(result, MetaTensor):
            message = (
                f"{where} gave a {type(result).__name__} under {self.key!r}, not a MONAI MetaTensor with an affine; "
                "medcam3d needs the input grid to place the maps."
            )
            raise PreprocessingError(message)
        assert info.spatial_shape is not None  # a single image or series (several series were refused above)
        scanner_space = Space(info.spatial_shape, info.affine)
        seen = result.meta.get("original_affine")  # the file's grid as the bundle's reader saw it
        if seen is not None:
            seen = np.asarray(seen.cpu() if isinstance(seen, torch.Tensor) else seen, dtype=np.float64)
            try:
                same = scanner_space.isclose(Space(scanner_space.shape, seen), atol=1e-3, rtol=1e-5)
            except SpaceError:  # not a 4x4 voxel -> world matrix
                same = False
            if not same:
                message = (
                    f"{where}: the bundle's reader placed '{path}' with the voxel -> world affine "
                    f"{np.array2string(seen, precision=4)}, but medcam3d reads it as {scanner_space}; the maps could not "
                    "be placed reliably. Check the reader arguments of LoadImaged (e.g. ITKReader's affine_lps_to_ras "
                    "must stay true)."
                )
                raise PreprocessingError(message)
        return result.float(), scanner_space


def _input_key(transform, metadata: Mapping, config_file: Path) -> str:
    from monai.transforms import Compose, LoadImaged

    from .errors import PreprocessingError

    steps = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    loader = next((step for step in steps if isinstance(step, LoadImaged)), None)
    if loader is None:
        message = (
            f"{config_file}: preprocessing has no LoadImaged, so medcam3d cannot hand it a file. Add "
            "{\"_target_\": \"LoadImaged\", \"keys\": \"image\"} at its start, or give preprocessing in the medcam3d config."
        )
        raise PreprocessingError(message)
    keys = [str(key) for key in loader.keys]
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    for candidate in [*(inputs if isinstance(inputs, Mapping) else ()), "image"]:
        if candidate in keys:
            return candidate
    return keys[0]


def _bundle_preprocessing(parser, config_file: Path, metadata: Mapping, max_voxels: int | None) -> BundlePreprocessing | None:
    from .errors import PreprocessingError

    if "preprocessing" not in parser:
        return None
    try:
        transform = parser.get_parsed_content("preprocessing")
    except Exception as error:
        raise PreprocessingError(f"{config_file}: cannot build 'preprocessing': {_one_line(error)}") from error
    if not callable(transform):
        raise PreprocessingError(f"{config_file}: 'preprocessing' built a {type(transform).__name__}, not a transform.")
    return BundlePreprocessing(transform, _input_key(transform, metadata, config_file), config_file, max_voxels)


@dataclass(frozen=True, eq=False)
class Bundle:
    """A MONAI bundle loaded for explanation (:func:`load_bundle`).

    Attributes
    ----------
    directory : Path
        The bundle folder.
    network : torch.nn.Module
        Its network, with its trained weights, on the requested device, in eval mode.
    weights : Path or None
        ``models/model.pt``, or ``models/model.ts`` when the weights came from TorchScript; None
        with ``random_weights``.
    torchscript : bool
        ``network`` is the TorchScript module itself (its parameters did not fit ``network_def``,
        or the bundle defines none).
    random_weights : bool
        ``network`` has its random initial parameters, on purpose.
    preprocessing : BundlePreprocessing or None
        The bundle's ``preprocessing`` chain, None if it defines none.
    class_names : tuple of str or None
        From the metadata's ``channel_def`` of the first output, if it names every channel.
    metadata : dict
        ``configs/metadata.json`` (``{}`` without one).
    config_file : Path
        The inference config that was read.
    """

    directory: Path
    network: nn.Module
    weights: Path | None
    torchscript: bool
    random_weights: bool
    preprocessing: BundlePreprocessing | None
    class_names: tuple[str, ...] | None
    metadata: dict
    config_file: Path


def load_bundle(
    directory: str | Path,
    *,
    trust: bool = False,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
    source: str | Path | None = None,
    max_activation_bytes: int | None = MAX_ACTIVATION_BYTES,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> Bundle:
    """Load a MONAI bundle: its network with its weights, and its preprocessing.

    Everything comes from MONAI's own ``monai.bundle.ConfigParser`` reading
    ``configs/metadata.json`` and ``configs/inference.json`` (or ``.yaml``): the network is
    ``network_def`` (else ``network``), filled from ``models/model.pt`` (a state_dict, read with
    ``weights_only=True`` first) or, without one, from the parameters of ``models/model.ts``; the
    preprocessing is ``preprocessing`` (:class:`BundlePreprocessing`). Parsing the configs runs
    their Python expressions, so it needs ``trust``.

    Parameters
    ----------
    directory : str or Path
        The bundle folder.
    trust : bool
        Required: a bundle's configs run code.
    device : str or torch.device
        Where to put the network; also given to the config's ``device``.
    random_weights : bool
        Explain ``network_def`` with its random initial parameters (ignoring the bundle's weights),
        on purpose, e.g. for a sanity check.
    source : str or Path, optional
        The medcam3d config naming the bundle (named in errors).
    max_activation_bytes : int or None
        The network (unless it is TorchScript) refuses inputs whose layer outputs would need more
        memory at once (:func:`limit_activations`). None: no limit.
    max_voxels : int or None
        The largest grid a step of the bundle's preprocessing may make (see
        :class:`BundlePreprocessing`). None: no limit.

    Returns
    -------
    Bundle

    Raises
    ------
    UntrustedModelError
        Without ``trust``.
    ModelLoadError
        Not a bundle, a config that cannot be read or built, weights that do not fit.
    ConfigError
        No weights in ``models/`` and no ``random_weights``.
    PreprocessingError
        A ``preprocessing`` that cannot be built or has no ``LoadImaged``.
    """
    directory = Path(directory)
    if not trust:
        raise _refuse_bundle(directory, source)
    parser, config_file, metadata = _bundle_parser(directory, source=source, device=device)
    with _bundle_imports(directory):
        with _seeded(random_weights):
            network, weights, scripted = _bundle_network(parser, directory, config_file, source=source,
                                                         random_weights=random_weights)
        preprocessing = _bundle_preprocessing(parser, config_file, metadata, max_voxels)
    if not scripted:
        limit_activations(network, max_activation_bytes, source=source or directory)
    return Bundle(
        directory=directory, network=network.to(device).eval(), weights=weights, torchscript=scripted,
        random_weights=random_weights, preprocessing=preprocessing, class_names=_class_names(metadata),
        metadata=metadata, config_file=config_file,
    )


def bundle_preprocessing(directory: str | Path, *, trust: bool = False, device: str | torch.device = "cpu",
                         max_voxels: int | None = DEFAULT_MAX_VOXELS) -> BundlePreprocessing:
    """The ``preprocessing`` chain of a MONAI bundle, without loading its network.

    ``directory``, ``trust`` and ``max_voxels`` are as for :func:`load_bundle`; ``device`` is given
    to the config's ``device`` (transforms such as ``EnsureTyped`` may use it).

    Returns
    -------
    BundlePreprocessing
        Call it with a file: ``x, scanner_space = bundle_preprocessing(d, trust=True)(path)``.

    Raises
    ------
    UntrustedModelError
        Without ``trust``.
    ModelLoadError
        Not a bundle.
    PreprocessingError
        The bundle defines no ``preprocessing``, or it cannot be built or has no ``LoadImaged``.
    """
    from .errors import PreprocessingError

    directory = Path(directory)
    if not trust:
        raise _refuse_bundle(directory, None)
    parser, config_file, metadata = _bundle_parser(directory, device=device)
    with _bundle_imports(directory):
        preprocessing = _bundle_preprocessing(parser, config_file, metadata, max_voxels)
    if preprocessing is None:
        raise PreprocessingError(f"{config_file} defines no 'preprocessing'; give preprocessing in the medcam3d config.")
    return preprocessing


# ----------------------------------------------------------------------------- loading from a config

_NO_WEIGHTS_MESSAGE = (
    "model.weights is missing: a network without weights has random parameters; give the trained weights, or "
    "`weights: none` to explain a randomly initialised network on purpose (e.g. for a sanity check)"
)


@contextlib.contextmanager
def _seeded(enabled: bool, seed: int = 0):
    """Random initial parameters that are the same on every run (the global RNG is left as it was)."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_model(
    config: Config | ModelConfig,
    *,
    trust: bool = False,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
    max_activation_bytes: Any = "config",
) -> nn.Module:
    """Build the configured model, load its weights, move it to ``device``, in eval mode.

    A network without weights has random parameters, and its maps mean nothing; so a
    ``model.network`` without ``model.weights`` is refused unless the config says
    ``weights: none`` (:attr:`ModelConfig.random_weights`) or ``random_weights=True`` (CLI
    ``--random-weights``) is passed. Random parameters are drawn with a fixed seed, so the same
    network explains the same way on every run.

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
    random_weights : bool
        Explain the network with its random initial parameters, on purpose (a template, a
        sanity check): a missing ``model.weights`` is accepted and a given one (or a bundle's) is
        not loaded. Label what is made with it as such.
    max_activation_bytes : int, None or "config"
        The model refuses inputs whose layer outputs would need more memory at once
        (:func:`limit_activations`; TorchScript models are not limited); None: no limit. Default:
        the config's ``model.max_activation_bytes`` (:data:`MAX_ACTIVATION_BYTES` unless changed
        with :func:`medcam3d.config.with_limits`).

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
    ConfigError
        A network without weights, without ``weights: none`` or ``random_weights``.
    """
    spec = config.model if isinstance(config, Config) else config
    random_weights = bool(random_weights or spec.random_weights)
    limit = spec.max_activation_bytes if isinstance(max_activation_bytes, str) and max_activation_bytes == "config" else max_activation_bytes
    if spec.bundle is not None:
        return load_bundle(spec.bundle, trust=trust, device=device, random_weights=random_weights, source=spec.source,
                           max_activation_bytes=limit).network
    if spec.torchscript is not None:
        if not trust:
            message = (
                f"{_where(spec.source)}model.torchscript: {spec.torchscript} is TorchScript, which runs code when "
                f"loaded. Give model.network, model.args and a state_dict as model.weights instead, or: {_TRUST_HINT}."
            )
            raise UntrustedModelError(message)
        if random_weights:
            raise ConfigError(f"{_where(spec.source)}model.torchscript: a TorchScript file cannot be re-initialised at random; give model.network and model.args instead.")
        model = torch.jit.load(str(spec.torchscript), map_location="cpu")
    else:
        if spec.network is None:
            raise ModelLoadError("The model config names no network, bundle or torchscript file.")
        with _seeded(random_weights):
            model = build_network(spec.network, spec.args, trust=trust, source=spec.source, max_activation_bytes=limit)
        if random_weights:
            if spec.weights is not None:
                logger.warning("random weights requested: %s is not loaded; %s keeps its random initial parameters.", spec.weights, spec.network)
        elif spec.weights is None:
            raise ConfigError(f"{spec.source or 'config'}: {_NO_WEIGHTS_MESSAGE}.")
        else:
            load_weights(model, spec.weights, trust=trust)
    return model.to(device).eval()


@dataclass(frozen=True, eq=False)
class ConfiguredModel:
    """A config's model, loaded (:func:`load_configured`).

    Attributes
    ----------
    config : Config
        The config, with ``class_names`` from a MONAI bundle's metadata when it gives none.
    model : torch.nn.Module
        In eval mode.
    random_weights : bool
        The model has random parameters on purpose (asked for, ``weights: none``, or a bundle
        loaded with ``random_weights``): what is made with it must say so.
    preprocessing : BundlePreprocessing or None
        A MONAI bundle's own ``preprocessing`` chain when the config gives no ``preprocessing``
        list (that list overrides the bundle's); None otherwise (then the config's list, or
        :data:`medcam3d.preprocess.DEFAULT_TRANSFORMS`, applies).
    """

    config: Config
    model: nn.Module
    random_weights: bool
    preprocessing: BundlePreprocessing | None


def load_configured(
    config: Config,
    *,
    trust: bool = False,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> ConfiguredModel:
    """Load a config's model as the CLI, :meth:`medcam3d.Explainer.from_config` and napari do.

    A MONAI bundle (:func:`load_bundle`) gives its network, its class names (when the config gives
    none) and its own preprocessing (when the config gives no ``preprocessing`` list); any other
    model comes from :func:`load_model`.

    Parameters
    ----------
    config : Config
        From :func:`medcam3d.config.load_config` (its limits from :func:`medcam3d.config.with_limits`).
    trust, random_weights, device
        As for :func:`load_model`.
    max_voxels : int or None
        The largest grid a step of a bundle's own preprocessing may make (:func:`load_bundle`).

    Returns
    -------
    ConfiguredModel

    Raises
    ------
    UntrustedModelError, ModelLoadError, ConfigError, PreprocessingError
        As :func:`load_model` and :func:`load_bundle` raise them.
    """
    spec = config.model
    if spec.bundle is None:
        model = load_model(config, trust=trust, device=device, random_weights=random_weights)
        return ConfiguredModel(config, model, bool(random_weights or spec.random_weights), None)
    bundle = load_bundle(spec.bundle, trust=trust, device=device, random_weights=random_weights, source=config.source,
                         max_activation_bytes=spec.max_activation_bytes, max_voxels=max_voxels)
    if config.class_names is None and bundle.class_names:
        config = dataclasses.replace(config, class_names=list(bundle.class_names))
    preprocessing = None
    if config.preprocessing is None:  # the config's own preprocessing list overrides the bundle's
        preprocessing = bundle.preprocessing
        if preprocessing is not None:
            logger.info("preprocessing: the bundle's own (%s)", bundle.config_file)
    return ConfiguredModel(config, bundle.network, bool(random_weights or bundle.random_weights), preprocessing)


# ----------------------------------------------------------------------------- input rank

_CONV_DIMS_BY_NAME = {
    f"{kind}{dims}d": dims for kind in ("Conv", "ConvTranspose", "LazyConv", "LazyConvTranspose") for dims in (1, 2, 3)
}


def _spatial_dims(model: nn.Module) -> int | None:
    """Spatial dimensionality of the model's first convolution (TorchScript modules too), or None."""
    try:  # the engine's answer, where it has one
        from .layers import expected_spatial_dims
    except ImportError:
        pass
    else:
        return expected_spatial_dims(model)
    from torch.nn.modules.conv import _ConvNd

    for module in model.modules():
        if isinstance(module, _ConvNd):
            return len(module.kernel_size)
        if isinstance(module, torch.jit.ScriptModule):
            dims = _CONV_DIMS_BY_NAME.get(getattr(module, "original_name", ""))
            if dims is not None:
                return dims
    return None


def check_input_rank(scan_shape, model: nn.Module, *, path: str | Path | None = None) -> int | None:
    """Refuse a scan whose dimensionality is not the model's, before any preprocessing runs.

    A 2D image (shape ``(I, J)``, or ``(I, J, 1)``: one slice stored as a volume) cannot go through
    a 3D network, nor a volume through a 2D one; without this check the mismatch surfaces later as
    an obscure error from a transform or a convolution.

    Parameters
    ----------
    scan_shape : sequence of int
        The scan's spatial shape (``medcam3d.io.describe(path).spatial_shape``, or
        ``Space.shape``): 2 or 3 values.
    model : torch.nn.Module
        The network (eager or TorchScript); its first convolution tells its dimensionality.
    path : str or Path, optional
        The scan, named in the error.

    Returns
    -------
    int or None
        The model's spatial dimensionality, or None if it has no convolution (then nothing is
        checked).

    Raises
    ------
    InputError
        The scan is 2D and the model 3D, or the reverse, or ``scan_shape`` is not a spatial shape.
    """
    from .errors import InputError

    shape = tuple(int(n) for n in scan_shape)
    name = f"'{path}'" if path is not None else "the scan"
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise InputError(f"{name}: expected a spatial shape of 2 or 3 positive sizes, got {shape}; for a 4D file pick one volume first.")
    dims = _spatial_dims(model)
    if dims is None:
        return None
    flat = [axis for axis, n in enumerate(shape) if n == 1]
    if dims == 3 and len(shape) == 2:
        message = (
            f"{name} is a 2D image (shape {shape}); the model takes 3D volumes (its first convolution is 3D). "
            "Give a 3D scan, or a model for 2D images."
        )
        raise InputError(message)
    if dims == 3 and flat:
        message = (
            f"{name} is a single slice (shape {shape}: one voxel along axis {'ijk'[flat[0]]}), a 2D image stored as a "
            "volume; the model takes 3D volumes (its first convolution is 3D). Give the whole 3D scan."
        )
        raise InputError(message)
    if dims == 2 and len(shape) == 3:
        what = "one slice stored as a volume" if flat else "a 3D volume"
        message = (
            f"{name} is {what} (shape {shape}); the model takes 2D images (its first convolution is 2D). "
            + ("Save the slice as a 2D image (shape (I, J))." if flat else "Give a 2D image (one slice), or a model for 3D volumes.")
        )
        raise InputError(message)
    if dims not in (2, 3) or (dims == 2 and len(shape) != 2):
        raise InputError(f"{name} has shape {shape}, but the model's first convolution is {dims}D.")
    return dims
