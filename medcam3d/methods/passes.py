"""What the methods beyond one layer share: baselines, repeated targets, chunked passes, results.

The input-level methods (:mod:`.gradxinput`, :mod:`.smoothgrad`, :mod:`.integrated_gradients`), the
multi-layer one (:mod:`.fused`) and the perturbation references (:mod:`.occlusion`, :mod:`.scorecam`)
run their passes through the engine (:meth:`medcam3d.explainer.Explainer._pass`: the model's view,
eval mode, output activation, target resolution, one batched vector–Jacobian product for all
classes) and assemble their :class:`~medcam3d.explanation.Explanation` with the engine's
``_result``. Nothing in this module runs the model itself, and it does not import the engine (which
imports the methods).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MethodBudgetError, UsageError
from ..targets import ClassTarget, RegionTarget, Target
from .base import Method

if TYPE_CHECKING:  # the engine imports this package: no import cycle at run time
    from ..explainer import Explainer
    from ..explanation import Explanation, Pass

__all__ = ["PerturbationMethod", "BASELINES", "baseline_of", "gaussian_blur", "repeat_target", "select_target", "batches", "check_budget",
           "explanation", "input_placement", "feature_grid", "onto", "check_positive_int", "check_sigma"]

#: Reference inputs the input-level and perturbation methods measure against (see :func:`baseline_of`).
BASELINES = ("blur", "zero", "mean")


def check_positive_int(value: object, name: str, method: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, or a :class:`~medcam3d.errors.UsageError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise UsageError(f"{method}: {name} must be an integer >= {minimum}, not {value!r}.")
    return int(value)


def check_sigma(value: object, name: str, method: str) -> float:
    """A finite, non-negative float (a width in voxels or a noise level)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) < 0:
        raise UsageError(f"{method}: {name} must be a finite number >= 0, not {value!r}.")
    return float(value)


def check_baseline(value: object, method: str) -> str | float:
    """One of :data:`BASELINES` or a finite number."""
    if isinstance(value, str) and value.lower() in BASELINES:
        return value.lower()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    raise UsageError(f"{method}: baseline must be one of {', '.join(repr(b) for b in BASELINES)} or a number, not {value!r}.")


def gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of every channel over the spatial axes, edges repeated.

    Parameters
    ----------
    x : (B, C, *spatial) Tensor
    sigma : float or sequence of float
        Standard deviation per spatial axis, in voxels; 0 leaves an axis as it is. The kernel is
        truncated at ``3 σ`` (and at the axis length).

    Returns
    -------
    (B, C, *spatial) Tensor
        Same dtype (computed in at least float32).
    """
    spatial = x.ndim - 2
    sigmas = [float(sigma)] * spatial if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    out = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    batch, channels = out.shape[:2]
    for axis, s in enumerate(sigmas):
        size = out.shape[2 + axis]
        if s <= 0 or size == 1:
            continue
        radius = min(int(math.ceil(3.0 * s)), size - 1)
        offsets = torch.arange(-radius, radius + 1, device=out.device, dtype=out.dtype)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)
        kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
        moved = out.movedim(2 + axis, -1)
        shape = moved.shape
        line = moved.reshape(-1, 1, size)
        line = F.pad(line, (radius, radius), mode="replicate")
        out = F.conv1d(line, kernel).reshape(shape).movedim(-1, 2 + axis)
    assert out.shape[:2] == (batch, channels)
    return out.to(x.dtype)


def baseline_of(x: torch.Tensor, baseline: str | float, sigma: float | Sequence[float]) -> torch.Tensor:
    """The reference input ``x̄`` for ``x``: what "no lesion-scale structure here" looks like.

    Parameters
    ----------
    x : (B, C, *spatial) Tensor
    baseline : {"blur", "zero", "mean"} or float
        ``"blur"``: ``x`` blurred with a Gaussian of ``sigma`` voxels (:func:`gaussian_blur`), so
        ``x − x̄`` is the local contrast at that scale; ``"zero"``: zeros (0 of the normalized input);
        ``"mean"``: each sample's channel means; a number: that constant.
    sigma : float or sequence of float
        The blur's standard deviation per axis, in voxels (``"blur"`` only).

    Returns
    -------
    (B, C, *spatial) Tensor, ``x``'s dtype and device
    """
    if baseline == "blur":
        return gaussian_blur(x, sigma)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x).contiguous()
    return torch.full_like(x, float(baseline))


def repeat_target(target: Target, repeats: int) -> Target:
    """``target`` for a batch in which each sample is repeated ``repeats`` times in a row.

    Sample ``b``'s classes (and region) serve rows ``b·repeats … (b+1)·repeats − 1``: the perturbed
    copies of a sample are scored exactly as the sample was.
    """
    if repeats == 1:
        return target
    indices = target.class_indices.repeat_interleave(repeats, dim=0)
    signs = target.signs.repeat_interleave(repeats, dim=0)
    if isinstance(target, RegionTarget):
        return RegionTarget(indices, signs, target.regions.repeat_interleave(repeats, dim=0))
    if isinstance(target, ClassTarget):
        return ClassTarget(indices, signs)
    raise TypeError(f"Cannot repeat a target of type {type(target).__name__}.")


def select_target(target: Target, rows: torch.Tensor | slice) -> Target:
    """The rows ``rows`` of a resolved target (a chunk of a batch of perturbed inputs)."""
    indices, signs = target.class_indices[rows], target.signs[rows]
    if isinstance(target, RegionTarget):
        return RegionTarget(indices, signs, target.regions[rows])
    if isinstance(target, ClassTarget):
        return ClassTarget(indices, signs)
    raise TypeError(f"Cannot select rows of a target of type {type(target).__name__}.")


def batches(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class PerturbationMethod(Method):
    """A gradient-free method that scores perturbed copies of the input (occlusion, Score-CAM).

    Parameters
    ----------
    baseline : {"blur", "zero", "mean"} or float
        What the perturbed parts of the input show (:func:`baseline_of`).
    batch_size : int
        Perturbed inputs per forward pass.
    max_forwards : int
        The most forward passes one call may run (:func:`check_budget`).
    """

    level = "perturbation"
    needs_gradients = False

    def __init__(self, baseline: str | float, batch_size: int, max_forwards: int) -> None:
        self.baseline = check_baseline(baseline, self.name)
        self.batch_size = check_positive_int(batch_size, "batch_size", self.name)
        self.max_forwards = check_positive_int(max_forwards, "max_forwards", self.name)


def check_budget(method: str, forwards: int, limit: int, what: str, fix: str) -> None:
    """Refuse, before any work, a perturbation that would run more forward passes than allowed.

    Raises
    ------
    MethodBudgetError
        ``forwards > limit``; the message says what was asked, the limit and how to fix it.
    """
    if forwards > limit:
        message = (f"{method} would run {forwards} forward passes ({what}), more than max_forwards={limit}: "
                   f"{fix}, or raise max_forwards.")
        raise MethodBudgetError(message)


def explanation(
    engine: Explainer,
    run: Pass,
    *,
    inputs: torch.Tensor,
    input_affine: np.ndarray | None,
    maps: torch.Tensor,
    layer: str,
    relu: bool,
    placement: tuple[str, Any] | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Explanation:
    """The :class:`~medcam3d.explanation.Explanation` of a method's maps (ReLU applied here when asked).

    Parameters
    ----------
    run : Pass
        The pass over the user's input (given ``x``): its target, logits, scores, output activation
        undone and output placement are the explanation's.
    maps : (B, T, *grid) Tensor
        Signed maps on their grid: the input grid for input-level and occlusion maps, a layer's
        feature grid otherwise.
    layer : str
        ``"input"`` for maps on the input grid; the layer name(s) otherwise.
    placement : (str, ReceptiveField or None), optional
        How the maps' grid is placed on the input (:func:`medcam3d.placement.layer_placement` of a
        layer); default: the input grid itself (:func:`input_placement`).
    """
    mode, field = placement if placement is not None else input_placement(engine, inputs.ndim - 2)
    maps = maps.detach().float()
    return engine._result(run, maps=maps.clamp_min(0) if relu else maps, layer=layer, relu=relu,
                          input_shape=tuple(inputs.shape[2:]), input_affine=input_affine, placement=mode,
                          receptive_field=field, diagnostics=diagnostics)


def input_placement(engine: Explainer, ndim: int) -> tuple[str, Any]:
    """The placement of maps on the input grid: the identity receptive field (step 1, offset 0), or
    the align_corners convention (the same grid) when the explainer was asked for it."""
    from ..receptive_field import ReceptiveField

    if engine.placement == "receptive_field":
        return "receptive_field", ReceptiveField.identity(ndim)
    return "align_corners", None


def feature_grid(input_shape: Sequence[int], feature_shape: Sequence[int], field: Any) -> Any:
    """A layer's grid in the input's voxel coordinates (identity input affine), placed by ``field``
    (a receptive field, or None for the align_corners convention)."""
    from ..space import Space, feature_space

    identity = Space(tuple(int(n) for n in input_shape), np.eye(4))
    return feature_space(identity, tuple(int(n) for n in feature_shape), receptive_field=field)


def onto(maps: torch.Tensor, source: Any, target: Any) -> torch.Tensor:
    """Maps ``(N, T, *source.shape)`` resampled linearly onto the grid ``target`` (both grids in one
    coordinate system, e.g. the input's voxels). Target voxels beyond the source's outermost cell
    centres take the edge cells' values (the source is extended by one repeated cell on each side),
    so a coarse map covers every voxel of a finer grid of the same input."""
    from ..space import Space, resample

    shape = tuple(maps.shape[2:])
    if shape == tuple(target.shape) and np.allclose(source.affine, target.affine, atol=1e-9):
        return maps
    padded = F.pad(maps, [1] * (2 * len(shape)), mode="replicate")
    shift = np.eye(4)
    shift[: len(shape), 3] = -1.0
    return resample(padded, Space(tuple(n + 2 for n in shape), source.affine @ shift), target, fill=0.0)
