"""Where each cell of a layer's output looks in the input: receptive-field step, centre and size.

Cell ``u`` of a target layer's output (per spatial axis) is centred on input voxel
``offset + step * u`` and reaches ``size`` input voxels. The feature grid of a map is placed there
(:func:`medcam3d.space.feature_space`), so a heatmap lands where the network looked, not where the
``F.interpolate(align_corners=False)`` convention puts it (``step = s``, ``offset = (s - 1) / 2``),
which is off by up to half a cell: on MONAI's ``resnet18`` ``layer4`` (stride 16) the convention
places cell 3 at input voxel 55.5, the network centres it on voxel 48.

Two ways to find it, both in :func:`measure` (behind :func:`medcam3d.layers.receptive_field`):

``"graph"`` (the fast path)
    One forward pass on *meta* tensors (shapes only: no computation, no memory, the model's
    parameters are never touched) under a :class:`torch.overrides.TorchFunctionMode` that follows
    every tensor from the input to the target layer's output and composes the geometry of each
    operation: convolutions and transposed convolutions (kernel, stride, padding, dilation, also
    ``padding="same"``), max/average/Lp pooling, adaptive pooling where it is a plain pooling,
    ``F.interpolate``/``nn.Upsample``, ``F.pad`` and crops, and every operation that keeps the
    spatial axes in place (activations, normalization, dropout, arithmetic, concatenation along
    channels, linear layers over the channels). The spatial axes may move: permutes and reshapes
    are followed (channel-last maps, a grid flattened into a token sequence and back, as in
    UNETR's and SwinUNETR's transformers), and so are strided slices (Swin's patch merging, whose
    eight shifted slices joined along channels make one 2-voxel window). A product of two
    input-dependent tensors (attention) mixes every position with every other by content: like a
    gate computed from the whole image, it does not move a cell, and the residual path that adds
    it back places it. For a layer with kernel ``k``, stride ``s``,
    left padding ``p`` and dilation ``d`` (``ke = d (k - 1) + 1``)::

        step'   = step * s
        offset' = offset + step * ((ke - 1) / 2 - p)
        size'   = size + (ke - 1) * step

    and for a transposed convolution ``step' = step / s``,
    ``offset' = offset + step * (p - d (k - 1) / 2) / s``. Paths that meet (residual additions,
    dense concatenations, U-Net skips) must agree on step and offset; channel gates computed from
    the whole image (squeeze-and-excitation) do not move a cell. The trace runs on a view of the
    model with none of the user's hooks (they never see meta tensors).

    This is the centre of the cell's receptive field. Far from the input's borders it is where the
    cell's gradient looks; a deep cell whose field is clipped by the borders leans toward the
    larger part of its feature maps (MONAI's DenseNet121 ``transition3`` on a 32-voxel input: 5
    voxels), which no placement of a regular grid follows.

``"probe"`` (the fallback, and the reference)
    Where the graph cannot be read (TorchScript, a custom op, paths that disagree, such as a U-Net
    decoder adding an upsampled path to a skip whose cells sit elsewhere), the gradient of a few
    cells' sums over channels with respect to seeded noise inputs (``PROBE_INPUTS`` of them, added
    up; eval mode, the model's own weights, never modified, none of the user's hooks run): a
    cell's centre is the midpoint of the gradient's support where that support lies inside the
    input (exact), else the ``|gradient|``-weighted mean position over the widest window symmetric
    about it inside the input; step and offset are fitted per axis by least squares over the cells
    (a fitted step within 15 % of a whole number, or of one over a whole number, is taken as that
    number), ``size`` is the support's extent (a lower bound where it reaches the input's borders).
    Where paths disagree, this is where this model's gradient looks (a mix of the paths' places,
    weighted by the model's weights). It costs ``PROBE_INPUTS`` forward passes up to the layer,
    one at a time, and one backward pass per cell and input.

Results are cached per model (weakly), layer and input shape; a graph result that no
shape-dependent operation (interpolation to a size, padding, cropping, adaptive pooling) took part
in is reused for every input size with the same channels and rank.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import LayerError
from .hooks import _HOOK_TABLES, counterpart, forward_hooks, isolated_model, model_lock
from .torchscript import is_scripted, script_split, scripted_ancestor

__all__ = ["ReceptiveField", "receptive_field", "clear_cache", "PLACEMENTS"]

logger = logging.getLogger(__name__)

#: The placements an :class:`~medcam3d.Explainer` offers.
PLACEMENTS = ("receptive_field", "align_corners")


@dataclass(frozen=True)
class ReceptiveField:
    """Where the cells of a layer's output look in the input, per spatial axis (input voxel units).

    Cell ``u`` (an index along one axis of the layer's output) is centred on input voxel index
    ``offset + step * u`` and reaches ``size`` input voxels along that axis.

    Attributes
    ----------
    step : tuple of float
        Input voxels between neighbouring cells (the layer's total stride), per spatial axis.
    offset : tuple of float
        Input voxel index (fractional) of the centre of cell 0, per spatial axis.
    size : tuple of float
        Extent of the input that one cell reaches, per axis (for ``source="graph"`` the kernels'
        reach, not counting normalization or attention over the whole image; for ``"probe"`` the
        extent of the gradient's support, a lower bound where it reaches the input's borders).
    source : {"graph", "probe", "identity"}
        How it was found: from the network's operations, from a gradient probe, or the input grid
        itself (:meth:`identity`).
    """

    step: tuple[float, ...]
    offset: tuple[float, ...]
    size: tuple[float, ...]
    source: str = "graph"

    def __post_init__(self) -> None:
        step = tuple(float(v) for v in self.step)
        offset = tuple(float(v) for v in self.offset)
        size = tuple(float(v) for v in self.size)
        if not len(step) == len(offset) == len(size) or not step:
            raise ValueError(f"step, offset and size need one value per spatial axis, not {step}, {offset}, {size}.")
        if not all(math.isfinite(v) for v in (*step, *offset, *size)) or min(step) <= 0:
            raise ValueError(f"step must be positive and all values finite, not step={step}, offset={offset}, "
                             f"size={size}.")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "size", size)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.step)

    @classmethod
    def identity(cls, ndim: int) -> ReceptiveField:
        """The input grid itself (``step 1, offset 0, size 1``): for maps computed on the input, such as
        input-level attributions (gradient x input)."""
        return cls((1.0,) * ndim, (0.0,) * ndim, (1.0,) * ndim, "identity")

    def centres(self, index: Any) -> np.ndarray:
        """Input voxel coordinates of cell centres.

        Parameters
        ----------
        index : (..., ndim) array_like
            Cell indices on the layer's grid.

        Returns
        -------
        (..., ndim) ndarray
            float64 ``offset + step * index``.
        """
        index = np.asarray(index, dtype=np.float64)
        if index.shape[-1:] != (self.ndim,):
            raise ValueError(f"index must have {self.ndim} values in its last axis, not shape {index.shape}.")
        return np.asarray(self.offset) + np.asarray(self.step) * index

    def matrix(self) -> np.ndarray:
        """The 4x4 map from feature cell indices to input voxel indices, ``[[diag(step), offset], [0, 1]]``
        (float64; a 2D field leaves the third axis as it is)."""
        matrix = np.eye(4)
        for axis, (step, offset) in enumerate(zip(self.step, self.offset)):
            matrix[axis, axis] = step
            matrix[axis, 3] = offset
        return matrix

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"step": [...], "offset": [...], "size": [...], "source": ...}``."""
        return {"step": list(self.step), "offset": list(self.offset), "size": list(self.size), "source": self.source}

    @classmethod
    def from_dict(cls, data: Any) -> ReceptiveField:
        """The inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or not {"step", "offset", "size"} <= set(data):
            raise ValueError(f"A receptive field is a mapping with step, offset and size, not {data!r:.80}.")
        return cls(tuple(data["step"]), tuple(data["offset"]), tuple(data["size"]), str(data.get("source", "graph")))

    def __str__(self) -> str:
        def text(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:g}" for v in values) + ")"

        return f"step {text(self.step)}, offset {text(self.offset)}, size {text(self.size)} voxels ({self.source})"


# ------------------------------------------------------------------------------------------ cache
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
        traced = _graph(model, name, module, shape)
        if isinstance(traced, str):
            reason = traced
            if method == "graph":
                raise LayerError(f"The receptive field of layer {name!r} cannot be read from the graph: {traced}. "
                                 "Use method='auto' (a gradient probe where the graph cannot be read).")
        else:
            result, invariant = traced
    if result is None:
        logger.info("receptive field of %r: gradient probe (%s)", name, reason)
        result = _probe(model, name, module, shape, device)
    logger.info("receptive field of %r for input %s: %s", name, shape, result)
    with _CACHE_GUARD:
        _CACHE.setdefault(model, {})[general if invariant else exact] = result
    return result


# ------------------------------------------------------------------------------------------ view
@contextmanager
def _hookless_view(model: nn.Module) -> Iterator[nn.Module]:
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
                for table in _HOOK_TABLES.intersection(state):
                    state[table] = type(state[table])()
        yield view


# ------------------------------------------------------------------------------------------ graph
@dataclass(frozen=True)
class _Field:
    """A tensor some of whose axes are the input's spatial axes, with its cells' placement.

    ``axes``: the tensor's dimensions (negative: counted from the end) that hold the spatial axes,
    in the input's order; empty for the last ``ndim`` dimensions (a channel-first map, the common
    case). ``grid``: for a token sequence, the spatial grid's shape whose cells are flattened
    (row-major) into the one dimension ``axes[0]``.
    """

    step: tuple[float, ...]
    offset: tuple[float, ...]
    size: tuple[float, ...]
    axes: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()


_CONST = "const"  # does not depend on the input (parameters, buffers, created tensors)
_GLOBAL = "global"  # depends on the input, but has no spatial extent (pooled over the whole image)


@dataclass(frozen=True)
class _Unknown:
    reason: str


_Annotation = Any  # _Field | _CONST | _GLOBAL | _Unknown


class _Stop(Exception):
    """Raised by the target layer's hook: the rest of the forward pass is not needed."""


def _same_step(a: _Field, b: _Field) -> bool:
    return a.axes == b.axes and a.grid == b.grid and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a.step, b.step))


