"""Target layers: resolve a name or module, select one automatically, list candidates, and their
receptive fields (:func:`receptive_field`).

``layer="auto"`` has one definition, :func:`auto_layer`: the :class:`~medcam3d.Explainer`, the
``LayerInfo.auto`` mark of :func:`list_layers` (what ``medcam3d layers`` prints) and the jobs all
call it. It probes the model with a small input of the same rank and channels (grown until no layer
that comes after the choice has collapsed to one voxel), and caches the choice per model, input
channels and rank, so that explaining with ``"auto"`` costs no extra full-size forward pass.

TorchScript models (scripted, traced or loaded) and plain models with scripted submodules are
listed and auto-selected too (see :mod:`medcam3d.torchscript`); their layer types are the names of
the modules they were made from (``"Conv3d"``).

The Linear head that CAM needs is :mod:`medcam3d.cam_head`; which spatial rank and input channels
a model takes is :mod:`medcam3d.input_rank`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import InputError, LayerError, LayerNotFoundError, ModelOutputError
from .hooks import forward_hooks, isolated_model, model_lock
from .input_rank import axis_names, expected_spatial_dims
from .model_io import first_tensor, model_device_dtype
from .receptive_field import ReceptiveField, measure as _measure_receptive_field
from .torchscript import is_scripted, module_type_name, probe_script, script_error_reason

__all__ = [
    "LayerInfo",
    "ReceptiveField",
    "receptive_field",
    "resolve_layer",
    "list_layers",
    "auto_layer",
    "select_auto_layer",
    "token_blocks",
    "TOKEN_BLOCKS",
]

logger = logging.getLogger(__name__)

#: Transformer blocks (by class name, TorchScript modules by the name of their original class): the outputs
#: of the modules inside them hold tokens — ``(B, tokens, dims)``, ``(qkv, B, heads, tokens, dims)``,
#: attention ``(B, heads, tokens, tokens)``, or Swin's channels-last windows — not a channels-first grid of
#: the scan, so they are never target layers (MONAI's ViT/UNETR/SwinUNETR blocks, torch.nn's transformers).
TOKEN_BLOCKS = re.compile(
    r"^(SABlock|CrossAttentionBlock|TransformerBlock|SwinTransformerBlock|WindowAttention|PatchMerging(V2)?|"
    r"MultiheadAttention|Transformer(Encoder|Decoder)?(Layer)?|\w*SelfAttention|\w*MultiHeadAttention)$"
)
#: Smallest probe edge for ``layer="auto"`` (voxels); doubled while a later layer collapses.
AUTO_PROBE_SIZE = 32
_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, LayerInfo]] = weakref.WeakKeyDictionary()
_AUTO_GUARD = threading.Lock()


@dataclass(frozen=True)
class LayerInfo:
    """A candidate target layer.

    Attributes
    ----------
    name : str
        Dotted name in ``model.named_modules()``.
    type : str
        Class name of the module (for a TorchScript module: of the module it was made from).
    output_shape : tuple of int
        Output shape ``(B, K, *spatial)`` for the probed input.
    auto : bool
        True for the layer that ``layer="auto"`` uses for this input shape (:func:`auto_layer`).
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    auto: bool = False

    def __str__(self) -> str:
        mark = "  <- auto" if self.auto else ""
        return f"{self.name:<40} {self.type:<24} {tuple(self.output_shape)}{mark}"


