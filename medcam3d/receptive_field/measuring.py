"""The receptive field of a layer, cached per model (weakly), layer and input shape: the graph trace where it
can be read, else the gradient probe (:func:`measure`, behind :func:`medcam3d.layers.receptive_field`)."""

from __future__ import annotations

import logging
import threading
import weakref

import torch
from torch import nn

from ..errors import LayerError
from .field import ReceptiveField
from .graph import trace_graph
from .probe import probe_field

logger = logging.getLogger(__name__)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ReceptiveField]] = weakref.WeakKeyDictionary()


_CACHE_GUARD = threading.Lock()


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget cached receptive fields (of one model, or of all); e.g. after changing a model's layers."""
    with _CACHE_GUARD:
        if model is None:
            _CACHE.clear()
        else:
            _CACHE.pop(model, None)


def measure(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...], *,
            device: torch.device | str | None = None, method: str = "auto") -> ReceptiveField:
    """The receptive field of ``module`` (named ``name`` in ``model``) for a batched input ``shape``
    ``(1, C_in, *spatial)``, cached: what :func:`medcam3d.layers.receptive_field` computes once it has
    resolved the layer and the shape (see there)."""
    if method not in ("auto", "graph", "probe"):
        raise ValueError(f"method must be 'auto', 'graph' or 'probe', not {method!r}.")
    exact = (name, method, shape)
    general = (name, method, shape[1], len(shape))
    with _CACHE_GUARD:
        cached = _CACHE.get(model, {})
        found = cached.get(exact) or cached.get(general)
    if found is not None:
        return found
    result: ReceptiveField | None = None
    invariant = False
    reason = "probe requested"
    if method != "probe":
        traced = trace_graph(model, name, module, shape)
        if isinstance(traced, str):
            reason = traced
            if method == "graph":
                raise LayerError(f"The receptive field of layer {name!r} cannot be read from the graph: {traced}. "
                                 "Use method='auto' (a gradient probe where the graph cannot be read).")
        else:
            result, invariant = traced
    if result is None:
        logger.info("receptive field of %r: gradient probe (%s)", name, reason)
        result = probe_field(model, name, module, shape, device)
    logger.info("receptive field of %r for input %s: %s", name, shape, result)
    with _CACHE_GUARD:
        _CACHE.setdefault(model, {})[general if invariant else exact] = result
    return result
