"""Localization metrics: how well one map agrees with one ground-truth mask on the same grid.

Every function takes one map and one binary mask of the same shape (3D, or 2D), usually both on
the scan's grid (scanner space, after :meth:`medcam3d.Explanation.to_scanner_space`). Maps are
raw or normalized; only their order and their positive mass matter. Inputs may be numpy arrays
or torch tensors.

Conventions for degenerate inputs (never NaN, never an exception):

* a map with no positive value ("empty map") points nowhere: pointing game ``False``, energy
  ``0.0``, thresholded mask empty;
* an empty ground-truth mask (no lesion): pointing game ``False``, energy ``0.0``; Dice, IoU and
  box IoU are ``1.0`` when the thresholded map is empty too (both agree there is nothing) and
  ``0.0`` otherwise. Cohort statistics usually skip cases without a lesion
  (:func:`medcam3d.jobs.evaluate.evaluate` does);
* the one exception to "never NaN": :func:`hausdorff95` is ``0.0`` when both masks are empty and
  ``nan`` when exactly one is (there is no distance to an empty set); averages skip it and say
  how many were undefined.

Segmentation scores (a predicted mask, e.g. from :func:`medcam3d.segment.segment`, against the
truth): :func:`dice`, :func:`iou`, :func:`hausdorff95` (MONAI, in mm), :func:`box_iou_mm` (boxes
in RAS mm) and, all at once with per-lesion box IoU, :func:`segmentation_scores`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..masks import BoundingBox
from ..space import Space

__all__ = [
    "DEFAULT_THRESHOLDS",
    "SegmentationScores",
    "ThresholdCurve",
    "box_iou",
    "box_iou_mm",
    "box_of",
    "dice",
    "dice_iou_curve",
    "energy_pointing_game",
    "hausdorff95",
    "iou",
    "pointing_game",
    "segmentation_scores",
]

#: Thresholds of :func:`dice_iou_curve`, as fractions of the map's maximum.
DEFAULT_THRESHOLDS: np.ndarray = np.round(np.linspace(0.05, 1.0, 20), 4)


def _as_array(value: object, name: str) -> np.ndarray:
    """A numpy copy-free view of an array or (detached, CPU) tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D array (one map on one grid), got shape {array.shape}. "
                         "Pass a single map, e.g. heatmap.data or result.maps[0, t].")
    return array


def _pair(heat: object, mask: object) -> tuple[np.ndarray, np.ndarray]:
    heat = _as_array(heat, "heat").astype(np.float64, copy=False)
    mask = _as_array(mask, "mask")
    if heat.shape != mask.shape:
        raise ValueError(f"The map has shape {heat.shape} but the mask has shape {mask.shape}; both must lie on one "
                         "grid. Resample the map to the mask's grid first (Explanation.to_scanner_space).")
    if not np.all(np.isfinite(heat)):
        raise ValueError("The map contains NaN/Inf values; fix the map before scoring it.")
    return heat, mask.astype(bool, copy=False)


def pointing_game(heat: object, mask: object, space: Space | None = None, *, tolerance_mm: float = 0.0) -> bool:
    """Is the map's peak inside the mask (or within ``tolerance_mm`` of it)?

    Parameters
    ----------
    heat : (*shape) array
        One map.
    mask : (*shape) bool array
        The ground truth on the same grid.
    space : Space, optional
        The grid, needed for a tolerance in mm (distances are measured in world space, so
        anisotropic and oblique grids are handled exactly).
    tolerance_mm : float
        A hit also counts when a mask voxel lies within this distance of the peak voxel
        (centre to centre). 0: the peak voxel itself must be inside.

    Returns
    -------
    bool
        ``False`` for a map without a positive value or an empty mask. The peak is the first
        maximum in C order (as :meth:`medcam3d.heatmap.Heatmap.peak`).
    """
    heat, mask = _pair(heat, mask)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, not {tolerance_mm}.")
    if not mask.any() or heat.size == 0 or heat.max() <= 0:
        return False
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if mask[peak]:
        return True
    if tolerance_mm == 0:
        return False
    if space is None:
        raise ValueError("A tolerance in mm needs the grid: pass space=Space(shape, affine) (e.g. heatmap.space).")
    if tuple(space.shape) != heat.shape:
        raise ValueError(f"space has shape {space.shape} but the map has shape {heat.shape}.")
    peak_mm = space.voxel_to_world(np.asarray(peak, dtype=float))
    inside_mm = space.voxel_to_world(np.argwhere(mask).astype(float))
    return bool(np.min(np.linalg.norm(inside_mm - peak_mm, axis=1)) <= tolerance_mm + 1e-9)