# ------------------------------------------------------------------------------------ resolving
def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Find a target layer by dotted name or by module.

    Parameters
    ----------
    model : nn.Module
    layer : str or nn.Module
        A name from ``model.named_modules()`` (e.g. ``"layer4"``,
        ``"features.norm5"``) or a submodule of ``model``.

    Returns
    -------
    (name, module)

    Raises
    ------
    LayerNotFoundError
        The name or module is not part of the model; the message lists the
        closest names.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                _refuse_token_layer(model, name, modules)
                return name, module
        message = (
            f"The module {type(layer).__name__} passed as layer is not a submodule of this "
            f"{type(model).__name__}. Pass a module taken from this model, or its name."
        )
        raise LayerNotFoundError(message)
    if not isinstance(layer, str):
        message = f"layer must be a name (str), a module, or 'auto', not {type(layer).__name__}."
        raise TypeError(message)
    if layer in modules and layer != "":
        _refuse_token_layer(model, layer, modules)
        return layer, modules[layer]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    message = (
        f"Layer {layer!r} not found in {type(model).__name__}.{hint} "
        "List candidate layers with medcam3d.list_layers(model, input_shape) or `medcam3d layers`."
    )
    raise LayerNotFoundError(message)


def token_blocks(model: nn.Module) -> dict[str, str]:
    """The transformer blocks of a model (:data:`TOKEN_BLOCKS`): ``{dotted name: class name}``."""
    return {name: module_type_name(module) for name, module in model.named_modules()
            if name and TOKEN_BLOCKS.match(module_type_name(module))}


def _token_block_of(name: str, blocks: dict[str, str]) -> str | None:
    """The outermost transformer block holding the layer ``name`` (or being it), or None."""
    return next((block for block in blocks if name == block or name.startswith(block + ".")), None)


def _refuse_token_layer(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> None:
    blocks = token_blocks(model)
    block = _token_block_of(name, blocks)
    if block is None:
        return
    grids = [n for n, m in modules.items() if n and _token_block_of(n, blocks) is None
             and re.match(r"^(Conv|ConvTranspose)[123]d$", module_type_name(m))]
    instead = f"e.g. {grids[-1]!r}, " if grids else ""
    message = (
        f"Layer {name!r} is inside the transformer block {block!r} ({blocks[block]}): its output holds tokens "
        "(tokens x features, or heads x tokens x ...), not a grid of the scan, so a map of it cannot be placed in the "
        f"image. Choose a convolutional layer ({instead}the patch embedding of a ViT; `medcam3d layers` lists the "
        "candidates), or a method on the input's voxels (gradxinput, smoothgrad, integrated_gradients, occlusion)."
    )
    raise LayerError(message)


def list_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> list[LayerInfo]:
    """Candidate target layers: modules with a spatial output, in execution order.

    Runs one forward pass on zeros, without gradients, in eval mode (the model's flags are restored
    afterwards), plus the small probes of :func:`auto_layer` the first time.

    Parameters
    ----------
    model : nn.Module
        A plain model, a TorchScript model, or a plain model with scripted submodules (their layers
        are listed where the scripted graph can be cut at them: see :mod:`medcam3d.torchscript`).
    input_shape : sequence of int
        ``(C_in, *spatial)`` or ``(B, C_in, *spatial)``.
    device : optional
        Defaults to the device of the model's parameters.

    Returns
    -------
    list of LayerInfo
        In completion order (a module after the modules it calls). Exactly one entry has
        ``auto=True``: the layer ``layer="auto"`` uses for this shape (:func:`auto_layer`); none
        when no layer qualifies.
    """
    x = _zeros(model, input_shape, device)
    records, _ = _probe_with_output(model, x)
    layers = [info for info in records if _spatial_size(info.output_shape) > 1]
    try:
        chosen = auto_layer(model, tuple(x.shape[1:]), device=x.device).name
    except LayerError:
        chosen = None
    return [replace(info, auto=True) if info.name == chosen else info for info in layers]


def auto_layer(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    exact: bool = False,
) -> LayerInfo:
    """The layer that ``layer="auto"`` uses for inputs of this shape: the one definition of it.

    The last module (in completion order) whose output is spatial, ``(B, K, *spatial)`` with more
    than one voxel, that runs once per forward pass; for a segmentation network (an output with the
    input's rank) the modules whose output has the network's output shape are skipped (they produce
    the logits themselves and would make trivial maps).

    Cheap: it is chosen on a small probe, zeros of shape ``(1, C_in, *probe)`` with each probe edge
    ``min(edge, 32)``, doubled (up to the real edge) while a module after the choice has collapsed
    to a single voxel in the probe (global pooling excepted), so the choice is the one the full size
    would give. The choice is cached per model (weakly), input channels and rank: later calls, and
    other :class:`~medcam3d.Explainer` objects on the same model, run no probe.

    Parameters
    ----------
    model : nn.Module
    input_shape : sequence of int
        ``(C_in, *spatial)``, or ``(B, C_in, *spatial)`` for a model whose rank is known
        (:func:`expected_spatial_dims`).
    device : optional
        Where to run the probe (default: the model's device).
    exact : bool
        Choose on the full ``input_shape`` (one forward pass at that size) and cache it for that
        shape only: for a size where the general choice does not work (it collapses to one voxel).

    Returns
    -------
    LayerInfo
        ``auto=True``; ``output_shape`` is that of the probe input the choice was made on.

    Raises
    ------
    LayerError
        When no module has a spatial output for this shape.
    """
    dims = expected_spatial_dims(model)
    batched = dims is not None and len(input_shape) == dims + 2
    x_shape = _zeros(model, input_shape, device, shape_only=True, batched=batched)
    general, specific = (x_shape[1], len(x_shape)), (x_shape[1], tuple(x_shape[2:]))
    with _AUTO_GUARD:
        cached = _AUTO_CACHE.get(model, {})
        info = cached.get(specific) or (None if exact else cached.get(general))
    if info is not None and _resolves(model, info.name):
        return info
    info = _choose_on_probes(model, x_shape, device, exact=exact)
    logger.info("layer='auto' selected %r (%s, output %s for a probe input)", info.name, info.type, info.output_shape)
    with _AUTO_GUARD:
        _AUTO_CACHE.setdefault(model, {})[specific if exact else general] = info
    return info


def select_auto_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module]:
    """:func:`auto_layer` for the input ``x``, as ``(name, module)``.

    Raises
    ------
    LayerError
        When no module has a spatial output (e.g. a model without convolutions).
    """
    info = auto_layer(model, tuple(x.shape[1:]), device=x.device)
    return info.name, _submodule(model, info.name)


