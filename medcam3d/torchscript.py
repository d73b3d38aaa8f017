"""TorchScript models: target layers without hooks, by splitting a copy of the scripted graph (§4).

PyTorch has no forward hooks on a ``ScriptModule`` (``register_forward_hook is not supported on
ScriptModules``), and the submodules of a scripted network are called from C++, where no Python
hook can see them. medcam3d therefore works on the model's *graph*, never on the model:

1. **Flatten.** Copy the forward graph (``module.forward.graph.copy()``) and inline, in the copy,
   the calls (``prim::CallMethod``) of the modules that contain the target layer and of the model's
   own helper methods (SegResNet's ``encode``/``decode``). Plain attributes (bool, int, float, str;
   never ``training``) are folded into constants, so that branches such as ``if self.use_conv_final:``
   disappear and the layers inside them become reachable. Calls of other modules stay calls.
2. **Find the layer's call.** The target layer must now be called exactly once, at the top level of
   the flattened graph (not inside a remaining ``if`` or loop); otherwise a
   :class:`~medcam3d.errors.LayerError` lists the layers that can be reached.
3. **Split.** The *prefix* graph runs everything up to that call and returns its output (the
   activations) plus every value computed before it that the rest of the network still uses (skip
   connections, lists of features, ...: the *carry*). The *suffix* graph takes the activations and
   the carry as inputs and runs the rest; what came before is removed from it.

Both halves are compiled as free TorchScript functions whose first argument is the model object
itself, so they read the model's own parameters, buffers and ``training`` flags; nothing is
attached to the model, and its graphs and code are not changed. The prefix runs without autograd
and the suffix with autograd from the activations on: the engine's lean principles (§5) hold,
except that the TorchScript executor may keep its own profiling state for the compiled halves.

A scripted (``torch.jit.script``) or traced (``torch.jit.trace``) network, saved and loaded with
``torch.jit.save``/``torch.jit.load``, works the same way; so does a scripted submodule of a plain
``nn.Module`` (see :class:`medcam3d.capture.ActivationCapture`).

Layers listed by :func:`probe_script` are the ones a split can reach: modules called once, at the
top level of the graph flattened down to the leaves.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .errors import LayerError

__all__ = [
    "bind_arguments",
    "ScriptLogits",
    "ScriptRecord",
    "ScriptSplit",
    "TrailingActivation",
    "is_scripted",
    "module_type_name",
    "probe_script",
    "script_layer_names",
    "script_logits",
    "script_split",
    "scripted_ancestor",
    "script_error_reason",
]

#: Leaf modules (by class name) and graph operators whose output is an activation of logits.
ACTIVATION_MODULES = {"Softmax": "softmax", "Softmax2d": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
_ACTIVATION_OPS = {"aten::softmax": "softmax", "aten::log_softmax": "log_softmax", "aten::sigmoid": "sigmoid"}
#: Attribute types folded into constants when flattening (``training`` never is).
_FOLDED_TYPES = {"BoolType": bool, "IntType": int, "FloatType": float, "StringType": str}
_MAX_SWEEPS = 64
#: Methods that are a module's forward: tracing names the second call of a module ``forward1`` ...
_FORWARD = re.compile(r"^forward\d*$")
_NAMES = itertools.count()
_NO_DEFAULT = object()
_CACHE_GUARD = threading.Lock()
logger = logging.getLogger(__name__)
_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[str, ScriptSplit]] = weakref.WeakKeyDictionary()
_PROBES: weakref.WeakKeyDictionary[nn.Module, _ProbePlan] = weakref.WeakKeyDictionary()
_LOGITS: weakref.WeakKeyDictionary[nn.Module, ScriptLogits | None] = weakref.WeakKeyDictionary()


def is_scripted(module: object) -> bool:
    """True for a TorchScript module (scripted, traced, or loaded with ``torch.jit.load``)."""
    return isinstance(module, torch.jit.ScriptModule)


def module_type_name(module: nn.Module) -> str:
    """The class name of a module; for a TorchScript module, that of the module it was made from
    (``"Conv3d"``, not ``"RecursiveScriptModule"``)."""
    if is_scripted(module):
        name = getattr(module, "original_name", None)
        if isinstance(name, str) and name:
            return name
    return type(module).__name__


def scripted_ancestor(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The outermost TorchScript module on the path from ``model`` to its submodule ``name``.

    Parameters
    ----------
    model : nn.Module
    name : str
        Dotted name of a submodule of ``model`` (``""``: the model itself).

    Returns
    -------
    (name, module) or None
        ``("", model)`` when the model itself is scripted; ``None`` when no module on the path is.
    """
    if is_scripted(model):
        return "", model
    module, parts = model, []
    for part in name.split(".") if name else []:
        child = module._modules[part]
        if child is None:  # a slot registered as None: no module below it, scripted or not
            return None
        module = child
        parts.append(part)
        if is_scripted(module):
            return ".".join(parts), module
    return None


