"""Weakly-supervised segmentation from class activation maps: seed, expand, constrain (3D).

A class map says roughly *where* a class's evidence lies (the demo model's feature cells are
8 mm); the scan says where the object's edges are. :func:`segment` combines the two, per class
and per candidate lesion, on crops of the scan around the candidates, so that a 512 x 512 x 300
CT costs what its lesions cost, not what the scan costs:

1. **candidates**: the local maxima of the class map at or above ``candidate`` x its maximum,
   found on the map's own grid (a feature-grid map is searched at its coarse resolution and
   resampled only inside the crops); each crop is a candidate region's box plus ``margin_mm``;
2. **seeds**, in scanner space: around each peak, its *confident region* (the connected part of
   the map, optionally smoothed by ``smooth_mm``, at or above ``foreground`` x the peak, where the
   class beats the other segmented classes' maps, each divided by its maximum). *Foreground*
   seeds are the voxels of the confident regions whose intensity sets them apart from their
   surroundings (``seeding="contrast"``: at least ``contrast`` times likelier inside than in a
   shell around; or ``seeding="peak"``: the typical voxels next to each peak). *Background*
   seeds: the map below ``background`` x its maximum, and the crop's faces; *competing* seeds
   (background for this class): where another segmented class's map is confident;
3. **expand and constrain with the image**: scikit-image's random walker (the default,
   ``method="random_walker"``) or SimpleITK's confidence-connected region growing
   (``"region_growing"``), on the seeds' box plus ``margin_mm``; ``"threshold"`` keeps the
   thresholded map itself (the baseline). Only the parts connected to foreground seeds are kept,
   with their holes filled; a voxel claimed by two classes goes to the higher relative map;
4. **lesions**: the connected components of each class's label (26-connectivity), each with a
   box in voxels and in world mm (:class:`medcam3d.masks.BoundingBox`); a class may have several.

The result, :class:`Segmentation`, holds a label map on the scan's grid (label ``c + 1`` for
class ``c``, as the ground-truth masks of :mod:`medcam3d.demo`) and the lesions, and keeps each
crop's seeds and foreground probability (:class:`Region`) for pictures. :func:`gated_maps` makes
sharper input maps: a finer layer's map (e.g. LayerCAM) gated by the last layer's.

MONAI's ``CRF`` block (mean-field CRF with image features) was the third candidate for step 3;
it needs MONAI's compiled C++ extension (``monai._C``, ``BUILD_MONAI=1``), which the pip wheels do
not ship, so it is not offered. ``benchmarks/weak_segmentation.py`` compares the methods and
``docs/weak_segmentation.md`` reports the numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ._files import atomic_write_text
from .errors import InputError, SpaceError, UsageError
from .heatmap import Heatmap, heatmap_list
from .masks import BoundingBox, bounding_box
from .space import Resampler, Space

__all__ = ["METHODS", "Lesion", "Region", "SegmentSettings", "Segmentation", "gated_maps", "segment"]

#: Expansion methods of :func:`segment`, the default first.
METHODS: tuple[str, ...] = ("random_walker", "region_growing", "threshold")

# Seed codes of Region.seeds.
UNLABELED, FOREGROUND, BACKGROUND, COMPETING = 0, 1, 2, 3

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_RW_TOL = 1e-2  # relative tolerance of the random walker's conjugate gradients (0.5 cut: 1e-3 gave the same masks)


@dataclass(frozen=True)
class SegmentSettings:
    """The settings of :func:`segment` (fractions are of a class map's maximum).

    Attributes
    ----------
    method : {"random_walker", "region_growing", "threshold"}
        How seeds are expanded (see the module docstring).
    candidate : float in (0, 1]
        Candidate regions: map >= ``candidate`` x max. ``"threshold"`` returns these regions.
    foreground : float in (0, 1]
        Foreground seeds: map >= ``foreground`` x the candidate's own peak.
    background : float in [0, 1)
        Background seeds: map < ``background`` x max. Must be below ``candidate``.
    margin_mm : float
        Added to each candidate's box on every side to form its crop.
    smooth_mm : float
        Standard deviation (mm) of a Gaussian applied to each map on its own grid first (0: none).
    beta : float
        Random walker: edge weights are ``exp(-beta * (difference / noise)^2)``, the noise being
        estimated in each crop (robust, from neighbour differences), so ``beta`` is unitless.
    seeding : {"contrast", "peak"}
        How foreground seeds are chosen inside the confident regions: ``"contrast"``, the voxels
        whose intensity sets the region apart from its surroundings (see ``contrast``);
        ``"peak"``, the voxels within ``seed_mm`` of each peak whose intensity is that of most of
        them (within 2 noise levels of their median).
    contrast : float
        ``seeding="contrast"``: foreground seeds are the confident voxels whose intensity is at least this many times
        likelier inside the confident region than in the background region (see
        :func:`_image_seeds`); 0 keeps every confident voxel.
    seed_mm : float
        ``seeding="peak"``: radius of the seed ball around each peak.
    multiplier : float
        Region growing: the accepted intensity range is mean ± ``multiplier`` x std of the seeds.
    iterations : int
        Region growing: re-estimations of the mean and std from the grown region.
    min_volume_mm3 : float
        Components smaller than this are dropped.
    fill_holes : bool
        Fill enclosed holes of each class's result.
    """

    method: str = "random_walker"
    candidate: float = 0.5
    foreground: float = 0.8
    background: float = 0.05
    margin_mm: float = 10.0
    smooth_mm: float = 8.0
    beta: float = 1.0
    seeding: str = "contrast"
    contrast: float = 4.0
    seed_mm: float = 3.0
    multiplier: float = 2.0
    iterations: int = 1
    min_volume_mm3: float = 20.0
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = [m for m in METHODS if m.split("_")[0] in str(self.method).lower()]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"method must be one of {METHODS}, not {self.method!r}.{hint}")
        for name in ("candidate", "foreground"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise UsageError(f"{name} is a fraction of the map's maximum in (0, 1], not {value}.")
        if not 0 <= self.background < self.candidate:
            raise UsageError(f"background must lie in [0, candidate={self.candidate}), not {self.background}: "
                             "background seeds are voxels below the candidate threshold.")
        for name in ("margin_mm", "smooth_mm", "beta", "contrast", "seed_mm", "multiplier", "min_volume_mm3"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, not {value!r}.")
        if self.method == "random_walker" and self.beta <= 0:
            raise UsageError("beta must be > 0 for the random walker (it weighs the image's edges).")
        if self.seeding not in ("contrast", "peak"):
            raise UsageError(f"seeding must be 'contrast' or 'peak', not {self.seeding!r}.")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise UsageError(f"iterations must be an integer >= 0, not {self.iterations!r}.")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Region:
    """One crop of the scan where one class was segmented, with its seeds (for pictures and checks).

    Attributes
    ----------
    class_index : int
    crop : tuple of slice
        The crop's voxel ranges on the scan grid, ``image[crop]``.
    seeds : (*crop shape) uint8 ndarray
        0 unlabeled, 1 foreground, 2 background, 3 competing (another class's confident voxels).
    class_map : (*crop shape) float32 ndarray
        The class's map on the crop (smoothed as the settings say).
    probability : (*crop shape) float32 ndarray or None
        Random walker: the probability of the foreground label; None for the other methods.
    mask : (*crop shape) bool ndarray
        The class's result on the crop before classes are merged.
    """

    class_index: int
    crop: tuple[slice, ...]
    seeds: np.ndarray
    class_map: np.ndarray
    probability: np.ndarray | None
    mask: np.ndarray

    def to_dict(self) -> dict:
        """Crop bounds (inclusive voxel indices) and seed and result counts, JSON-ready."""
        counts = np.bincount(self.seeds.ravel(), minlength=4)
        return {
            "class_index": self.class_index,
            "voxel_min": [s.start for s in self.crop],
            "voxel_max": [s.stop - 1 for s in self.crop],
            "seeds": {"foreground": int(counts[FOREGROUND]), "background": int(counts[BACKGROUND]),
                      "competing": int(counts[COMPETING])},
            "voxels": int(self.mask.sum()),
        }


@dataclass(frozen=True)
class Lesion:
    """One connected component of one class's label.

    Attributes
    ----------
    class_index : int
    class_name : str or None
    label : int
        Its value in :attr:`Segmentation.labels` (``class_index + 1``).
    box : BoundingBox
        On the scan grid: voxel bounds, world extent and corners (RAS mm), centre, size.
    volume_mm3 : float
    peak_value : float
        The class map's largest value inside the lesion.
    peak_mm : tuple of float
        Where it lies (RAS mm).
    """

    class_index: int
    class_name: str | None
    label: int
    box: BoundingBox
    volume_mm3: float
    peak_value: float
    peak_mm: tuple[float, ...]

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"class_index": self.class_index, "class_name": self.class_name, "label": self.label,
                "volume_mm3": self.volume_mm3, "peak_value": self.peak_value, "peak_mm": list(self.peak_mm),
                "box": self.box.to_dict()}


@dataclass(frozen=True)
class Segmentation:
    """The result of :func:`segment`.

    Attributes
    ----------
    labels : (I, J, K) uint8 ndarray (uint16 beyond 255 classes)
        On the scan grid: 0 background, ``c + 1`` class ``c``.
    space : Space
        The scan's grid.
    lesions : tuple of Lesion
        Every component of every class, ordered by class, then by first voxel.
    class_names : tuple of (str or None)
        Per class index of the maps.
    settings : SegmentSettings
    regions : tuple of Region
        The crops that were segmented.
    """

    labels: np.ndarray
    space: Space
    lesions: tuple[Lesion, ...]
    class_names: tuple[str | None, ...]
    settings: SegmentSettings
    regions: tuple[Region, ...] = field(default_factory=tuple)

    def mask(self, class_index: int) -> np.ndarray:
        """Boolean ``(I, J, K)`` mask of one class."""
        return self.labels == class_index + 1

    def to_dict(self) -> dict:
        """Settings, grid, classes, lesions (with boxes in mm) and crops, JSON-ready (no arrays)."""
        return {
            "settings": self.settings.to_dict(),
            "space": {"shape": list(self.space.shape), "affine": np.asarray(self.space.affine).tolist()},
            "classes": [{"index": c, "name": name, "label": c + 1} for c, name in enumerate(self.class_names)],
            "lesions": [lesion.to_dict() for lesion in self.lesions],
            "regions": [region.to_dict() for region in self.regions],
        }

    def save(self, labels_path: str | Path, boxes_path: str | Path | None = None, *, like: Any = None) -> tuple[Path, Path | None]:
        """Write the label map (NIfTI, uint8/uint16) and optionally :meth:`to_dict` as JSON, atomically.

        Parameters
        ----------
        labels_path : path
            ``.nii.gz`` (or any format :func:`medcam3d.io.write` knows).
        boxes_path : path, optional
            JSON with the lesions and their boxes.
        like : optional
            A reference image whose header codes are copied (see :func:`medcam3d.io.write`).
        """
        from . import io

        names = ", ".join(f"{c + 1} {name or f'class{c}'}" for c, name in enumerate(self.class_names))
        descrip = f"medcam3d segment {self.settings.method}: 0 bg, {names}"[:80]
        io.write(labels_path, self.labels, self.space, dtype=self.labels.dtype, like=like, descrip=descrip)
        if boxes_path is not None:
            atomic_write_text(boxes_path, json.dumps(self.to_dict(), indent=2))
        return Path(labels_path), None if boxes_path is None else Path(boxes_path)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class _Map:
    """One class map on its own grid, smoothed, with its maximum and a resampler to the scan."""

    index: int
    name: str | None
    data: np.ndarray
    space: Space
    top: float
    same_grid: bool
    resampler: Resampler | None
    raw: np.ndarray | None = None  # before smoothing (where the peaks are found)

    def crop(self, crop: tuple[slice, ...]) -> np.ndarray:
        """The map on the scan's voxels ``crop`` (trilinear; 0 outside the map's field of view)."""
        if self.same_grid:
            return np.asarray(self.data[crop], dtype=np.float32)
        assert self.resampler is not None  # set whenever the grids differ
        indices = [np.arange(s.start, s.stop) for s in crop]
        return np.asarray(self.resampler(self.data, indices=indices, fill=0.0), dtype=np.float32)


def _maps(heatmaps: Any, space: Space, class_names: Sequence[str | None] | None, smooth_mm: float) -> list[_Map]:
    """Validate the maps and bring them into one form (see :func:`segment`)."""
    if isinstance(heatmaps, Heatmap):
        heatmaps = [heatmaps]
    entries: list[tuple[int, str | None, np.ndarray, Space]] = []
    if isinstance(heatmaps, np.ndarray) or hasattr(heatmaps, "detach"):
        array = heatmaps.detach().cpu().numpy() if hasattr(heatmaps, "detach") else heatmaps
        if array.ndim != 4 or tuple(array.shape[1:]) != space.shape:
            raise InputError(f"maps given as an array must have shape (C, *scan shape) = (C, {', '.join(map(str, space.shape))}), "
                             f"got {array.shape}; or pass Heatmap objects on any grid.")
        entries = [(c, None, array[c], space) for c in range(array.shape[0])]
    else:
        heatmaps = heatmap_list(heatmaps)
        for position, heat in enumerate(heatmaps):
            if not isinstance(heat, Heatmap):
                raise InputError(f"heatmaps[{position}] is a {type(heat).__name__}; expected medcam3d Heatmap objects "
                                 "(Explanation.to_scanner_space(...)) or one (C, *scan shape) array.")
            entries.append((heat.class_index, heat.class_name, np.asarray(heat.data), heat.space))
    if not entries:
        raise InputError("no class maps were given; pass at least one Heatmap.")
    indices = [e[0] for e in entries]
    if len(set(indices)) != len(indices):
        raise InputError(f"each class may have one map; got class indices {indices}.")
    out = []
    resamplers: dict[tuple, Resampler] = {}
    for index, name, data, grid in entries:
        if data.ndim != 3 or tuple(data.shape) != tuple(grid.shape):
            raise InputError(f"the map of class {index} has shape {data.shape}; expected a 3D map on its grid {grid.shape}.")
        data = np.asarray(data, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            raise InputError(f"the map of class {index} contains NaN/Inf values; fix the map before segmenting.")
        if class_names is not None and index < len(class_names) and class_names[index] is not None:
            name = class_names[index]
        raw = data
        if smooth_mm > 0:
            sigma = [smooth_mm / s for s in grid.spacing]
            data = ndimage.gaussian_filter(data, sigma, mode="nearest").astype(np.float32)
        same = tuple(grid.shape) == tuple(space.shape) and grid.isclose(space)
        resampler = None
        if not same:
            key = (tuple(grid.shape), np.asarray(grid.affine).round(6).tobytes())
            resampler = resamplers.get(key)
            if resampler is None:
                resampler = resamplers[key] = Resampler(grid, space)
        top = float(data.max()) if data.size else 0.0
        out.append(_Map(int(index), name, data, grid, top, same, resampler, raw))
    return out


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def segment(
    image: Any,
    space: Any,
    heatmaps: Any,
    *,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str | None] | None = None,
    settings: SegmentSettings | None = None,
    **overrides: Any,
) -> Segmentation:
    """Segment the lesions of each class from its map and the scan: seed, expand, constrain.

    Parameters
    ----------
    image : (I, J, K) array
        The scan on its own grid (e.g. HU), as :func:`medcam3d.io.read` gives it.
    space : Space or (shape, affine)
        The scan's grid (``scanner_space``); its shape must equal ``image.shape``.
    heatmaps : ClassMaps, sequence of Heatmap, or (C, I, J, K) array
        One map per class. Heatmaps may lie on any grid: pass them on the feature grid
        (``explanation.feature_maps()``) for speed on big scans, or on the scan's grid.
        An array holds maps on the scan's grid, class ``c`` at position ``c``.
    classes : sequence of int, optional
        Class indices to segment, e.g. those predicted present (default: every map). Only these
        compete with each other for voxels.
    class_names : sequence of str, optional
        Overrides the names the heatmaps carry.
    settings : SegmentSettings, optional
        Default :class:`SegmentSettings()`; keyword ``overrides`` replace single fields
        (``segment(..., method="threshold")``).

    Returns
    -------
    Segmentation
        An all-zero label map and no lesions where a class map has no positive value.

    Raises
    ------
    InputError
        Image not 3D or not finite, maps of the wrong shape, NaN maps, unknown classes.
    SpaceError
        The grid does not match the image.
    UsageError
        Bad settings.
    """
    settings = settings or SegmentSettings()
    if overrides:
        unknown = sorted(set(overrides) - set(SegmentSettings.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown setting(s) {unknown}; the settings are {sorted(SegmentSettings.__dataclass_fields__)}.")
        settings = replace(settings, **overrides)
    image = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if image.ndim != 3:
        raise InputError(f"image must be one 3D volume (I, J, K), got shape {image.shape}; drop channel/batch axes first.")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise InputError(f"image must hold real numbers, not {image.dtype}.")
    space = Space.of(space)
    if space.ndim != 3 or tuple(space.shape) != tuple(image.shape):
        raise SpaceError(f"the grid has shape {space.shape} but the image has shape {image.shape}; pass the image's own "
                         "grid (scanner_space).")
    maps = _maps(heatmaps, space, class_names, settings.smooth_mm)
    by_index = {m.index: m for m in maps}
    wanted = sorted(by_index) if classes is None else [int(c) for c in classes]
    missing = [c for c in wanted if c not in by_index]
    if missing:
        raise InputError(f"no map for class(es) {missing}; maps were given for {sorted(by_index)}.")
    n_classes = max(by_index) + 1
    names = tuple(by_index[c].name if c in by_index else None for c in range(n_classes))
    labels = np.zeros(space.shape, dtype=np.uint8 if n_classes < 256 else np.uint16)
    active = [by_index[c] for c in wanted if by_index[c].top > 0]
    regions: list[Region] = []
    for cmap in active:
        peaks = _peaks(cmap, settings)
        for crop in _crops(cmap, space, settings):
            region = _segment_crop(image, space, crop, cmap, [m for m in active if m is not cmap], settings, peaks)
            regions.append(region)
            _paste(labels, region, cmap, active)
    lesions = _lesions(labels, space, regions, by_index, settings)
    return Segmentation(labels, space, tuple(lesions), names, settings, tuple(regions))


def _crops(cmap: _Map, space: Space, settings: SegmentSettings) -> list[tuple[slice, ...]]:
    """Scan-grid crops around the candidate components of one map (overlapping ones merged)."""
    candidate = cmap.data >= settings.candidate * cmap.top
    components, _ = ndimage.label(candidate, structure=_FULL)
    boxes = []
    spacing = np.asarray(space.spacing)
    for found in ndimage.find_objects(components):
        if found is None:
            continue
        low = np.array([s.start for s in found], dtype=np.float64) - 1.0  # the superlevel set ends before the
        high = np.array([s.stop - 1 for s in found], dtype=np.float64) + 1.0  # next node below the threshold
        corners = np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1).T
        voxels = space.world_to_voxel(cmap.space.voxel_to_world(corners))
        pad = settings.margin_mm / spacing
        lo = np.maximum(np.floor(voxels.min(0) - pad), 0).astype(int)
        hi = np.minimum(np.ceil(voxels.max(0) + pad), np.asarray(space.shape) - 1).astype(int)
        if np.all(hi >= lo):
            boxes.append([lo, hi])
    merged = True
    while merged:  # merge boxes that overlap or touch, so that each lesion lies in one crop
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (lo_a, hi_a), (lo_b, hi_b) = boxes[a], boxes[b]
                if np.all(lo_a <= hi_b + 1) and np.all(lo_b <= hi_a + 1):
                    boxes[a] = [np.minimum(lo_a, lo_b), np.maximum(hi_a, hi_b)]
                    del boxes[b]
                    merged = True
                    break
            if merged:
                break
    return [tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi)) for lo, hi in boxes]


def _peaks(cmap: _Map, settings: SegmentSettings) -> np.ndarray:
    """World positions (N, 3) of the map's local maxima (3 x 3 x 3 on its own grid, before any
    smoothing, which could merge two lesions' peaks) at or above ``candidate`` x the maximum: one
    per candidate lesion (a trilinear map peaks at its nodes)."""
    data = cmap.data if cmap.raw is None else cmap.raw
    local = ndimage.maximum_filter(data, size=3, mode="nearest")
    where = np.argwhere((data >= local) & (data >= settings.candidate * float(data.max())))
    return cmap.space.voxel_to_world(where.astype(np.float64)).reshape(-1, 3)


def _segment_crop(image: np.ndarray, space: Space, crop: tuple[slice, ...], cmap: _Map, others: list[_Map],
                  settings: SegmentSettings, peaks: np.ndarray) -> Region:
    """Seeds, expansion and constraints of one class around one candidate crop."""
    values = cmap.crop(crop)
    relative = values / cmap.top
    crop_image = np.asarray(image[crop], dtype=np.float32)
    candidate = relative >= settings.candidate
    beaten = np.zeros(values.shape, dtype=bool)
    competing = np.zeros(values.shape, dtype=bool)
    for other in others:
        theirs = other.crop(crop) / other.top
        beaten |= theirs > relative
        competing |= theirs >= settings.foreground
    background = relative < settings.background
    # the confident region of each peak: its connected part of the map above foreground x the peak
    start = np.array([c.start for c in crop])
    voxels = np.rint(space.world_to_voxel(peaks) - start).astype(int) if len(peaks) else np.zeros((0, 3), int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(values.shape)), axis=1)
    confident: list[np.ndarray] = []
    centres: list[tuple[int, ...]] = []
    for voxel in sorted({tuple(v) for v in voxels[inside]}, key=lambda v: -values[v]):
        if beaten[voxel] or not candidate[voxel] or any(region[voxel] for region in confident):
            continue
        labelled, _ = ndimage.label((values >= settings.foreground * values[voxel]) & ~beaten, structure=_FULL)
        confident.append(labelled == labelled[voxel])
        centres.append(voxel)
    high = np.logical_or.reduce(confident) if confident else np.zeros(values.shape, dtype=bool)
    if settings.method == "threshold":
        mask = _constrain(candidate & ~beaten, high, settings.fill_holes)
        seeds = _seed_codes(high, background, competing)
        return Region(cmap.index, crop, seeds, values, None, mask)
    if high.any():  # the surroundings the confident region is compared with: a shell margin_mm wide
        distance = ndimage.distance_transform_edt(~high, sampling=space.spacing)
        reference = (distance > 0) & (distance <= max(settings.margin_mm, 1e-6))
    else:
        reference = high
    if settings.seeding == "peak":
        foreground = _peak_seeds(crop_image, centres, confident, space, settings.seed_mm)
    else:
        foreground = _image_seeds(crop_image, values, confident, reference, settings)
    # expand on a tighter crop: the seeds' box plus the margin
    sub = _inner_crop(foreground, space, settings.margin_mm)
    full = tuple(slice(c.start + s.start, c.start + s.stop) for c, s in zip(crop, sub))
    foreground, background, competing = foreground[sub], background[sub], competing[sub]
    fallback = candidate[sub] & ~beaten[sub]
    values, crop_image = values[sub], crop_image[sub]
    seeds = _seed_codes(foreground, background, competing)
    probability = None
    if not foreground.any():
        mask = foreground
    elif settings.method == "random_walker":
        probability = _random_walker(crop_image, seeds, space, settings.beta)
        mask = probability > 0.5 if probability is not None else fallback  # a flat image: the map decides
    else:
        mask = _region_growing(crop_image, foreground, values, settings)
        mask &= seeds != BACKGROUND
        mask &= seeds != COMPETING
    mask = _constrain(mask, foreground, settings.fill_holes)
    return Region(cmap.index, full, seeds, values, probability, mask)


def _seed_codes(foreground: np.ndarray, background: np.ndarray, competing: np.ndarray) -> np.ndarray:
    """Seed codes (uint8): background where the map is low and on the crop's faces, competing, foreground."""
    seeds = np.zeros(foreground.shape, dtype=np.uint8)
    faces = np.zeros(foreground.shape, dtype=bool)
    for axis in range(foreground.ndim):
        index: list[Any] = [slice(None)] * foreground.ndim
        for end in (0, -1):
            index[axis] = end
            faces[tuple(index)] = True
    seeds[background | faces] = BACKGROUND
    seeds[competing & ~foreground] = COMPETING
    seeds[foreground] = FOREGROUND
    return seeds


def _image_seeds(crop_image: np.ndarray, values: np.ndarray, confident: list[np.ndarray], reference: np.ndarray,
                 settings: SegmentSettings) -> np.ndarray:
    """Foreground seeds: the voxels of the map's confident region whose intensity is typical of it.

    The intensities of the confident regions (``high``) and of their surroundings (``reference``:
    a shell ``margin_mm`` wide around them) give two histograms (bins of the crop's noise level,
    smoothed). Voxels of ``high`` whose intensity is at least ``contrast`` times likelier inside
    are seeds: the part of where the model looks that differs from around it, whatever its
    polarity. Isolated
    voxels are dropped (an opening), and each confident region keeps its seed components holding at
    least a quarter of the map's mass of the largest. Where nothing differs from its surroundings,
    there is no seed (no lesion); only a flat image (no information at all) falls back to the top of
    the map (>= 0.95 x its peak).
    """
    if not confident:
        return np.zeros(values.shape, dtype=bool)
    high = np.logical_or.reduce(confident)
    seeds = high.copy()
    if reference.any() and settings.contrast > 0:
        sigma = _noise_sigma(crop_image) or 1.0
        low_value, top_value = float(crop_image.min()), float(crop_image.max())
        width = max(sigma, (top_value - low_value) / 1024.0, 1e-6)
        bins = np.minimum(((crop_image - low_value) / width).astype(np.int64), 1024)
        size = int(bins.max()) + 1
        inside = bins[high]

        def density(index: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            counts = ndimage.gaussian_filter1d(np.bincount(index, weights=weights, minlength=size).astype(np.float64), 1.0)
            return (counts + 1e-3) / (counts.sum() + 1e-3 * size)

        ratio = density(inside) / density(bins[reference])
        seeds = np.zeros(high.shape, dtype=bool)
        seeds[high] = ratio[inside] >= settings.contrast
        seeds = ndimage.binary_opening(seeds, structure=ndimage.generate_binary_structure(3, 1)) & seeds
    kept = np.zeros(high.shape, dtype=bool)
    labelled, count = ndimage.label(seeds, structure=_FULL)
    if count == 0:
        if float(crop_image.std()) > 0:  # nothing where the model looks differs from around it: no lesion
            return kept
        for region in confident:  # a flat image carries no information: the top of the map is the seed
            kept |= region & (values >= 0.95 * values[region].max())
        return kept
    for region in confident:
        ids = np.unique(labelled[region & seeds])
        ids = ids[ids > 0]
        if ids.size:  # a peak without distinct voxels (a side lobe of the map) gets no seed
            masses = np.asarray(ndimage.sum(values, labelled, index=ids), dtype=np.float64)
            for number in ids[masses >= 0.25 * masses.max()]:  # two lesions under one peak: both
                kept |= labelled == number
    return kept


def _peak_seeds(crop_image: np.ndarray, centres: list[tuple[int, ...]], confident: list[np.ndarray], space: Space,
                radius_mm: float) -> np.ndarray:
    """Foreground seeds at each peak: the voxels of its confident region within ``radius_mm`` whose
    intensity lies within 2 noise levels of their median (the majority tissue at the peak)."""
    seeds = np.zeros(crop_image.shape, dtype=bool)
    if not centres:
        return seeds
    sigma = _noise_sigma(crop_image)
    spacing = np.asarray(space.spacing)
    for centre, region in zip(centres, confident):
        reach = np.ceil(radius_mm / spacing).astype(int)
        box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, crop_image.shape))
        offsets = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * d for b, c, d in zip(box, centre, spacing)], indexing="ij")
        ball = (sum(o**2 for o in offsets) <= radius_mm**2) & region[box]
        if not ball.any():
            continue
        values = crop_image[box]
        typical = np.abs(values - np.median(values[ball])) <= 2.0 * sigma if sigma > 0 else np.ones(ball.shape, bool)
        seeds[box] |= ball & typical
    return seeds