def _choose_on_probes(model: nn.Module, shape: tuple[int, ...], device, *, exact: bool) -> LayerInfo:
    spatial = tuple(shape[2:])
    size = spatial if exact else tuple(min(s, AUTO_PROBE_SIZE) for s in spatial)
    while True:
        x = _zeros(model, (shape[1], *size), device, batched=False)
        try:
            records, output_shape = _probe_with_output(model, x)
        except (RuntimeError, ValueError, IndexError) as error:  # a TorchScript error arrives as a RuntimeError
            if size == spatial:
                raise
            logger.debug("auto-layer probe %s failed (%s); trying a larger one", size, error)
            size = tuple(min(s, 2 * p) for s, p in zip(spatial, size))
            continue
        choice = _choose(records, output_shape, len(shape))
        if size == spatial or (choice is not None and not _collapsed_after(records, choice, size, spatial)):
            break
        size = tuple(min(s, 2 * p) for s, p in zip(spatial, size))
    if choice is None:
        message = (
            f"layer='auto' found no module of {type(model).__name__} with a spatial output "
            f"(shape (B, K, *spatial) with more than one voxel) for input {shape}. "
            "CAM methods need a convolutional layer: pass layer=<name> of one, or use a larger input."
        )
        raise LayerError(message)
    return replace(records[choice], auto=True)


def _choose(records: list[LayerInfo], output_shape: tuple[int, ...] | None, ndim: int) -> int | None:
    """Index in ``records`` of the auto choice, or None."""
    segmentation = output_shape is not None and len(output_shape) == ndim
    for index in range(len(records) - 1, -1, -1):
        info = records[index]
        if _spatial_size(info.output_shape) <= 1:
            continue
        if segmentation and info.output_shape == output_shape:
            continue  # produces the logits itself: a trivial map
        return index
    return None


