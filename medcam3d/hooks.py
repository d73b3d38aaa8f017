"""Hooks, locks and state hygiene: the user's model is used, never changed.

One concept: how medcam3d touches the user's model. Hooks that answer for the installing thread
only and are always removed (:func:`forward_hooks`; on a scripted module that Python calls, a
global forward hook that answers for that module and this thread only), one lock per model
(:func:`model_lock`), flags and buffers restored (:func:`preserved_model_state`), and the model
view every forward pass runs through (:func:`isolated_model`). The lean forward pass that captures
the target layer's output on that view is :mod:`medcam3d.capture`.

Concurrency: everything that installs hooks on a model or flips its flags holds
:func:`model_lock` for the whole forward/backward/restore, so calls from several
threads on one model (or on models that share submodules) run one after the
other, and each restores exactly the state it found.

Other threads that call the model themselves (training it, or running inference) while medcam3d
explains it take no lock and are not disturbed: medcam3d runs its forward pass through
:func:`isolated_model`, a view of the model whose modules are shallow copies (the *same*
parameter and buffer tensors, their own ``training`` flags and hook tables), so the user's modules
never carry medcam3d's hooks or its eval mode. Every hook of :func:`forward_hooks` answers for the
thread that installed it only, so where hooks do sit on the user's modules (metrics, a TorchScript
model) another thread's call passes through untouched. Only what cannot be copied (TorchScript and
``torch.compile``-d modules, ``DistributedDataParallel``) is switched to eval mode in place; another
thread's call into such a module meanwhile gets a :class:`~medcam3d.errors.ConcurrentUseWarning`.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from .errors import ConcurrentUseWarning
from .torchscript import bind_arguments, is_scripted

__all__ = [
    "preserved_model_state",
    "isolated_model",
    "counterpart",
    "forward_hooks",
    "model_lock",
]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold the model for one use: its hooks, flags and buffers are ours until exit.

    One re-entrant lock per module, taken for every module of ``model`` in one global order
    (by ``id``), so that two models sharing submodules (a wrapper and the network inside it)
    exclude each other too, without deadlock. Re-entrant: a call that holds the model may call
    another function that takes it (``completeness`` runs an ``Explainer``).

    Examples
    --------
    >>> with model_lock(model):   # doctest: +SKIP
    ...     with preserved_model_state(model), forward_hooks([(layer, hook)]):
    ...         model(x)
    """
    modules = sorted(model.modules(), key=id)
    with _LOCKS_GUARD:
        locks = []
        for module in modules:
            lock = _LOCKS.get(module)
            if lock is None:
                lock = _LOCKS[module] = threading.RLock()
            locks.append(lock)
    held: list[threading.RLock] = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Register forward hooks for the duration of a ``with`` block; all removed on exit.

    Every hook answers for the thread that entered the block only: a forward pass that another
    thread runs through the same modules meanwhile (the user training or predicting with the model)
    passes through untouched, neither recorded nor changed.

    Parameters
    ----------
    hooks : iterable of (module, hook)
        ``hook(module, inputs, output)`` as for ``nn.Module.register_forward_hook``. A TorchScript
        module gets a global forward hook that calls ``hook`` for that module on this thread only:
        it fires when Python calls the module (a scripted submodule of a plain model, or a scripted
        model), never for the submodules a scripted module calls itself.

    Yields
    ------
    list of RemovableHandle
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    owner = threading.get_ident()
    try:
        for module, hook in hooks:
            if is_scripted(module):
                handles.append(_scripted_hook(module, hook))
            else:
                handles.append(module.register_forward_hook(_own_thread(hook, owner)))
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()


def _own_thread(hook: Callable, owner: int) -> Callable:
    """``hook`` for calls made by thread ``owner``; other threads' calls pass through untouched."""

    def answer(module: nn.Module, inputs: object, output: object) -> object:
        if threading.get_ident() != owner:
            return None
        return hook(module, inputs, output)

    return answer