def energy_pointing_game(heat: object, mask: object) -> float:
    """Share of the map's positive mass that lies inside the mask (Score-CAM's energy game).

    Parameters
    ----------
    heat : (*shape) array
    mask : (*shape) bool array

    Returns
    -------
    float
        ``Σ_mask max(heat, 0) / Σ max(heat, 0)`` in [0, 1]; 0.0 when the map has no positive mass.
    """
    heat, mask = _pair(heat, mask)
    positive = np.clip(heat, 0, None)
    total = float(positive.sum())
    if total <= 0:
        return 0.0
    return float(positive[mask].sum() / total)


def _mask_pair(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    """Two masks as boolean arrays of one shape (a ValueError otherwise)."""
    a, b = _as_array(a, "a").astype(bool), _as_array(b, "b").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"Masks of shapes {a.shape} and {b.shape} cannot be compared; put them on one grid.")
    return a, b


def dice(a: object, b: object) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two binary masks.

    Parameters
    ----------
    a, b : (*shape) bool array
        Two masks on one grid (2D or 3D; any nonzero value counts as inside).

    Returns
    -------
    float
        In [0, 1]; 1.0 when both are empty, 0.0 when only one is.
    """
    a, b = _mask_pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: object, b: object) -> float:
    """Intersection over union (Jaccard index) ``|A∩B| / |A∪B|`` of two (*shape) binary masks on one grid.

    Same inputs and empty-mask convention as :func:`dice` (1.0 when both are empty, 0.0 when only
    one is); ``iou = dice / (2 - dice)``.
    """
    a, b = _mask_pair(a, b)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


@dataclass(frozen=True)
class ThresholdCurve:
    """Dice and IoU of the thresholded map against the mask, per threshold.

    Attributes
    ----------
    thresholds : (N,) ndarray
        Fractions of the map's maximum; voxels ``>= t * max`` (and > 0) form the mask.
    dice, iou : (N,) ndarray
    best_dice, best_iou : float
        Maxima over the thresholds.
    best_dice_threshold, best_iou_threshold : float
        Where they are reached (the lowest such threshold).
    auc_dice, auc_iou : float
        Area under each curve over the threshold range, divided by the range's width: the mean
        score over thresholds, in [0, 1] (1.0 for a map equal to the mask). A single threshold
        gives its score.
    """

    thresholds: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    best_dice: float
    best_iou: float
    best_dice_threshold: float
    best_iou_threshold: float
    auc_dice: float
    auc_iou: float


def _normalized_area(values: np.ndarray, x: np.ndarray) -> float:
    if len(x) == 1:
        return float(values[0])
    width = float(x[-1] - x[0])
    area = float(np.trapezoid(values, x))
    return float(np.clip(area / width, 0.0, 1.0))  # scores lie in [0, 1]; drop float round-off


def dice_iou_curve(heat: object, mask: object, thresholds: Sequence[float] | None = None) -> ThresholdCurve:
    """Dice and IoU of ``heat >= t · max(heat)`` against the mask for each threshold ``t``.

    Parameters
    ----------
    heat : (*shape) array
    mask : (*shape) bool array
    thresholds : sequence of float in (0, 1], increasing, optional
        Fractions of the maximum; default :data:`DEFAULT_THRESHOLDS` (0.05, 0.10, ..., 1.0).

    Returns
    -------
    ThresholdCurve
    """
    heat, mask = _pair(heat, mask)
    t = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64).ravel()
    if t.size == 0 or np.any(t <= 0) or np.any(t > 1) or np.any(np.diff(t) <= 0):
        raise ValueError(f"thresholds must be increasing fractions of the maximum in (0, 1], not {t.tolist()}.")
    top = float(heat.max()) if heat.size else 0.0
    truth = int(mask.sum())
    if top <= 0:  # nothing above any threshold
        value = 1.0 if truth == 0 else 0.0
        dices = ious = np.full(t.shape, value)
    else:
        # counts per threshold from one sort instead of one pass per threshold
        values = heat.ravel()
        inside = mask.ravel()
        order = np.sort(values[values > 0])  # every cut is > 0: only positive voxels can pass
        order_in = np.sort(values[inside & (values > 0)])
        cut = t * top
        predicted = order.size - np.searchsorted(order, cut, side="left")
        hits = order_in.size - np.searchsorted(order_in, cut, side="left")
        union = predicted + truth - hits
        with np.errstate(invalid="ignore", divide="ignore"):
            dices = np.where(predicted + truth > 0, 2.0 * hits / np.maximum(predicted + truth, 1), 1.0)
            ious = np.where(union > 0, hits / np.maximum(union, 1), 1.0)
    best_d, best_i = int(np.argmax(dices)), int(np.argmax(ious))
    return ThresholdCurve(
        thresholds=t,
        dice=np.asarray(dices, dtype=np.float64),
        iou=np.asarray(ious, dtype=np.float64),
        best_dice=float(dices[best_d]),
        best_iou=float(ious[best_i]),
        best_dice_threshold=float(t[best_d]),
        best_iou_threshold=float(t[best_i]),
        auc_dice=_normalized_area(np.asarray(dices, dtype=np.float64), t),
        auc_iou=_normalized_area(np.asarray(ious, dtype=np.float64), t),
    )


def box_of(mask: object) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Inclusive voxel bounds ``(low, high)`` of a binary mask; None when it is empty."""
    where = np.argwhere(_as_array(mask, "mask").astype(bool))
    if where.size == 0:
        return None
    return tuple(int(v) for v in where.min(0)), tuple(int(v) for v in where.max(0))


