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
  (:func:`medcam3d.evaluate.evaluate` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..space import Space

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ThresholdCurve",
    "box_iou",
    "box_of",
    "dice",
    "dice_iou_curve",
    "energy_pointing_game",
    "iou",
    "pointing_game",
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


def dice(a: object, b: object) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two binary masks; 1.0 when both are empty."""
    a, b = _as_array(a, "a").astype(bool), _as_array(b, "b").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"Masks of shapes {a.shape} and {b.shape} cannot be compared; put them on one grid.")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: object, b: object) -> float:
    """Intersection over union ``|A∩B| / |A∪B|`` of two binary masks; 1.0 when both are empty."""
    a, b = _as_array(a, "a").astype(bool), _as_array(b, "b").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"Masks of shapes {a.shape} and {b.shape} cannot be compared; put them on one grid.")
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