def _scripted_hook(module: nn.Module, hook: Callable) -> torch.utils.hooks.RemovableHandle:
    """A global forward hook that calls ``hook(module, args, output)`` for ``module`` on this thread;
    keyword arguments of the call are bound into ``args`` (positional, defaults filled in)."""
    owner = threading.get_ident()

    def answer(called: nn.Module, inputs: tuple, kwargs: dict, output: object) -> object:
        if called is module and threading.get_ident() == owner:
            return hook(called, bind_arguments(called, inputs, kwargs) if kwargs else inputs, output)
        return None

    # torch annotates the hook as returning None, but its docstring (and the call) let a returned value
    # replace the module's output, which ActivationCapture relies on.
    return nn.modules.module.register_module_forward_hook(answer, with_kwargs=True)  # type: ignore[arg-type]


@contextmanager
def preserved_model_state(model: nn.Module, *, eval_mode: bool = True, restore_buffers: bool = True) -> Iterator[None]:
    """Optionally put the model in eval mode; on exit restore every module's ``training`` flag
    and, by default, the buffers of the modules that run in training mode.

    Parameters
    ----------
    model : nn.Module
    eval_mode : bool
        ``model.eval()`` for the block (False: the flags stay as the user set them).
    restore_buffers : bool
        For every module in training mode during the block, snapshot its buffers (BatchNorm
        ``running_mean``/``running_var``/``num_batches_tracked``, and any other) and write them
        back on exit, bitwise, into the same tensor objects (a buffer the forward replaced is put
        back). Modules in eval mode do not update their statistics, so with ``eval_mode=True``
        nothing is copied. False: train-mode updates are kept.

    Parameters' ``requires_grad`` and ``.grad`` are not touched. Hold :func:`model_lock`
    around it when other threads may use the model.
    """
    flags = [(module, module.training) for module in model.modules()]
    buffers = []
    try:
        if eval_mode and any(training for _, training in flags):
            model.eval()
        if restore_buffers:
            buffers = [
                (module, name, tensor, tensor.detach().clone())
                for module in model.modules() if module.training
                for name, tensor in module._buffers.items() if tensor is not None
            ]
        yield
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training
        with torch.no_grad():
            for module, name, tensor, saved in buffers:
                module._buffers[name] = tensor
                tensor.copy_(saved)


#: The tables ``nn.Module.__init__`` puts in a module's ``__dict__`` (parameters, buffers, children, hook
#: dictionaries). A copy in :func:`isolated_model` shares them with the original, except its children
#: (when one of them is copied) and, for a module that medcam3d hooks, the hook tables.
_MODULE_TABLES = frozenset(key for key, value in vars(nn.Module()).items() if isinstance(value, (dict, set)))
HOOK_TABLES = frozenset(key for key in _MODULE_TABLES if "hooks" in key)


def _copyable(module: nn.Module) -> bool:
    """Whether a shallow copy of ``module`` computes what the module computes, through the copy.

    Not for a TorchScript module (its flags and submodules live in its C++ object), a
    ``torch.compile``-d one (the compiled code is bound to the original), or
    ``DistributedDataParallel`` (its reducer holds the original's parameters and hooks).
    """
    if module.__dict__.get("_compiled_call_impl") is not None:  # nn.Module.compile()
        return False
    kind = type(module)
    known = _COPYABLE_TYPES.get(kind)
    if known is None:
        scripted = issubclass(kind, torch.jit.ScriptModule)
        known = _COPYABLE_TYPES[kind] = not (
            scripted or issubclass(kind, nn.parallel.DistributedDataParallel) or kind.__name__ == "OptimizedModule"
        )
    return known


_COPYABLE_TYPES: dict[type, bool] = {}


#: Attribute values that never refer to a module (checked by exact type, before anything else).
_PLAIN_TYPES = frozenset({int, float, str, bool, type(None), torch.dtype, torch.device, torch.Tensor, nn.Parameter})