def _box(value: object, name: str):
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (tuple, list)) for v in value):
        low, high = (np.asarray(v, dtype=np.int64) for v in value)
        if low.shape != high.shape or np.any(high < low):
            raise ValueError(f"{name} must be (low, high) inclusive voxel bounds with low <= high, not {value}.")
        return low, high
    box = box_of(value)
    return None if box is None else (np.asarray(box[0]), np.asarray(box[1]))


def box_iou(a: object, b: object) -> float:
    """IoU of two axis-aligned voxel boxes (3D or 2D).

    Parameters
    ----------
    a, b : binary mask, or ``(low, high)`` inclusive voxel bounds (as :func:`box_of`), or None
        A mask is replaced by its bounding box. To score a map, threshold it first, e.g.
        ``box_iou(medcam3d.masks.threshold_mask(heat, keep_largest=True), lesion)``.

    Returns
    -------
    float
        ``|A∩B| / |A∪B|`` counted in voxels (on one grid this equals the ratio of volumes in mm³);
        1.0 when both are empty, 0.0 when only one is.
    """
    box_a, box_b = _box(a, "a"), _box(b, "b")
    if box_a is None or box_b is None:
        return 1.0 if box_a is None and box_b is None else 0.0
    if box_a[0].shape != box_b[0].shape:
        raise ValueError(f"Boxes of {box_a[0].size} and {box_b[0].size} dimensions cannot be compared.")
    volume_a = float(np.prod(box_a[1] - box_a[0] + 1))
    volume_b = float(np.prod(box_b[1] - box_b[0] + 1))
    overlap = np.minimum(box_a[1], box_b[1]) - np.maximum(box_a[0], box_b[0]) + 1
    inter = float(np.prod(np.clip(overlap, 0, None)))
    return inter / (volume_a + volume_b - inter)


