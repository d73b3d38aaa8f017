"""Seeds of the weakly-supervised segmenter: where the classifier's class maps say a class surely is, or surely is not.

The classifier's class maps (:func:`class_maps`, several methods gated by :func:`seed_maps`) are
smoothed (:func:`smooth_map`); each class's absolute level is calibrated on the training scans
without it (:func:`calibrate_levels`), and :func:`find_seeds` grows the peaks above it into seed
regions and marks confident background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError, UsageError
from ..heatmap import heatmaps_of
from ..space import Space
from ..settings import Settings, check_number, check_numbers, check_range, check_whole

__all__ = ["DEFAULT_SEED_METHOD", "IGNORE", "SeedSettings", "Seeds", "calibrate_levels", "class_maps", "find_seeds",
           "map_extent", "seed_maps", "seed_methods", "smooth_map"]

#: Seed code of an unlabelled voxel (ignored by :func:`seed_loss`); 0 is background, ``c + 1`` class ``c``.
IGNORE = 255

#: The seed method used when none is given: chosen on the demo set (seeds 2 000 000+) by the
#: precision of its seed voxels against the masks (``benchmarks/weak_segmentation.py``, "Seed
#: methods"; ``docs/weak_segmentation.md``).
DEFAULT_SEED_METHOD = "gradxinput*fused"

_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


@dataclass(frozen=True)
class SeedSettings(Settings):
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
        prefix = "seed setting "
        check_numbers(self, ("smooth", "region_radius", "background_distance"), prefix=prefix)
        if self.background_reach is not None:
            check_number(self.background_reach, "background_reach", minimum=self.background_distance,
                         note=" (background_distance; None: off)", prefix=prefix)
        check_range(self.quantile, "quantile", 0, 1, low_open=True, high_open=True, note=" (e.g. 0.9)", prefix=prefix)
        check_range(self.region_fraction, "region_fraction", 0, 1, low_open=True, prefix=prefix)
        check_range(self.background_fraction, "background_fraction", 0, 1, high_open=True, prefix=prefix)
        for name in ("peak_distance", "max_peaks"):
            check_whole(getattr(self, name), name, prefix=prefix)


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