def _inner_crop(foreground: np.ndarray, space: Space, margin_mm: float) -> tuple[slice, ...]:
    """The box of the foreground seeds plus ``margin_mm``, within the crop (the whole crop if no seed)."""
    where = np.argwhere(foreground)
    if where.size == 0:
        return tuple(slice(0, n) for n in foreground.shape)
    pad = np.ceil(margin_mm / np.asarray(space.spacing)).astype(int)
    lo = np.maximum(where.min(0) - pad, 0)
    hi = np.minimum(where.max(0) + pad + 1, foreground.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _noise_sigma(data: np.ndarray) -> float:
    """Robust noise level from neighbour differences along every axis (MAD, Gaussian-consistent)."""
    diffs = [np.abs(np.diff(data, axis=a)).ravel() for a in range(data.ndim) if data.shape[a] > 1]
    if not diffs:
        return 0.0
    d = np.concatenate(diffs)
    d = d[d > 0]
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(d) / math.sqrt(2.0))


def _random_walker(crop_image: np.ndarray, seeds: np.ndarray, space: Space, beta: float) -> np.ndarray | None:
    """Foreground probability (crop shape) of scikit-image's random walker; None for a flat image."""
    from skimage.segmentation import random_walker

    sigma = _noise_sigma(crop_image)
    data = crop_image / sigma if sigma > 0 else crop_image
    spread = float(data.std())
    if not spread > 0:
        return None  # a flat image says nothing about edges
    labels = np.where(seeds == FOREGROUND, 1, np.where(seeds == UNLABELED, 0, 2)).astype(np.int32)
    # skimage weighs an edge exp(-beta' g^2 / (10 std)); beta' = beta 10 std makes it exp(-beta g^2),
    # g being the neighbour difference in units of the crop's noise level.
    with warnings.catch_warnings():  # a probability a hair outside [0, 1] (the solver's tolerance) is harmless
        warnings.filterwarnings("ignore", message="The probability range is outside")
        probability = random_walker(data, labels, beta=beta * 10.0 * spread, mode="cg_j", tol=_RW_TOL,
                                    return_full_prob=True, channel_axis=None)
    return np.asarray(probability[0], dtype=np.float32)


