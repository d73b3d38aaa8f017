"""Faithfulness: does the model's output follow the map? Deletion and insertion curves in 3D,
and HiResCAM's completeness (the map sums to the logit minus the bias on suitable heads).

Perturbations happen on the model's input grid. A map on the feature grid is upsampled there with
``F.interpolate(mode="trilinear", align_corners=False)``, which places feature cell centres where
medcam3d's feature affine does (docs/architecture.md §3); a map on another grid (e.g. the scan's) is resampled
with :func:`medcam3d.space.resample` when both grids are given. Voxels are then ranked by the map
(ties in random, seeded order) and removed (deletion: replaced by a baseline) or revealed
(insertion: copied onto the baseline) in ``steps`` equal shares. All perturbed volumes of a
curve, or of several curves, go through the model in batches of ``batch_size``: a 20-step
deletion + insertion pair costs ``ceil(42 / batch_size)`` forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import ArrayLike
import torch
import torch.nn.functional as F
from torch import nn

from ..capture import ActivationCapture
from ..hooks import counterpart, isolated_model, model_lock
from ..cam_head import linear_head
from ..model_io import first_tensor, model_output, to_model_input
from ..targets import probabilities

__all__ = [
    "BASELINES",
    "Completeness",
    "PerturbationCurve",
    "baseline_volume",
    "completeness",
    "deletion_curve",
    "insertion_curve",
    "map_to_input_grid",
    "perturbation_curves",
]

#: Named baselines: what a removed voxel becomes.
BASELINES = ("blur", "mean", "zero")
_MODES = ("deletion", "insertion")


@dataclass(frozen=True)
class PerturbationCurve:
    """One deletion or insertion curve.

    Attributes
    ----------
    mode : {"deletion", "insertion"}
    fractions : (S + 1,) ndarray
        Share of the input voxels removed (deletion) or revealed (insertion), 0 … max_fraction.
    scores : (S + 1,) ndarray
        The class score (probability or logit) at each step.
    auc : float
        Trapezoidal area under ``scores`` over ``fractions``, divided by the last fraction (the
        mean score; lower is better for deletion, higher for insertion).
    baseline : str
        What removed voxels became (``"blur(sigma=5)"``, ``"mean"``, ``"zero"``, ``"constant(…)"``
        or ``"tensor"``).
    score : {"probability", "logit"}
    target : int
        Class index.
    """

    mode: str
    fractions: np.ndarray
    scores: np.ndarray
    auc: float
    baseline: str
    score: str
    target: int


def map_to_input_grid(heat: object, input_shape: Sequence[int], *, heat_space=None, input_space=None) -> torch.Tensor:
    """A map on the input grid, ready for ranking voxels.

    Parameters
    ----------
    heat : (*shape) array or Tensor
        A map on the feature grid (any shape with the input's number of axes), on the input grid
        already, or on another grid described by ``heat_space``.
    input_shape : sequence of int
        Spatial shape of the model's input.
    heat_space, input_space : Space, optional
        Give both to resample a map from its own grid (e.g. the scan's) onto the input grid
        (trilinear, 0 outside the map's field of view).

    Returns
    -------
    (*input_shape) float32 Tensor (CPU)
    """
    input_shape = tuple(int(s) for s in input_shape)
    tensor = torch.as_tensor(np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat), dtype=torch.float32)
    if (heat_space is None) != (input_space is None):
        raise ValueError("Give both heat_space and input_space (to resample between grids), or neither.")
    if heat_space is not None:
        from ..space import resample

        return torch.as_tensor(resample(tensor, heat_space, input_space)).float()
    if tensor.ndim != len(input_shape):
        raise ValueError(f"The map has shape {tuple(tensor.shape)} but the input grid is {input_shape}; pass one map "
                         "with as many axes as the input's spatial shape (e.g. result.maps[0, t]).")
    if tuple(tensor.shape) == input_shape:
        return tensor
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[tensor.ndim]
    return F.interpolate(tensor[None, None], size=input_shape, mode=mode, align_corners=False)[0, 0]


def baseline_volume(x: torch.Tensor, baseline: object = "blur", *, blur_sigma: float = 5.0) -> tuple[torch.Tensor, str]:
    """What removed voxels become.

    Parameters
    ----------
    x : (C, *spatial) Tensor
        One input volume.
    baseline : "blur", "mean", "zero", float or Tensor
        ``blur``: a Gaussian-blurred copy (``blur_sigma`` voxels; removes detail, keeps the
        intensity distribution); ``mean``: each channel's mean; ``zero``; a constant; or a tensor
        of ``x``'s shape.
    blur_sigma : float
        Standard deviation of the blur in voxels.

    Returns
    -------
    ((C, *spatial) Tensor, str)
        The baseline and its description.
    """
    if isinstance(baseline, torch.Tensor) or isinstance(baseline, np.ndarray):
        volume = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
        if volume.shape != x.shape:
            raise ValueError(f"A baseline tensor must have the input's shape {tuple(x.shape)}, not {tuple(volume.shape)}.")
        return volume, "tensor"
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline)), f"constant({float(baseline):g})"
    if baseline == "zero":
        return torch.zeros_like(x), "zero"
    if baseline == "mean":
        spatial = tuple(range(1, x.ndim))
        return x.mean(dim=spatial, keepdim=True).expand_as(x).clone(), "mean"
    if baseline == "blur":
        from scipy.ndimage import gaussian_filter

        array = x.detach().cpu().double().numpy()
        sigma = (0,) + (float(blur_sigma),) * (x.ndim - 1)
        blurred = gaussian_filter(array, sigma=sigma, mode="nearest")
        return torch.as_tensor(blurred, dtype=x.dtype, device=x.device), f"blur(sigma={blur_sigma:g})"
    raise ValueError(f"baseline must be one of {BASELINES}, a number or a tensor of the input's shape, not {baseline!r}.")


def _score_fn(score: str, task: str):
    if score == "logit":
        return lambda logits, c: logits[:, min(c, logits.shape[1] - 1)] * (-1 if logits.shape[1] == 1 and c == 0 else 1)
    if score != "probability":
        raise ValueError(f"score must be 'probability' or 'logit', not {score!r}.")
    def probability(logits: torch.Tensor, c: int) -> torch.Tensor:
        return probabilities(logits, task)[:, c]  # single logit: class 0 negative, 1 positive

    return probability


def _ranks(heat: torch.Tensor, seed: int) -> torch.Tensor:
    """Rank of each voxel (0 = highest map value); ties broken in a seeded random order."""
    flat = heat.reshape(-1).double()
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(flat.numel(), generator=generator)
    order = shuffle[torch.argsort(-flat[shuffle], stable=True)]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def perturbation_curves(
    model: nn.Module,
    x: torch.Tensor,
    heat: object,
    target: int,
    *,
    modes: Sequence[str] = _MODES,
    steps: int = 20,
    baseline: object = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 8,
    score: str = "probability",
    task: str = "multiclass",
    heat_space=None,
    input_space=None,
    max_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, PerturbationCurve]:
    """Deletion and/or insertion curves of one map, with all perturbed volumes batched together.

    Parameters
    ----------
    model : nn.Module
        A classifier returning ``(B, C)`` logits. Run in eval mode under ``torch.no_grad()``,
        holding :func:`medcam3d.hooks.model_lock`, through :func:`medcam3d.hooks.isolated_model`
        (the model's own flags never change: another thread may use it meanwhile).
    x : (C_in, *spatial) or (1, C_in, *spatial) Tensor
        The preprocessed input (a MetaTensor is fine); moved to the model's device and dtype
        (:func:`medcam3d.model_io.to_model_input`).
    heat : (*feature_shape) or (*spatial) array or Tensor
        The map (see :func:`map_to_input_grid`); higher = more important.
    target : int
        Class index whose score is tracked.
    modes : sequence of {"deletion", "insertion"}
    steps : int
        Number of equal shares; each curve has ``steps + 1`` points (0 % … 100 %).
    baseline, blur_sigma
        See :func:`baseline_volume`. The same baseline serves both modes (insertion starts from it).
    batch_size : int
        Perturbed volumes per forward pass.
    score : {"probability", "logit"}
    task : {"multiclass", "multilabel", "binary"}
        How probabilities come from logits (softmax, sigmoid, single-logit sigmoid).
    heat_space, input_space : Space, optional
        Grids, when the map is on neither the feature nor the input grid.
    max_fraction : float in (0, 1]
        The curves cover the first ``max_fraction`` of the ranked voxels (default: all). In 3D a
        lesion is often well under 1 % of the volume; ``0.05`` puts every step where it matters.
        The area is then divided by ``max_fraction``, so it stays a mean score.
    seed : int
        Seed of the tie-breaking order.

    Returns
    -------
    dict mode -> PerturbationCurve
    """
    for mode in modes:
        if mode not in _MODES:
            raise ValueError(f"mode must be 'deletion' or 'insertion', not {mode!r}.")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], not {max_fraction}.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got steps={steps}, batch_size={batch_size}).")
    inputs = to_model_input(x, model)
    spatial_ndim = heat_space.ndim if heat_space is not None else len(heat.shape if hasattr(heat, "shape") else np.shape(cast(ArrayLike, heat)))
    if inputs.ndim == spatial_ndim + 2:
        if inputs.shape[0] != 1:
            raise ValueError(f"x holds a batch of {inputs.shape[0]}; curves are per volume: pass x[i] with its own map.")
        inputs = inputs[0]
    if inputs.ndim != spatial_ndim + 1:
        raise ValueError(f"x has shape {tuple(inputs.shape)} but the map is {spatial_ndim}D; expected x of shape "
                         f"(C_in, *spatial) or (1, C_in, *spatial).")
    spatial = tuple(inputs.shape[1:])
    ranking_map = map_to_input_grid(heat, spatial, heat_space=heat_space, input_space=input_space)
    if not bool(torch.isfinite(ranking_map).all()):
        raise ValueError("The map contains NaN/Inf values; fix the map before computing faithfulness curves.")
    ranks = _ranks(ranking_map, seed).to(inputs.device).view(1, 1, *spatial)
    base, described = baseline_volume(inputs, baseline, blur_sigma=blur_sigma)
    total = ranks.numel()
    fractions = max_fraction * np.arange(steps + 1) / steps
    counts = torch.tensor([int(round(f * total)) for f in fractions], device=inputs.device)
    jobs = [(mode, k) for mode in modes for k in range(steps + 1)]
    measure = _score_fn(score, task)
    values = np.empty(len(jobs), dtype=np.float64)
    # through a view of the model in eval mode: other threads calling the model keep their own mode
    with model_lock(model), isolated_model(model) as view, torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            n = counts[[k for _, k in chunk]].view(-1, *([1] * (inputs.ndim)))
            chosen = ranks < n  # (b, 1, *spatial): the top-n voxels of each step
            deleting = torch.tensor([mode == "deletion" for mode, _ in chunk], device=inputs.device)
            deleting = deleting.view(-1, *([1] * inputs.ndim))
            use_base = torch.where(deleting, chosen, ~chosen)
            batch = torch.where(use_base, base.unsqueeze(0), inputs.unsqueeze(0))
            logits = model_output(view, batch)
            if logits.ndim != 2:
                raise ValueError(f"Faithfulness curves need a classifier with (B, C) logits; the model returned "
                                 f"{tuple(logits.shape)}.")
            if not 0 <= target < max(logits.shape[1], 2 if logits.shape[1] == 1 else 1):
                raise ValueError(f"target {target} is not a class index of this model ({logits.shape[1]} outputs).")
            values[start:start + len(chunk)] = measure(logits.float(), target).cpu().double().numpy()
    curves = {}
    for position, mode in enumerate(modes):
        scores = values[position * (steps + 1):(position + 1) * (steps + 1)]
        curves[mode] = PerturbationCurve(mode=mode, fractions=fractions, scores=scores,
                                         auc=float(np.trapezoid(scores, fractions)) / max_fraction,
                                         baseline=described, score=score, target=int(target))
    return curves


def deletion_curve(model: nn.Module, x: torch.Tensor, heat: object, target: int, **options) -> PerturbationCurve:
    """The deletion curve: remove the most important voxels first (see :func:`perturbation_curves`)."""
    return perturbation_curves(model, x, heat, target, modes=("deletion",), **options)["deletion"]


def insertion_curve(model: nn.Module, x: torch.Tensor, heat: object, target: int, **options) -> PerturbationCurve:
    """The insertion curve: reveal the most important voxels first (see :func:`perturbation_curves`)."""
    return perturbation_curves(model, x, heat, target, modes=("insertion",), **options)["insertion"]


# ---------------------------------------------------------------------------------- completeness
@dataclass(frozen=True)
class Completeness:
    """HiResCAM's completeness on a head that allows it.

    On ``flatten + Linear`` and ``GAP + Linear`` heads the signed HiResCAM map sums exactly to the
    logit minus the Linear's bias: ``Σ_voxels map = y^c − b^c``.

    Attributes
    ----------
    head : {"flatten+linear", "gap+linear"}
    layer : str
    class_indices : (T,) ndarray of int
    map_sums : (B, T) ndarray
        Σ of the signed (no ReLU) HiResCAM map.
    logits : (B, T) ndarray
    bias : (T,) ndarray
    errors : (B, T) ndarray
        ``map_sums − (logits − bias)``.
    """

    head: str
    layer: str
    class_indices: np.ndarray
    map_sums: np.ndarray
    logits: np.ndarray
    bias: np.ndarray
    errors: np.ndarray

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error."""
        return float(np.max(np.abs(self.errors))) if self.errors.size else 0.0

    @property
    def relative_errors(self) -> np.ndarray:
        """``|error| / max(|logit − bias|, 1e-12)``, (B, T)."""
        return np.abs(self.errors) / np.maximum(np.abs(self.logits - self.bias), 1e-12)


def completeness(model: nn.Module, x: torch.Tensor, target: object = "all", *, layer: str | nn.Module = "auto",
                 strict: bool = False) -> Completeness | None:
    """Completeness error of HiResCAM: ``Σ map − (logit − bias)`` for each explained class.

    Parameters
    ----------
    model : nn.Module
        Never modified (hooks live for one forward). TorchScript models (scripted, traced or
        loaded) work too: the layer's output is captured as the Explainer captures it, by running
        a copy of the scripted graph split at the layer (:mod:`medcam3d.torchscript`).
    x : (B, C_in, *spatial) Tensor
    target : as for :class:`medcam3d.Explainer`
    layer : str, nn.Module or "auto"
    strict : bool
        Raise instead of returning None when the head does not allow it.

    Returns
    -------
    Completeness or None
        None when the target layer is not followed directly by ``flatten + one Linear`` or
        ``global average pooling + one Linear`` (checked numerically on this batch).
    """
    from ..explainer import Explainer
    from ..layers import resolve_layer

    with model_lock(model):  # the explanation and the head check see one state of the model
        explanation = Explainer(model, method="hirescam", layer=layer)(x, target=target, relu=False)
        name, module = resolve_layer(model, explanation.layer)
        found = _head_of(model, name, module, x)
    if isinstance(found, str):
        if strict:
            raise ValueError(f"Completeness needs the layer {name!r} to be followed by flatten + one Linear or global "
                             f"average pooling + one Linear; {found} Use a model with such a head, or skip this metric.")
        return None
    head, linear = found
    classes = explanation.class_indices.cpu().numpy()
    bias = np.zeros(classes.shape[1]) if linear.bias is None else linear.bias.detach().cpu().double().numpy()[classes[0]]
    map_sums = explanation.maps.double().flatten(start_dim=2).sum(dim=2).cpu().numpy()
    logits = np.take_along_axis(explanation.logits.double().cpu().numpy(), classes, axis=1)
    return Completeness(head=head, layer=name, class_indices=classes[0], map_sums=map_sums, logits=logits,
                        bias=bias, errors=map_sums - (logits - bias))


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, eager or scripted (a TorchScript module compiled from one)."""
    from ..torchscript import is_scripted, module_type_name

    return isinstance(module, nn.Linear) or (is_scripted(module) and module_type_name(module) == "Linear")


def _head_of(model: nn.Module, name: str, module: nn.Module, x: torch.Tensor) -> tuple[str, nn.Linear] | str:
    """``(kind, linear)`` if the logits are Linear(flatten/GAP(layer output)) on this batch, else a reason.

    The layer's output is captured by :class:`~medcam3d.capture.ActivationCapture` given the model, so
    a layer inside a TorchScript model is reached by splitting its graph (no hooks exist there).
    """
    if not any(_is_linear(m) for m in model.modules()):
        return "the model has no nn.Linear."
    inputs = to_model_input(x, model)
    with model_lock(model), isolated_model(model, hooked=[module]) as view, torch.no_grad():
        capture = ActivationCapture(counterpart(view, name, module), name, track_gradients=False, spatial_ndim=None,
                                    model=view)
        with capture:
            outputs = first_tensor(capture.run(inputs))
    if capture.activations is None:
        return "the target layer did not run."
    found = linear_head(model, capture.activations, outputs, kinds=("flatten+linear", "gap+linear"))
    if found is None:
        return "the logits are not the output of an nn.Linear reading the flattened or globally averaged layer output."
    return found