def _collapsed_after(records: list[LayerInfo], choice: int, size: tuple[int, ...], spatial: tuple[int, ...]) -> bool:
    """Whether a module after the choice is one voxel in the probe and might not be at full size."""
    grown = [axis for axis, (p, s) in enumerate(zip(size, spatial)) if p < s]
    for info in records[choice + 1 :]:
        if _spatial_size(info.output_shape) > 1 or info.type.startswith("Adaptive"):
            continue
        if any(info.output_shape[2 + axis] == 1 for axis in grown):
            return True
    return False


def _zeros(model: nn.Module, input_shape: Sequence[int], device, *, shape_only: bool = False, batched: bool | None = None):
    """Zeros ``(1, C_in, *spatial)`` on the model's device and dtype (or just that shape).

    ``batched``: whether ``input_shape`` has the batch axis (None: decided by the model's rank).
    """
    shape = tuple(int(s) for s in input_shape)
    dims = expected_spatial_dims(model)
    if batched is False or (batched is None and dims is not None and len(shape) == dims + 1):
        shape = (1, *shape)
    if len(shape) < 3:
        message = f"input_shape must be (C_in, *spatial) or (B, C_in, *spatial), not {tuple(input_shape)}."
        raise ValueError(message)
    if dims is not None and len(shape) != dims + 2:
        message = (
            f"input_shape {tuple(input_shape)} does not fit this model, which takes {dims}D inputs: give "
            f"(C_in, {axis_names(dims)}) or (B, C_in, {axis_names(dims)})."
        )
        raise InputError(message)
    shape = (1, *shape[1:])
    if shape_only:
        return shape
    model_device, dtype = model_device_dtype(model)
    device = device if device is not None else model_device or torch.device("cpu")
    return torch.zeros(shape, device=device, dtype=dtype or torch.float32)


def _resolves(model: nn.Module, name: str) -> bool:
    try:
        _submodule(model, name)
    except (KeyError, AttributeError):
        return False
    return True


def _submodule(model: nn.Module, name: str) -> nn.Module:
    module = model
    for part in name.split("."):
        child = module._modules[part]
        if child is None:  # a slot registered as None (named_modules skips it): no layer there
            raise AttributeError(f"submodule {part!r} of {name!r} is None")
        module = child
    return module