def _region_growing(crop_image: np.ndarray, foreground: np.ndarray, values: np.ndarray,
                    settings: SegmentSettings) -> np.ndarray:
    """SimpleITK's ConfidenceConnected from the foreground seeds (at most 64, the map's highest)."""
    import SimpleITK as sitk

    where = np.argwhere(foreground)
    order = np.argsort(-values[foreground], kind="stable")[:64]
    seed_list = [tuple(int(v) for v in where[i][::-1]) for i in order]  # SimpleITK indexes (x, y, z) = reversed
    itk = sitk.GetImageFromArray(crop_image.astype(np.float32))
    grown = sitk.ConfidenceConnected(itk, seedList=seed_list, numberOfIterations=int(settings.iterations),
                                     multiplier=float(settings.multiplier), initialNeighborhoodRadius=1, replaceValue=1)
    return sitk.GetArrayFromImage(grown).astype(bool)


def _constrain(mask: np.ndarray, foreground: np.ndarray, fill_holes: bool) -> np.ndarray:
    """The components of ``mask`` that hold a foreground seed, holes filled."""
    mask = mask | foreground
    components, count = ndimage.label(mask, structure=_FULL)
    if count == 0:
        return mask
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(components[foreground])] = True
    keep[0] = False
    mask = keep[components]
    return ndimage.binary_fill_holes(mask) if fill_holes else mask