def script_error_reason(error: BaseException) -> str:
    """The reason a TorchScript run failed, in one line: the error the graph raised
    (``ValueError: Expected more than 1 spatial element ...``), without the TorchScript traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    return reason.removeprefix("builtins.")


@dataclass(frozen=True)
class TrailingActivation:
    """The activation that produces a scripted model's output (its input is the logits).

    Attributes
    ----------
    kind : {"softmax", "log_softmax", "sigmoid"}
    name : str
        The module's dotted name, or the operator (``"aten::softmax"``) for a functional call.
    """

    kind: str
    name: str


@dataclass(frozen=True)
class ScriptRecord:
    """One module's output, recorded by :func:`probe_script`.

    Attributes
    ----------
    name : str
        Dotted name relative to the scripted module.
    type : str
        Class name (:func:`module_type_name`).
    output : Tensor
        The module's output for the probed input (its final value: a later in-place operation of
        the network may have changed its values, never its shape).
    """

    name: str
    type: str
    output: torch.Tensor


# ------------------------------------------------------------------------------------ flattening
def _module_table(root: nn.Module) -> dict[str, nn.Module]:
    table: dict[str, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        table.setdefault(name, module)
    return table


def _all_nodes(block) -> list:
    nodes = []
    for node in block.nodes():
        nodes.append(node)
        for inner in node.blocks():
            nodes.extend(_all_nodes(inner))
    return nodes


def _value_paths(graph: torch._C.Graph, table: dict[str, nn.Module]) -> dict[int, str]:
    """``value.unique() -> dotted path`` for every value that is one of the root's modules."""
    paths = {next(iter(graph.inputs())).unique(): ""}
    for node in _all_nodes(graph.block()):
        if node.kind() == "prim::GetAttr":
            base = paths.get(node.input().unique())
            if base is not None:
                path = f"{base}.{node.s('name')}" if base else node.s("name")
                if path in table:
                    paths[node.output().unique()] = path
    return paths


def _fold_attributes(graph: torch._C.Graph, paths: dict[int, str], table: dict[str, nn.Module]) -> bool:
    """Replace reads of plain module attributes (not ``training``) by constants."""
    changed = False
    for node in _all_nodes(graph.block()):
        if node.kind() != "prim::GetAttr" or node.s("name") == "training":
            continue
        base = paths.get(node.input().unique())
        wanted = _FOLDED_TYPES.get(node.output().type().kind())
        if base is None or wanted is None:
            continue
        value = getattr(table[base], node.s("name"), None)
        if type(value) is not wanted:
            continue
        graph.setInsertPoint(node)
        # Graph.insertConstant exists at runtime; torch's stub (torch/_C/__init__.pyi) omits it.
        node.output().replaceAllUsesWith(graph.insertConstant(value))  # type: ignore[attr-defined]
        node.destroy()
        changed = True
    graph.setInsertPoint(graph.block())
    return changed


def _inline_call(graph: torch._C.Graph, node, callee: torch._C.Graph) -> list:
    """Replace one ``prim::CallMethod`` node by a copy of the callee's graph."""
    graph.setInsertPoint(node)
    outputs = graph.insertGraph(callee.copy(), list(node.inputs()))
    for old, new in zip(node.outputs(), outputs):
        old.replaceAllUsesWith(new)
    node.destroy()
    graph.setInsertPoint(graph.block())
    return outputs


def _method_graph(module: nn.Module, method: str) -> torch._C.Graph:
    """The graph of a compiled method (``module.forward`` of a freshly traced submodule is Python)."""
    return _cpp_module(module)._get_method(method).graph