# ------------------------------------------------------------------------------ segmentation
def hausdorff95(prediction: object, truth: object, spacing: Space | Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two masks' surfaces, in mm (MONAI).

    MONAI's :func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95`` and the
    voxel spacing: the 95th percentile of the distances from each mask's surface voxels to the
    other mask's surface, both directions pooled. It runs on the box holding both masks (plus one
    voxel), so its cost does not grow with the scan.

    Parameters
    ----------
    prediction, truth : (I, J, K) or (I, J) bool array
        Two masks on one grid.
    spacing : Space or sequence of float, optional
        The grid (its voxel size is used) or the voxel size in mm per axis; default 1 mm. Distances
        are exact on any grid without shear (rotations, i.e. oblique and LPS grids, keep them).

    Returns
    -------
    float
        In mm; ``0.0`` when both masks are empty; ``nan`` when exactly one is (undefined).
    """
    a = _as_array(prediction, "prediction").astype(bool)
    b = _as_array(truth, "truth").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"Masks of shapes {a.shape} and {b.shape} cannot be compared; put them on one grid.")
    if spacing is None:
        step = [1.0] * a.ndim
    elif isinstance(spacing, Space):
        if tuple(spacing.shape) != a.shape:
            raise ValueError(f"space has shape {spacing.shape} but the masks have shape {a.shape}.")
        step = [float(v) for v in spacing.spacing]
    else:
        step = [float(v) for v in spacing]
    if len(step) != a.ndim or not all(math.isfinite(v) and v > 0 for v in step):
        raise ValueError(f"spacing must be {a.ndim} positive voxel sizes in mm, not {step}.")
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.nan
    import torch
    from monai.metrics import compute_hausdorff_distance

    where = np.argwhere(a | b)
    box = tuple(slice(max(int(low) - 1, 0), int(high) + 2) for low, high in zip(where.min(0), where.max(0)))
    p = torch.from_numpy(np.ascontiguousarray(a[box]))[None, None].float()
    t = torch.from_numpy(np.ascontiguousarray(b[box]))[None, None].float()
    with warnings.catch_warnings():  # MONAI's own deprecation notices about its internals
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=step)
    return float(value.item())


def _world_box(value: object, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    if value is None:
        return None
    if isinstance(value, BoundingBox):
        low, high = np.asarray(value.world_min, dtype=np.float64), np.asarray(value.world_max, dtype=np.float64)
    elif isinstance(value, dict) and "world_min" in value:
        low, high = np.asarray(value["world_min"], dtype=np.float64), np.asarray(value["world_max"], dtype=np.float64)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        low, high = (np.asarray(v, dtype=np.float64) for v in value)
    else:
        raise ValueError(f"{name} must be a BoundingBox, its to_dict(), or (min_mm, max_mm); not {type(value).__name__}.")
    if low.ndim != 1 or low.shape != high.shape or np.any(high < low) or not np.all(np.isfinite(low + high)):
        raise ValueError(f"{name} must have finite world bounds with min <= max, not {low.tolist()}, {high.tolist()}.")
    return low, high


def box_iou_mm(a: object, b: object) -> float:
    """IoU of two axis-aligned boxes in world (RAS) mm: volumes in mm³.

    Parameters
    ----------
    a, b : BoundingBox, its ``to_dict()``, ``(min_mm, max_mm)`` pair of (D,) sequences, or None
        A :class:`medcam3d.masks.BoundingBox` counts by its world extent (``world_min`` to
        ``world_max``: the outer voxel edges; on an oblique grid, the world-axis-aligned extent of
        its corners). Boxes from different grids can be compared.

    Returns
    -------
    float
        ``vol(A∩B) / vol(A∪B)``; 1.0 when both are None (nothing to find, nothing found), 0.0 when
        only one is, and 0.0 for two boxes of zero volume that do not coincide.
    """
    box_a, box_b = _world_box(a, "a"), _world_box(b, "b")
    if box_a is None or box_b is None:
        return 1.0 if box_a is None and box_b is None else 0.0
    if box_a[0].shape != box_b[0].shape:
        raise ValueError(f"Boxes of {box_a[0].size} and {box_b[0].size} dimensions cannot be compared.")
    volume_a = float(np.prod(box_a[1] - box_a[0]))
    volume_b = float(np.prod(box_b[1] - box_b[0]))
    inter = float(np.prod(np.clip(np.minimum(box_a[1], box_b[1]) - np.maximum(box_a[0], box_b[0]), 0, None)))
    union = volume_a + volume_b - inter
    if union <= 0:
        return 1.0 if np.array_equal(box_a[0], box_b[0]) and np.array_equal(box_a[1], box_b[1]) else 0.0
    return inter / union


_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: one lesion is one 26-connected component


def _extent_mm(found: tuple[slice, ...], space: Space) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) extent of the outer voxel edges of a voxel box, as :class:`BoundingBox` has it."""
    edges = [(s.start - 0.5, s.stop - 0.5) for s in found]
    corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(len(edges), -1).T
    world = np.asarray(space.voxel_to_world(corners), dtype=np.float64)
    return world.min(0), world.max(0)


