"""The receptive field found by a gradient probe: where a few cells' gradients with respect to seeded noise
inputs lie (see :mod:`medcam3d.receptive_field`, ``"probe"``); the fallback where the graph cannot be read,
and the reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import LayerError
from ..hooks import counterpart, forward_hooks, model_lock
from ..torchscript import script_split, scripted_ancestor
from .field import ReceptiveField
from .view import Stop, hookless_view


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
            raise Stop

        hooks: list[tuple[nn.Module, Callable[..., None]]] = [(root, prefix)]
    else:
        def capture(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                found["output"] = output
            raise Stop

        hooks = [(module, capture)]
    try:
        with forward_hooks(hooks):
            model(x)
    except Stop:
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


def probe_field(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...],
           device: torch.device | str | None) -> ReceptiveField:
    from ..model_io import model_device_dtype

    model_device, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device or torch.device("cpu")
    nd = len(shape) - 2
    cells: list[tuple[int, ...]] = []
    sums: list[list[np.ndarray] | None] = []
    grid: tuple[int, ...] = ()
    # through a view of the model: its eval mode and hooks stay invisible to other threads calling the model
    with model_lock(model), hookless_view(model) as view, torch.enable_grad(), \
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