def _paste(labels: np.ndarray, region: Region, cmap: _Map, active: list[_Map]) -> None:
    """Write one region into the label map; a voxel claimed twice goes to the class whose map is higher
    relative to its maximum."""
    crop = region.crop
    view = labels[crop]
    mine = region.mask
    taken = mine & (view != 0) & (view != cmap.index + 1)
    if taken.any():
        relative = region.class_map / cmap.top
        for other in active:
            if other is cmap:
                continue
            clash = taken & (view == other.index + 1)
            if clash.any():
                theirs = other.crop(crop) / other.top
                mine = mine & ~(clash & (theirs >= relative))
    view[mine] = cmap.index + 1


def _lesions(labels: np.ndarray, space: Space, regions: list[Region], by_index: dict[int, _Map],
             settings: SegmentSettings) -> list[Lesion]:
    """Connected components of each class's label, inside that class's crops, small ones removed."""
    voxel_mm3 = float(abs(np.linalg.det(space.affine[:3, :3])))
    lesions: list[tuple[tuple, Lesion]] = []
    for region in regions:
        c = region.class_index
        view = labels[region.crop]
        mine = view == c + 1
        components, count = ndimage.label(mine, structure=_FULL)
        if count == 0:
            continue
        start = np.array([s.start for s in region.crop])
        sub_affine = space.affine.copy()
        sub_affine[:3, 3] = space.voxel_to_world(start.astype(float))
        sub = Space(mine.shape, sub_affine)
        for number, found in enumerate(ndimage.find_objects(components), start=1):
            part = components[found] == number
            volume = float(part.sum()) * voxel_mm3
            if volume < settings.min_volume_mm3:
                view[found][part] = 0
                continue
            whole = components == number
            found_box = bounding_box(whole, sub)
            assert found_box is not None  # the component is not empty
            box = replace(found_box, voxel_min=tuple(int(v) for v in np.asarray(found_box.voxel_min) + start),
                          voxel_max=tuple(int(v) for v in np.asarray(found_box.voxel_max) + start))
            scores = np.where(whole, region.class_map, -np.inf)
            peak = np.unravel_index(int(np.argmax(scores)), scores.shape)
            peak_mm = space.voxel_to_world(np.asarray(peak, dtype=float) + start)
            lesion = Lesion(c, by_index[c].name, c + 1, box, round(volume, 3), float(region.class_map[peak]),
                            tuple(float(v) for v in peak_mm))
            lesions.append(((c, box.voxel_min), lesion))
    lesions.sort(key=lambda item: item[0])
    return [lesion for _, lesion in lesions]


