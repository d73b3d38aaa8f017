"""Training the segmenter with SEC's losses from image labels (:func:`train_segmenter`): seeding the
training scans (:func:`compute_seeds`), the size prior (:func:`size_bounds`, :func:`set_prior_bias`)
and the networks it builds (:data:`NETWORKS`)."""

from __future__ import annotations

import logging
import math
import time
from importlib import import_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, UsageError
from ..space import Space
from ..settings import Settings, check_numbers, check_range, check_whole
from .losses import constrain_loss, expand_loss, seed_loss, size_loss
from .refinement import refine
from .seeds import DEFAULT_SEED_METHOD, SeedSettings, calibrate_levels, find_seeds, map_extent, seed_maps, seed_methods, smooth_map
from .training_set import TrainingSet

__all__ = ["NETWORKS", "TrainSettings", "WeakSegmenter", "compute_seeds", "make_network", "network_args", "set_prior_bias",
           "size_bounds", "train_segmenter"]

logger = logging.getLogger(__name__)

#: The segmentation networks :func:`train_segmenter` builds by name, and their default arguments
#: (``out_channels`` is set to the number of classes + 1).
NETWORKS: dict[str, tuple[str, dict]] = {
    "unet": ("monai.networks.nets.UNet",
             {"spatial_dims": 3, "in_channels": 1, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}),
    "segresnet": ("monai.networks.nets.SegResNet",
                  {"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]}),
}


@dataclass(frozen=True)
class TrainSettings(Settings):
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
            check_whole(getattr(self, name), name)
        for name in ("decay", "background_decay"):
            check_range(getattr(self, name), name, 0, 1, note=" (0: max pooling, 1: mean)")
        check_numbers(self, ("lr", "weight_decay", "constrain_weight", "size_weight", "size_factor"))
        if not self.size_factor > 0:
            raise UsageError(f"size_factor must be > 0 (the size prior's bound is size_factor x the map extent), "
                             f"not {self.size_factor!r}.")


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


def make_network(path: str, args: dict) -> torch.nn.Module:
    """A new, untrained segmentation network: the class at ``path`` (from :func:`network_args`) built with ``args``."""
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
    from ..explainer import Explainer

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
    model = make_network(path, args)
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
                losses = supervised_losses(logits, y)
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


def supervised_losses(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fully supervised reference's losses (the benchmark's upper bound, never ``weak-train``'s).

    Class-balanced cross-entropy (:func:`~medcam3d.weak.losses.seed_loss` with every voxel a seed: the
    mean over each class's voxels, averaged over the classes present, so a 100-voxel lesion weighs as
    much as the background) plus the soft Dice of the classes present in each scan. With plain
    cross-entropy a small class's output saturates at zero before the Dice term can pull it up (its
    gradient through the softmax vanishes there): the reference then never learned ``dark_elongated``.

    Parameters
    ----------
    logits : (B, K, *S) Tensor
        ``K`` = classes + 1 (channel 0 background).
    masks : (B, *S) integer Tensor
        0 .. K - 1.

    Returns
    -------
    dict
        ``"ce"`` and ``"dice"``, each a () Tensor.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(masks, logits.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    overlap = (probabilities * onehot).sum(dims)
    truth = onehot.sum(dims)
    dice = 1.0 - (2 * overlap + 1.0) / (probabilities.sum(dims) + truth + 1.0)
    present = truth[:, 1:] > 0  # Dice of the classes in each scan (an absent class's is ~1 whatever the output)
    term = dice[:, 1:][present].mean() if bool(present.any()) else logits.sum() * 0.0
    return {"ce": seed_loss(logits, masks), "dice": term}