def _cpp_module(module: nn.Module) -> torch._C.ScriptModule:
    """The C++ object of a TorchScript module (``module._c``; typed as a tensor or module by ``nn.Module.__getattr__``)."""
    return cast(torch._C.ScriptModule, module._c)


def _is_tensor(value) -> bool:
    return value.type().kind() == "TensorType"


@dataclass
class _Flat:
    graph: torch._C.Graph
    table: dict[str, nn.Module]
    paths: dict[int, str]
    records: list[tuple[str, int]]  # (path, index of the graph output that holds its output)


def _flatten(root: nn.Module, inline: Callable[[str, str, nn.Module], bool], *, record: bool = False) -> _Flat:
    """A copy of ``root.forward.graph`` with the calls chosen by ``inline(path, method, module)`` inlined.

    With ``record``, the output of every inlined ``forward`` call becomes an extra graph output.
    """
    table = _module_table(root)
    graph = _method_graph(root, "forward").copy()
    records: list[tuple[str, int]] = []
    for _ in range(_MAX_SWEEPS):
        paths = _value_paths(graph, table)
        if _fold_attributes(graph, paths, table):
            torch._C._jit_pass_constant_propagation(graph)
            paths = _value_paths(graph, table)
        calls = []
        for node in graph.nodes():
            if node.kind() == "prim::CallMethod":
                path = paths.get(node.inputsAt(0).unique())
                if path is not None and inline(path, node.s("name"), table[path]):
                    calls.append((node, path, node.s("name")))
        if not calls:
            return _Flat(graph, table, paths, records)
        for node, path, method in calls:
            outputs = _inline_call(graph, node, _method_graph(table[path], method))
            if record and _FORWARD.match(method) and path and len(outputs) == 1 and _is_tensor(outputs[0]):
                records.append((path, graph.registerOutput(outputs[0])))
    message = f"The TorchScript graph of {module_type_name(root)} nests module calls too deeply to be split."
    raise LayerError(message)


def _forward_calls(flat: _Flat) -> tuple[list[tuple[str, torch._C.Node]], list[str]]:
    """``forward`` calls of known modules left in the graph: top-level (path, node), nested paths."""
    top_level, nested = [], []
    for node in _all_nodes(flat.graph.block()):
        if node.kind() != "prim::CallMethod" or not _FORWARD.match(node.s("name")):
            continue
        path = flat.paths.get(node.inputsAt(0).unique())
        if path is None or not path:
            continue
        if node.owningBlock().owningNode() is None:
            top_level.append((path, node))
        else:
            nested.append(path)
    return top_level, nested