def _agree(a: _Field, b: _Field) -> bool:
    scale = max(1.0, *(abs(s) for s in a.step))
    return _same_step(a, b) and all(abs(x - y) <= 1e-6 * scale for x, y in zip(a.offset, b.offset))


# Operations that act on each spatial position alone (or pool over channels, or normalize) and
# broadcast their operands: a cell stays where it is.
_POINTWISE = {
    # arithmetic (function, method and operator forms; in-place forms are stripped of their "_")
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod",
    "rsub", "pow", "float_power", "neg", "negative", "abs", "absolute", "sign", "sgn", "square", "sqrt", "rsqrt",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "reciprocal", "clamp", "clamp_min", "clamp_max", "clip",
    "where", "masked_fill", "lerp", "addcmul", "addcdiv", "minimum", "maximum", "fmin", "fmax", "floor", "ceil",
    "round", "trunc", "frac", "nan_to_num", "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or",
    "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isfinite",
    "sin", "cos", "erf", "erfc", "atan", "hypot", "copysign", "xlogy", "mean_channels",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__floordiv__",
    "__rfloordiv__", "__pow__", "__rpow__", "__ipow__", "__neg__", "__abs__", "__and__", "__or__", "__xor__",
    "__rand__", "__ror__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__mod__",
    "__iand__", "__ior__",
    # activations
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid",
    "tanh", "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "softshrink", "hardshrink",
    "tanhshrink", "threshold", "logsigmoid",
    # normalization (over channels, or over the whole image: a cell's centre stays)
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "normalize", "rms_norm",
    # dropout
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    # copies and casts
    "clone", "contiguous", "detach", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "requires_grad", "zero", "fill", "copy", "new_zeros_like", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "data",
}

