"""Mirror test-time augmentation: a map per mirrored pass, flipped back, averaged with the others.

nnU-Net predicts a scan once as it is and once flipped along every non-empty subset of its mirror
axes (``inference_allowed_mirroring_axes`` in each fold's checkpoint; 8 passes for three axes),
flips each prediction back and averages them. :func:`explain_mirrored` does the same with the
explanations: each pass explains the flipped input, its maps and logits are flipped back, and the
maps, logits and scores of all passes are averaged.

Geometry: the flip of a pass is exact on the cell grid of the maps. The input is first padded at
its far end to the grid the unflipped pass explained (sliding windows pad to a multiple of the
feature stride), and that padded grid is flipped, so cell ``c`` of a flipped pass is cell
``n - 1 - c`` of the unflipped grid, with no resampling. Every cell covers the same input voxels in
every pass; only where inside its cell a flipped pass's receptive field is centred may differ
(by less than one cell: the network itself is not mirror-symmetric). The averaged maps keep the
placement of the unflipped pass.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import InputError
from .explanation import Explanation
from .targets import Region

__all__ = ["mirror_combinations", "explain_mirrored"]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The flips of the mirrored passes, as nnU-Net orders them: every non-empty subset of ``axes``.

    Parameters
    ----------
    axes : sequence of int
        Spatial axes (0 = the first spatial axis of the input).

    Returns
    -------
    list of tuple of int
        ``2**len(axes) - 1`` subsets, smallest first (the unflipped pass is not listed).
    """
    unique = sorted({int(a) for a in axes})
    return [c for size in range(1, len(unique) + 1) for c in itertools.combinations(unique, size)]


def explain_mirrored(explain: Callable[[torch.Tensor, object], Explanation], x: torch.Tensor, target: object,
                     axes: Sequence[int]) -> Explanation:
    """Explain ``x`` as it is and flipped along every subset of ``axes``; return the mean.

    Parameters
    ----------
    explain : callable
        ``explain(batch, target) -> Explanation``: e.g. an :class:`~medcam3d.explainer.Explainer`
        call, or :func:`medcam3d.sliding.explain_sliding_window` with its settings.
    x : (B, C_in, *spatial) Tensor or MetaTensor
    target : object
        As ``explain`` takes it. A ``Region`` mask (on the input grid, or on another grid with
        ``space=``, resampled onto the input grid first) is flipped with the input.
    axes : sequence of int
        Spatial axes to mirror (nnU-Net's ``inference_allowed_mirroring_axes``); empty: one plain
        call of ``explain``, unchanged.

    Returns
    -------
    Explanation
        ``maps``, ``logits`` and ``scores``: the mean over the ``2**len(axes)`` passes, on the grid
        (``input_shape``, ``feature_shape``, ``input_affine``, placement) of the unflipped pass.
        The scores are the mean of each pass's own scores.

    Raises
    ------
    InputError
        An axis outside the input's spatial axes, or a grid whose size along a mirrored axis is not
        a multiple of the feature grid's (the flipped cells would not fall on the same cells: explain
        through sliding windows, which pad the input to a multiple of the feature stride).
    """
    first = explain(x, target)
    combinations = mirror_combinations(axes)
    if not combinations:
        return first
    spatial = tuple(int(n) for n in x.shape[2:])
    bad = [a for a in {a for c in combinations for a in c} if not 0 <= a < len(spatial)]
    if bad:
        raise InputError(f"mirror axes {sorted(bad)} are outside the input's {len(spatial)} spatial axes (0 to {len(spatial) - 1}).")
    grid, cells = tuple(first.input_shape), tuple(first.feature_shape)
    mirrored_axes = sorted({a for c in combinations for a in c})
    if len(grid) != len(spatial) or any(grid[a] < spatial[a] or grid[a] % cells[a] for a in mirrored_axes):
        message = (f"mirroring needs a grid whose size is a multiple of the feature grid along each mirrored axis, so that a "
                   f"flipped map falls on the same cells; the input grid {grid} has feature grid {cells}. Explain through "
                   "sliding windows (they pad the input to a multiple of the feature stride).")
        raise InputError(message)
    plain = x.as_tensor() if hasattr(x, "as_tensor") else x
    pad = [p for n, g in zip(reversed(spatial), reversed(grid)) for p in (0, g - n)]
    padded = torch.nn.functional.pad(plain, pad) if any(pad) else plain
    flippable = _flippable_target(target, x, spatial, grid)
    passes = [first]
    for combination in combinations:
        dims = [2 + a for a in combination]
        found = explain(torch.flip(padded, dims), _flipped_target(flippable, combination, len(spatial)))
        if tuple(found.feature_shape) != cells or tuple(found.input_shape) != grid:
            raise InputError(f"a mirrored pass explained the grid {tuple(found.input_shape)} -> {tuple(found.feature_shape)}, "
                             f"not the unflipped pass's {grid} -> {cells}.")
        logits = found.logits
        if logits.ndim > 2:
            logits = torch.flip(logits, [logits.ndim - len(spatial) + a for a in combination])
        passes.append(dataclasses.replace(found, maps=torch.flip(found.maps, [found.maps.ndim - len(cells) + a for a in combination]),
                                          logits=logits))
    for other in passes[1:]:
        if other.targets != first.targets or other.maps.shape != first.maps.shape or other.logits.shape != first.logits.shape:
            message = (f"the mirrored passes explained different classes or grids ({first.targets} vs {other.targets}); give the "
                       "classes to explain (e.g. --target 1).")
            raise InputError(message)

    def mean(name: str) -> torch.Tensor:
        total = getattr(first, name).float().clone()
        for other in passes[1:]:
            total += getattr(other, name).float()
        return total / len(passes)

    return dataclasses.replace(first, maps=mean("maps"), logits=mean("logits"), scores=mean("scores"))


def _flippable_target(target: object, x: object, spatial: tuple[int, ...], grid: tuple[int, ...]) -> object:
    """A ``Region`` with a mask as a tensor on the padded input grid; any other target as it is."""
    if not isinstance(target, Region) or target.mask is None:
        return target
    if target.space is not None:
        from .sliding import region_on_input_grid

        target = region_on_input_grid(target, x, spatial)
        assert isinstance(target, Region)
    mask = target.mask
    tensor = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    tensor = tensor.float()
    if tuple(tensor.shape[-len(spatial):]) == spatial and spatial != grid:
        pad = [p for n, g in zip(reversed(spatial), reversed(grid)) for p in (0, g - n)]
        tensor = torch.nn.functional.pad(tensor, pad)
    return Region(target.classes, mask=tensor)


def _flipped_target(target: object, combination: tuple[int, ...], rank: int) -> object:
    """``target`` with a ``Region``'s mask (its last ``rank`` axes spatial) flipped along ``combination``."""
    if not isinstance(target, Region) or not isinstance(target.mask, torch.Tensor):
        return target
    mask = target.mask
    return Region(target.classes, mask=torch.flip(mask, [mask.ndim - rank + a for a in combination]))