@dataclass(frozen=True)
class SegmentationScores:
    """How a predicted mask of one class agrees with the truth (see :func:`segmentation_scores`).

    Attributes
    ----------
    dice, iou : float
        Of the whole masks.
    hd95 : float
        :func:`hausdorff95` in mm (``nan`` when exactly one mask is empty).
    box_ious : tuple of float
        Per true lesion (26-connected component of the truth, in order of first voxel): the best
        :func:`box_iou_mm` of its box with a predicted box (0.0 when nothing was predicted).
    found : tuple of bool
        Per true lesion: some predicted voxel lies inside it.
    predicted_lesions, true_lesions : int
        Number of predicted boxes and of true lesions.
    """

    dice: float
    iou: float
    hd95: float
    box_ious: tuple[float, ...]
    found: tuple[bool, ...]
    predicted_lesions: int
    true_lesions: int

    @property
    def box_iou(self) -> float:
        """Mean of :attr:`box_ious` (``nan`` without a true lesion)."""
        return float(np.mean(self.box_ious)) if self.box_ious else math.nan

    @property
    def lesions_found(self) -> float:
        """Share of the true lesions that were found (``nan`` without a true lesion)."""
        return float(np.mean(self.found)) if self.found else math.nan

    def to_dict(self) -> dict:
        """JSON-ready (strict: ``None`` where a value is undefined)."""
        def plain(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {"dice": self.dice, "iou": self.iou, "hd95_mm": plain(self.hd95), "box_iou": plain(self.box_iou),
                "box_ious": list(self.box_ious), "lesions_found": plain(self.lesions_found), "found": list(self.found),
                "predicted_lesions": self.predicted_lesions, "true_lesions": self.true_lesions}


def segmentation_scores(prediction: object, truth: object, space: Space, boxes: Sequence[object] | None = None
                        ) -> SegmentationScores:
    """Dice, IoU, HD95 (mm) and per-lesion box IoU (mm) of a predicted mask against the truth.

    Parameters
    ----------
    prediction, truth : (I, J, K) bool array
        One class's predicted and true masks on the grid ``space``.
    space : Space
        The grid of both masks (voxel size for HD95, world positions for the boxes).
    boxes : sequence of BoundingBox (or what :func:`box_iou_mm` takes), optional
        The predicted lesions' boxes (e.g. ``[l.box for l in segmentation.lesions if l.class_index == c]``);
        default: the boxes of the 26-connected components of ``prediction``.

    Returns
    -------
    SegmentationScores
        Each true lesion (26-connected component of ``truth``) is scored by the best IoU of its
        world box with a predicted box; an empty truth has no lesion to score (empty tuples).
    """
    from scipy import ndimage

    predicted = _as_array(prediction, "prediction").astype(bool)
    true = _as_array(truth, "truth").astype(bool)
    if predicted.shape != true.shape or tuple(space.shape) != true.shape:
        raise ValueError(f"prediction {predicted.shape}, truth {true.shape} and space {tuple(space.shape)} must have "
                         "one shape: put both masks on the grid of space.")
    structure = _FULL if true.ndim == 3 else np.ones((3, 3), dtype=bool)
    if boxes is None:
        components, _ = ndimage.label(predicted, structure=structure)
        boxes = [_extent_mm(found, space) for found in ndimage.find_objects(components) if found is not None]
    boxes = [box for box in boxes if box is not None]
    components, count = ndimage.label(true, structure=structure)
    box_ious, found_lesions = [], []
    for number, found in enumerate(ndimage.find_objects(components), start=1):
        if found is None:
            continue
        own = _extent_mm(found, space)
        box_ious.append(max((box_iou_mm(own, box) for box in boxes), default=0.0))
        found_lesions.append(bool(predicted[found][components[found] == number].any()))
    return SegmentationScores(dice=dice(predicted, true), iou=iou(predicted, true),
                              hd95=hausdorff95(predicted, true, space), box_ious=tuple(box_ious), found=tuple(found_lesions),
                              predicted_lesions=len(boxes), true_lesions=int(count))