@contextlib.contextmanager
def _script_errors(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """A failure inside TorchScript (``torch.jit.Error``, not a ``RuntimeError``, with the graph's traceback
    as its text) as a one-line ``RuntimeError``, as eager modules fail (an InstanceNorm given one voxel ...)."""
    try:
        yield
    except torch.jit.Error as error:
        message = (f"{module_type_name(model)} failed in TorchScript on an input of shape {tuple(x.shape)}: "
                   f"{script_error_reason(error)}")
        raise RuntimeError(message) from None


def _probe_with_output(model: nn.Module, x: torch.Tensor) -> tuple[list[LayerInfo], tuple[int, ...] | None]:
    """Modules whose output has the rank of ``x`` (any size), in completion order; the output shape.

    Modules called more than once are left out. Inside TorchScript modules: the layers that
    :func:`medcam3d.torchscript.probe_script` reaches.
    """
    records: list[LayerInfo] = []
    blocks = token_blocks(model)

    def record(name: str, kind: str, output: object) -> None:
        # a tensor of the input's rank whose first axis is the batch's, outside transformer blocks (tokens)
        if isinstance(output, torch.Tensor) and output.ndim == x.ndim and output.shape[0] == x.shape[0] \
                and _token_block_of(name, blocks) is None:
            records.append(LayerInfo(name, kind, tuple(output.shape)))

    def plain(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            record(name, type(module).__name__, output)

        return hook

    def scripted(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            for inner in probe_script(module, inputs)[0]:
                record(f"{name}.{inner.name}", inner.type, inner.output)
            record(name, module_type_name(module), output)

        return hook

    # One-shot probes: the TorchScript executor need not profile and optimize them (thread-local flag).
    # Through a view of the model (hooks and eval mode invisible to other threads calling the model meanwhile).
    with model_lock(model), isolated_model(model) as view, torch.no_grad(), torch.jit.optimized_execution(False), \
            _script_errors(model, x):
        if is_scripted(view):
            inner, output = probe_script(view, (x,))
            for item in inner:
                record(item.name, item.type, item.output)
        else:
            hooks: list[tuple[nn.Module, Callable]] = []
            roots: list[str] = []
            for name, module in view.named_modules():
                if not name or any(name.startswith(root + ".") for root in roots):
                    continue
                if is_scripted(module):
                    roots.append(name)
                    hooks.append((module, scripted(name)))
                else:
                    hooks.append((module, plain(name)))
            with forward_hooks(hooks):
                output = view(x)
        try:
            output_shape: tuple[int, ...] | None = tuple(first_tensor(output).shape)
        except ModelOutputError:
            output_shape = None
    # A module called several times (a shared activation, say) has no single output: not a candidate.
    calls = Counter(record.name for record in records)
    return [record for record in records if calls[record.name] == 1], output_shape


def _spatial_size(shape: Sequence[int] | torch.Tensor) -> int:
    """Voxels per channel of a ``(B, K, *spatial)`` shape (or tensor)."""
    shape = shape.shape if isinstance(shape, torch.Tensor) else shape
    size = 1
    for s in shape[2:]:
        size *= int(s)
    return size


def receptive_field(
    model: nn.Module,
    layer: str | nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    method: str = "auto",
) -> ReceptiveField:
    """Step, centre offset and size of the receptive fields of ``layer``'s output cells.

    Parameters
    ----------
    model : nn.Module
        A plain model, a TorchScript model, or a plain model with scripted submodules. Never
        modified: the graph path runs on meta tensors, the probe in eval mode with the flags restored.
    layer : str, nn.Module or "auto"
        The target layer (as for :class:`~medcam3d.Explainer`).
    input_shape : sequence of int
        ``(C_in, *spatial)`` or ``(B, C_in, *spatial)``: the model input's shape (placement can
        depend on the size, e.g. where a network pads or crops to match its branches).
    device : optional
        Where the probe runs (default: the model's device).
    method : {"auto", "graph", "probe"}
        ``"auto"``: the graph, and the probe where the graph cannot be read. ``"graph"`` raises
        where the graph cannot be read; ``"probe"`` always probes.

    Returns
    -------
    ReceptiveField
        ``step``, ``offset`` and ``size`` per spatial axis, in input voxels; ``source`` says how
        they were found. Cached per model, layer and input shape.

    Raises
    ------
    LayerError
        The layer does not run for this input, does not output a spatial map, or (``method="graph"``)
        the graph cannot be read; with ``"auto"``/``"probe"``: the layer's output does not depend on
        the input through gradients.

    Examples
    --------
    >>> rf = receptive_field(model, "layer4", (1, 96, 96, 96))   # doctest: +SKIP
    >>> rf.step, rf.offset                                       # doctest: +SKIP
    ((16.0, 16.0, 16.0), (0.0, 0.0, 0.0))
    """
    if method not in ("auto", "graph", "probe"):
        raise ValueError(f"method must be 'auto', 'graph' or 'probe', not {method!r}.")
    dims = expected_spatial_dims(model)
    batched = dims is not None and len(input_shape) == dims + 2
    shape = tuple(int(s) for s in _zeros(model, input_shape, device, shape_only=True, batched=batched))
    if isinstance(layer, str) and layer == "auto":
        layer = auto_layer(model, shape[1:], device=device).name
    name, module = resolve_layer(model, layer)
    return _measure_receptive_field(model, name, module, shape, device=device, method=method)
