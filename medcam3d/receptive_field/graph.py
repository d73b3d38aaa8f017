"""The receptive field read from the graph: one forward pass on meta tensors under a
:class:`~torch.overrides.TorchFunctionMode` that composes the geometry of every operation (see
:mod:`medcam3d.receptive_field`, ``"graph"``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..hooks import counterpart, forward_hooks, model_lock
from ..torchscript import is_scripted, scripted_ancestor
from .field import ReceptiveField
from .ops import (AVG_POOL, CONST, CONV, CONV_T, GLOBAL, INTERPOLATE, LAYOUT, LP_POOL, MATMUL, MAX_POOL, PAD, PERMUTE,
                  POINTWISE, PRIMES, REDUCE, SAME_SHAPE, Annotation, Field, Unknown, bind, fields_agree, map_nested,
                  name_of, per_axis, same_step, tensors_in)
from .view import Stop, hookless_view


class _Tracer(TorchFunctionMode):
    """Runs a forward pass on meta tensors and annotates every tensor with its placement."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.notes: dict[int, tuple[torch.Tensor, Annotation]] = {}
        self.meta: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shape_dependent = False

    # -- bookkeeping
    def note(self, tensor: torch.Tensor, annotation: Annotation) -> None:
        self.notes[id(tensor)] = (tensor, annotation)

    def annotation(self, tensor: torch.Tensor) -> Annotation:
        if tensor.device.type != "meta":  # a parameter, a buffer or another tensor from outside
            copy = self.meta.get(id(tensor))  # unless input-dependent values were written into its meta copy
            return self.annotation(copy[1]) if copy is not None and copy[0] is tensor else CONST
        found = self.notes.get(id(tensor))
        if found is None or found[0] is not tensor:
            return Unknown("a tensor produced outside PyTorch's Python API (e.g. a TorchScript module)")
        return found[1]

    def _to_meta(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        found = self.meta.get(id(tensor))
        if found is None or found[0] is not tensor:
            converted = tensor.detach().to("meta")
            self.meta[id(tensor)] = (tensor, converted)
            self.note(converted, CONST)
            return converted
        return found[1]

    # -- the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = name_of(func)
        inputs = [(t, self.annotation(t)) for t in tensors_in((args, kwargs))]
        args, kwargs = map_nested(args, self._to_meta), map_nested(kwargs, self._to_meta)
        if name in SAME_SHAPE and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            # a normalization's output has its input's shape and dtype: no need to run it (on meta
            # tensors PyTorch runs batch_norm through its Python decompositions, ~10 ms a call)
            out = torch.empty_like(args[0])
        else:
            out = func(*args, **kwargs)
        if name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            self.note(args[0], self._setitem(inputs))
            return out
        outputs = list(tensors_in(out))
        if not outputs:
            return out
        try:
            annotation = self._rule(name, func, args, kwargs, inputs, outputs)
        except Exception as error:  # noqa: BLE001  an argument form this reader does not know: not readable
            annotation = Unknown(f"{name}: {type(error).__name__}")
        for tensor in outputs:
            self.note(tensor, annotation)
        return out

    # -- layouts: where a field's spatial axes are among a tensor's dimensions
    def _standard(self, field: Field) -> bool:
        """Whether the spatial axes are the tensor's last ``ndim`` dimensions (a channel-first map)."""
        return not field.grid and (not field.axes or field.axes == tuple(range(-self.ndim, 0)))

    def _dims(self, field: Field, rank: int) -> list[int] | None:
        """The (non-negative) dimensions of a rank-``rank`` tensor that hold the field's spatial axes."""
        axes = field.axes or tuple(range(-self.ndim, 0))
        if any(a < -rank for a in axes):
            return None
        return [rank + a for a in axes]

    def _fits(self, field: Field, tensor: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``out`` has the field's spatial dimensions where ``tensor`` has them, with the same sizes."""
        dims, into = self._dims(field, tensor.ndim), self._dims(field, out.ndim)
        return dims is not None and into is not None and all(
            int(tensor.shape[d]) == int(out.shape[e]) for d, e in zip(dims, into))

    def _moved(self, field: Field, tensor: torch.Tensor, out: torch.Tensor, where: Callable[[int], int | None],
               what: str) -> Annotation:
        """The field on ``out``, whose dimension ``where(d)`` is ``tensor``'s dimension ``d`` (None: gone)."""
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return Unknown(f"{what} on a tensor of fewer dimensions than its spatial axes")
        moved = [where(d) for d in dims]
        if any(m is None or m < 0 or m >= out.ndim or int(out.shape[m]) != int(tensor.shape[d])
               for m, d in zip(moved, dims)):
            return Unknown(f"{what} changes the spatial layout")
        axes = tuple(int(m) - out.ndim for m in moved if m is not None)
        if not field.grid and axes == tuple(range(-self.ndim, 0)):
            axes = ()
        return replace(field, axes=axes)

    # -- rules
    def _setitem(self, inputs: list) -> Annotation:
        target = inputs[0][1] if inputs else CONST
        values = [a for _, a in inputs[1:]]
        if any(isinstance(a, (Field, Unknown)) for a in values):
            return Unknown("__setitem__ of input-dependent values")
        return target

    def _rule(self, name: str, func: Any, args: tuple, kwargs: dict, inputs: list, outputs: list) -> Annotation:
        annotations = [a for _, a in inputs]
        spatial = [a for a in annotations if isinstance(a, (Field, Unknown))]
        if not spatial:
            return GLOBAL if any(a == GLOBAL for a in annotations) else CONST
        first, main = inputs[0] if inputs else (None, None)
        out = outputs[0]
        nd = self.ndim
        if name in MATMUL and sum(a != CONST for a in annotations) >= 2:
            # attention, Gram matrices: every position mixed with every other by content, like a gate
            # computed from the whole image; the residual path that adds it back keeps the cells' places
            return GLOBAL
        if name.endswith("d_with_indices"):  # max_pool3d_with_indices
            name = name[: -len("_with_indices")]
        base = name[:-2] if name[-2:] in ("1d", "2d", "3d") else name
        rank = int(name[-2]) if base != name else None
        if base in ("adaptive_avg_pool", "adaptive_max_pool") and isinstance(main, (Field, Unknown)) and first is not None:
            return self._adaptive(first, out, main)
        if isinstance(main, Unknown):
            return main
        if any(isinstance(a, Unknown) for a in annotations):
            return next(a for a in annotations if isinstance(a, Unknown))
        if name in POINTWISE or name in ("cat", "concat", "concatenate", "stack"):
            return self._combine(name, args, kwargs, inputs, out)
        if not isinstance(main, Field) or first is None:
            return self._second_operand(name, inputs, out)
        if base in ("conv", "conv_transpose", "max_pool", "avg_pool", "lp_pool"):
            if rank != nd or first.ndim < nd or not self._standard(main):
                return Unknown(f"{name} on a tensor whose last axes are not the input's spatial axes")
            return self._window(base, args, kwargs, main, first)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            if not self._standard(main):
                return Unknown(f"{name} on a tensor whose last axes are not the input's spatial axes")
            return self._interpolate(name, args, kwargs, main, first, out)
        if name in ("linear", *MATMUL):
            return self._linear(name, main, first, out)
        if name == "pad":
            return self._pad(args, kwargs, main, first)
        if name == "__getitem__":
            return self._getitem(args, main, first, out)
        if name == "roll":
            return self._roll(args, kwargs, main, first, out)
        if name in PERMUTE:
            return self._permute(name, func, args, kwargs, main, first, out)
        if name in REDUCE:
            return self._reduce(name, args, kwargs, main, first, out)
        if name in LAYOUT:
            return self._layout(name, args, kwargs, main, first, out)
        return Unknown(f"the operation {name!r}")

    def _combine(self, name: str, args: tuple, kwargs: dict, inputs: list, out: torch.Tensor) -> Annotation:
        """Operands broadcast position by position (or are joined along another axis): their fields must
        agree; fields of equal step and extent joined along channels (a patch merging, a space-to-depth)
        make one field over their union."""
        fields: list[Field] = []
        for tensor, annotation in inputs:
            if not isinstance(annotation, Field):
                continue
            if name == "stack":  # a new dimension: those after it move by one
                at = int(kwargs.get("dim", args[1] if len(args) > 1 else 0)) % out.ndim

                def shifted(d: int) -> int:
                    return d if d < at else d + 1

                annotation = self._moved(annotation, tensor, out, shifted, name)
                if isinstance(annotation, Unknown):
                    return annotation
                fields.append(annotation)
            elif self._fits(annotation, tensor, out):
                fields.append(annotation)
            elif (dims := self._dims(annotation, tensor.ndim)) is not None and all(tensor.shape[d] == 1 for d in dims):
                continue  # one value per image, broadcast over space
            else:
                return Unknown(f"{name} of tensors on different grids")
        if not fields:
            return GLOBAL
        first = fields[0]
        if all(fields_agree(first, other) for other in fields[1:]):
            size = tuple(max(f.size[i] for f in fields) for i in range(self.ndim))
            return replace(first, size=size)
        if name in ("cat", "concat", "concatenate", "stack") and all(
                same_step(first, other) and other.size == first.size for other in fields[1:]):
            low = [min(f.offset[i] for f in fields) for i in range(self.ndim)]
            high = [max(f.offset[i] for f in fields) for i in range(self.ndim)]
            return replace(first, offset=tuple((a + b) / 2 for a, b in zip(low, high)),
                           size=tuple(s + b - a for s, a, b in zip(first.size, low, high)))
        other = next(f for f in fields[1:] if not fields_agree(first, f))
        return Unknown(f"{name} joins paths whose cells are placed differently "
                        f"({first.offset} vs {other.offset}, steps {first.step} vs {other.step})")

    def _second_operand(self, name: str, inputs: list, out: torch.Tensor) -> Annotation:
        """``W @ x``: a constant matrix times a map, over its second-to-last dimension."""
        if name in ("matmul", "__matmul__", "__rmatmul__") and len(inputs) == 2:
            (left, a), (right, b) = inputs
            if name == "__rmatmul__":
                (left, a), (right, b) = (right, b), (left, a)
            if a == CONST and isinstance(b, Field) and right.ndim >= 2 and out.ndim == right.ndim:
                dims = self._dims(b, right.ndim)
                if dims is not None and right.ndim - 2 not in dims:
                    return self._moved(b, right, out, lambda d: d, name)
        return Unknown(f"{name} with a spatial map that is not its first operand")

    def _linear(self, name: str, field: Field, tensor: torch.Tensor, out: torch.Tensor) -> Annotation:
        """``x @ W`` (``F.linear``, ``matmul`` by a constant): mixes the last dimension only."""
        if name in ("linear", "matmul", "__matmul__", "mm", "bmm") and out.ndim == tensor.ndim:
            dims = self._dims(field, tensor.ndim)
            if dims is not None and tensor.ndim - 1 not in dims:
                return self._moved(field, tensor, out, lambda d: d, name)
        return Unknown(f"{name} over a spatial axis")

    def _window(self, base: str, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor) -> Annotation:
        nd = self.ndim
        if base == "conv" or base == "conv_transpose":
            bound = bind(CONV if base == "conv" else CONV_T, args, kwargs)
            kernel = tuple(int(k) for k in bound["weight"].shape[2:])
            stride = per_axis(bound.get("stride"), nd, 1)
            dilation = per_axis(bound.get("dilation"), nd, 1)
            padding = bound.get("padding", 0)
            if isinstance(padding, str):
                if padding == "same":
                    pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
                elif padding == "valid":
                    pad = (0,) * nd
                else:
                    return Unknown(f"padding={padding!r}")
            else:
                pad = per_axis(padding, nd, 0)
        else:
            names = {"max_pool": MAX_POOL, "avg_pool": AVG_POOL, "lp_pool": LP_POOL}[base]
            bound = bind(names, args, kwargs)
            kernel = per_axis(bound["kernel_size"], nd, 1)
            stride_arg = bound.get("stride")
            stride = kernel if stride_arg is None or (isinstance(stride_arg, (list, tuple)) and not stride_arg) \
                else per_axis(stride_arg, nd, 1)
            pad = per_axis(bound.get("padding", 0), nd, 0)
            dilation = per_axis(bound.get("dilation", 1), nd, 1)
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
        return Field(tuple(step), tuple(offset), tuple(size))

    def _adaptive(self, tensor: torch.Tensor, out: torch.Tensor, field: Annotation) -> Annotation:
        nd = self.ndim
        sizes_in, sizes_out = tuple(tensor.shape[-nd:]), tuple(out.shape[-nd:])
        if all(n == 1 for n in sizes_out) and (not isinstance(field, Field) or self._standard(field)):
            return GLOBAL
        if isinstance(field, Unknown):
            return field
        if not self._standard(field):
            return Unknown("adaptive pooling of a tensor whose last axes are not the input's spatial axes")
        self.shape_dependent = True
        step, offset, size = [], [], []
        for axis in range(nd):
            n, m = sizes_in[axis], sizes_out[axis]
            if n % m:
                return Unknown(f"adaptive pooling from {sizes_in} to {sizes_out} (not a whole-number pooling)")
            k = n // m
            step.append(field.step[axis] * k)
            offset.append(field.offset[axis] + field.step[axis] * (k - 1) / 2)
            size.append(field.size[axis] + (k - 1) * field.step[axis])
        return Field(tuple(step), tuple(offset), tuple(size))

    def _interpolate(self, name: str, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor,
                     out: torch.Tensor) -> Annotation:
        nd = self.ndim
        bound = bind(INTERPOLATE[:3] if name != "interpolate" else INTERPOLATE, args, kwargs)
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
                return Unknown(f"interpolate(mode={mode!r}) from {sizes_in} to {sizes_out}")
            step.append(st * ratio)
            offset.append(of + st * shift)
            size.append(sz + reach * st)
        return Field(tuple(step), tuple(offset), tuple(size))

    def _pad(self, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor) -> Annotation:
        bound = bind(PAD, args, kwargs)
        pads = [int(p) for p in bound["pad"]]
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return Unknown("pad of a tensor of fewer dimensions than its spatial axes")
        offset = list(field.offset)
        for pair in range(len(pads) // 2):  # (left, right) per dimension, from the last one backwards
            dim, left, right = tensor.ndim - 1 - pair, pads[2 * pair], pads[2 * pair + 1]
            if not (left or right) or dim not in dims:
                continue
            if field.grid:
                return Unknown("padding of a token sequence")
            axis = dims.index(dim)
            self.shape_dependent = True
            offset[axis] -= left * field.step[axis]
        return replace(field, offset=tuple(offset))

    def _getitem(self, args: tuple, field: Field, tensor: torch.Tensor, out: torch.Tensor) -> Annotation:
        index = args[1] if len(args) > 1 else ()
        items = list(index) if isinstance(index, tuple) else [index]
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return Unknown("indexing a tensor of fewer dimensions than its spatial axes")
        if any(isinstance(item, (torch.Tensor, list, np.ndarray, bool)) for item in items):
            # advanced indexing: of dimensions before the spatial ones only (their places from the end stay)
            simple = not any(item is Ellipsis or item is None for item in items)
            return field if simple and len(items) <= min(dims) and self._fits(field, tensor, out) else \
                Unknown("advanced indexing of spatial axes")
        ellipsis = [i for i, item in enumerate(items) if item is Ellipsis]
        if len(ellipsis) > 1:
            return Unknown("indexing with several ellipses")
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
                        return Unknown("reversed spatial axis")
                    if field.grid:
                        if (start, stop, stride) != (0, int(tensor.shape[dim]), 1):
                            return Unknown("slicing of a token sequence")
                    else:
                        axis = dims.index(dim)
                        if start or stride != 1:
                            self.shape_dependent = True
                        offset[axis] += start * step[axis]
                        step[axis] *= stride
                where[dim] = position
                position += 1
            elif dim in dims:
                return Unknown("integer index of a spatial axis")
            dim += 1
        axes = tuple(where[d] - out.ndim for d in dims)
        if not field.grid and axes == tuple(range(-self.ndim, 0)):
            axes = ()
        return replace(field, step=tuple(step), offset=tuple(offset), axes=axes)

    def _dim_list(self, value: Any, ndim: int) -> list[int]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [int(v) % ndim for v in values]

    def _roll(self, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor, out: torch.Tensor) -> Annotation:
        rolled = kwargs.get("dims", args[2] if len(args) > 2 else None)
        dims = self._dims(field, tensor.ndim)
        if rolled is None or dims is None or set(self._dim_list(rolled, tensor.ndim)) & set(dims):
            return Unknown("roll (a cyclic shift) of a spatial axis")
        return field

    def _permute(self, name: str, func: Any, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor,
                 out: torch.Tensor) -> Annotation:
        if tensor.ndim > len(PRIMES):
            return Unknown(f"{name} of a tensor of {tensor.ndim} dimensions")
        # the same operation on a tensor whose sizes are distinct primes tells where each dimension goes
        moved = func(torch.empty(PRIMES[:tensor.ndim], device="meta"), *args[1:], **kwargs)
        position = {int(n): i for i, n in enumerate(moved.shape)}
        return self._moved(field, tensor, out, lambda d: position.get(PRIMES[d]), name)

    def _reduce(self, name: str, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor,
                out: torch.Tensor) -> Annotation:
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            # the element-wise maximum of two tensors
            return self._combine(name, args, kwargs, [(t, self.annotation(t)) for t in args[:2]], out)
        position = 2 if name == "norm" else 1
        dim = kwargs.get("dim", args[position] if len(args) > position else None)
        if dim is None:
            return GLOBAL
        dims = self._dims(field, tensor.ndim)
        if dims is None:
            return Unknown(f"{name} of a tensor of fewer dimensions than its spatial axes")
        reduced = set(self._dim_list(dim, tensor.ndim))
        spatial = set(dims)
        if name in ("softmax", "log_softmax", "cumsum"):
            if spatial & reduced:
                return Unknown(f"{name} along a spatial axis")
            return self._moved(field, tensor, out, lambda d: d, name)
        if spatial <= reduced:
            return GLOBAL
        if spatial & reduced:
            return Unknown(f"{name} over some of the spatial axes")
        if out.ndim == tensor.ndim:  # keepdim
            return self._moved(field, tensor, out, lambda d: d, name)
        return self._moved(field, tensor, out, lambda d: d - sum(r < d for r in reduced), name)

    def _layout(self, name: str, args: tuple, kwargs: dict, field: Field, tensor: torch.Tensor,
                out: torch.Tensor) -> Annotation:
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
                return Unknown(f"{name} along a spatial axis")
            return self._moved(field, tensor, out, lambda d: d, name)
        if name in ("expand", "expand_as", "repeat"):  # dimensions added in front; the others keep their sizes
            return self._moved(field, tensor, out, lambda d: d + out.ndim - tensor.ndim, name)
        return self._reshape(name, field, tensor, out)

    def _reshape(self, name: str, field: Field, tensor: torch.Tensor, out: torch.Tensor) -> Annotation:
        """A reshape (view, flatten, unflatten, squeeze ...): a dimension of the output with the size of a
        spatial dimension and as many elements after it indexes the same positions; spatial dimensions
        in a row flattened into one make a token sequence, and a token sequence unflattened into its
        grid is a spatial map again."""
        shape_in, shape_out = [int(n) for n in tensor.shape], [int(n) for n in out.shape]
        dims = self._dims(field, tensor.ndim)
        if dims is None or math.prod(shape_in) != math.prod(shape_out):
            return Unknown(f"{name} changes the spatial layout")
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
            return Unknown(f"{name} changes the spatial layout of a token sequence")
        moved = [find(shape_in[d], after(shape_in, d), d - len(shape_in)) for d in dims]
        if all(m is not None for m in moved) and all(a < b for a, b in zip(moved, moved[1:])):  # type: ignore[operator]
            axes = tuple(int(m) - rank for m in moved if m is not None)
            return replace(field, axes=() if axes == standard else axes)
        if dims == list(range(dims[0], dims[0] + len(dims))):  # the spatial dimensions in a row, flattened
            flat = find(math.prod(shape_in[d] for d in dims), after(shape_in, dims[-1]), dims[0] - len(shape_in))
            if flat is not None:
                return replace(field, axes=(flat - rank,), grid=tuple(shape_in[d] for d in dims))
        return Unknown(f"{name} changes the spatial layout")


def trace_graph(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...]) \
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
                Unknown(f"the layer returns {type(output).__name__}, not a tensor")
            found["shape"] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        raise Stop

    x = torch.zeros(shape, device="meta")
    tracer.note(x, Field((1.0,) * nd, (0.0,) * nd, (1.0,) * nd))
    try:
        # through a view of the model: its eval mode and hook stay invisible to other threads calling the model
        with model_lock(model), hookless_view(model) as view, torch.no_grad():
            with forward_hooks([(counterpart(view, name, module), hook)]), tracer:
                view(x)
    except Stop:
        pass
    except Exception as error:  # noqa: BLE001  anything a meta forward cannot run (values read, custom code)
        return f"the model cannot run on meta tensors ({type(error).__name__}: {str(error)[:120]})"
    annotation = found.get("annotation")
    if annotation is None:
        return f"layer {name!r} did not run"
    if isinstance(annotation, Unknown):
        return annotation.reason
    if not isinstance(annotation, Field) or found["shape"] is None or len(found["shape"]) != len(shape) \
            or not tracer._standard(annotation):
        return "the layer's output is not a channel-first map on the input's spatial axes"
    return ReceptiveField(annotation.step, annotation.offset, annotation.size, "graph"), not tracer.shape_dependent
