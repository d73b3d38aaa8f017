"""Target layers: resolve a name or module, select one automatically, list candidates,
find the Linear head that CAM needs, and tell which spatial rank a model takes.

``layer="auto"`` has one definition, :func:`auto_layer`: the :class:`~medcam3d.Explainer`, the
``LayerInfo.auto`` mark of :func:`list_layers` (what ``medcam3d layers`` prints) and the jobs all
call it. It probes the model with a small input of the same rank and channels (grown until no layer
that comes after the choice has collapsed to one voxel), and caches the choice per model, input
channels and rank, so that explaining with ``"auto"`` costs no extra full-size forward pass.

TorchScript models (scripted, traced or loaded) and plain models with scripted submodules are
listed and auto-selected too (see :mod:`medcam3d.torchscript`); their layer types are the names of
the modules they were made from (``"Conv3d"``).
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
from typing import cast

import torch
from torch import nn

from .errors import InputError, LayerError, LayerNotFoundError, ModelOutputError
from .hooks import forward_hooks, isolated_model, model_lock
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
    "find_cam_head",
    "token_blocks",
    "TOKEN_BLOCKS",
    "linear_head",
    "head_tolerance",
    "expected_spatial_dims",
    "expected_input_channels",
    "spatial_dims_of",
    "check_spatial_rank",
    "rank_mismatch_message",
]

logger = logging.getLogger(__name__)

_CONV_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
                      nn.ConvTranspose3d: 3}
#: Class names of the layers whose type tells the input rank (TorchScript modules are matched by name).
_RANK_LAYER = re.compile(
    r"^(Lazy)?(Conv|ConvTranspose|MaxPool|AvgPool|AdaptiveAvgPool|AdaptiveMaxPool|LPPool|FractionalMaxPool|"
    r"MaxUnpool)([123])d$"
)
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


# ----------------------------------------------------------------------------------- input rank
def expected_spatial_dims(model: nn.Module) -> int | None:
    """The number of spatial axes the model takes (2 or 3 ...), from its first convolution or pooling.

    Reads module types only (no forward pass): ``Conv3d``, ``ConvTranspose3d``, ``MaxPool3d``,
    ``AdaptiveAvgPool3d`` ... (subclasses too), also inside TorchScript modules.

    Returns
    -------
    int or None
        None when the model has no such layer (then the rank is not checked).
    """
    for module in model.modules():
        for conv_type, dims in _CONV_SPATIAL_DIMS.items():
            if isinstance(module, conv_type):
                return dims
        found = _RANK_LAYER.match(module_type_name(module))
        if found:
            return int(found.group(3))
    return None


spatial_dims_of = expected_spatial_dims  # the older name

_CONV_BY_NAME = re.compile(r"^(Lazy)?Conv([123])d$")


def expected_input_channels(model: nn.Module) -> int | None:
    """The number of input channels the model takes: its first convolution's ``in_channels``.

    Reads module attributes only (no forward pass); TorchScript modules (matched by the name of
    their original class) from their weight's shape. "First" is the first convolution in
    ``model.modules()`` order, the order the network registers its layers in (its stem comes first
    in MONAI's and torchvision's networks).

    Returns
    -------
    int or None
        None when the model has no convolution before another rank layer (then nothing is checked),
        or a lazy convolution (it takes any number).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if isinstance(module, nn.modules.lazy.LazyModuleMixin):
                return None
            return int(module.in_channels)
        name = module_type_name(module)
        if _CONV_BY_NAME.match(name):
            weight = getattr(module, "weight", None)
            groups = getattr(module, "groups", 1)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 3 and isinstance(groups, int):
                return int(weight.shape[1]) * groups
            return None
        if _RANK_LAYER.match(name) or isinstance(module, tuple(_CONV_SPATIAL_DIMS)):
            return None  # a pooling or transposed convolution first: the channels are not told
    return None

_AXES = {1: "W", 2: "H, W", 3: "D, H, W"}


def _axes(dims: int) -> str:
    return _AXES.get(dims, ", ".join(f"S{i}" for i in range(dims)))


def rank_mismatch_message(model_dims: int, shape: Sequence[int], *, batched: bool) -> str | None:
    """What is wrong when an input of ``shape`` does not have the model's spatial rank (None if it does).

    Parameters
    ----------
    model_dims : int
        :func:`expected_spatial_dims` of the model.
    shape : sequence of int
        ``(B, C_in, *spatial)`` when ``batched``, else the spatial shape of an image ``(*spatial)``.
    batched : bool
    """
    shape = tuple(int(s) for s in shape)
    wanted = f"{model_dims}D inputs (C, {_axes(model_dims)})"
    if not batched:
        if len(shape) == model_dims:
            return None
        return (
            f"This is a {len(shape)}D image ({_axes(len(shape))}) of shape {shape}, but the model takes {wanted}. "
            f"Give a {model_dims}D image, or a model made for {len(shape)}D images."
        )
    if len(shape) == model_dims + 2:
        return None
    if len(shape) == model_dims + 1:
        other = model_dims - 1
        batch_of = (
            f"; if it is a batch of {other}D images (B, C_in, {_axes(other)}), give {model_dims}D images or a model "
            f"made for {other}D images" if other >= 1 else ""
        )
        return (
            f"x has shape {shape}, but this model takes {model_dims}D inputs of shape (B, C_in, {_axes(model_dims)}). "
            f"If x is one image (C_in, {_axes(model_dims)}), add the batch axis with x[None]{batch_of}."
        )
    image_dims = len(shape) - 2
    if image_dims >= 1:
        return (
            f"x has shape {shape}: a batch of {image_dims}D images (B, C_in, {_axes(image_dims)}), but the model "
            f"takes {wanted} batched as (B, C_in, {_axes(model_dims)}). Give {model_dims}D images, or a model made "
            f"for {image_dims}D images."
        )
    return f"x has shape {shape}, but this model takes {model_dims}D inputs of shape (B, C_in, {_axes(model_dims)})."


