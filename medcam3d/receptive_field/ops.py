"""The vocabulary of the graph trace: a tensor's placement (:class:`Field` and the other annotations), the
operations grouped by what they do to the spatial axes, and helpers to read an operation's arguments."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Field:
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


CONST = "const"  # does not depend on the input (parameters, buffers, created tensors)


GLOBAL = "global"  # depends on the input, but has no spatial extent (pooled over the whole image)


@dataclass(frozen=True)
class Unknown:
    reason: str


Annotation = Any  # Field | CONST | GLOBAL | Unknown


def same_step(a: Field, b: Field) -> bool:
    return a.axes == b.axes and a.grid == b.grid and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a.step, b.step))


def fields_agree(a: Field, b: Field) -> bool:
    scale = max(1.0, *(abs(s) for s in a.step))
    return same_step(a, b) and all(abs(x - y) <= 1e-6 * scale for x, y in zip(a.offset, b.offset))


# Operations that act on each spatial position alone (or pool over channels, or normalize) and
# broadcast their operands: a cell stays where it is.
POINTWISE = {
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
SAME_SHAPE = {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm"}


# Reshapes that keep the last axes in row-major order when those axes keep their sizes.
LAYOUT = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "repeat", "unbind", "select",
           "split", "chunk", "tensor_split", "split_with_sizes", "cat", "concat", "concatenate", "stack", "narrow",
           "view_as", "reshape_as", "expand_as"}


# Products of two tensors: of two input-dependent ones (attention), or of a map and a constant matrix.
MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "einsum", "bilinear",
           "scaled_dot_product_attention", "tensordot", "inner", "outer", "dot", "mv"}


#: Distinct sizes that show where a permutation puts each dimension.
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}


REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nanmean",
           "nansum", "argmax", "argmin", "std_mean", "var_mean", "softmax", "log_softmax", "cumsum", "any", "all",
           "count_nonzero", "median"}


# Parameter names, in order, of the geometric operations (torch.nn.functional and torch).
CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


AVG_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


LP_POOL = ("input", "norm_type", "kernel_size", "stride", "ceil_mode")


INTERPOLATE = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


PAD = ("input", "pad", "mode", "value")


def bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def per_axis(value: Any, ndim: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * ndim
    if isinstance(value, (int, float)):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    return values if len(values) == ndim else values * ndim if len(values) == 1 else values[-ndim:]


def name_of(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a Tensor property (x.data, x.T ...)
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "property")
        return name if name == "data" else f"property {name}"
    if name.endswith("_") and not name.startswith("__"):  # in-place form
        name = name[:-1]
    return name


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def map_nested(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [map_nested(v, fn) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_nested(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_nested(v, fn) for k, v in value.items()}
    return value
