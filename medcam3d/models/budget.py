"""The build budget: a network from an untrusted config is stopped while it is built once it
registers more than :data:`MAX_PARAMETERS` parameters and buffers or :data:`MAX_MODULES`
submodules, or runs longer than :data:`MAX_BUILD_SECONDS`.

It counts through torch's process-wide module registration hooks, which exist only while a build
under a budget runs (installed by the first, removed when the last ends, whatever happens) and do
nothing for threads that are not building under a budget.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch
from torch import nn

from ..errors import ModelLoadError
from .rules import TRUST_HINT, where

__all__ = ["MAX_PARAMETERS", "MAX_MODULES", "MAX_BUILD_SECONDS", "OverBudget", "Budget", "build_budget",
           "count_parameters", "over_budget"]

#: Most parameters (and buffers) a network built from an untrusted config may have (2 GB in
#: float32; MONAI's largest 3D networks have about 100 million).
MAX_PARAMETERS = 500_000_000

#: Most submodules a network built from an untrusted config may register while it is built
#: (MONAI's 3D networks register a few hundred to a few thousand).
MAX_MODULES = 50_000

#: Longest a network from an untrusted config may take to build (checked whenever it registers a
#: parameter, buffer or submodule; MONAI's networks take a few seconds at most).
MAX_BUILD_SECONDS = 60.0


class OverBudget(Exception):
    """Raised from torch's registration hooks when a build registers too much."""


class Budget:
    def __init__(self, max_elements: int, max_modules: int, to_meta: bool = False):
        self.max_elements, self.max_modules, self.to_meta = max_elements, max_modules, to_meta
        self.elements = self.modules = 0
        self.exceeded: str | None = None
        self.deadline = time.monotonic() + MAX_BUILD_SECONDS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.over(f"more than {MAX_BUILD_SECONDS:g} s of construction")

    def over(self, what: str) -> OverBudget:
        self.exceeded = what
        return OverBudget(what)


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
def build_budget(max_elements: int, *, to_meta: bool = False):
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
        budget = _BUDGET.current = Budget(max_elements, MAX_MODULES, to_meta)
        yield budget
    finally:
        _BUDGET.current = previous
        with _HOOKS_LOCK:
            _HOOK_USERS -= 1
            if _HOOK_USERS == 0:
                while _HOOKS:
                    _HOOKS.pop().remove()


def count_parameters(factory, args: dict, max_parameters: int) -> int | None:
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
    OverBudget
        The build was stopped.
    """
    for to_meta in (False, True):
        try:
            with build_budget(max_parameters, to_meta=to_meta) as budget:
                with torch.device("meta") if not to_meta else contextlib.nullcontext():
                    model = factory(**args)
        except OverBudget:
            raise
        except Exception:
            if budget.exceeded:  # the constructor caught and replaced our exception
                raise OverBudget(budget.exceeded) from None
            continue
        if budget.exceeded:
            raise OverBudget(budget.exceeded)
        if not isinstance(model, nn.Module):
            return None
        return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return None


def over_budget(network: str, error: OverBudget, source, max_parameters: int | None) -> ModelLoadError:
    assert max_parameters is not None, "only a build under a parameter budget is stopped"
    message = (
        f"{where(source)}model.args: building {network} with these arguments was stopped: it needed {error}. "
        f"Without --trust a network may have at most {max_parameters:,} parameters and buffers and "
        f"{MAX_MODULES:,} submodules, and take at most {MAX_BUILD_SECONDS:g} s to build. Check model.args "
        f"(channels, features, depths, block sizes) against how the model was trained. {TRUST_HINT}."
    )
    return ModelLoadError(message)