def check_spatial_rank(model: nn.Module, spatial_shape: Sequence[int]) -> None:
    """Refuse an image whose spatial rank is not the model's, before any preprocessing or forward.

    Parameters
    ----------
    model : nn.Module
    spatial_shape : sequence of int
        The image's spatial shape, e.g. ``(H, W)`` of a 2D slice or ``(X, Y, Z)`` of a volume.

    Raises
    ------
    InputError
        E.g. "This is a 2D image (H, W) of shape (256, 256), but the model takes 3D inputs
        (C, D, H, W) ...". Nothing is raised when the model's rank is unknown.
    """
    dims = expected_spatial_dims(model)
    message = None if dims is None else rank_mismatch_message(dims, spatial_shape, batched=False)
    if message is not None:
        raise InputError(message)


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
            f"(C_in, {_axes(dims)}) or (B, C_in, {_axes(dims)})."
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


def find_cam_head(model: nn.Module, channels: int) -> nn.Linear:
    """The last ``nn.Linear`` of the model that takes ``channels`` features (CAM's head).

    A scripted ``Linear`` inside a TorchScript model counts too (it has ``weight`` and ``bias``).

    Raises
    ------
    LayerError
        When there is none.
    """
    heads = _linears(model, channels)
    if not heads:
        message = (
            f"CAM needs the target layer ({channels} channels) to be followed by global average "
            f"pooling and one nn.Linear with in_features={channels}; {type(model).__name__} has none. "
            "Use method='hirescam' (or 'gradcam'), which work on any head."
        )
        raise LayerError(message)
    logger.info("CAM head: Linear(%d -> %d)", heads[-1].weight.shape[1], heads[-1].weight.shape[0])
    return heads[-1]


def _linears(model: nn.Module, in_features: int) -> list[nn.Linear]:
    """``nn.Linear`` modules (also scripted ones) taking ``in_features`` features, in module order."""
    found: list[nn.Linear] = []
    for module in model.modules():
        if isinstance(module, nn.Linear) or (is_scripted(module) and module_type_name(module) == "Linear"):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == in_features:
                # a scripted Linear is not an nn.Linear, but has the same ``weight`` and ``bias``
                found.append(cast(nn.Linear, module))
    return found


#: Heads whose logits are exactly ``Linear(features(A))``, with the features of each kind.
HEAD_KINDS = ("gap+linear", "flatten+linear")


def head_tolerance(*tensors: torch.Tensor) -> float:
    """Relative tolerance of the numerical head check: 1e-4, or 3e-2 when any tensor is
    float16/bfloat16 (autocast)."""
    return 3e-2 if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) else 1e-4


def linear_head(
    model: nn.Module,
    activations: torch.Tensor,
    outputs: torch.Tensor,
    *,
    kinds: Sequence[str] = HEAD_KINDS,
    rtol: float | None = None,
) -> tuple[str, nn.Linear] | None:
    """The ``nn.Linear`` that turns the target layer's output into the logits, checked on this batch.

    A head of kind ``"gap+linear"`` computes ``logits = Linear(mean over voxels of A)`` (CAM's
    setting; CAM = Grad-CAM · voxels there), ``"flatten+linear"`` computes
    ``logits = Linear(flatten(A))`` (HiResCAM's; its map then sums to ``logit − bias``).

    Parameters
    ----------
    model : nn.Module
    activations : (B, K, *spatial) Tensor
        The target layer's output for this batch.
    outputs : (B, C) Tensor
        The model's logits for the same batch.
    kinds : sequence of {"gap+linear", "flatten+linear"}
        Which heads to accept, tried in this order.
    rtol : float, optional
        Relative tolerance (default :func:`head_tolerance`); the absolute tolerance is
        ``rtol · (1 + max |logits|)``.

    Returns
    -------
    (kind, nn.Linear) or None
        None when the logits are not ``Linear(features)`` for any ``nn.Linear`` of the model
        with the right ``in_features`` (the last such module is tried first).
    """
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, not {kind!r}.")
    if outputs.ndim != 2 or activations.ndim < 3:
        return None
    tolerance = head_tolerance(activations, outputs) if rtol is None else rtol
    with torch.no_grad(), torch.autocast(outputs.device.type, enabled=False):
        values = activations.detach().float()
        logits = outputs.detach().float()
        scale = 1.0 + float(logits.abs().max())
        for kind in kinds:
            features = values.flatten(start_dim=2).mean(dim=2) if kind == "gap+linear" else values.flatten(start_dim=1)
            linears = _linears(model, features.shape[1])
            for linear in reversed(linears):
                bias = None if linear.bias is None else linear.bias.detach().float()
                expected = nn.functional.linear(features, linear.weight.detach().float(), bias)
                if expected.shape == logits.shape and torch.allclose(expected, logits, rtol=tolerance, atol=tolerance * scale):
                    return kind, linear
    return None


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
