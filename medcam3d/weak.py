"""A learned weakly-supervised 3D segmenter: seed, expand, constrain (SEC) from image labels only.

:func:`medcam3d.segment.segment` expands one case's class maps at test time and learns nothing.
This module trains an ordinary MONAI segmentation network (``UNet`` or ``SegResNet``) from a
trained classifier and scans that carry **image-level labels only** (which classes are present),
with the three losses of SEC (Kolesnikov & Lampert, "Seed, Expand and Constrain", ECCV 2016) in 3D:

1. **seed loss** (:func:`seed_loss`): cross-entropy on the *seeds* only, unlabelled voxels
   ignored. Seeds (:func:`find_seeds`) come from the classifier's class maps (any ``method=`` of
   :class:`~medcam3d.Explainer`; default :data:`DEFAULT_SEED_METHOD`): the local maxima of each
   present class's smoothed map at or above an **absolute level** calibrated on the training scans
   (:func:`calibrate_levels`: a high quantile of the map's maximum over the scans *without* that
   class, so a peak this high is rare where the class is absent), each grown to a small confident
   region around it. Every lesion whose peak clears the level gets seeds, a second lesion of a
   class included. Confident background: voxels far from every seed where every present class's
   map is low, and every voxel of a scan labelled with no class.
2. **expand loss** (:func:`expand_loss`): global weighted rank pooling (:func:`gwrp`) of each
   class's probability against the image labels: present classes must reach a high pooled score
   (the decay ``d`` sets the size prior, between max pooling, ``d = 0``, and the mean, ``d = 1``),
   absent classes are pushed to zero everywhere (max pooling), background as a present class.
3. **constrain loss** (:func:`constrain_loss`): the Kullback-Leibler divergence from a
   boundary-aware refinement of the network's own output (:func:`refine`) to that output.

A **size prior** (:func:`size_loss`, ``TrainSettings.size_weight``) keeps a present class
lesion-sized: its mean probability over the scan may not exceed a bound calibrated on the training
scans (:func:`size_bounds`: the median extent of the seeded peaks in the smoothed maps,
:func:`map_extent`). Without it nothing in the three losses keeps a present class small: the
seed loss weighs the ~7 seed voxels of a class as much as the whole background, the expand loss
asks only that a present class's top voxels be high and pushes an absent class down at its
maximum alone, and the CRF sharpens edges without shrinking; a network trained so labels a fixed
blob of tens of thousands of voxels in every scan, with or without the class
(``docs/weak_segmentation.md``). Optionally (``SeedSettings.background_reach``) every voxel far
from all seeds of a fully seeded scan is background too.

The refinement is a local mean-field CRF (a "convolutional CRF": the dense CRF's mean-field update
of Krähenbühl & Koltun with its Gaussian appearance and smoothness kernels restricted to a window
of neighbours), written here in torch. A 3D dense CRF from the package registry was the first
choice: ``SimpleCRF`` 0.2.1.1 (the only one with a 3D dense CRF) ships as source only and does not
build against NumPy 2 (``NPY_IN_ARRAY`` is gone) nor without a C++ toolchain, and
``pydensecrf``/``pydensecrf2`` are 2D. The random walker (:mod:`skimage`) was the second: it
takes about a second per 64³ volume, which would dominate a training step, while the local CRF
costs tens of milliseconds and runs on the batch as it is.

The trained segmenter is written as a plain medcam3d config (``task: segmentation``, the network's
class and arguments, the classifier's preprocessing) and a ``state_dict`` that loads with
``torch.load(weights_only=True)`` (:func:`save_segmenter`), so :func:`medcam3d.models.load_model`,
``medcam3d explain`` and ``medcam3d segment`` (:func:`segment_scan`: label maps and lesion boxes on
the scan's grid, the same files as ``--segment``) use it like any other network.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ._json import json_values
from .errors import ConfigError, InputError, UsageError
from .heatmap import heatmaps_of
from .space import Resampler, Space

__all__ = [
    "DEFAULT_SEED_METHOD",
    "IGNORE",
    "NETWORKS",
    "SeedSettings",
    "Seeds",
    "TrainSettings",
    "TrainingSet",
    "WeakSegmenter",
    "SegmenterSettings",
    "calibrate_levels",
    "class_maps",
    "cohort_training_set",
    "constrain_loss",
    "demo_training_set",
    "expand_loss",
    "find_seeds",
    "gwrp",
    "load_segmenter",
    "map_extent",
    "network_args",
    "refine",
    "save_segmenter",
    "seed_loss",
    "size_loss",
    "seed_maps",
    "seed_methods",
    "segment_scan",
    "set_prior_bias",
    "size_bounds",
    "smooth_map",
    "train_segmenter",
]

logger = logging.getLogger(__name__)

#: Seed code of an unlabelled voxel (ignored by :func:`seed_loss`); 0 is background, ``c + 1`` class ``c``.
IGNORE = 255

#: The seed method used when none is given: chosen on the demo set (seeds 2 000 000+) by the
#: precision of its seed voxels against the masks (``benchmarks/weak_segmentation.py``, "Seed
#: methods"; ``docs/weak_segmentation.md``).
DEFAULT_SEED_METHOD = "gradxinput*fused"

#: The segmentation networks :func:`train_segmenter` builds by name, and their default arguments
#: (``out_channels`` is set to the number of classes + 1).
NETWORKS: dict[str, tuple[str, dict]] = {
    "unet": ("monai.networks.nets.UNet",
             {"spatial_dims": 3, "in_channels": 1, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}),
    "segresnet": ("monai.networks.nets.SegResNet",
                  {"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]}),
}

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSettings:
    """How seeds are found in the class maps (distances in voxels of the model's input grid).

    The defaults were chosen with :data:`DEFAULT_SEED_METHOD` on the demo set (the precision of the
    seed voxels against the masks, ``benchmarks/weak_segmentation.py --parts seeds``).

    Attributes
    ----------
    smooth : float
        Standard deviation (voxels) of the Gaussian applied to each class map before anything
        else (0: none). Input-level maps are voxel-noisy; a lesion-scale blur makes their peaks
        lie where the evidence is dense.
    quantile : float in (0, 1)
        The absolute level of a class is this quantile of the smoothed map's maximum over the
        training scans labelled *without* the class (:func:`calibrate_levels`).
    peak_distance : int
        Local maxima: the largest value within this many voxels (a ``2 r + 1`` cube).
    max_peaks : int
        At most this many seeded peaks per class and scan (the highest). The default, 1, was the
        most precise on the demo set, whose scans hold one lesion per class; raise it for data
        with several lesions of a class per scan (every peak above the level is then a seed).
    region_radius : float
        A peak's seed region lies within this distance (voxels) of the peak ...
    region_fraction : float in (0, 1]
        ... where the smoothed map is at least this fraction of the peak's value (the connected
        part holding the peak).
    background_fraction : float in [0, 1)
        Confident background: every present class's smoothed map below this fraction of its level ...
    background_distance : float
        ... and farther than this (voxels) from every foreground seed.
    background_reach : float or None
        Dense background: in a scan where every present class has a seed, every voxel farther
        than this (voxels) from all its foreground seeds is confident background too, whatever
        the maps say (a lesion lies around its peak, not across the body). None: off (background
        only where the maps are low).
    """

    smooth: float = 2.5
    quantile: float = 0.8
    peak_distance: int = 3
    max_peaks: int = 1
    region_radius: float = 1.0
    region_fraction: float = 0.6
    background_fraction: float = 0.25
    background_distance: float = 5.0
    background_reach: float | None = None

    def __post_init__(self) -> None:
        for name in ("smooth", "region_radius", "background_distance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"seed setting {name} must be a finite number >= 0, not {value!r}.")
        reach = self.background_reach
        if reach is not None and not (isinstance(reach, (int, float)) and math.isfinite(reach)
                                      and reach >= self.background_distance):
            raise UsageError(f"seed setting background_reach must be None or a finite number >= background_distance "
                             f"({self.background_distance}), not {reach!r}.")
        if not 0 < self.quantile < 1:
            raise UsageError(f"seed setting quantile must lie in (0, 1), not {self.quantile!r} (e.g. 0.9).")
        if not 0 < self.region_fraction <= 1:
            raise UsageError(f"seed setting region_fraction must lie in (0, 1], not {self.region_fraction!r}.")
        if not 0 <= self.background_fraction < 1:
            raise UsageError(f"seed setting background_fraction must lie in [0, 1), not {self.background_fraction!r}.")
        for name in ("peak_distance", "max_peaks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"seed setting {name} must be a whole number >= 1, not {value!r}.")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Seeds:
    """The seeds of one scan.

    Attributes
    ----------
    labels : (*S) uint8 ndarray
        0 confident background, ``c + 1`` a seed of class ``c``, :data:`IGNORE` unlabelled.
    peaks : list of (int, tuple of int, float)
        ``(class index, voxel, smoothed map value)`` of every seeded peak.
    """

    labels: np.ndarray
    peaks: list[tuple[int, tuple[int, ...], float]]

    def counts(self) -> dict[str, int]:
        """Voxels per seed code: ``background``, ``class<c>``, ``unlabelled``."""
        values = np.bincount(self.labels.ravel(), minlength=256)
        out = {"background": int(values[0]), "unlabelled": int(values[IGNORE])}
        out.update({f"class{c - 1}": int(values[c]) for c in range(1, IGNORE) if values[c]})
        return out


def smooth_map(values: np.ndarray, sigma: float) -> np.ndarray:
    """A class map ``(*S)`` smoothed with a Gaussian of ``sigma`` voxels (float32; unchanged for 0)."""
    values = np.asarray(values, dtype=np.float32)
    return ndimage.gaussian_filter(values, sigma, mode="constant") if sigma > 0 else values


def calibrate_levels(maxima: Sequence[Sequence[float]], quantile: float) -> np.ndarray:
    """The absolute seed level of each class from the training scans without it.

    Parameters
    ----------
    maxima : sequence (one per class) of sequences of float
        For each class, the maximum of its smoothed map on every training scan labelled *without*
        the class.
    quantile : float in (0, 1)

    Returns
    -------
    (C,) float64 ndarray
        The ``quantile`` of each class's maxima: a peak at or above it occurs in at most
        ``1 - quantile`` of the scans without the class.

    Raises
    ------
    InputError
        A class with no training scan without it: its level cannot be calibrated.
    """
    levels = []
    for c, given in enumerate(maxima):
        values = np.asarray(list(given), dtype=np.float64)
        if values.size == 0:
            raise InputError(f"class {c} is present in every training scan, so its seed level cannot be calibrated; "
                             "add scans labelled without it (the level is a quantile of its map's maximum there).")
        levels.append(float(np.quantile(values, quantile)))
    return np.asarray(levels, dtype=np.float64)


def _ball(radius: float) -> np.ndarray:
    reach = int(math.floor(radius))
    grid = np.indices((2 * reach + 1,) * 3) - reach
    return (grid**2).sum(0) <= radius**2 + 1e-9


def find_seeds(maps: np.ndarray, present: Sequence[bool], levels: Sequence[float],
               settings: SeedSettings = SeedSettings(), *, smoothed: bool = False) -> Seeds:
    """Seeds of one scan from its class maps, its image labels and the calibrated levels.

    For each present class: the local maxima of its smoothed map (the largest value within
    ``peak_distance`` voxels) at or above the class's absolute level, at most ``max_peaks`` (the
    highest), each grown to the connected voxels within ``region_radius`` of it whose map is at
    least ``region_fraction`` x the peak's value. A voxel claimed by two classes is left unlabelled.
    Confident background: where every present class's map is below ``background_fraction`` x its
    level and no foreground seed lies within ``background_distance``; with ``background_reach``, in
    a scan where every present class has a seed, also every voxel farther than that from all
    foreground seeds; a scan with no class present is background everywhere. The rest is
    :data:`IGNORE`.

    Parameters
    ----------
    maps : (C, *S) ndarray
        Class maps on the model's input grid (e.g. :func:`class_maps`), raw or (``smoothed=True``)
        already passed through :func:`smooth_map` with ``settings.smooth``.
    present : (C,) bools
        The image labels.
    levels : (C,) floats
        :func:`calibrate_levels`.
    settings : SeedSettings

    Returns
    -------
    Seeds
    """
    maps = np.asarray(maps, dtype=np.float32)
    present = [bool(p) for p in present]
    if maps.ndim < 2 or maps.shape[0] != len(present) or len(levels) != len(present):
        raise InputError(f"find_seeds needs one map, one label and one level per class; got maps {maps.shape}, "
                         f"{len(present)} labels and {len(levels)} levels.")
    shape = maps.shape[1:]
    labels = np.full(shape, IGNORE, dtype=np.uint8)
    if not any(present):
        labels[...] = 0
        return Seeds(labels, [])
    ball = _ball(settings.region_radius)
    reach = ball.shape[0] // 2
    foreground = np.zeros(shape, dtype=bool)
    claimed = np.zeros(shape, dtype=np.int16)  # class + 1 of the first claim; -1 for a clash
    low = np.ones(shape, dtype=bool)
    peaks: list[tuple[int, tuple[int, ...], float]] = []
    for c, is_present in enumerate(present):
        if not is_present:
            continue
        values = maps[c] if smoothed else smooth_map(maps[c], settings.smooth)
        level = float(levels[c])
        low &= values < settings.background_fraction * level
        size = 2 * settings.peak_distance + 1
        local = (values == ndimage.maximum_filter(values, size=size, mode="constant", cval=-np.inf))
        local &= (values >= level) & (values > 0)
        where = np.argwhere(local)
        if where.size == 0:
            continue
        order = np.argsort(-values[local], kind="stable")[: settings.max_peaks]
        for index in order:
            voxel = tuple(int(v) for v in where[index])
            top = float(values[voxel])
            box = tuple(slice(max(v - reach, 0), min(v + reach + 1, n)) for v, n in zip(voxel, shape))
            ball_part = ball[tuple(slice(b.start - v + reach, b.stop - v + reach) for b, v in zip(box, voxel))]
            region = ball_part & (values[box] >= settings.region_fraction * top)
            parts, _ = ndimage.label(region, structure=_FULL)
            centre = tuple(v - b.start for v, b in zip(voxel, box))
            region = parts == parts[centre]
            view = claimed[box]
            clash = region & (view != 0) & (view != c + 1)
            view[clash] = -1
            view[region & (view == 0)] = c + 1
            foreground[box] |= region
            peaks.append((c, voxel, top))
    for c in range(len(present)):
        labels[claimed == c + 1] = c + 1
    if foreground.any():
        distance = ndimage.distance_transform_edt(~foreground)
        far = distance > settings.background_distance
    else:
        far = np.ones(shape, dtype=bool)
    labels[low & far] = 0
    seeded = {c for c, _, _ in peaks}
    if settings.background_reach is not None and foreground.any() and \
            all(c in seeded for c, p in enumerate(present) if p):
        labels[distance > settings.background_reach] = 0
    return Seeds(labels, peaks)


def map_extent(values: np.ndarray, voxel: Sequence[int], level: float) -> int:
    """Voxels of the connected region (26-connectivity) around ``voxel`` where ``values >= level``
    (0 if the voxel itself is below): the extent of one peak of a class map."""
    above = np.asarray(values) >= level
    if not above[tuple(voxel)]:
        return 0
    parts, _ = ndimage.label(above, structure=_FULL)
    return int((parts == parts[tuple(voxel)]).sum())


def seed_methods(method: Any) -> list[Any]:
    """The methods of a seed method: one method, or several joined by ``*`` (``"gradxinput*fused"``) or
    given as a list, whose maps are multiplied (:func:`seed_maps`)."""
    if isinstance(method, str):
        parts = [part.strip() for part in method.split("*")]
        if not all(parts):
            raise UsageError(f"the seed method {method!r} has an empty part; give a method or methods joined by '*' "
                             "(e.g. gradxinput*fused).")
        return parts
    if isinstance(method, (list, tuple)):
        if not method:
            raise UsageError("the seed method is an empty list; give a method (e.g. gradxinput).")
        return list(method)
    return [method]


def seed_maps(explainers: Sequence[Any], x: torch.Tensor, input_space: Space) -> np.ndarray:
    """The seed maps of a batch: :func:`class_maps` of each explainer, their positive parts multiplied.

    One explainer gives its maps as they are (ReLU'd by the explainer); several are a gate: the
    product keeps the evidence where every method puts the class, e.g. an input-level map's voxel
    detail where a layer-level map puts the class (``"gradxinput*fused"``).

    Returns
    -------
    (B, C, *S) float32 ndarray
    """
    maps = class_maps(explainers[0], x, input_space)
    for explainer in explainers[1:]:
        maps = np.clip(maps, 0.0, None) * np.clip(class_maps(explainer, x, input_space), 0.0, None)
    return maps


def class_maps(explainer: Any, x: torch.Tensor, input_space: Space) -> np.ndarray:
    """The classifier's class maps of a batch on the model's input grid.

    Parameters
    ----------
    explainer : Explainer
        With ``class_names`` optional; every class is explained (``target="all"``).
    x : (B, C_in, *S) Tensor
        Model inputs (on the explainer model's device).
    input_space : Space
        The grid of ``x`` (shape ``S``). Feature-grid maps are resampled onto it (trilinear, from
        the receptive-field placement); input-level maps are on it already.

    Returns
    -------
    (B, C, *S) float32 ndarray
    """
    explanation = explainer(x, target="all")
    out = np.zeros((x.shape[0], explanation.maps.shape[1], *input_space.shape), dtype=np.float32)
    for b in range(x.shape[0]):
        if tuple(explanation.feature_shape) == tuple(input_space.shape) and explanation.layer == "input":
            out[b] = explanation.maps[b].float().cpu().numpy()
            continue
        heatmaps = heatmaps_of(explanation, input_space, input_space=input_space, sample=b)
        for t, heat in enumerate(heatmaps):
            out[b, t] = np.asarray(heat.data, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# The three losses
# --------------------------------------------------------------------------------------------


def gwrp(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Global weighted rank pooling over the last axis (Kolesnikov & Lampert 2016).

    ``G = sum_j d^j v_(j) / sum_j d^j`` with ``v_(0) >= v_(1) >= ...`` the values sorted in
    decreasing order: ``d = 0`` is max pooling, ``d = 1`` average pooling, and values between set
    how many of the top values count (about ``1 / (1 - d)``).

    Parameters
    ----------
    values : (..., N) Tensor
    decay : float in [0, 1]

    Returns
    -------
    (...) Tensor
        Differentiable.
    """
    if not 0.0 <= decay <= 1.0:
        raise UsageError(f"the GWRP decay must lie in [0, 1] (0: max, 1: mean), not {decay!r}.")
    n = values.shape[-1]
    if decay == 0.0:
        return values.max(dim=-1).values
    if decay == 1.0:
        return values.mean(dim=-1)
    # weights below 1e-8 of the first are dropped from the sum (their share of the total is smaller still)
    k = n if decay < 1e-8 else min(n, int(math.ceil(math.log(1e-8) / math.log(decay))) + 1)
    top = torch.topk(values, k, dim=-1, sorted=True).values
    weights = decay ** torch.arange(k, dtype=values.dtype, device=values.device)
    return (top * weights).sum(-1) / weights.sum()


def seed_loss(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the seed voxels only, each seeded class weighing the same.

    The mean over seed voxels is taken per class (background and each class) and then averaged
    over the classes that have seeds in the batch, so a few foreground seeds are not drowned by
    the many background ones. Unlabelled voxels (:data:`IGNORE`) do not count.

    Parameters
    ----------
    logits : (B, K, *S) Tensor
        ``K`` = classes + 1 (channel 0 background).
    seeds : (B, *S) integer Tensor
        0 .. K - 1, or :data:`IGNORE`.

    Returns
    -------
    () Tensor
        0 when there is no seed.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    seeds = seeds.long()
    total = logits.new_zeros(())
    count = 0
    for k in range(logits.shape[1]):
        where = seeds == k
        if bool(where.any()):
            total = total - log_p[:, k][where].mean()
            count += 1
    return total / count if count else logits.sum() * 0.0


def expand_loss(probabilities: torch.Tensor, labels: torch.Tensor, decay: float = 0.98,
                background_decay: float = 0.9999) -> torch.Tensor:
    """SEC's expand loss: GWRP of each class's probability against the image labels.

    ``-log G_c`` for each present class (decay ``decay``), ``-log (1 - max p_c)`` for each absent
    class (pushed to zero everywhere), and ``-log G_bg`` for the background (always present,
    decay ``background_decay``); the three parts are averaged over their classes and added.

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background.
    labels : (B, K - 1) Tensor
        1 where the class is present in the image, 0 where it is absent.
    decay, background_decay : float in [0, 1]

    Returns
    -------
    () Tensor
    """
    if labels.shape != (probabilities.shape[0], probabilities.shape[1] - 1):
        raise InputError(f"expand_loss needs labels of shape (B, K - 1) = {(probabilities.shape[0], probabilities.shape[1] - 1)}, "
                         f"got {tuple(labels.shape)}.")
    flat = probabilities.float().flatten(2)
    classes = flat[:, 1:]
    present = labels.to(classes.dtype) > 0.5
    pooled = gwrp(classes, decay)
    highest = classes.max(dim=-1).values
    loss_present = -torch.log(pooled.clamp_min(_EPS))
    loss_absent = -torch.log((1.0 - highest).clamp_min(_EPS))
    zero = flat.new_zeros(())
    n_present, n_absent = present.sum(), (~present).sum()
    term_present = (loss_present * present).sum() / n_present if n_present > 0 else zero
    term_absent = (loss_absent * ~present).sum() / n_absent if n_absent > 0 else zero
    term_background = -torch.log(gwrp(flat[:, 0], background_decay).clamp_min(_EPS)).mean()
    return term_present + term_absent + term_background


def size_loss(probabilities: torch.Tensor, labels: torch.Tensor, bounds: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A size prior: a present class may not cover more of the scan than its bound.

    ``log(mean_voxels p_c / bound_c)`` where the mean probability of a present class exceeds its
    bound, 0 below it, averaged over the (scan, present class) pairs. The expand loss only asks
    that a present class's *top* voxels be high; this term keeps the rest low, so a present class
    cannot grow over the body. Absent classes are not counted (the expand loss pushes them to 0).

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background.
    labels : (B, K - 1) Tensor
        1 where the class is present in the image.
    bounds : (K - 1,) floats in (0, 1]
        The largest mean probability (share of the scan's voxels) of each class where present.

    Returns
    -------
    () Tensor
        0 when no class is present or every present class is within its bound.
    """
    bounds = torch.as_tensor(bounds, dtype=torch.float32, device=probabilities.device).flatten()
    if labels.shape != (probabilities.shape[0], probabilities.shape[1] - 1) or bounds.numel() != probabilities.shape[1] - 1:
        raise InputError(f"size_loss needs labels (B, K - 1) = {(probabilities.shape[0], probabilities.shape[1] - 1)} and "
                         f"K - 1 bounds; got labels {tuple(labels.shape)} and {bounds.numel()} bounds.")
    if not bool(((bounds > 0) & (bounds <= 1)).all()):
        raise InputError(f"size_loss bounds must lie in (0, 1], not {bounds.tolist()}.")
    mean = probabilities.float().flatten(2)[:, 1:].mean(-1)
    excess = torch.relu(torch.log(mean.clamp_min(1e-12)) - torch.log(bounds))
    present = labels.to(mean.dtype) > 0.5
    if not bool(present.any()):
        return probabilities.sum() * 0.0
    return (excess * present).sum() / present.sum()


def _offsets(radius: int) -> list[tuple[int, int, int]]:
    r = range(-radius, radius + 1)
    return [(a, b, c) for a in r for b in r for c in r if (a, b, c) != (0, 0, 0)]


def _shifted(padded: torch.Tensor, offset: Sequence[int], radius: int, shape: Sequence[int]) -> torch.Tensor:
    """``padded[..., i + o]`` for every voxel ``i`` of ``shape`` (``padded`` has ``radius`` more on each side)."""
    index: tuple[Any, ...] = (Ellipsis, *(slice(radius + o, radius + o + n) for o, n in zip(offset, shape)))
    return padded[index]


@torch.no_grad()
def refine(probabilities: torch.Tensor, image: torch.Tensor, *, iterations: int = 3, radius: int = 1,
           spatial_sigma: float = 1.0, intensity_sigma: float = 0.05, appearance_weight: float = 3.0,
           smoothness_weight: float = 1.0, candidate: float | None = 0.3, margin: int = 3) -> torch.Tensor:
    """A boundary-aware refinement of a soft segmentation: local mean-field CRF on the image.

    The mean-field update of the dense CRF (Potts compatibility) with its two Gaussian kernels,
    restricted to the neighbours within ``radius`` voxels (a cube)::

        k(i, j) = w_a exp(-|i - j|² / 2 s² - |I_i - I_j|² / 2 t²) + w_s exp(-|i - j|² / 2 s²)
        Q_i(l) ∝ p_i(l) exp(sum_j k(i, j) Q_j(l))        (``iterations`` times, from Q = p)

    The appearance kernel lets a label spread between neighbours of similar intensity and not
    across an edge; the smoothness kernel removes isolated voxels. A hard (0/1) output is left as
    it is (its zeros stay zeros). Where every foreground channel (1 ..) is below ``candidate``,
    plus ``margin`` voxels, nothing is refined (Q = p): the work is proportional to the candidate
    region, not to the scan.

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background (the unary is its log).
    image : (B, C_in, *S) Tensor
        The network's input (intensity differences summed over channels).
    iterations : int
    radius : int
        Neighbourhood half-width in voxels.
    spatial_sigma : float
        ``s``, voxels.
    intensity_sigma : float
        ``t``, in the image's units (the demo's window maps 500 HU to 1, so 0.05 is 25 HU).
    appearance_weight, smoothness_weight : float
        ``w_a``, ``w_s``.
    candidate : float or None
        Refine only the box of the voxels where a foreground channel reaches this (None: everywhere).
    margin : int
        Voxels added around that box.

    Returns
    -------
    (B, K, *S) Tensor
        Q, float32, summing to 1 over K.
    """
    if probabilities.ndim < 3 or image.shape[0] != probabilities.shape[0] or image.shape[2:] != probabilities.shape[2:]:
        raise InputError(f"refine needs probabilities (B, K, *S) and an image (B, C, *S) on the same grid; got "
                         f"{tuple(probabilities.shape)} and {tuple(image.shape)}.")
    p = probabilities.float()
    out = p.clone()
    for b in range(p.shape[0]):
        if candidate is None or p.shape[1] < 2:
            box = tuple(slice(0, n) for n in p.shape[2:])
        else:
            where = torch.nonzero((p[b, 1:] >= candidate).any(0))
            if where.numel() == 0:
                continue
            low = (where.min(0).values - margin).clamp_min(0).tolist()
            high = (where.max(0).values + margin + 1).tolist()
            box = tuple(slice(int(lo), min(int(hi), n)) for lo, hi, n in zip(low, high, p.shape[2:]))
        where_box: tuple[Any, ...] = (b, slice(None), *box)
        out[where_box] = _mean_field(p[where_box][None], image[where_box][None].float(), iterations, radius,
                                     spatial_sigma, intensity_sigma, appearance_weight, smoothness_weight)[0]
    return out


def _mean_field(p: torch.Tensor, image: torch.Tensor, iterations: int, radius: int, spatial_sigma: float,
                intensity_sigma: float, appearance_weight: float, smoothness_weight: float) -> torch.Tensor:
    """:func:`refine` on one box ``(1, K, *s)``."""
    shape = p.shape[2:]
    unary = torch.log(p.clamp_min(0.0))  # -inf where p is exactly 0: such a label stays impossible
    pad = [radius] * (2 * len(shape))
    padded_image = F.pad(image, pad)
    inside = F.pad(torch.ones_like(image[:, :1]), pad)
    offsets = _offsets(radius)
    kernels = []
    for offset in offsets:
        spatial = math.exp(-float(sum(o * o for o in offset)) / (2.0 * spatial_sigma**2))
        difference2 = (image - _shifted(padded_image, offset, radius, shape)).square().sum(1, keepdim=True)
        weight = torch.exp(difference2.mul_(-1.0 / (2.0 * intensity_sigma**2))).mul_(appearance_weight * spatial)
        weight.add_(smoothness_weight * spatial).mul_(_shifted(inside, offset, radius, shape))
        kernels.append(weight)
    q = p
    for _ in range(iterations):
        padded = F.pad(q, pad)
        message = unary.clone()
        for offset, weight in zip(offsets, kernels):
            message.addcmul_(weight, _shifted(padded, offset, radius, shape))
        q = torch.softmax(message, dim=1)
    return q


def constrain_loss(probabilities: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """SEC's constrain loss: ``mean_voxels sum_k Q log(Q / p)``, the KL divergence from the refinement Q to p.

    Zero exactly when the output equals its refinement (an output already consistent with the
    image); the gradient flows into ``probabilities`` only (``refined`` is a target).

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
    refined : (B, K, *S) Tensor
        :func:`refine` of ``probabilities`` (detached).

    Returns
    -------
    () Tensor
    """
    if probabilities.shape != refined.shape:
        raise InputError(f"constrain_loss needs two tensors of one shape; got {tuple(probabilities.shape)} and "
                         f"{tuple(refined.shape)}.")
    q = refined.detach().float()
    log_q = torch.log(q.clamp_min(1e-12))
    log_p = torch.log(probabilities.float().clamp_min(1e-12))
    return (torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Scans on the model's input grid with their image labels, and (once seeded) their seeds.

    Attributes
    ----------
    images : (N, C_in, *S) Tensor
        Model inputs (float32, or uint8 holding ``round(255 x)`` for inputs in [0, 1]).
    labels : (N, C) float32 Tensor
        1 present, 0 absent.
    space : Space
        The model's input grid.
    class_names : list of str
    masks : (N, *S) uint8 Tensor or None
        Ground truth (0 background, ``c + 1`` class ``c``): only for the fully supervised
        reference of the benchmark; never used by weakly-supervised training.
    seeds : (N, *S) uint8 Tensor or None
        Filled by :func:`train_segmenter` (0, ``c + 1`` or :data:`IGNORE`).
    seed_record : dict or None
        What :func:`compute_seeds` returned when it filled ``seeds`` (levels, statistics, the
        map extent that calibrates the size prior).
    """

    images: torch.Tensor
    labels: torch.Tensor
    space: Space
    class_names: list[str]
    masks: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    seed_record: dict | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 model inputs of the scans ``index``."""
        images = self.images[index]
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def demo_training_set(count: int, *, seed0: int = 0, with_masks: bool = False) -> TrainingSet:
    """Scans of the demo generator on the model grid (:func:`medcam3d.demo.train.generate_batch`),
    seeds ``seed0 ..``, with their image labels (and, for the supervised reference, masks)."""
    from .demo import synthetic

    if count < 1:
        raise UsageError(f"the number of training cases must be >= 1, not {count}.")
    grid = synthetic.model_grid()
    images = torch.empty((count, 1, *grid.shape), dtype=torch.uint8)
    labels = torch.empty((count, len(synthetic.CLASS_NAMES)), dtype=torch.float32)
    masks = torch.empty((count, *grid.shape), dtype=torch.uint8) if with_masks else None
    for i in range(count):
        phantom = synthetic.make_phantom(seed0 + i)
        image, truth = phantom.sample(grid)
        images[i, 0] = torch.from_numpy(np.round(synthetic.scale_intensity(image) * 255.0).astype(np.uint8))
        labels[i] = torch.tensor(phantom.present, dtype=torch.float32)
        if masks is not None:
            masks[i] = torch.from_numpy(truth)
    return TrainingSet(images, labels, grid, list(synthetic.CLASS_NAMES), masks)


def _class_index(label: str, class_names: Sequence[str], where: str) -> int:
    text = label.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(class_names):
            return index
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise InputError(f"{where}: the label {text!r} is not a class of the classifier; expected one of {list(class_names)} "
                     "(or an index), separated by ';'.")


def cohort_training_set(cases: Sequence[Any], config: Any, *, trust: bool = False) -> TrainingSet:
    """Scans of a cohort (:func:`medcam3d.jobs.cases.collect_cases`) preprocessed with the
    classifier's config, with their image labels (the CSV's ``labels`` column).

    Raises
    ------
    InputError
        A case without image labels (no ``labels`` column), a label that is not a class, scans
        that preprocess to different grids, or a config without class names.
    """
    from .preprocess import preprocess

    names = list(config.class_names or [])
    if not names:
        raise InputError("the classifier's config has no class_names; weak-train needs them to read the image labels.")
    images, labels = [], []
    space: Space | None = None
    for case in cases:
        if case.labels is None:
            raise InputError(f"{case.source or case.id}: no image labels; give a CSV with a 'labels' column (class "
                             "names present in each scan, separated by ';'; an empty cell: none).")
        row = np.zeros(len(names), dtype=np.float32)
        for label in case.labels:
            row[_class_index(label, names, case.source or case.id)] = 1.0
        x, _ = preprocess(case.image, config.preprocessing, trust=trust, source=config.source)
        grid = Space.of(x)
        if space is None:
            space = grid
        elif not grid.isclose(space, atol=1e-3):
            raise InputError(f"{case.source or case.id}: preprocesses to the grid {grid}, the first scan to {space}; "
                             "the classifier's preprocessing must give every scan one grid (e.g. end with "
                             "ResizeWithPadOrCrop and resample to one spacing).")
        images.append(torch.as_tensor(np.asarray(x), dtype=torch.float32))
        labels.append(torch.from_numpy(row))
    if not images or space is None:
        raise InputError("no training scans were given.")
    return TrainingSet(torch.stack(images), torch.stack(labels), space, names)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """How the segmenter is trained.

    Attributes
    ----------
    epochs : int
    batch_size : int
    lr : float
        AdamW's peak learning rate (one-cycle schedule).
    weight_decay : float
    decay : float
        GWRP decay of the present classes in the expand loss.
    background_decay : float
        GWRP decay of the background.
    constrain_weight : float
        Weight of the constrain loss (0: off).
    size_weight : float
        Weight of the size prior (:func:`size_loss`; 0: off).
    prior_bias : bool
        With the size prior: start the network at it, the output layer's bias set so that each
        class's probability is its bound everywhere and the background the rest
        (:func:`set_prior_bias`). The losses then raise a class where its evidence is, instead of
        having to lower it everywhere else: AdamW moves a bias by about ``lr`` per step, so from
        an unbiased start a few hundred steps cannot bring a class from 1/K to a lesion's share.
    size_factor : float
        The size prior's bound of a class: this many times the map extent of its seeded peaks
        (the median voxel count of the connected region around a peak where the smoothed map is
        at least half the peak, over the training scans; :func:`compute_seeds`), as a share of
        the scan.
    crf : dict
        Keyword arguments of :func:`refine`.
    seed : int
        ``torch.manual_seed`` (initialisation, batch order, flips).
    """

    epochs: int = 6
    batch_size: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    decay: float = 0.98
    background_decay: float = 0.9999
    constrain_weight: float = 1.0
    size_weight: float = 0.0
    size_factor: float = 1.0
    prior_bias: bool = True
    crf: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a whole number >= 1, not {value!r}.")
        for name in ("decay", "background_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} must lie in [0, 1] (0: max pooling, 1: mean), not {getattr(self, name)!r}.")
        for name in ("lr", "weight_decay", "constrain_weight", "size_weight", "size_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, not {value!r}.")
        if not self.size_factor > 0:
            raise UsageError(f"size_factor must be > 0 (the size prior's bound is size_factor x the map extent), "
                             f"not {self.size_factor!r}.")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def network_args(network: str, classes: int, args: dict | None = None) -> tuple[str, dict]:
    """The network's class path and arguments for ``classes`` classes (+ background).

    ``network`` is a key of :data:`NETWORKS` or a class path from :data:`NETWORKS`' values; ``args``
    override the defaults.
    """
    paths = {path: name for name, (path, _) in NETWORKS.items()}
    key = network.lower() if network.lower() in NETWORKS else paths.get(network)
    if key is None:
        raise UsageError(f"the segmenter network must be one of {sorted(NETWORKS)} (MONAI UNet, SegResNet), not {network!r}.")
    path, defaults = NETWORKS[key]
    merged = {**defaults, **(args or {}), "out_channels": classes + 1}
    return path, merged


def _build(path: str, args: dict) -> torch.nn.Module:
    from importlib import import_module

    module, _, name = path.rpartition(".")
    return cast(torch.nn.Module, getattr(import_module(module), name)(**args))


@dataclass
class WeakSegmenter:
    """A trained segmenter and what made it.

    Attributes
    ----------
    model : nn.Module
        In eval mode; output ``(B, classes + 1, *S)`` logits, channel 0 background.
    network : str
        Its class path (e.g. ``monai.networks.nets.UNet``).
    args : dict
        Its constructor arguments.
    class_names : list of str
    input_space : Space
        The grid it was trained on.
    history : list of dict
        Per logged step: losses and seconds.
    provenance : dict
        Seed method and settings, calibrated levels, seed statistics, training settings, times.
    """

    model: torch.nn.Module
    network: str
    args: dict
    class_names: list[str]
    input_space: Space
    history: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


def _flip(tensors: Sequence[torch.Tensor], axes: Sequence[int]) -> list[torch.Tensor]:
    return [torch.flip(t, [a + (t.ndim - 3) for a in axes]) if axes else t for t in tensors]


def compute_seeds(data: TrainingSet, classifier: torch.nn.Module, *, method: Any = DEFAULT_SEED_METHOD,
                  layer: str = "auto", settings: SeedSettings = SeedSettings(), chunk: int = 4,
                  placement: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Seed every scan of ``data`` (fills ``data.seeds`` and ``data.seed_record``); returns the calibration and statistics.

    The classifier's maps (``method``) are computed once per scan and smoothed; the level of each
    class is calibrated on the scans labelled without it (:func:`calibrate_levels`); then each
    scan's seeds are found (:func:`find_seeds`). Only the image labels are used. ``placement``
    is the Explainer's (default: its own).
    """
    from .explainer import Explainer

    options: dict[str, Any] = {} if placement is None else {"placement": placement}
    explainers = [Explainer(classifier.eval(), method=part, layer=layer, class_names=data.class_names, **options)
                  for part in seed_methods(method)]
    count, classes = len(data), data.labels.shape[1]
    kept: list[dict[int, np.ndarray]] = []  # smoothed maps of the present classes, per scan
    maxima: list[list[float]] = [[] for _ in range(classes)]
    started = time.perf_counter()
    for begin in range(0, count, chunk):
        index = torch.arange(begin, min(begin + chunk, count))
        maps = seed_maps(explainers, data.batch(index), data.space)
        if maps.shape[1] != classes:
            raise InputError(f"the classifier explains {maps.shape[1]} classes but the scans have {classes} image labels "
                             f"({data.class_names}); give a classifier with one output per class.")
        for b, i in enumerate(index.tolist()):
            entry = {}
            for c in range(classes):
                smooth = smooth_map(maps[b, c], settings.smooth)
                if data.labels[i, c] > 0.5:
                    entry[c] = smooth
                else:
                    maxima[c].append(float(smooth.max()))
            kept.append(entry)
        if log is not None and (begin // chunk) % 25 == 0:
            log(f"seed maps {min(begin + chunk, count)}/{count} ({time.perf_counter() - started:.0f} s)")
    levels = calibrate_levels(maxima, settings.quantile)
    seeds = torch.empty((count, *data.space.shape), dtype=torch.uint8)
    peaks_per_class = np.zeros(classes)
    seeded_scans = np.zeros(classes)
    extents: list[list[int]] = [[] for _ in range(classes)]
    for i, entry in enumerate(kept):
        present = [c in entry for c in range(classes)]
        maps = np.zeros((classes, *data.space.shape), dtype=np.float32)
        for c, values in entry.items():
            maps[c] = values
        found = find_seeds(maps, present, levels.tolist(), settings, smoothed=True)
        seeds[i] = torch.from_numpy(found.labels)
        for c in range(classes):
            n = sum(1 for peak in found.peaks if peak[0] == c)
            peaks_per_class[c] += n
            seeded_scans[c] += n > 0
        for c, voxel, top in found.peaks:
            extents[c].append(map_extent(maps[c], voxel, 0.5 * top))
    data.seeds = seeds
    positives = data.labels.sum(0).numpy()
    data.seed_record = {
        "method": "*".join(str(getattr(m, "name", m)) for m in seed_methods(method)),
        "method_repr": "*".join(repr(m) for m in seed_methods(method)), "layer": layer,
        "settings": settings.to_dict(), "levels": [float(v) for v in levels],
        "scans_with_seeds": [float(seeded_scans[c] / positives[c]) if positives[c] else None for c in range(classes)],
        "peaks_per_positive_scan": [float(peaks_per_class[c] / positives[c]) if positives[c] else None for c in range(classes)],
        "map_extent_voxels": [float(np.median(extents[c])) if extents[c] else None for c in range(classes)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return data.seed_record


def train_segmenter(data: TrainingSet, classifier: torch.nn.Module | None = None, *, method: Any = DEFAULT_SEED_METHOD,
                    layer: str = "auto", seed_settings: SeedSettings = SeedSettings(),
                    settings: TrainSettings = TrainSettings(), network: str = "unet", network_options: dict | None = None,
                    supervised: bool = False, placement: str | None = None, log: Callable[[str], None] | None = None,
                    log_every: int = 25) -> WeakSegmenter:
    """Train a segmentation network with SEC's losses from image labels only.

    Parameters
    ----------
    data : TrainingSet
        Scans on the classifier's input grid with image labels (:func:`demo_training_set`,
        :func:`cohort_training_set`).
    classifier : nn.Module
        The trained classifier whose maps give the seeds (not needed with ``supervised``).
    method : str or Method
        The seed method (any ``method=`` of :class:`~medcam3d.Explainer`).
    layer : str
        The classifier's target layer for layer-level methods.
    seed_settings : SeedSettings
    settings : TrainSettings
    network : {"unet", "segresnet"} or a class path
    network_options : dict, optional
        Constructor arguments overriding :data:`NETWORKS`' defaults.
    supervised : bool
        The fully supervised reference: cross-entropy + Dice on ``data.masks`` instead of SEC (the
        benchmark's upper bound; never what ``weak-train`` does).
    placement : str, optional
        The Explainer's placement of feature grids (default: its own).
    log : callable, optional
        Receives progress lines.

    Returns
    -------
    WeakSegmenter
    """
    started = time.perf_counter()
    say = log or (lambda text: logger.info(text))
    classes = int(data.labels.shape[1])
    provenance: dict = {"classes": list(data.class_names), "train_cases": len(data), "supervised": supervised,
                        "settings": settings.to_dict()}
    if supervised:
        if data.masks is None:
            raise InputError("the supervised reference needs masks (demo_training_set(with_masks=True)).")
    else:
        if data.seeds is None:
            if classifier is None:
                raise UsageError("train_segmenter needs the classifier whose maps give the seeds.")
            provenance["seeds"] = compute_seeds(data, classifier, method=method, layer=layer, settings=seed_settings,
                                                placement=placement, log=say)
            say(f"seeds: levels {provenance['seeds']['levels']}, scans with seeds {provenance['seeds']['scans_with_seeds']} "
                f"({provenance['seeds']['seconds']:.0f} s)")
        elif data.seed_record is not None:
            provenance["seeds"] = data.seed_record
        if settings.size_weight > 0:
            bounds = size_bounds(provenance.get("seeds"), settings.size_factor, int(np.prod(data.space.shape)))
            provenance["size_bounds"] = bounds
            if bounds is None:
                say("size prior off: no class has a seeded peak in the training scans to calibrate it")
    torch.manual_seed(settings.seed)
    path, args = network_args(network, classes, network_options)
    args = {**args, "in_channels": int(data.images.shape[1])}
    model = _build(path, args)
    if not supervised and provenance.get("size_bounds") and settings.prior_bias:
        provenance["prior_bias_layer"] = set_prior_bias(model, provenance["size_bounds"])
    generator = torch.Generator().manual_seed(settings.seed)
    bounds = provenance.get("size_bounds")
    steps_per_epoch = max(len(data) // settings.batch_size, 1)
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    model.train()
    history: list[dict] = []
    running: list[list[float]] = []
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator)
        for b in range(steps_per_epoch):
            index = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            x = data.batch(index)
            target = (data.masks if supervised else data.seeds)
            assert target is not None
            y = target[index].long()
            axes = [a for a in range(3) if torch.rand(1, generator=generator).item() < 0.5]
            x, y = _flip([x, y], axes)
            logits = model(x)
            if supervised:
                losses = _supervised_losses(logits, y)
            else:
                losses = _sec_losses(logits, x, y, data.labels[index], settings, bounds)
            loss = sum(losses.values(), logits.new_zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            running.append([float(v.detach()) for v in losses.values()])
            if step % log_every == 0 or step == total:
                mean = np.mean(running, axis=0)
                entry = {"step": step, "epoch": epoch + 1, **{k: round(float(v), 5) for k, v in zip(losses, mean)},
                         "seconds": round(time.perf_counter() - started, 1)}
                history.append(entry)
                say(f"epoch {epoch + 1}/{settings.epochs} step {step}/{total} "
                    + " ".join(f"{k} {v:.4f}" for k, v in zip(losses, mean)) + f" ({entry['seconds']:.0f} s)")
                running = []
    model.eval()
    provenance["steps"] = total
    provenance["seconds"] = round(time.perf_counter() - started, 1)
    return WeakSegmenter(model, path, args, list(data.class_names), data.space, history, provenance)


def size_bounds(seed_record: dict | None, factor: float, voxels: int) -> list[float] | None:
    """The size prior's bound of each class (:func:`size_loss`): ``factor`` x the median map extent of
    its seeded peaks (``seed_record["map_extent_voxels"]``, :func:`compute_seeds`) over the scan's voxels.

    A class with no seeded peak in the training scans takes the largest bound of the others; None
    when no class has one (no size prior can be calibrated).
    """
    extents = [e if e is not None and e > 0 else None for e in (seed_record or {}).get("map_extent_voxels") or []]
    known = [e for e in extents if e is not None]
    if not known:
        return None
    largest = max(known)
    return [float(min(max(factor * (largest if e is None else e) / voxels, 1.0 / voxels), 0.5)) for e in extents]


def set_prior_bias(model: torch.nn.Module, bounds: Sequence[float]) -> str | None:
    """Set the bias of a segmenter's output layer so that it starts at the size prior.

    The last module (in :meth:`~torch.nn.Module.named_modules` order) with a bias of ``K`` =
    ``len(bounds) + 1`` values is taken as the output layer (the last convolution of MONAI's
    ``UNet`` and ``SegResNet``, whose output adds to it); its bias becomes ``0`` for the
    background and ``log(bound_c / (1 - sum(bounds)))`` for class ``c``, so that with the rest
    of the logits equal the softmax gives each class its bound.

    Returns
    -------
    str or None
        The module's name; None if no module has such a bias (nothing is changed).
    """
    bounds = [float(b) for b in bounds]
    rest = 1.0 - sum(bounds)
    if not all(0 < b < 1 for b in bounds) or rest <= 0:
        raise InputError(f"prior bias: each bound must lie in (0, 1) and their sum below 1, not {bounds}.")
    found = None
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (len(bounds) + 1,):
            found = (name, bias)
    if found is None:
        return None
    values = torch.tensor([0.0, *[math.log(b / rest) for b in bounds]], dtype=found[1].dtype)
    with torch.no_grad():
        found[1].copy_(values.to(found[1].device))
    return found[0]


def _sec_losses(logits: torch.Tensor, x: torch.Tensor, seeds: torch.Tensor, labels: torch.Tensor,
                settings: TrainSettings, bounds: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    probabilities = torch.softmax(logits.float(), dim=1)
    losses = {"seed": seed_loss(logits, seeds),
              "expand": expand_loss(probabilities, labels, settings.decay, settings.background_decay)}
    if settings.size_weight > 0 and bounds is not None:
        losses["size"] = settings.size_weight * size_loss(probabilities, labels, bounds)
    if settings.constrain_weight > 0:
        refined = refine(probabilities.detach(), x, **settings.crf)
        losses["constrain"] = settings.constrain_weight * constrain_loss(probabilities, refined)
    return losses


def _supervised_losses(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    probabilities = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(masks, logits.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    overlap = (probabilities * onehot).sum(dims)
    truth = onehot.sum(dims)
    dice = 1.0 - (2 * overlap + 1.0) / (probabilities.sum(dims) + truth + 1.0)
    present = truth[:, 1:] > 0  # Dice of the classes in each scan (an absent class's is ~1 whatever the output)
    term = dice[:, 1:][present].mean() if bool(present.any()) else logits.sum() * 0.0
    return {"ce": F.cross_entropy(logits.float(), masks), "dice": term}


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_segmenter(segmenter: WeakSegmenter, config_path: str | Path, *, preprocessing: list[dict] | None,
                   weights_name: str | None = None) -> tuple[Path, Path, Path]:
    """Write the segmenter as a medcam3d config, a ``state_dict`` and a JSON of how it was made.

    Parameters
    ----------
    segmenter : WeakSegmenter
    config_path : path
        ``<name>.yaml``; the weights go to ``<name>.pt`` beside it (or ``weights_name``) and the
        provenance to ``<name>.json``.
    preprocessing : list of dict or None
        The classifier's preprocessing (the segmenter sees the same grid).

    Returns
    -------
    (config, weights, provenance) paths
    """
    import yaml

    from ._files import atomic_write, atomic_write_text

    config_path = Path(config_path)
    weights_path = config_path.with_name(weights_name or config_path.stem + ".pt")
    info_path = config_path.with_suffix(".json")
    state = {k: v.detach().cpu().contiguous() for k, v in segmenter.model.state_dict().items()}
    atomic_write(weights_path, lambda temp: torch.save(state, temp))
    config = {
        "model": {"network": segmenter.network, "args": json_values(segmenter.args), "weights": weights_path.name},
        "task": "segmentation",
        "class_names": ["background", *segmenter.class_names],
        "layer": "auto",
        "method": "hirescam",
        "target": list(range(1, len(segmenter.class_names) + 1)),
        "output_activation": "none",
    }
    if preprocessing is not None:
        config["preprocessing"] = json_values(list(preprocessing))
    head = ("# A weakly-supervised segmenter trained by `medcam3d weak-train` (seed, expand, constrain; image labels\n"
            f"# only). How it was made: {info_path.name}. Use: medcam3d segment --config {config_path.name} --image SCAN --out OUT\n")
    atomic_write_text(config_path, head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120))
    info = {"network": segmenter.network, "args": json_values(segmenter.args), "class_names": segmenter.class_names,
            "input_space": {"shape": list(segmenter.input_space.shape),
                            "affine": np.asarray(segmenter.input_space.affine).round(6).tolist()},
            **json_values(segmenter.provenance), "history": segmenter.history}
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return config_path, weights_path, info_path


def load_segmenter(config_path: str | Path, *, trust: bool = False) -> tuple[Any, torch.nn.Module]:
    """A segmenter config and its network (weights loaded with ``weights_only=True``), in eval mode.

    Raises
    ------
    ConfigError
        The config's task is not ``segmentation`` or its network has not ``len(class_names)`` outputs.
    """
    from .config import load_config
    from .models import load_model

    config = load_config(config_path)
    if config.task != "segmentation":
        raise ConfigError(f"{config_path}: task is {config.task!r}; a segmenter config has task: segmentation (write one "
                          "with medcam3d weak-train).")
    if not config.class_names or len(config.class_names) < 2:
        raise ConfigError(f"{config_path}: a segmenter config needs class_names [background, class0, ...].")
    model = load_model(config, trust=trust)
    return config, model.eval()


# --------------------------------------------------------------------------------------------
# Segmenting scans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmenterSettings:
    """What :func:`segment_scan` did (recorded in the lesions JSON).

    Attributes
    ----------
    method : str
        ``"learned"``.
    network : str
    min_volume_mm3 : float
        Components smaller than this are dropped.
    margin : int
        Input voxels added around the candidate region before resampling to the scan.
    """

    method: str = "learned"
    network: str = ""
    min_volume_mm3: float = 20.0
    margin: int = 2

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``(B, K, *S)`` of a segmenter (eval mode, no gradients)."""
    was = model.training
    model.eval()
    try:
        return torch.softmax(model(x).float(), dim=1)
    finally:
        model.train(was)


def segment_scan(model: torch.nn.Module, x: torch.Tensor, scanner_space: Any, class_names: Sequence[str | None], *,
                 input_space: Any = None, settings: SegmenterSettings = SegmenterSettings(), classes: Iterable[int] | None = None):
    """Segment one preprocessed scan with a trained segmenter, on the scan's grid.

    The probabilities are computed on the model's input grid and resampled (trilinear, the
    preprocessing's affine inverted exactly) onto the scan's voxels only inside the box where a
    class may win (any class probability above 0.1, plus ``margin`` voxels); each voxel takes the
    most probable label there, and each class's connected components (26-connectivity, at least
    ``min_volume_mm3``) are its lesions, with boxes in voxels and in RAS mm.

    Parameters
    ----------
    model : nn.Module
        Output ``(1, K, *S)`` logits, channel 0 background.
    x : (C_in, *S) Tensor or MetaTensor
        The preprocessed scan (its affine is the input grid's unless ``input_space`` is given).
    scanner_space : Space
        The scan's grid.
    class_names : sequence
        ``K - 1`` names of the foreground classes (the config's names without ``background``).
    classes : iterable of int, optional
        Foreground class indices to segment (default: all).

    Returns
    -------
    medcam3d.segment.Segmentation
        ``labels`` (0 background, ``c + 1`` class ``c``) on the scan's grid and the lesions;
        :meth:`~medcam3d.segment.Segmentation.save` writes the label map and the lesions JSON.
    """
    from .masks import bounding_box
    from .segment import Lesion, Segmentation

    scan = Space.of(scanner_space)
    grid = Space.of(input_space) if input_space is not None else Space.of(x)
    device = next(iter(model.parameters()), torch.zeros(())).device
    probabilities = predict(model, torch.as_tensor(x).float()[None].to(device))[0].cpu()
    if tuple(probabilities.shape[1:]) != grid.shape:
        raise InputError(f"the segmenter's output grid {tuple(probabilities.shape[1:])} is not its input grid {grid.shape}.")
    names = list(class_names)
    if probabilities.shape[0] != len(names) + 1:
        raise InputError(f"the segmenter has {probabilities.shape[0]} outputs but {len(names)} foreground class names; "
                         "its config needs class_names [background, <one per output class>].")
    wanted = set(range(len(names))) if classes is None else {int(c) for c in classes}
    labels = np.zeros(scan.shape, dtype=np.uint8 if len(names) < 255 else np.uint16)
    foreground = probabilities[1:].clone()
    for c in range(len(names)):
        if c not in wanted:
            foreground[c] = 0.0
    candidate = (foreground > 0.1).any(0).numpy()
    lesions: list = []
    if candidate.any():
        where = np.argwhere(candidate)
        low = np.maximum(where.min(0) - settings.margin, 0)
        high = np.minimum(where.max(0) + settings.margin, np.asarray(grid.shape) - 1)
        corners = np.array(np.meshgrid(*[(a, b) for a, b in zip(low, high)], indexing="ij")).reshape(3, -1).T
        world = grid.voxel_to_world(corners.astype(float))
        scan_voxels = scan.world_to_voxel(world)
        lo = np.clip(np.floor(scan_voxels.min(0)).astype(int) - 1, 0, np.asarray(scan.shape) - 1)
        hi = np.clip(np.ceil(scan_voxels.max(0)).astype(int) + 1, 0, np.asarray(scan.shape) - 1)
        indices = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
        resampler = Resampler(grid, scan)
        crop = np.asarray(resampler(probabilities.numpy(), indices=indices, fill=0.0), dtype=np.float32)
        crop[0] = np.where(crop.sum(0) > 0, crop[0], 1.0)  # outside the model's view: background
        for c in range(len(names)):
            if c not in wanted:
                crop[c + 1] = -1.0
        winner = crop.argmax(0).astype(labels.dtype)
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
        labels[box] = winner
        voxel_mm3 = float(abs(np.linalg.det(scan.affine[:3, :3])))
        found = []
        for c in sorted(wanted):
            mine = winner == c + 1
            parts, count = ndimage.label(mine, structure=_FULL)
            for number, part_box in enumerate(ndimage.find_objects(parts), start=1):
                if part_box is None:
                    continue
                part = parts == number
                volume = float(part.sum()) * voxel_mm3
                if volume < settings.min_volume_mm3:
                    labels[box][part] = 0
                    continue
                full = np.zeros(scan.shape, dtype=bool)
                full[box] = part
                lesion_box = bounding_box(full, scan)
                assert lesion_box is not None
                scores = np.where(part, crop[c + 1], -np.inf)
                peak = np.unravel_index(int(np.argmax(scores)), scores.shape)
                peak_voxel = np.asarray(peak, dtype=float) + lo
                found.append(((c, lesion_box.voxel_min), Lesion(
                    c, names[c], c + 1, lesion_box, round(volume, 3), float(crop[c + 1][peak]),
                    tuple(float(v) for v in scan.voxel_to_world(peak_voxel)))))
        found.sort(key=lambda item: item[0])
        lesions = [lesion for _, lesion in found]
    return Segmentation(labels, scan, tuple(lesions), tuple(names), cast(Any, settings), ())

