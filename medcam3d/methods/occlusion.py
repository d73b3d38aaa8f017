"""Occlusion at lesion scale: a gradient-free reference map from batched forward passes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product
from typing import Any

import torch

from ..errors import UsageError
from .passes import (
    PerturbationMethod,
    baseline_of,
    batches,
    check_budget,
    check_sigma,
    explanation,
    repeat_target,
    select_target,
)


def _per_axis(value: int | Sequence[int] | None, name: str, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) * len(spatial) if isinstance(value, int) else tuple(value)
    if len(values) != len(spatial) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UsageError(f"occlusion: {name} must be a positive int or {len(spatial)} positive ints, not {value!r}.")
    return values


def starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch starts along one axis: every ``stride`` voxels, plus one flush with the far edge."""
    last = size - patch
    found = list(range(0, last + 1, stride))
    if found[-1] != last:
        found.append(last)
    return found


class Occlusion(PerturbationMethod):
    r"""Occlusion: ``map^c(v)`` = mean, over the patches covering voxel ``v``, of ``y^c(x) − y^c(x_P)``.

    ``x_P`` is the input with the patch ``P`` replaced by the baseline (by default the input blurred
    at the patch's scale, so a patch loses its lesion-scale detail but keeps its intensity level: a
    patch of air or of bone is not turned into something else). A positive value: hiding that
    neighbourhood lowers the class logit. No gradients; every class map comes from the same forward
    passes. The maps lie on the input grid.

    Cost: one inference plus one forward pass per patch position and sample, ``batch_size`` at a
    time, without autograd. With the default patch (1/8 of each axis, rounded up) and stride (half
    the patch) a 3D input has 15³ = 3375 positions (about 3375 inferences); a call that would need
    more than ``max_forwards`` passes is refused before any work
    (:class:`~medcam3d.errors.MethodBudgetError`).

    Parameters
    ----------
    patch : int or sequence of int, optional
        Patch size in input voxels (per axis when a sequence); default ``ceil(size / 8)`` per axis,
        lesion scale for a field of view a few lesions wide.
    stride : int or sequence of int, optional
        Default half the patch (at least 1).
    baseline : {"blur", "zero", "mean"} or float
        What a patch is replaced with (:func:`medcam3d.methods.passes.baseline_of`).
    sigma : float, optional
        Width of the ``"blur"`` baseline in voxels; default a quarter of the patch on each axis.
    batch_size, max_forwards : int
        Occluded inputs per forward pass, and the most forward passes one call may run
        (:class:`~medcam3d.methods.passes.PerturbationMethod`).

    References
    ----------
    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv:1311.2901.
    """

    name = "occlusion"

    def __init__(self, patch: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                 baseline: str | float = "blur", sigma: float | None = None, batch_size: int = 4,
                 max_forwards: int = 4096) -> None:
        for value, label in ((patch, "patch"), (stride, "stride")):
            if value is not None:
                _per_axis(value, label, (0,) if isinstance(value, int) else tuple(0 for _ in value))
        self.patch = patch if patch is None or isinstance(patch, int) else tuple(patch)
        self.stride = stride if stride is None or isinstance(stride, int) else tuple(stride)
        super().__init__(baseline, batch_size, max_forwards)
        self.sigma = None if sigma is None else check_sigma(sigma, "sigma", self.name)

    def geometry(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]:
        """Patch size, stride and every patch start for an input of spatial shape ``spatial``."""
        patch = _per_axis(self.patch, "patch", spatial) or tuple(math.ceil(n / 8) for n in spatial)
        patch = tuple(min(p, n) for p, n in zip(patch, spatial))
        stride = _per_axis(self.stride, "stride", spatial) or tuple(max(1, p // 2) for p in patch)
        positions = list(product(*(starts(n, p, s) for n, p, s in zip(spatial, patch, stride))))
        return patch, stride, positions

    def explain(self, engine: Any, inputs: torch.Tensor, x: object, target: object, *, relu: bool,
                input_affine: Any) -> Any:
        spatial = tuple(int(n) for n in inputs.shape[2:])
        patch, stride, positions = self.geometry(spatial)
        batch = inputs.shape[0]
        check_budget(self.name, batch * len(positions), self.max_forwards,
                     f"{len(positions)} patch positions x {batch} samples: patch {patch}, stride {stride} on {spatial}",
                     "use a larger patch or stride (Occlusion(patch=..., stride=...)), or explain fewer samples at a time")
        clean = engine._pass(inputs, (), target, x=x, track=False)
        sigma = self.sigma if self.sigma is not None else [p / 4 for p in patch]
        with torch.no_grad():
            reference = baseline_of(inputs, self.baseline, sigma)
        # rows: (sample, position) pairs, sample-major
        pairs = [(b, p) for b in range(batch) for p in range(len(positions))]
        every = repeat_target(clean.target, len(positions))
        targets = clean.scores.shape[1]
        total = torch.zeros((batch, targets, *spatial), device=inputs.device, dtype=torch.float32)
        count = torch.zeros(spatial, device=inputs.device, dtype=torch.float32)
        for position in positions:
            count[tuple(slice(s, s + p) for s, p in zip(position, patch))] += 1
        for chunk in batches(len(pairs), self.batch_size):
            with torch.no_grad():
                occluded = inputs[[b for b, _ in pairs[chunk]]].clone()
                for row, (b, p) in enumerate(pairs[chunk]):
                    window: tuple[Any, ...] = tuple(slice(s, s + q) for s, q in zip(positions[p], patch))
                    occluded[(row, slice(None), *window)] = reference[(b, slice(None), *window)]
            run = engine._pass(occluded, (), select_target(every, chunk), track=False, perturbed=True)
            drops = clean.scores.float()[[b for b, _ in pairs[chunk]]] - run.scores.float()  # (n, T)
            for row, (b, p) in enumerate(pairs[chunk]):
                window = tuple(slice(s, s + q) for s, q in zip(positions[p], patch))
                total[(b, slice(None), *window)] += drops[row].reshape(targets, *([1] * len(spatial)))
        maps = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        diagnostics = {"patch": patch, "stride": stride, "forwards": len(pairs) + 1}
        return explanation(engine, clean, inputs=inputs, input_affine=input_affine, maps=maps,
                           layer="input", relu=relu, diagnostics=diagnostics)

    def __repr__(self) -> str:
        return (f"Occlusion(patch={self.patch!r}, stride={self.stride!r}, baseline={self.baseline!r}, "
                f"batch_size={self.batch_size}, max_forwards={self.max_forwards})")