def _remap(value: object, copies: dict[int, nn.Module]) -> object:
    """``value`` with every module of the model it refers to replaced by that module's copy: the module
    itself, a method bound to it, a ``functools.partial`` or a plain list/tuple/dict holding one."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return value
    if isinstance(value, nn.Module):
        return copies.get(id(value), value)
    if kind is types.MethodType and isinstance(value.__self__, nn.Module):  # type: ignore[attr-defined]
        owner = copies.get(id(value.__self__))  # type: ignore[attr-defined]
        return value if owner is None else types.MethodType(value.__func__, owner)  # type: ignore[attr-defined]
    if isinstance(value, functools.partial):
        func = _remap(value.func, copies)
        args = _remap(value.args, copies)
        keywords = _remap(value.keywords, copies)
        if func is value.func and args is value.args and keywords is value.keywords:
            return value
        return functools.partial(cast(Callable, func), *cast(tuple, args), **cast(dict, keywords))
    if isinstance(value, (list, tuple)) and kind in (list, tuple):
        items = [_remap(item, copies) for item in value]
        changed = any(new is not old for new, old in zip(items, value))
        return kind(items) if changed else value
    if isinstance(value, dict) and kind is dict:
        entries = {key: _remap(item, copies) for key, item in value.items()}
        return entries if any(entries[key] is not item for key, item in value.items()) else value
    return value


def _shallow_copies(
    model: nn.Module, *, eval_mode: bool, hooked: Iterable[nn.Module] = ()
) -> tuple[dict[int, nn.Module], list[nn.Module]]:
    """Copies of the modules of ``model`` that a forward pass must not run as they are, sharing their tensors.

    A module is copied when it can be (see :func:`_copyable`) and its ``training`` flag must change
    for the pass (``eval_mode`` and the module in training mode), or it is in ``hooked``, or one of its
    children is copied (so that the forward reaches the copy). Everything else is used as it is: for
    a model already in eval mode only the hooked modules and their ancestors are copied.

    Returns
    -------
    copies : dict
        ``id(original) -> copy``, in eval mode when ``eval_mode``. A copy has the original's
        attributes, its own tables (the same parameters, buffers and hooks in them), and its children
        and attributes (a module, a bound method, a list of modules ...) point to the copies.
    kept : list of nn.Module
        The modules that cannot be copied and hold a module in training mode (``eval_mode`` only):
        these subtrees are switched to eval mode in place.
    """
    wanted = {id(module) for module in hooked}
    needs: dict[int, bool] = {}
    kept: dict[int, nn.Module] = {}
    modules: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> bool:  # recursive, as nn.Module.named_modules is
        key = id(module)
        known = needs.get(key)
        if known is not None:  # a module shared by several parents: visited once
            return known
        if not _copyable(module):
            needs[key] = False
            if eval_mode and any(inner.training for inner in module.modules()):
                kept[key] = module
            return False
        need = (eval_mode and module.training) or key in wanted
        for child in module._modules.values():
            if child is not None and visit(child):
                need = True
        needs[key] = need
        if need:
            modules[key] = module
        return need

    visit(model)
    copies: dict[int, nn.Module] = {}
    for key, module in modules.items():
        copy = object.__new__(type(module))
        state = copy.__dict__
        state.update(module.__dict__)
        if key in wanted:  # hook tables of its own (the same hooks in them): medcam3d's hooks stay off the model
            for name in HOOK_TABLES.intersection(state):
                state[name] = state[name].copy()
        if eval_mode:
            state["training"] = False
        copies[key] = copy
    for copy in copies.values():
        state = copy.__dict__
        children = state["_modules"]
        if any(child is not None and id(child) in copies for child in children.values()):
            state["_modules"] = {name: None if child is None else copies.get(id(child), child)
                                 for name, child in children.items()}
        for name, value in state.items():
            if name not in _MODULE_TABLES:
                state[name] = _remap(value, copies)
    return copies, list(kept.values())


@contextmanager
def isolated_model(
    model: nn.Module, *, eval_mode: bool = True, restore_buffers: bool = True, hooked: Iterable[nn.Module] = ()
) -> Iterator[nn.Module]:
    """A view of ``model`` to run medcam3d's forward passes through, leaving the model itself alone.

    The view shares the model's parameters and buffers (no weight is copied) and its structure, but
    every module whose ``training`` flag must change for the pass, every module in ``hooked``, and
    their ancestors are shallow copies: the same tensors and user hooks, their own ``training`` flag,
    hook tables and attributes. The view's eval mode and the hooks put on its copies are therefore
    invisible to the model: another thread that trains or runs the model meanwhile sees its own
    flags and no medcam3d hook. A model already in eval mode costs only the copies of ``hooked`` and
    their ancestors. Modules that cannot be copied (TorchScript, ``torch.compile``,
    ``DistributedDataParallel``) are part of the view as they are and, with ``eval_mode``, put in eval
    mode in place for the block (as :func:`preserved_model_state` does); another thread calling one
    of them meanwhile gets a :class:`~medcam3d.errors.ConcurrentUseWarning`.

    Parameters
    ----------
    model : nn.Module
    eval_mode : bool
        The view runs in eval mode (False: with the modules' own flags).
    restore_buffers : bool
        For every module that runs in training mode, its buffers (BatchNorm running statistics ...)
        are written back bitwise on exit, into the same tensors. False: updates are kept, in place or
        (a buffer the forward replaced in a copy) put into the model's module.
    hooked : iterable of nn.Module
        Modules of ``model`` that the caller will put hooks on: copied, so that the hooks stay off
        the model (see :func:`counterpart`).

    Yields
    ------
    nn.Module
        The view of ``model``: call it instead of the model; :func:`counterpart` gives the module of
        the view that stands for a module of the model. Valid inside the block only.

    Anything else a forward assigns to a copied module (an attribute, a replaced buffer when
    restoring) lands in the copy and is dropped with the view. Hold :func:`model_lock` around it when
    other medcam3d calls may use the model (the buffers are shared).
    """
    copies, kept = _shallow_copies(model, eval_mode=eval_mode, hooked=hooked)
    view = copies.get(id(model), model)
    flags = [(module, module.training) for root in kept for module in root.modules()]
    buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    handle = None
    try:
        for root in kept:
            root.eval()
        flipped = {id(module) for module, training in flags if training}
        if flipped:
            handle = nn.modules.module.register_module_forward_pre_hook(_warn_foreign(flipped, threading.get_ident()))
        if restore_buffers and not eval_mode:  # in eval mode nothing runs in training mode: no update to undo
            seen: set[int] = set()
            for original in model.modules():
                runs = copies.get(id(original), original)
                if runs.training and id(original) not in seen:
                    seen.add(id(original))
                    buffers.extend((original, name, tensor, tensor.detach().clone())
                                   for name, tensor in original._buffers.items() if tensor is not None)
        yield view
    finally:
        if handle is not None:
            handle.remove()
        for module, training in flags:
            if module.training != training:
                module.training = training
        with torch.no_grad():
            for original, name, tensor, saved in buffers:
                original._buffers[name] = tensor  # a buffer the forward replaced (in the model itself) is put back
                tensor.copy_(saved)
        if not restore_buffers:  # buffers the forward replaced in a copy: the update the caller asked to keep
            for original in model.modules():
                copy = copies.get(id(original))
                if copy is not None:
                    for name, replaced in copy._buffers.items():
                        if name in original._buffers and original._buffers[name] is not replaced:
                            original._buffers[name] = replaced


def counterpart(view: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """The module of an :func:`isolated_model` view that stands for the model's ``module``, named ``name``:
    its copy, or ``module`` itself where it was not copied (inside a TorchScript module, say)."""
    found = view
    for part in name.split(".") if name else ():
        child = None if is_scripted(found) else found._modules.get(part)
        if child is None:  # inside a module used as it is (or not reachable by name): not copied
            return module
        found = child
    return found if type(found) is type(module) else module


def _warn_foreign(flipped: set[int], owner: int) -> Callable:
    """A global forward pre-hook: warn when another thread calls a module put in eval mode in place."""

    def warn(module: nn.Module, inputs: object) -> None:
        if id(module) in flipped and threading.get_ident() != owner:
            message = (
                f"Thread {threading.current_thread().name!r} called {type(module).__name__} while medcam3d was "
                "explaining the same model in another thread; a TorchScript, torch.compile or DistributedDataParallel "
                "module cannot be explained through a copy, so this call ran in eval mode. Do not call the model "
                "from another thread during an explanation, or explain a copy (copy.deepcopy(model))."
            )
            warnings.warn(message, ConcurrentUseWarning, stacklevel=2)

    return warn