def _has_children(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is not None


# ---------------------------------------------------------------------------------------- probing
@dataclass
class _ProbePlan:
    function: torch._C.ScriptFunction
    records: list[tuple[str, str, int]]  # (name, type, output index), completion order
    reachable: list[str]
    defaults: list[object]


def _forward_defaults(root: nn.Module) -> list[object]:
    """Default values of the forward's arguments after ``self`` (``_NO_DEFAULT`` where none)."""
    arguments = _cpp_module(root)._get_method("forward").schema.arguments[1:]
    return [a.default_value if a.has_default_value() else _NO_DEFAULT for a in arguments]


def bind_arguments(module: nn.Module, args: Sequence[object], kwargs: dict[str, object]) -> tuple:
    """The arguments of a call of a scripted module's forward as one positional tuple.

    Keyword arguments are put in their places; arguments not given take their defaults.

    Raises
    ------
    TypeError
        For a keyword the forward does not have.
    """
    arguments = _cpp_module(module)._get_method("forward").schema.arguments[1:]
    bound = list(args)
    unknown = set(kwargs) - {a.name for a in arguments}
    if unknown:
        raise TypeError(f"forward() of {module_type_name(module)} got unexpected keyword arguments {sorted(unknown)}")
    for argument in arguments[len(bound) :]:
        if argument.name in kwargs:
            bound.append(kwargs[argument.name])
        elif argument.has_default_value():
            bound.append(argument.default_value)
        else:
            break
    return tuple(bound)


def _complete(args: Sequence[object], defaults: list[object]) -> tuple:
    """``args`` followed by the defaults of the arguments not given (the compiled halves have none)."""
    args = tuple(args)
    missing = defaults[len(args) :]
    if any(value is _NO_DEFAULT for value in missing):
        return args  # let TorchScript say which argument is missing
    return args + tuple(missing)


def _probe_plan(root: nn.Module) -> _ProbePlan:
    with _CACHE_GUARD:
        plan = _PROBES.get(root)
    if plan is not None:
        return plan
    flat = _flatten(root, lambda path, method, module: path == "" or not _FORWARD.match(method) or _has_children(module),
                    record=True)
    graph = flat.graph
    top_level, nested = _forward_calls(flat)
    for path, node in top_level:  # leaves
        if len(list(node.outputs())) == 1 and _is_tensor(node.output()):
            flat.records.append((path, graph.registerOutput(node.output())))
    outputs = list(graph.outputs())
    position = {value.unique(): i for i, node in enumerate(graph.nodes()) for value in node.outputs()}
    calls = Counter(id(flat.table[path]) for path, _ in flat.records)
    calls.update(id(flat.table[path]) for path in nested)
    kept = [(path, index) for path, index in flat.records if calls[id(flat.table[path])] == 1]
    kept.sort(key=lambda item: (position.get(outputs[item[1]].unique(), -1), -item[0].count(".")))
    graph.makeMultiOutputIntoTuple()
    graph.lint()
    function = torch._C._create_function_from_graph(f"medcam3d_probe_{next(_NAMES)}", graph)
    records = [(path, module_type_name(flat.table[path]), index) for path, index in kept]
    plan = _ProbePlan(function, records, [path for path, _ in kept], _forward_defaults(root))
    with _CACHE_GUARD:
        _PROBES[root] = plan
    return plan


def probe_script(root: nn.Module, args: Sequence[object]) -> tuple[list[ScriptRecord], object]:
    """Run a TorchScript module once and record the output of every layer a split can reach.

    Parameters
    ----------
    root : ScriptModule
    args : sequence
        The forward's arguments, e.g. ``(x,)`` with ``x`` of shape ``(B, C_in, *spatial)``.

    Returns
    -------
    (list of ScriptRecord, output)
        Records in completion order (a module after the modules it calls); ``output`` is what
        ``root(*args)`` returns. Modules called more than once, or only inside an ``if``/loop of the
        graph, are left out. Runs under the caller's grad mode (use ``torch.no_grad()``).
    """
    plan = _probe_plan(root)
    result = plan.function(root._c, *_complete(args, plan.defaults))
    return [ScriptRecord(name, kind, result[index]) for name, kind, index in plan.records], result[0]


def script_layer_names(root: nn.Module) -> list[str]:
    """Names of the layers of a TorchScript module that a split can reach, in completion order
    (whatever their output; :func:`medcam3d.list_layers` keeps the spatial ones)."""
    return list(_probe_plan(root).reachable)


# -------------------------------------------------------------------------------------- splitting
class ScriptSplit:
    """A TorchScript module cut at one layer: a prefix up to the layer, a suffix after it.

    Built by :func:`script_split` (cached per module and layer). Holds no reference to the module:
    pass it to :meth:`prefix` and :meth:`suffix`.

    Attributes
    ----------
    layer : str
        Dotted name of the layer, relative to the scripted module.
    trailing : TrailingActivation or None
        The softmax/sigmoid (module or operator) whose output the model returns, when the graph
        shows one; :meth:`suffix` then also returns that activation's input (the logits).
    """

    def __init__(self, root: nn.Module, layer: str) -> None:
        self.layer = layer
        flat = _flatten(root, lambda path, method, module: path == "" or layer.startswith(path + "."))
        top_level, nested = _forward_calls(flat)
        target = id(flat.table[layer])
        here = [node for path, node in top_level if id(flat.table[path]) == target]
        inside = [path for path in nested if id(flat.table[path]) == target]
        if len(here) + len(inside) != 1 or inside:
            raise LayerError(_unreachable_message(root, layer, calls=len(here) + len(inside), nested=bool(inside)))
        node = here[0]
        self.trailing, logits = _peel_output(flat, layer)
        graph = flat.graph
        nodes = list(graph.nodes())
        output_id = node.output().unique()
        index = next(i for i, n in enumerate(nodes) if any(o.unique() == output_id for o in n.outputs()))
        carry = []
        for i in range(index):
            if nodes[i].kind() == "prim::Constant":
                continue
            for j, value in enumerate(nodes[i].outputs()):
                if value.unique() in flat.paths:
                    continue  # a module: the suffix reads it from `self` again
                if any(use.user.kind() == "prim::Return" or use.user.isAfter(node) for use in value.uses()):
                    carry.append((i, j))
        self._carry = len(carry)
        self._logits = logits is not None
        self._defaults = _forward_defaults(root)
        self._prefix = _compile(_prefix_graph(graph, index, carry), "prefix")
        self._suffix = _compile(_suffix_graph(graph, index, carry, logits), "suffix")

    def prefix(self, root: nn.Module, args: Sequence[object]) -> tuple[torch.Tensor, tuple]:
        """Run up to the layer: ``(activations, carry)`` for ``root(*args)``."""
        result = self._prefix(root._c, *_complete(args, self._defaults))
        if not self._carry:
            return result, ()
        return result[0], tuple(result[1:])

    def suffix(self, root: nn.Module, activations: torch.Tensor, carry: tuple, args: Sequence[object]) -> tuple[object, torch.Tensor | None]:
        """Run the rest from the layer's output: ``(model output, logits or None)``.

        ``logits`` is the input of :attr:`trailing` when there is one.
        """
        result = self._suffix(root._c, *_complete(args, self._defaults), activations, *carry)
        if self._logits:
            return result[0], result[1]
        return result, None


def script_split(root: nn.Module, layer: str) -> ScriptSplit:
    """The :class:`ScriptSplit` of a TorchScript module at ``layer`` (built once, cached per module).

    Raises
    ------
    LayerError
        The layer is not called exactly once at a place the graph can be cut (it runs inside an
        ``if``/loop, twice, or never); the message lists the layers that can be explained.
    """
    with _CACHE_GUARD:
        cached = _SPLITS.get(root, {}).get(layer)
    if cached is not None:
        return cached
    split = ScriptSplit(root, layer)
    with _CACHE_GUARD:
        _SPLITS.setdefault(root, {})[layer] = split
    return split


class ScriptLogits:
    """A TorchScript module's whole forward that also returns the input of its trailing activation.

    For a scripted model that ends in a softmax/sigmoid (module or operator) and is explained
    without a split (input-level methods, or a scripted submodule after the target layer): built by
    :func:`script_logits` (cached per module). Holds no reference to the module.

    Attributes
    ----------
    trailing : TrailingActivation
    """

    def __init__(self, root: nn.Module, trailing: TrailingActivation, graph: torch._C.Graph) -> None:
        self.trailing = trailing
        self._defaults = _forward_defaults(root)
        self._function = _compile(graph, "logits")

    def __call__(self, root: nn.Module, args: Sequence[object]) -> tuple[object, torch.Tensor]:
        """``(root(*args), logits)``: the model's output and its activation's input, from one run."""
        output, logits = self._function(root._c, *_complete(args, self._defaults))
        return output, logits


def script_logits(root: nn.Module) -> ScriptLogits | None:
    """The :class:`ScriptLogits` of a TorchScript module, or None when its graph does not end in a
    softmax/sigmoid (built once, cached per module)."""
    with _CACHE_GUARD:
        if root in _LOGITS:
            return _LOGITS[root]
    try:
        flat = _flatten(root, lambda path, method, module: path == "")
        trailing, logits = _peel_output(flat, "")
        found = None if trailing is None or logits is None else ScriptLogits(root, trailing, _with_output(flat.graph, logits))
    except (LayerError, RuntimeError) as error:  # a graph that cannot be rewritten: run as it is, output as it is
        logger.debug("The output activation of %s could not be found in its graph: %s", module_type_name(root), error)
        found = None
    with _CACHE_GUARD:
        _LOGITS[root] = found
    return found


def _with_output(graph: torch._C.Graph, value) -> torch._C.Graph:
    graph.registerOutput(value)
    return graph


def _unreachable_message(root: nn.Module, layer: str, *, calls: int, nested: bool) -> str:
    if nested:
        why = "runs inside a conditional or a loop of its TorchScript graph, where the graph cannot be cut"
    elif calls > 1:
        why = f"is called {calls} times in one forward pass, so its output is ambiguous"
    else:
        why = "is never called by the forward pass"
    try:
        names = script_layer_names(root)
    except Exception:  # noqa: BLE001  (the message must not hide the original problem)
        names = []
    listed = ", ".join(repr(n) for n in names[-12:]) if names else "none"
    more = f" (the last 12 of {len(names)}; see medcam3d.list_layers)" if len(names) > 12 else ""
    return (
        f"Layer {layer!r} of the TorchScript module {module_type_name(root)} {why}. Layers that can be "
        f"explained: {listed}{more}."
    )


def _peel_output(flat: _Flat, layer: str) -> tuple[TrailingActivation | None, object]:
    """Inline the module calls that produce the output until an activation shows, if any.

    Returns the activation and its input value (the logits), or ``(None, None)``.
    """
    graph = flat.graph
    for _ in range(_MAX_SWEEPS):
        value = next(iter(graph.outputs()))
        node = value.node()
        while node.kind() in ("prim::TupleConstruct", "prim::ListConstruct") and node.inputsSize():
            value = node.inputsAt(0)  # first_tensor: the first entry holds the logits
            node = value.node()
        if node.kind() in _ACTIVATION_OPS and node.inputsSize():
            return TrailingActivation(_ACTIVATION_OPS[node.kind()], node.kind()), node.inputsAt(0)
        if node.kind() != "prim::CallMethod" or not _FORWARD.match(node.s("name")):
            return None, None
        path = flat.paths.get(node.inputsAt(0).unique())
        if not path or path == layer or node.owningBlock().owningNode() is not None:
            return None, None
        module = flat.table[path]
        kind = ACTIVATION_MODULES.get(module_type_name(module))
        if kind is not None and node.inputsSize() == 2:
            return TrailingActivation(kind, path), node.inputsAt(1)
        if not _has_children(module) or layer.startswith(path + "."):
            return None, None
        _inline_call(graph, node, _method_graph(module, node.s("name")))
        flat.paths = _value_paths(graph, flat.table)
    return None, None


def _tensor_or(value) -> torch._C.JitType:
    """The type of a new graph input standing for ``value`` (any tensor: a traced shape is not a contract)."""
    return torch._C.TensorType.get() if _is_tensor(value) else value.type()


def _prefix_graph(graph: torch._C.Graph, index: int, carry: list[tuple[int, int]]) -> torch._C.Graph:
    prefix = graph.copy()
    nodes = list(prefix.nodes())
    outputs = [nodes[index].output(), *(nodes[i].outputsAt(j) for i, j in carry)]
    for k in reversed(range(len(list(prefix.outputs())))):
        prefix.eraseOutput(k)
    for value in outputs:
        prefix.registerOutput(value)
    for node in reversed(nodes[index + 1 :]):
        node.destroy()
    return prefix


def _suffix_graph(graph: torch._C.Graph, index: int, carry: list[tuple[int, int]], logits) -> torch._C.Graph:
    suffix = graph.copy()
    nodes = list(suffix.nodes())
    target = nodes[index]
    if logits is not None:  # the same value in the copy: found by its producer's position
        producer = logits.node()
        position = next((i for i, n in enumerate(graph.nodes()) if any(o.unique() == logits.unique() for o in n.outputs())), None)
        if position is None:
            logits = None
        else:
            offset = [o.unique() for o in producer.outputs()].index(logits.unique())
            suffix.registerOutput(nodes[position].outputsAt(offset))
    activations = suffix.addInput("activations")
    activations.setType(torch._C.TensorType.get())
    target.output().replaceAllUsesWith(activations)
    for i, j in carry:
        value = nodes[i].outputsAt(j)
        replacement = suffix.addInput()
        replacement.setType(_tensor_or(value))
        value.replaceAllUsesAfterNodeWith(target, replacement)
        for use in list(value.uses()):  # the return node is not "after" any node in every version
            if use.user.kind() == "prim::Return":
                use.user.replaceInputWith(value, replacement)
    for node in reversed(nodes[: index + 1]):
        if not any(output.uses() for output in node.outputs()):
            node.destroy()
    return suffix


def _compile(graph: torch._C.Graph, what: str):
    if len(list(graph.outputs())) > 1:
        graph.makeMultiOutputIntoTuple()
    graph.lint()
    return torch._C._create_function_from_graph(f"medcam3d_{what}_{next(_NAMES)}", graph)
