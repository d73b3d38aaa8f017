"""What a config may build without trust: the network namespaces and factories, the arguments
that need trust, and constructor defaults that would download weights.

Without trust, ``model.network`` must name a class that subclasses ``torch.nn.Module`` and is
defined in :data:`NETWORK_NAMESPACES`, or one of :data:`NETWORK_FACTORIES`; its arguments must be
plain data (:func:`medcam3d.config.plain_data_problem`) with no number above
:data:`MAX_ARGUMENT_INT` and none of :data:`ARGUMENTS_NEEDING_TRUST` set; a left-out argument whose
default would download is turned off (:func:`download_defaults`). :func:`medcam3d.models.build.build_network`
applies these rules.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping

from torch import nn

from ..config import plain_data_problem
from ..errors import ModelLoadError, UntrustedNetworkError, short_repr

__all__ = ["NETWORK_NAMESPACES", "NETWORK_FACTORIES", "NETWORKS_NEEDING_TRUST", "ARGUMENTS_NEEDING_TRUST",
           "MAX_ARGUMENT_INT", "TRUST_HINT", "where", "resolve_untrusted", "check_untrusted_args", "download_defaults"]

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

#: Largest integer (in absolute value) an untrusted config may give as a network argument; a
#: small config must not make a constructor loop or allocate without bound.
MAX_ARGUMENT_INT = 1 << 20

#: The advice every refusal for want of trust ends with.
TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"


def _inside(module_name: str, namespaces=NETWORK_NAMESPACES) -> bool:
    return any(module_name == ns or module_name.startswith(ns + ".") for ns in namespaces)


def where(source) -> str:
    return f"{source}: " if source else ""


def _refuse(source, key: str, reason: str, fix: str) -> UntrustedNetworkError:
    return UntrustedNetworkError(f"{where(source)}{key}: {reason}. {fix} {TRUST_HINT}.")


def resolve_untrusted(network: str, source) -> Callable[..., nn.Module]:
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
        raise ModelLoadError(f"{where(source)}model.network: cannot import {module_name!r} for {network!r}: {error}. Expected {allowed}.") from None
    obj = getattr(module, name, None) if name.isidentifier() and not name.startswith("_") else None
    if obj is None:
        candidates = [n for n in dir(module) if inspect.isclass(getattr(module, n, None)) and issubclass(getattr(module, n), nn.Module)]
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f" Did you mean {' or '.join(repr(f'{module_name}.{c}') for c in close)}?" if close else ""
        raise ModelLoadError(f"{where(source)}model.network: {module_name!r} has no network class {name!r}.{hint}")
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


def check_untrusted_args(args: Mapping, source) -> None:
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
            f"{where(source)}{key}: {short_repr(value)} is larger than {MAX_ARGUMENT_INT:,}, the largest number a config "
            f"may give a network without --trust. Check the value against how the model was trained. {TRUST_HINT}."
        )
        raise ModelLoadError(message)
    for name, value in args.items():
        if name in ARGUMENTS_NEEDING_TRUST and value not in (None, False, "", 0):
            raise _refuse(
                source, f"model.args.{name}", f"{name}: {short_repr(value)} makes the network download or read weights when it is built",
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
