"""One class segmented on one crop of the scan: its map there, seeds, expansion, constraint.

One concept: steps 2 and 3 of :func:`medcam3d.segment.segment` for one class and one crop.
:class:`ClassMap` is one class's map on its own grid (smoothed, with a resampler to the scan's
grid), made by :func:`class_maps`; :func:`segment_crop` seeds it (the confident region around each
peak, foreground seeds by contrast or at the peak, background and competing seeds), expands the
seeds with the random walker or region growing (or keeps the thresholded map) and keeps the parts
connected to foreground seeds, holes filled. The module docstring of :mod:`medcam3d.segment`
describes each step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError
from .heatmap import Heatmap, heatmap_list
from .segment_records import BACKGROUND, COMPETING, FOREGROUND, UNLABELED, Region, SegmentSettings
from .space import Resampler, Space

__all__ = ["ClassMap", "class_maps", "segment_crop"]

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_RW_TOL = 1e-2  # relative tolerance of the random walker's conjugate gradients (0.5 cut: 1e-3 gave the same masks)


@dataclass
class ClassMap:
    """One class map on its own grid, smoothed, with its maximum and a resampler to the scan.

    Attributes
    ----------
    index : int
        The class index.
    name : str or None
    data : (*grid shape) float32 ndarray
        The map, smoothed as the settings say.
    space : Space
        The map's own grid.
    top : float
        ``data``'s maximum.
    same_grid : bool
        The map lies on the scan's grid.
    resampler : Resampler or None
        From the map's grid to the scan's; None on the same grid.
    raw : (*grid shape) ndarray or None
        Before smoothing (where the peaks are found).
    """

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


def class_maps(heatmaps: Any, space: Space, class_names: Sequence[str | None] | None, smooth_mm: float) -> list[ClassMap]:
    """The maps of :func:`medcam3d.segment.segment` checked and brought into one form.

    Parameters
    ----------
    heatmaps : ClassMaps, sequence of Heatmap, Heatmap, or (C, I, J, K) array
        One map per class (an array: on the scan's grid, class ``c`` at position ``c``).
    space : Space
        The scan's grid.
    class_names : sequence of str, optional
        Overrides the names the heatmaps carry.
    smooth_mm : float
        Standard deviation (mm) of the Gaussian applied to each map on its own grid (0: none).

    Returns
    -------
    list of ClassMap
        In the order given.

    Raises
    ------
    InputError
        Maps of the wrong shape or type, NaN/Inf values, no map, two maps of one class.
    """
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
        out.append(ClassMap(int(index), name, data, grid, top, same, resampler, raw))
    return out



def segment_crop(image: np.ndarray, space: Space, crop: tuple[slice, ...], cmap: ClassMap, others: list[ClassMap],
                 settings: SegmentSettings, peaks: np.ndarray) -> Region:
    """Seeds, expansion and constraints of one class around one candidate crop.

    Parameters
    ----------
    image : (I, J, K) ndarray
        The scan on its grid ``space``.
    space : Space
    crop : tuple of slice
        The candidate crop's voxel ranges on the scan grid.
    cmap : ClassMap
        The class segmented.
    others : list of ClassMap
        The other segmented classes (they compete for voxels).
    settings : SegmentSettings
    peaks : (N, 3) ndarray
        World positions (RAS mm) of the class map's candidate peaks.

    Returns
    -------
    Region
        On the crop, or on a tighter crop around the foreground seeds (the seeds' box plus ``margin_mm``).
    """
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