# --------------------------------------------------------------------------------------------
# Sharper maps: a finer layer's map gated by the last layer's
# --------------------------------------------------------------------------------------------


def gated_maps(fine: Sequence[Heatmap] | Mapping[Any, Heatmap], gate: Sequence[Heatmap] | Mapping[Any, Heatmap]) -> list[Heatmap]:
    """Fused maps: each finer map (e.g. LayerCAM on an early layer) times the coarse map (e.g. the
    last layer's HiResCAM) divided by its maximum, on the finer map's grid.

    The early layer has the resolution (4 mm cells for the demo model instead of 8 mm) but little
    class specificity; the gate keeps its evidence only where the last layer puts the class.

    Parameters
    ----------
    fine : ClassMaps or sequence of Heatmap
        One per class, on one grid (``explanation.feature_maps()`` of the early layer).
    gate : ClassMaps or sequence of Heatmap
        The same classes in the same order, on any grid; resampled (trilinear) onto ``fine``'s.

    Returns
    -------
    list of Heatmap
        ``fine.data * max(gate, 0) / max(gate)`` (zero where the gate has no positive value), with
        ``method`` ``"<fine>*<gate>"`` and ``layer`` ``"<fine layer>*<gate layer>"``.
    """
    from .space import resample

    fine, gate = heatmap_list(fine), heatmap_list(gate)
    if len(fine) != len(gate) or not fine:
        raise InputError(f"gated_maps needs one gate per finer map; got {len(fine)} finer and {len(gate)} gate maps.")
    out = []
    for f, g in zip(fine, gate):
        if f.class_index != g.class_index:
            raise InputError(f"the maps are for different classes ({f.class_index} and {g.class_index}); pass them in "
                             "the same class order.")
        weight = np.asarray(resample(np.asarray(g.data, dtype=np.float32), g.space, f.space), dtype=np.float32)
        top = float(weight.max()) if weight.size else 0.0
        weight = np.clip(weight, 0.0, None) / top if top > 0 else np.zeros_like(weight)
        out.append(replace(f, data=(np.asarray(f.data, dtype=np.float32) * weight).astype(np.float32),
                           method=f"{f.method}*{g.method}", layer=f"{f.layer}*{g.layer}"))
    return out
