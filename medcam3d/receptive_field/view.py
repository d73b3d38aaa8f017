"""The view of a model that the receptive-field trace and probe run on (none of the user's hooks), and the
exception that stops a forward pass once the target layer has run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..hooks import HOOK_TABLES, isolated_model


@contextmanager
def hookless_view(model: nn.Module) -> Iterator[nn.Module]:
    """An eval-mode view of ``model`` (:func:`~medcam3d.hooks.isolated_model`) in which no hook of the
    user's runs: every module that can be copied is a shallow copy (the same parameters and buffers)
    with empty hook tables, so the trace's meta tensors and the probe's noise never reach the user's
    forward or backward hooks. Global hooks (``nn.modules.module.register_module_forward_hook``) and
    modules that cannot be copied (TorchScript) keep theirs."""
    with isolated_model(model, hooked=list(model.modules())) as view:
        originals = {id(module) for module in model.modules()}
        for module in view.modules():
            if id(module) not in originals:  # a copy: its hook tables are its own
                state = module.__dict__
                for table in HOOK_TABLES.intersection(state):
                    state[table] = type(state[table])()
        yield view


class Stop(Exception):
    """Raised by the target layer's hook: the rest of the forward pass is not needed."""
