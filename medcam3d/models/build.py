"""Build a network from a config: :func:`build_network` (the rules of :mod:`medcam3d.models.rules`
and the budget of :mod:`medcam3d.models.budget` without trust; the activation limit always), and
:func:`seeded` random initial parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, cause_line, short_repr
from .activations import MAX_ACTIVATION_BYTES, limit_activations
from .budget import MAX_PARAMETERS, OverBudget, build_budget, count_parameters, over_budget
from .rules import TRUST_HINT, check_untrusted_args, download_defaults, resolve_untrusted, where

logger = logging.getLogger(__name__)

__all__ = ["build_network", "seeded"]

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
        raise ModelLoadError(f"{where(source)}model.network must be a dotted class path like 'monai.networks.nets.DenseNet121', not {network!r}.")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ModelLoadError(f"{where(source)}model.args must be a mapping of constructor arguments, not {type(args).__name__}.")
    args = dict(args)
    factory: Callable[..., nn.Module] | None
    if not trust:
        factory = resolve_untrusted(network, source)
        check_untrusted_args(args, source)
        for name, value in download_defaults(factory, args).items():  # e.g. EfficientNetBN's pretrained=True
            logger.info("%smodel.args.%s is not given and %s's default would download or read weights; building with "
                        "%s=%r (give the weights as model.weights)", where(source), name, network, name, value)
            args[name] = value
        if max_parameters is not None:
            try:
                count = count_parameters(factory, args, max_parameters)
            except OverBudget as error:
                raise over_budget(network, error, source, max_parameters) from None
            if count is not None and count > max_parameters:
                message = (
                    f"{where(source)}model.args: {network} with these arguments has {count:,} or more parameters, "
                    f"more than the {max_parameters:,} allowed from an untrusted config. Check model.args (channels, "
                    f"features, block sizes) against how the model was trained. {TRUST_HINT}."
                )
                raise ModelLoadError(message)
    else:
        module_name, _, class_name = network.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ModelLoadError(f"{where(source)}model.network: cannot import {module_name!r} for {network!r}: {error}") from None
        factory = getattr(module, class_name, None)
        if factory is None or not callable(factory):
            raise ModelLoadError(f"{where(source)}model.network: {module_name!r} has no class {class_name!r} (network {network!r}).")
    budget = build_budget(max_parameters) if not trust and max_parameters is not None else contextlib.nullcontext()
    limits = None
    try:
        with budget as limits:
            model = factory(**args)
        if limits is not None and limits.exceeded:
            raise OverBudget(limits.exceeded)
    except OverBudget as error:
        raise over_budget(network, error, source, max_parameters) from None
    except Exception as error:  # TypeError, ValueError, IndexError (e.g. spatial_dims: 4), ...
        if limits is not None and limits.exceeded:
            raise over_budget(network, OverBudget(limits.exceeded), source, max_parameters) from None
        message = (
            f"{where(source)}model.args: cannot build {network} with args {short_repr(args)}: "
            f"{cause_line(error)}. Check the argument names and values against the class's documentation."
        )
        raise ModelLoadError(message) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{where(source)}model.network: {network} did not build a torch.nn.Module (got {type(model).__name__}).")
    return limit_activations(model, max_activation_bytes, source=source)


@contextlib.contextmanager
def seeded(enabled: bool, seed: int = 0):
    """Random initial parameters that are the same on every run (the global RNG is left as it was)."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
