"""Metrics for class activation maps: localization, faithfulness and sanity checks.

Plain functions on arrays and tensors, for one map at a time:

* :mod:`~medcam3d.metrics.localization` — pointing game (with a tolerance in mm), energy-based
  pointing game, Dice/IoU over thresholds, box IoU (map and mask on one grid); segmentation
  scores of a predicted mask: Dice, IoU, Hausdorff 95 (MONAI, mm), box IoU in mm;
* :mod:`~medcam3d.metrics.faithfulness` — deletion and insertion curves (batched), HiResCAM's
  completeness error;
* :mod:`~medcam3d.metrics.sanity` — the cascading model-parameter randomization test with
  Spearman and SSIM, and Guided Backprop / Guided Grad-CAM for comparison only.

:func:`medcam3d.jobs.evaluate.evaluate` runs them all over a cohort.
"""

from __future__ import annotations

from .faithfulness import (
    Completeness,
    PerturbationCurve,
    baseline_volume,
    completeness,
    deletion_curve,
    insertion_curve,
    map_to_input_grid,
    perturbation_curves,
)
from .localization import (
    SegmentationScores,
    ThresholdCurve,
    box_iou,
    box_iou_mm,
    box_of,
    dice,
    dice_iou_curve,
    energy_pointing_game,
    hausdorff95,
    iou,
    pointing_game,
    segmentation_scores,
)
from .sanity import RandomizationReport, guided_backprop, guided_gradcam, method_maps, randomization_test, spearman, ssim

__all__ = [
    "Completeness",
    "PerturbationCurve",
    "RandomizationReport",
    "SegmentationScores",
    "ThresholdCurve",
    "baseline_volume",
    "box_iou",
    "box_iou_mm",
    "box_of",
    "completeness",
    "deletion_curve",
    "dice",
    "dice_iou_curve",
    "energy_pointing_game",
    "guided_backprop",
    "guided_gradcam",
    "hausdorff95",
    "insertion_curve",
    "iou",
    "map_to_input_grid",
    "method_maps",
    "perturbation_curves",
    "pointing_game",
    "randomization_test",
    "segmentation_scores",
    "spearman",
    "ssim",
]