# Normalizations: the output has the input's shape and dtype (the trace does not compute them).
_SAME_SHAPE = {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm"}

# Reshapes that keep the last axes in row-major order when those axes keep their sizes.
_LAYOUT = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "repeat", "unbind", "select",
           "split", "chunk", "tensor_split", "split_with_sizes", "cat", "concat", "concatenate", "stack", "narrow",
           "view_as", "reshape_as", "expand_as"}
# Products of two tensors: of two input-dependent ones (attention), or of a map and a constant matrix.
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "einsum", "bilinear",
           "scaled_dot_product_attention", "tensordot", "inner", "outer", "dot", "mv"}
#: Distinct sizes that show where a permutation puts each dimension.
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nanmean",
           "nansum", "argmax", "argmin", "std_mean", "var_mean", "softmax", "log_softmax", "cumsum", "any", "all",
           "count_nonzero", "median"}

# Parameter names, in order, of the geometric operations (torch.nn.functional and torch).
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_LP_POOL = ("input", "norm_type", "kernel_size", "stride", "ceil_mode")
_INTERPOLATE = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_PAD = ("input", "pad", "mode", "value")


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _per_axis(value: Any, ndim: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * ndim
    if isinstance(value, (int, float)):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    return values if len(values) == ndim else values * ndim if len(values) == 1 else values[-ndim:]


def _name_of(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a Tensor property (x.data, x.T ...)
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "property")
        return name if name == "data" else f"property {name}"
    if name.endswith("_") and not name.startswith("__"):  # in-place form
        name = name[:-1]
    return name


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


class _Tracer(TorchFunctionMode):
    """Runs a forward pass on meta tensors and annotates every tensor with its placement."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.notes: dict[int, tuple[torch.Tensor, _Annotation]] = {}
        self.meta: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shape_dependent = False

    # -- bookkeeping
    def note(self, tensor: torch.Tensor, annotation: _Annotation) -> None:
        self.notes[id(tensor)] = (tensor, annotation)

    def annotation(self, tensor: torch.Tensor) -> _Annotation:
        if tensor.device.type != "meta":  # a parameter, a buffer or another tensor from outside
            copy = self.meta.get(id(tensor))  # unless input-dependent values were written into its meta copy
            return self.annotation(copy[1]) if copy is not None and copy[0] is tensor else _CONST
        found = self.notes.get(id(tensor))
        if found is None or found[0] is not tensor:
            return _Unknown("a tensor produced outside PyTorch's Python API (e.g. a TorchScript module)")
        return found[1]

    def _to_meta(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        found = self.meta.get(id(tensor))
        if found is None or found[0] is not tensor:
            converted = tensor.detach().to("meta")
            self.meta[id(tensor)] = (tensor, converted)
            self.note(converted, _CONST)
            return converted
        return found[1]

    # -- the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name_of(func)
        inputs = [(t, self.annotation(t)) for t in _tensors((args, kwargs))]
        args, kwargs = _map(args, self._to_meta), _map(kwargs, self._to_meta)
        if name in _SAME_SHAPE and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            # a normalization's output has its input's shape and dtype: no need to run it (on meta
            # tensors PyTorch runs batch_norm through its Python decompositions, ~10 ms a call)
            out = torch.empty_like(args[0])
        else:
            out = func(*args, **kwargs)
        if name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            self.note(args[0], self._setitem(inputs))
            return out
        outputs = list(_tensors(out))
        if not outputs:
            return out
        try:
            annotation = self._rule(name, func, args, kwargs, inputs, outputs)
        except Exception as error:  # noqa: BLE001  an argument form this reader does not know: not readable
            annotation = _Unknown(f"{name}: {type(error).__name__}")
        for tensor in outputs:
            self.note(tensor, annotation)
        return out

    # -- layouts: where a field's spatial axes are among a tensor's dimensions
    def _standard(self, field: _Field) -> bool:
        """Whether the spatial axes are the tensor's last ``ndim`` dimensions (a channel-first map)."""
        return not field.grid and (not field.axes or field.axes == tuple(range(-self.ndim, 0)))

    def _dims(self, field: _Field, rank: int) -> list[int] | None:
        """The (non-negative) dimensions of a rank-``rank`` tensor that hold the field's spatial axes."""
        axes = field.axes or tuple(range(-self.ndim, 0))
        if any(a < -rank for a in axes):
            return None
        return [rank + a for a in axes]

    def _fits(self, field: _Field, tensor: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``out`` has the field's spatial dimensions where ``tensor`` has them, with the same sizes."""
        dims, into = self._dims(field, tensor.ndim), self._dims(field, out.ndim)
        return dims is not None and into is not None and all(
            int(tensor.shape[d]) == int(out.shape[e]) for d, e in zip(dims, into))

    def _moved(self, field: _Field, tensor: torch.Tensor, out: torch.Tensor, where: Callable[[int], int | None],
               what: str) -> _Annotation:
        """The field on ``out``, whose dimension ``where(d)`` is ``tensor``'s dimension ``d`` (None: gone)."""
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return _Unknown(f"{what} on a tensor of fewer dimensions than its spatial axes")
        moved = [where(d) for d in dims]
        if any(m is None or m < 0 or m >= out.ndim or int(out.shape[m]) != int(tensor.shape[d])
               for m, d in zip(moved, dims)):
            return _Unknown(f"{what} changes the spatial layout")
        axes = tuple(int(m) - out.ndim for m in moved if m is not None)
        if not field.grid and axes == tuple(range(-self.ndim, 0)):
            axes = ()
        return replace(field, axes=axes)

    # -- rules
    def _setitem(self, inputs: list) -> _Annotation:
        target = inputs[0][1] if inputs else _CONST
        values = [a for _, a in inputs[1:]]
        if any(isinstance(a, (_Field, _Unknown)) for a in values):
            return _Unknown("__setitem__ of input-dependent values")
        return target

    def _rule(self, name: str, func: Any, args: tuple, kwargs: dict, inputs: list, outputs: list) -> _Annotation:
        annotations = [a for _, a in inputs]
        spatial = [a for a in annotations if isinstance(a, (_Field, _Unknown))]
        if not spatial:
            return _GLOBAL if any(a == _GLOBAL for a in annotations) else _CONST
        first, main = inputs[0] if inputs else (None, None)
        out = outputs[0]
        nd = self.ndim
        if name in _MATMUL and sum(a != _CONST for a in annotations) >= 2:
            # attention, Gram matrices: every position mixed with every other by content, like a gate
            # computed from the whole image; the residual path that adds it back keeps the cells' places
            return _GLOBAL
        if name.endswith("d_with_indices"):  # max_pool3d_with_indices
            name = name[: -len("_with_indices")]
        base = name[:-2] if name[-2:] in ("1d", "2d", "3d") else name
        rank = int(name[-2]) if base != name else None
        if base in ("adaptive_avg_pool", "adaptive_max_pool") and isinstance(main, (_Field, _Unknown)) and first is not None:
            return self._adaptive(first, out, main)
        if isinstance(main, _Unknown):
            return main
        if any(isinstance(a, _Unknown) for a in annotations):
            return next(a for a in annotations if isinstance(a, _Unknown))
        if name in _POINTWISE or name in ("cat", "concat", "concatenate", "stack"):
            return self._combine(name, args, kwargs, inputs, out)
        if not isinstance(main, _Field) or first is None:
            return self._second_operand(name, inputs, out)
        if base in ("conv", "conv_transpose", "max_pool", "avg_pool", "lp_pool"):
            if rank != nd or first.ndim < nd or not self._standard(main):
                return _Unknown(f"{name} on a tensor whose last axes are not the input's spatial axes")
            return self._window(base, args, kwargs, main, first)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            if not self._standard(main):
                return _Unknown(f"{name} on a tensor whose last axes are not the input's spatial axes")
            return self._interpolate(name, args, kwargs, main, first, out)
        if name in ("linear", *_MATMUL):
            return self._linear(name, main, first, out)
        if name == "pad":
            return self._pad(args, kwargs, main, first)
        if name == "__getitem__":
            return self._getitem(args, main, first, out)
        if name == "roll":
            return self._roll(args, kwargs, main, first, out)
        if name in _PERMUTE:
            return self._permute(name, func, args, kwargs, main, first, out)
        if name in _REDUCE:
            return self._reduce(name, args, kwargs, main, first, out)
        if name in _LAYOUT:
            return self._layout(name, args, kwargs, main, first, out)
        return _Unknown(f"the operation {name!r}")

    def _combine(self, name: str, args: tuple, kwargs: dict, inputs: list, out: torch.Tensor) -> _Annotation:
        """Operands broadcast position by position (or are joined along another axis): their fields must
        agree; fields of equal step and extent joined along channels (a patch merging, a space-to-depth)
        make one field over their union."""
        fields: list[_Field] = []
        for tensor, annotation in inputs:
            if not isinstance(annotation, _Field):
                continue
            if name == "stack":  # a new dimension: those after it move by one
                at = int(kwargs.get("dim", args[1] if len(args) > 1 else 0)) % out.ndim

                def shifted(d: int) -> int:
                    return d if d < at else d + 1

                annotation = self._moved(annotation, tensor, out, shifted, name)
                if isinstance(annotation, _Unknown):
                    return annotation
                fields.append(annotation)
            elif self._fits(annotation, tensor, out):
                fields.append(annotation)
            elif (dims := self._dims(annotation, tensor.ndim)) is not None and all(tensor.shape[d] == 1 for d in dims):
                continue  # one value per image, broadcast over space
            else:
                return _Unknown(f"{name} of tensors on different grids")
        if not fields:
            return _GLOBAL
        first = fields[0]
        if all(_agree(first, other) for other in fields[1:]):
            size = tuple(max(f.size[i] for f in fields) for i in range(self.ndim))
            return replace(first, size=size)
        if name in ("cat", "concat", "concatenate", "stack") and all(
                _same_step(first, other) and other.size == first.size for other in fields[1:]):
            low = [min(f.offset[i] for f in fields) for i in range(self.ndim)]
            high = [max(f.offset[i] for f in fields) for i in range(self.ndim)]
            return replace(first, offset=tuple((a + b) / 2 for a, b in zip(low, high)),
                           size=tuple(s + b - a for s, a, b in zip(first.size, low, high)))
        other = next(f for f in fields[1:] if not _agree(first, f))
        return _Unknown(f"{name} joins paths whose cells are placed differently "
                        f"({first.offset} vs {other.offset}, steps {first.step} vs {other.step})")

    def _second_operand(self, name: str, inputs: list, out: torch.Tensor) -> _Annotation:
        """``W @ x``: a constant matrix times a map, over its second-to-last dimension."""
        if name in ("matmul", "__matmul__", "__rmatmul__") and len(inputs) == 2:
            (left, a), (right, b) = inputs
            if name == "__rmatmul__":
                (left, a), (right, b) = (right, b), (left, a)
            if a == _CONST and isinstance(b, _Field) and right.ndim >= 2 and out.ndim == right.ndim:
                dims = self._dims(b, right.ndim)
                if dims is not None and right.ndim - 2 not in dims:
                    return self._moved(b, right, out, lambda d: d, name)
        return _Unknown(f"{name} with a spatial map that is not its first operand")

    def _linear(self, name: str, field: _Field, tensor: torch.Tensor, out: torch.Tensor) -> _Annotation:
        """``x @ W`` (``F.linear``, ``matmul`` by a constant): mixes the last dimension only."""
        if name in ("linear", "matmul", "__matmul__", "mm", "bmm") and out.ndim == tensor.ndim:
            dims = self._dims(field, tensor.ndim)
            if dims is not None and tensor.ndim - 1 not in dims:
                return self._moved(field, tensor, out, lambda d: d, name)
        return _Unknown(f"{name} over a spatial axis")

    def _window(self, base: str, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor) -> _Annotation:
        nd = self.ndim
        if base == "conv" or base == "conv_transpose":
            bound = _bind(_CONV if base == "conv" else _CONV_T, args, kwargs)
            kernel = tuple(int(k) for k in bound["weight"].shape[2:])
            stride = _per_axis(bound.get("stride"), nd, 1)
            dilation = _per_axis(bound.get("dilation"), nd, 1)
            padding = bound.get("padding", 0)
            if isinstance(padding, str):
                if padding == "same":
                    pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
                elif padding == "valid":
                    pad = (0,) * nd
                else:
                    return _Unknown(f"padding={padding!r}")
            else:
                pad = _per_axis(padding, nd, 0)
        else:
            names = {"max_pool": _MAX_POOL, "avg_pool": _AVG_POOL, "lp_pool": _LP_POOL}[base]
            bound = _bind(names, args, kwargs)
            kernel = _per_axis(bound["kernel_size"], nd, 1)
            stride_arg = bound.get("stride")
            stride = kernel if stride_arg is None or (isinstance(stride_arg, (list, tuple)) and not stride_arg) \
                else _per_axis(stride_arg, nd, 1)
            pad = _per_axis(bound.get("padding", 0), nd, 0)
            dilation = _per_axis(bound.get("dilation", 1), nd, 1)
        step, offset, size = [], [], []
        for axis in range(nd):
            st, of, sz = field.step[axis], field.offset[axis], field.size[axis]
            k, s, p, d = kernel[axis], stride[axis], pad[axis], dilation[axis]
            reach = d * (k - 1) + 1
            if base == "conv_transpose":
                step.append(st / s)
                offset.append(of + st * (p - d * (k - 1) / 2) / s)
                size.append(sz + (math.ceil(reach / s) - 1) * st)
            else:
                step.append(st * s)
                offset.append(of + st * ((reach - 1) / 2 - p))
                size.append(sz + (reach - 1) * st)
        return _Field(tuple(step), tuple(offset), tuple(size))

    def _adaptive(self, tensor: torch.Tensor, out: torch.Tensor, field: _Annotation) -> _Annotation:
        nd = self.ndim
        sizes_in, sizes_out = tuple(tensor.shape[-nd:]), tuple(out.shape[-nd:])
        if all(n == 1 for n in sizes_out) and (not isinstance(field, _Field) or self._standard(field)):
            return _GLOBAL
        if isinstance(field, _Unknown):
            return field
        if not self._standard(field):
            return _Unknown("adaptive pooling of a tensor whose last axes are not the input's spatial axes")
        self.shape_dependent = True
        step, offset, size = [], [], []
        for axis in range(nd):
            n, m = sizes_in[axis], sizes_out[axis]
            if n % m:
                return _Unknown(f"adaptive pooling from {sizes_in} to {sizes_out} (not a whole-number pooling)")
            k = n // m
            step.append(field.step[axis] * k)
            offset.append(field.offset[axis] + field.step[axis] * (k - 1) / 2)
            size.append(field.size[axis] + (k - 1) * field.step[axis])
        return _Field(tuple(step), tuple(offset), tuple(size))

    def _interpolate(self, name: str, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor,
                     out: torch.Tensor) -> _Annotation:
        nd = self.ndim
        bound = _bind(_INTERPOLATE[:3] if name != "interpolate" else _INTERPOLATE, args, kwargs)
        mode = {"upsample_nearest": "nearest", "upsample_bilinear": "bilinear"}.get(name, bound.get("mode", "nearest"))
        align = bool(bound.get("align_corners")) or name == "upsample_bilinear"
        sizes_in, sizes_out = tuple(tensor.shape[-nd:]), tuple(out.shape[-nd:])
        scale = bound.get("scale_factor")
        recompute = bool(bound.get("recompute_scale_factor"))
        if bound.get("size") is not None:
            self.shape_dependent = True
        step, offset, size = [], [], []
        for axis in range(nd):
            n, m = sizes_in[axis], sizes_out[axis]
            st, of, sz = field.step[axis], field.offset[axis], field.size[axis]
            if scale is not None and not recompute:
                factor = float(scale[axis] if isinstance(scale, (list, tuple)) else scale)
                ratio = 1.0 / factor
            else:
                ratio = n / m
            if mode in ("linear", "bilinear", "trilinear", "bicubic"):
                if align:
                    ratio = (n - 1) / (m - 1) if m > 1 else 1.0
                    shift = 0.0
                else:
                    shift = 0.5 * ratio - 0.5
                reach = 1.0 if ratio <= 1 else float(math.ceil(ratio))
            elif mode == "nearest":
                q = Fraction(ratio).limit_denominator(64).denominator
                shift, reach = -(q - 1) / (2 * q), 0.0
            elif mode == "nearest-exact":
                shift = float(math.floor(ratio / 2)) if float(ratio).is_integer() else 0.5 * ratio - 0.5
                reach = 0.0
            elif mode == "area" and n % m == 0:
                k = n // m
                ratio, shift, reach = float(k), (k - 1) / 2, float(k - 1)
            else:
                return _Unknown(f"interpolate(mode={mode!r}) from {sizes_in} to {sizes_out}")
            step.append(st * ratio)
            offset.append(of + st * shift)
            size.append(sz + reach * st)
        return _Field(tuple(step), tuple(offset), tuple(size))

    def _pad(self, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor) -> _Annotation:
        bound = _bind(_PAD, args, kwargs)
        pads = [int(p) for p in bound["pad"]]
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return _Unknown("pad of a tensor of fewer dimensions than its spatial axes")
        offset = list(field.offset)
        for pair in range(len(pads) // 2):  # (left, right) per dimension, from the last one backwards
            dim, left, right = tensor.ndim - 1 - pair, pads[2 * pair], pads[2 * pair + 1]
            if not (left or right) or dim not in dims:
                continue
            if field.grid:
                return _Unknown("padding of a token sequence")
            axis = dims.index(dim)
            self.shape_dependent = True
            offset[axis] -= left * field.step[axis]
        return replace(field, offset=tuple(offset))

    def _getitem(self, args: tuple, field: _Field, tensor: torch.Tensor, out: torch.Tensor) -> _Annotation:
        index = args[1] if len(args) > 1 else ()
        items = list(index) if isinstance(index, tuple) else [index]
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return _Unknown("indexing a tensor of fewer dimensions than its spatial axes")
        if any(isinstance(item, (torch.Tensor, list, np.ndarray, bool)) for item in items):
            # advanced indexing: of dimensions before the spatial ones only (their places from the end stay)
            simple = not any(item is Ellipsis or item is None for item in items)
            return field if simple and len(items) <= min(dims) and self._fits(field, tensor, out) else \
                _Unknown("advanced indexing of spatial axes")
        ellipsis = [i for i, item in enumerate(items) if item is Ellipsis]
        if len(ellipsis) > 1:
            return _Unknown("indexing with several ellipses")
        consumed = sum(item is not None and item is not Ellipsis for item in items)
        if ellipsis:
            at = ellipsis[0]
            items = items[:at] + [slice(None)] * (tensor.ndim - consumed) + items[at + 1:]
        items = items + [slice(None)] * (tensor.ndim - sum(item is not None for item in items))
        step, offset = list(field.step), list(field.offset)
        where: dict[int, int] = {}
        dim = position = 0
        for item in items:
            if item is None:  # a new dimension of size 1
                position += 1
                continue
            if isinstance(item, slice):
                if dim in dims:
                    start, stop, stride = item.indices(int(tensor.shape[dim]))
                    if stride < 1:
                        return _Unknown("reversed spatial axis")
                    if field.grid:
                        if (start, stop, stride) != (0, int(tensor.shape[dim]), 1):
                            return _Unknown("slicing of a token sequence")
                    else:
                        axis = dims.index(dim)
                        if start or stride != 1:
                            self.shape_dependent = True
                        offset[axis] += start * step[axis]
                        step[axis] *= stride
                where[dim] = position
                position += 1
            elif dim in dims:
                return _Unknown("integer index of a spatial axis")
            dim += 1
        axes = tuple(where[d] - out.ndim for d in dims)
        if not field.grid and axes == tuple(range(-self.ndim, 0)):
            axes = ()
        return replace(field, step=tuple(step), offset=tuple(offset), axes=axes)

    def _dim_list(self, value: Any, ndim: int) -> list[int]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [int(v) % ndim for v in values]

    def _roll(self, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor, out: torch.Tensor) -> _Annotation:
        rolled = kwargs.get("dims", args[2] if len(args) > 2 else None)
        dims = self._dims(field, tensor.ndim)
        if rolled is None or dims is None or set(self._dim_list(rolled, tensor.ndim)) & set(dims):
            return _Unknown("roll (a cyclic shift) of a spatial axis")
        return field

    def _permute(self, name: str, func: Any, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor,
                 out: torch.Tensor) -> _Annotation:
        if tensor.ndim > len(_PRIMES):
            return _Unknown(f"{name} of a tensor of {tensor.ndim} dimensions")
        # the same operation on a tensor whose sizes are distinct primes tells where each dimension goes
        moved = func(torch.empty(_PRIMES[:tensor.ndim], device="meta"), *args[1:], **kwargs)
        position = {int(n): i for i, n in enumerate(moved.shape)}
        return self._moved(field, tensor, out, lambda d: position.get(_PRIMES[d]), name)

    def _reduce(self, name: str, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor,
                out: torch.Tensor) -> _Annotation:
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            # the element-wise maximum of two tensors
            return self._combine(name, args, kwargs, [(t, self.annotation(t)) for t in args[:2]], out)
        position = 2 if name == "norm" else 1
        dim = kwargs.get("dim", args[position] if len(args) > position else None)
        if dim is None:
            return _GLOBAL
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return _Unknown(f"{name} of a tensor of fewer dimensions than its spatial axes")
        reduced = set(self._dim_list(dim, tensor.ndim))
        spatial = set(dims)
        if name in ("softmax", "log_softmax", "cumsum"):
            if spatial & reduced:
                return _Unknown(f"{name} along a spatial axis")
            return self._moved(field, tensor, out, lambda d: d, name)
        if spatial <= reduced:
            return _GLOBAL
        if spatial & reduced:
            return _Unknown(f"{name} over some of the spatial axes")
        if out.ndim == tensor.ndim:  # keepdim
            return self._moved(field, tensor, out, lambda d: d, name)
        return self._moved(field, tensor, out, lambda d: d - sum(r < d for r in reduced), name)

    def _layout(self, name: str, args: tuple, kwargs: dict, field: _Field, tensor: torch.Tensor,
                out: torch.Tensor) -> _Annotation:
        if name in ("select", "unbind"):
            gone = int(kwargs.get("dim", args[1] if len(args) > 1 else 0)) % tensor.ndim
            return self._moved(field, tensor, out, lambda d: None if d == gone else d if d < gone else d - 1, name)
        if name in ("narrow", "split", "chunk", "tensor_split", "split_with_sizes"):
            dim = kwargs.get("dim")
            if dim is None:
                position = 1 if name == "narrow" else 2
                dim = args[position] if len(args) > position else 0
            dims = self._dims(field, tensor.ndim)
            if dims is None or int(dim) % tensor.ndim in dims:
                return _Unknown(f"{name} along a spatial axis")
            return self._moved(field, tensor, out, lambda d: d, name)
        if name in ("expand", "expand_as", "repeat"):  # dimensions added in front; the others keep their sizes
            return self._moved(field, tensor, out, lambda d: d + out.ndim - tensor.ndim, name)
        return self._reshape(name, field, tensor, out)

    def _reshape(self, name: str, field: _Field, tensor: torch.Tensor, out: torch.Tensor) -> _Annotation:
        """A reshape (view, flatten, unflatten, squeeze ...): a dimension of the output with the size of a
        spatial dimension and as many elements after it indexes the same positions; spatial dimensions
        in a row flattened into one make a token sequence, and a token sequence unflattened into its
        grid is a spatial map again."""
        shape_in, shape_out = [int(n) for n in tensor.shape], [int(n) for n in out.shape]
        dims = self._dims(field, tensor.ndim)
        if dims is None or math.prod(shape_in) != math.prod(shape_out):
            return _Unknown(f"{name} changes the spatial layout")
        rank = len(shape_out)
        standard = tuple(range(-self.ndim, 0))

        def after(shape: list[int], at: int) -> int:
            return math.prod(shape[at + 1:])

        def find(size: int, behind: int, near: int) -> int | None:
            found = [j for j in range(rank) if shape_out[j] == size and after(shape_out, j) == behind]
            return min(found, key=lambda j: abs(j - rank - near)) if found else None

        if field.grid:
            dim = dims[0]
            behind = after(shape_in, dim)
            kept = find(shape_in[dim], behind, dim - len(shape_in))
            if kept is not None:
                return replace(field, axes=(kept - rank,))
            grid = list(field.grid)
            for j in range(rank - len(grid) + 1):
                if shape_out[j:j + len(grid)] == grid and after(shape_out, j + len(grid) - 1) == behind:
                    axes = tuple(j + i - rank for i in range(len(grid)))
                    return replace(field, axes=() if axes == standard else axes, grid=())
            return _Unknown(f"{name} changes the spatial layout of a token sequence")
        moved = [find(shape_in[d], after(shape_in, d), d - len(shape_in)) for d in dims]
        if all(m is not None for m in moved) and all(a < b for a, b in zip(moved, moved[1:])):  # type: ignore[operator]
            axes = tuple(int(m) - rank for m in moved if m is not None)
            return replace(field, axes=() if axes == standard else axes)
        if dims == list(range(dims[0], dims[0] + len(dims))):  # the spatial dimensions in a row, flattened
            flat = find(math.prod(shape_in[d] for d in dims), after(shape_in, dims[-1]), dims[0] - len(shape_in))
            if flat is not None:
                return replace(field, axes=(flat - rank,), grid=tuple(shape_in[d] for d in dims))
        return _Unknown(f"{name} changes the spatial layout")


def _graph(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...]) \
        -> tuple[ReceptiveField, bool] | str:
    """The receptive field read from the graph, and whether it holds for every input size; or why not."""
    if is_scripted(model) or scripted_ancestor(model, name) is not None:
        return "the layer is inside a TorchScript module, whose operations Python does not see"
    nd = len(shape) - 2
    tracer = _Tracer(nd)
    found: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if "annotation" not in found:
            found["annotation"] = tracer.annotation(output) if isinstance(output, torch.Tensor) else \
                _Unknown(f"the layer returns {type(output).__name__}, not a tensor")
            found["shape"] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        raise _Stop

    x = torch.zeros(shape, device="meta")
    tracer.note(x, _Field((1.0,) * nd, (0.0,) * nd, (1.0,) * nd))
    try:
        # through a view of the model: its eval mode and hook stay invisible to other threads calling the model
        with model_lock(model), _hookless_view(model) as view, torch.no_grad():
            with forward_hooks([(counterpart(view, name, module), hook)]), tracer:
                view(x)
    except _Stop:
        pass
    except Exception as error:  # noqa: BLE001  anything a meta forward cannot run (values read, custom code)
        return f"the model cannot run on meta tensors ({type(error).__name__}: {str(error)[:120]})"
    annotation = found.get("annotation")
    if annotation is None:
        return f"layer {name!r} did not run"
    if isinstance(annotation, _Unknown):
        return annotation.reason
    if not isinstance(annotation, _Field) or found["shape"] is None or len(found["shape"]) != len(shape) \
            or not tracer._standard(annotation):
        return "the layer's output is not a channel-first map on the input's spatial axes"
    return ReceptiveField(annotation.step, annotation.offset, annotation.size, "graph"), not tracer.shape_dependent


# ------------------------------------------------------------------------------------------ probe
#: Seed of the probe's first noise input (fixed: the probe gives the same answer every time).
PROBE_SEED = 20
#: Noise inputs whose gradients the probe adds up (one input's centroid strays by ~0.3 voxel).
PROBE_INPUTS = 4
_SNAP = 0.15


def _layer_output(model: nn.Module, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The target layer's output for ``x``, with its autograd graph to ``x`` (the rest of the model does not run)."""
    found: dict[str, torch.Tensor] = {}
    ancestor = scripted_ancestor(model, name)
    if ancestor is not None and ancestor[1] is not module:
        root_name, root = ancestor
        split = script_split(root, name[len(root_name) + 1:] if root_name else name)
        if root is model:
            return split.prefix(model, (x,))[0]

        def prefix(_module: nn.Module, inputs: tuple, _output: object) -> None:
            found["output"] = split.prefix(root, inputs)[0]
            raise _Stop

        hooks: list[tuple[nn.Module, Callable[..., None]]] = [(root, prefix)]
    else:
        def capture(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                found["output"] = output
            raise _Stop

        hooks = [(module, capture)]
    try:
        with forward_hooks(hooks):
            model(x)
    except _Stop:
        pass
    if "output" not in found:
        raise LayerError(f"Layer {name!r} did not run (or returned no tensor) for an input of shape {tuple(x.shape)}; "
                         "choose a layer on the path from input to output.")
    return found["output"]


def _cells(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The probed cells: the centre and two diagonal neighbours a quarter of the grid away."""
    centre = tuple((n - 1) // 2 for n in shape)
    delta = tuple(max(1, n // 4) if n >= 3 else (1 if n == 2 else 0) for n in shape)
    cells = {centre}
    for sign in (1, -1):
        cells.add(tuple(min(n - 1, max(0, c + sign * d)) for c, d, n in zip(centre, delta, shape)))
    return sorted(cells)


def _snap(step: float, n_in: int, n_out: int) -> float:
    """A fitted step made exact: the whole number (or one over a whole number) within 15 %; when the
    cells' centres were clipped by the input's borders (a fitted step shrinks toward the input's
    centre), the whole number nearest the fit among those that give ``n_out`` cells for ``n_in``
    voxels ("same" padding)."""
    consistent = [s for s in range(1, n_in + 1) if -(-n_in // s) == n_out]
    if consistent and not any(abs(step - s) <= _SNAP * s for s in consistent):
        return float(min(consistent, key=lambda s: (abs(s - step), -(s & -s))))
    for nice in (float(round(step)), 1.0 / round(1.0 / step) if step < 1 and round(1.0 / step) else None):
        if nice and abs(step - nice) <= _SNAP * nice:
            return nice
    return step


def _window_centroid(line: np.ndarray) -> float:
    """The centre of a gradient profile clipped by the input's borders: the ``|gradient|``-weighted mean
    over the widest window symmetric about it that lies inside the input (iterated from the plain mean,
    which the clipping pulls toward the input's centre)."""
    index = np.arange(line.size, dtype=np.float64)
    centre = float((line * index).sum() / line.sum())
    for _ in range(200):
        half = min(centre, line.size - 1 - centre)
        inside = np.abs(index - centre) <= half + 1e-9
        mass = float(line[inside].sum())
        if mass <= 0:
            break
        moved = float((line[inside] * index[inside]).sum() / mass)
        if abs(moved - centre) < 1e-9:
            break
        centre = moved
    return centre


def _probe(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...],
           device: torch.device | str | None) -> ReceptiveField:
    from .model_io import model_device_dtype

    model_device, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device or torch.device("cpu")
    nd = len(shape) - 2
    cells: list[tuple[int, ...]] = []
    sums: list[list[np.ndarray] | None] = []
    grid: tuple[int, ...] = ()
    # through a view of the model: its eval mode and hooks stay invisible to other threads calling the model
    with model_lock(model), _hookless_view(model) as view, torch.enable_grad(), \
            torch.jit.optimized_execution(False):
        target = counterpart(view, name, module)
        for draw in range(PROBE_INPUTS):  # one at a time: the memory of one pass
            generator = torch.Generator().manual_seed(PROBE_SEED + draw)
            x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype or torch.float32)
            x.requires_grad_(True)
            activations = _layer_output(view, name, target, x)
            if activations.ndim != len(shape) or not activations.requires_grad:
                raise LayerError(
                    f"Layer {name!r} outputs shape {tuple(activations.shape)}"
                    f"{'' if activations.requires_grad else ' that does not depend on the input'}; its receptive "
                    "field cannot be probed. Choose a convolutional layer (see medcam3d.list_layers).")
            if not cells:
                grid = tuple(int(n) for n in activations.shape[2:])
                cells = _cells(grid)
                sums = [None] * len(cells)
            for number, cell in enumerate(cells):
                index: tuple[int | slice, ...] = (0, slice(None), *cell)
                score = activations[index].float().sum()
                (gradient,) = torch.autograd.grad(score, x, retain_graph=number < len(cells) - 1, allow_unused=True)
                if gradient is None or not bool(torch.isfinite(gradient).all()):
                    raise LayerError(f"The output of layer {name!r} has no finite gradient with respect to the input "
                                     f"at cell {cell}, so its receptive field cannot be probed; pass "
                                     "placement='align_corners'.")
                weight = gradient.detach().abs().double().sum(dim=(0, 1))
                if not bool(weight.sum() > 0):
                    continue  # no gradient for this input (e.g. every channel of the cell is cut by a ReLU)
                lines = [(weight.sum(dim=tuple(a for a in range(nd) if a != axis)) if nd > 1 else weight)
                         .cpu().numpy() for axis in range(nd)]
                previous = sums[number]
                sums[number] = lines if previous is None else [p + q for p, q in zip(previous, lines)]
            del activations
    found = [number for number, lines in enumerate(sums) if lines is not None]
    if not found:
        raise LayerError(f"The output of layer {name!r} has no gradient with respect to the input at cells {cells}, "
                         "so its receptive field cannot be probed; pass placement='align_corners'.")
    cells = [cells[number] for number in found]
    profiles = [lines for lines in sums if lines is not None]
    step, offset, size = [], [], []
    for axis in range(nd):
        n_in = shape[2 + axis]
        positions, centres, exact = [], [], []
        for cell, profile in zip(cells, profiles):
            line = profile[axis]
            support = np.flatnonzero(line > 0)
            lo, hi = int(support[0]), int(support[-1])
            inside = lo > 0 and hi < n_in - 1
            centre = (lo + hi) / 2 if inside else _window_centroid(line)
            positions.append(cell[axis])
            centres.append(centre)
            exact.append(inside)
        central = min(range(len(cells)), key=lambda i: sum(abs(u - (n - 1) / 2) for u, n in zip(cells[i], grid)))
        line = profiles[central][axis]
        support = np.flatnonzero(line > 0)
        size.append(float(support[-1] - support[0] + 1))
        use = [i for i in range(len(cells)) if exact[i]]
        if len({positions[i] for i in use}) < 2:
            use = list(range(len(cells)))
        u = np.array([positions[i] for i in use], dtype=np.float64)
        c = np.array([centres[i] for i in use], dtype=np.float64)
        if len(set(u.tolist())) >= 2:
            slope = float(np.polyfit(u, c, 1)[0])
            fitted = slope if all(exact[i] for i in use) else _snap(slope, n_in, grid[axis])
            fitted = fitted if fitted > 0 else n_in / grid[axis]
        else:  # one cell along this axis: the step only matters for the grid's extent
            fitted = n_in / grid[axis]
        # The offset from the exact centres, else from the central cell (the least clipped one).
        anchors = [i for i in range(len(cells)) if exact[i]] or [central]
        offset.append(round(float(np.mean([centres[i] - fitted * positions[i] for i in anchors])), 6))
        step.append(round(fitted, 6))
    return ReceptiveField(tuple(step), tuple(offset), tuple(size), "probe")
