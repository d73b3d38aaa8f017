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

The result, :class:`~medcam3d.segment_records.Segmentation`, holds a label map on the scan's grid
(label ``c + 1`` for class ``c``, as the ground-truth masks of :mod:`medcam3d.demo`) and the
lesions, and keeps each crop's seeds and foreground probability
(:class:`~medcam3d.segment_records.Region`) for pictures. :func:`gated_maps` makes sharper input
maps: a finer layer's map (e.g. LayerCAM) gated by the last layer's.

This module holds the whole pipeline (steps 1 and 4, and the classes competing for voxels);
steps 2 and 3 on one crop are :mod:`medcam3d.segment_crops`; the settings and result records
(:class:`~medcam3d.segment_records.SegmentSettings`, ``Region``, ``Lesion``, ``Segmentation``)
are :mod:`medcam3d.segment_records`.

MONAI's ``CRF`` block (mean-field CRF with image features) was the third candidate for step 3;
it needs MONAI's compiled C++ extension (``monai._C``, ``BUILD_MONAI=1``), which the pip wheels do
not ship, so it is not offered. ``benchmarks/weak_segmentation.py`` compares the methods and
``docs/weak_segmentation.md`` reports the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError, SpaceError, UsageError
from .heatmap import Heatmap, heatmap_list
from .masks import bounding_box
from .segment_crops import ClassMap, class_maps, segment_crop
from .segment_records import Lesion, Region, SegmentSettings, Segmentation
from .space import Space

__all__ = ["gated_maps", "segment"]

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


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
        Default ``SegmentSettings()``; keyword ``overrides`` replace single fields
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
    maps = class_maps(heatmaps, space, class_names, settings.smooth_mm)
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
            region = segment_crop(image, space, crop, cmap, [m for m in active if m is not cmap], settings, peaks)
            regions.append(region)
            _paste(labels, region, cmap, active)
    lesions = _lesions(labels, space, regions, by_index, settings)
    return Segmentation(labels, space, tuple(lesions), names, settings, tuple(regions))


def _crops(cmap: ClassMap, space: Space, settings: SegmentSettings) -> list[tuple[slice, ...]]:
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


def _peaks(cmap: ClassMap, settings: SegmentSettings) -> np.ndarray:
    """World positions (N, 3) of the map's local maxima (3 x 3 x 3 on its own grid, before any
    smoothing, which could merge two lesions' peaks) at or above ``candidate`` x the maximum: one
    per candidate lesion (a trilinear map peaks at its nodes)."""
    data = cmap.data if cmap.raw is None else cmap.raw
    local = ndimage.maximum_filter(data, size=3, mode="nearest")
    where = np.argwhere((data >= local) & (data >= settings.candidate * float(data.max())))
    return cmap.space.voxel_to_world(where.astype(np.float64)).reshape(-1, 3)




def _paste(labels: np.ndarray, region: Region, cmap: ClassMap, active: list[ClassMap]) -> None:
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


def _lesions(labels: np.ndarray, space: Space, regions: list[Region], by_index: dict[int, ClassMap],
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
