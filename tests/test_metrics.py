"""Localization and faithfulness metrics on hand-built volumes with known answers; the
Grad-CAM vs HiResCAM experiment's claim as an exact test."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcam3d.masks import bounding_box
from medcam3d.metrics import (
    baseline_volume,
    box_iou,
    box_iou_mm,
    box_of,
    completeness,
    deletion_curve,
    dice,
    dice_iou_curve,
    energy_pointing_game,
    hausdorff95,
    insertion_curve,
    iou,
    map_to_input_grid,
    perturbation_curves,
    pointing_game,
    segmentation_scores,
)
from medcam3d.metrics.localization import DEFAULT_THRESHOLDS
from medcam3d.space import Space
from _images import oblique_lpi_affine
from _models import flatten_linear_cnn, gap_linear_cnn

REPO = Path(__file__).resolve().parent.parent


def cube(shape=(10, 10, 10), low=(2, 2, 2), size=(4, 4, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(lo, lo + s) for lo, s in zip(low, size))] = True
    return mask


# ------------------------------------------------------------------------------ pointing game
def test_pointing_game_hits_misses_and_degenerate_inputs():
    mask = cube()
    assert pointing_game(mask.astype(float), mask) is True
    shifted = np.roll(mask, 4, axis=0).astype(float)  # the cube moved 4 voxels: its peak (first max) is outside
    assert pointing_game(shifted, mask) is False
    assert pointing_game(np.zeros(mask.shape), mask) is False  # empty map points nowhere
    assert pointing_game(-np.ones(mask.shape), mask) is False
    assert pointing_game(mask.astype(float), np.zeros(mask.shape, bool)) is False  # empty mask
    assert pointing_game(torch.from_numpy(mask.astype(np.float32)), torch.from_numpy(mask)) is True


def test_pointing_game_tolerance_is_measured_in_world_mm():
    shape = (12, 12, 12)
    mask = np.zeros(shape, bool)
    mask[4, 4, 4] = True
    heat = np.zeros(shape)
    heat[4, 4, 6] = 1.0  # two voxels away along k
    anisotropic = Space(shape, np.diag([1.0, 1.0, 3.0, 1.0]))  # k spacing 3 mm: 6 mm away
    assert pointing_game(heat, mask, anisotropic, tolerance_mm=5.9) is False
    assert pointing_game(heat, mask, anisotropic, tolerance_mm=6.0) is True
    oblique = Space(shape, oblique_lpi_affine(spacing=(0.9, 1.1, 2.5)))  # 5 mm, whatever the rotation
    assert pointing_game(heat, mask, oblique, tolerance_mm=4.99) is False
    assert pointing_game(heat, mask, oblique, tolerance_mm=5.01) is True
    with pytest.raises(ValueError, match="space=Space"):
        pointing_game(heat, mask, tolerance_mm=3.0)


def test_pointing_game_in_2d():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    heat = np.zeros((6, 6))
    heat[2, 2] = 1.0
    assert pointing_game(heat, mask) is True
    heat[2, 2], heat[5, 5] = 0.5, 1.0
    assert pointing_game(heat, mask) is False
    assert pointing_game(heat, mask, Space((6, 6), np.diag([2.0, 2.0, 1.0, 1.0])), tolerance_mm=math.hypot(6, 6)) is True


# ----------------------------------------------------------------------------------- energy
def test_energy_pointing_game_by_hand():
    mask = cube()  # 64 voxels
    assert energy_pointing_game(mask.astype(float), mask) == 1.0
    heat = np.where(mask, 3.0, 0.0)
    heat[0, 0, :4] = 1.0  # 4 voxels of mass 1 outside
    heat[9, 9, 9] = -50.0  # negative values carry no mass
    assert energy_pointing_game(heat, mask) == pytest.approx(192 / 196)
    assert energy_pointing_game(np.zeros(mask.shape), mask) == 0.0
    assert energy_pointing_game(heat, np.zeros(mask.shape, bool)) == 0.0
    with pytest.raises(ValueError, match="same|one grid"):
        energy_pointing_game(heat, mask[:-1])


# ------------------------------------------------------------------------------ Dice and IoU
def test_dice_and_iou_of_binary_masks():
    a, b = cube(), cube(low=(3, 2, 2))  # overlap 3 x 4 x 4 = 48 of 64 each
    assert dice(a, b) == pytest.approx(2 * 48 / 128) and iou(a, b) == pytest.approx(48 / 80)
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(a, empty) == 0.0 and iou(a, empty) == 0.0


def test_dice_iou_curve_perfect_and_shifted():
    mask = cube()
    perfect = dice_iou_curve(mask.astype(float), mask)
    assert perfect.best_dice == perfect.best_iou == perfect.auc_dice == perfect.auc_iou == 1.0
    np.testing.assert_array_equal(perfect.thresholds, DEFAULT_THRESHOLDS)
    shifted = dice_iou_curve(cube(low=(3, 2, 2)).astype(float) * 7.0, mask)  # scale does not matter
    np.testing.assert_allclose(shifted.dice, 0.75)
    np.testing.assert_allclose(shifted.iou, 0.6)
    assert shifted.auc_dice == pytest.approx(0.75) and shifted.best_iou == pytest.approx(0.6)


def test_dice_iou_curve_of_a_graded_map_by_hand():
    mask = cube()  # 64 voxels
    heat = np.where(mask, 1.0, 0.0)
    shell = cube(low=(1, 1, 1), size=(6, 6, 6)) & ~mask  # 216 - 64 = 152 voxels
    heat[shell] = 0.4
    curve = dice_iou_curve(heat, mask)
    low = curve.thresholds <= 0.4 + 1e-9  # 0.05 ... 0.40: the shell is included
    expected_dice = np.where(low, 2 * 64 / (64 + 216), 1.0)
    expected_iou = np.where(low, 64 / 216, 1.0)
    np.testing.assert_allclose(curve.dice, expected_dice)
    np.testing.assert_allclose(curve.iou, expected_iou)
    t = curve.thresholds
    area = np.sum((expected_dice[1:] + expected_dice[:-1]) * np.diff(t)) / 2 / (t[-1] - t[0])
    assert curve.auc_dice == pytest.approx(area)
    assert curve.best_dice == 1.0 and curve.best_dice_threshold == pytest.approx(0.45)
    single = dice_iou_curve(heat, mask, thresholds=[0.2])
    assert single.auc_dice == pytest.approx(2 * 64 / 280)


def test_dice_iou_curve_degenerate_inputs_are_defined():
    mask = cube()
    empty_map = dice_iou_curve(np.zeros(mask.shape), mask)
    assert empty_map.best_dice == 0.0 and empty_map.auc_iou == 0.0
    both_empty = dice_iou_curve(np.zeros(mask.shape), np.zeros(mask.shape, bool))
    assert both_empty.best_dice == 1.0 and both_empty.auc_dice == 1.0
    no_lesion = dice_iou_curve(mask.astype(float), np.zeros(mask.shape, bool))
    assert no_lesion.best_dice == 0.0 and no_lesion.auc_iou == 0.0
    for curve in (empty_map, both_empty, no_lesion):
        assert np.all(np.isfinite(curve.dice)) and np.all(np.isfinite(curve.iou))
    with pytest.raises(ValueError, match="increasing fractions"):
        dice_iou_curve(mask.astype(float), mask, thresholds=[0.5, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        dice_iou_curve(np.full(mask.shape, np.nan), mask)


# ----------------------------------------------------------------------------------- box IoU
def test_box_iou_by_hand_3d_and_2d():
    a, b = cube(low=(0, 0, 0)), cube(low=(2, 2, 2))  # [0..3]^3 and [2..5]^3: 8 / (64 + 64 - 8)
    assert box_of(a) == ((0, 0, 0), (3, 3, 3))
    assert box_iou(a, b) == pytest.approx(8 / 120)
    assert box_iou(box_of(a), box_of(b)) == pytest.approx(8 / 120)
    assert box_iou(a, a) == 1.0
    sparse = np.zeros_like(a)
    sparse[0, 0, 0] = sparse[3, 3, 3] = True  # two corners: the same box as the full cube
    assert box_iou(sparse, a) == 1.0
    empty = np.zeros_like(a)
    assert box_iou(empty, empty) == 1.0 and box_iou(a, empty) == 0.0 and box_iou(None, a) == 0.0
    assert box_iou(cube(low=(0, 0, 0), size=(2, 2, 2)), cube(low=(5, 5, 5), size=(2, 2, 2))) == 0.0
    assert box_iou(((0, 0), (1, 3)), ((1, 0), (2, 3))) == pytest.approx(4 / 12)


# ------------------------------------------------------------------ segmentation: HD95, box IoU in mm
ANISOTROPIC = (0.8, 1.2, 3.0)


@pytest.mark.parametrize("axis, shift", [(0, 1), (1, 3), (2, 2), (2, 7)])
def test_hausdorff95_of_a_shifted_cube_is_the_shift_in_mm(axis, shift):
    a = cube(shape=(20, 20, 24), low=(5, 6, 4), size=(6, 5, 6))
    b = np.roll(a, shift, axis=axis)
    expected = shift * ANISOTROPIC[axis]
    assert hausdorff95(a, b, ANISOTROPIC) == pytest.approx(expected)
    assert hausdorff95(b, a, ANISOTROPIC) == pytest.approx(expected)  # symmetric
    # the same from a grid: an oblique LPI grid's rotation keeps the distances
    oblique = Space(a.shape, oblique_lpi_affine(spacing=ANISOTROPIC))
    assert hausdorff95(a, b, oblique) == pytest.approx(expected)
    assert hausdorff95(a, b) == pytest.approx(shift)  # default: 1 mm voxels


def test_hausdorff95_is_zero_for_equal_masks_and_ignores_outliers_below_5_percent():
    a = cube(shape=(30, 30, 30), low=(5, 5, 5), size=(10, 10, 10))
    assert hausdorff95(a, a, ANISOTROPIC) == 0.0
    b = a.copy()
    b[28, 28, 28] = True  # one stray voxel far away: under 5 % of the surface distances
    assert hausdorff95(a, b, (1.0, 1.0, 1.0)) < 1.0
    assert hausdorff95(a, b, (1.0, 1.0, 1.0)) < np.linalg.norm([13.0, 13.0, 13.0])


def test_hausdorff95_empty_mask_conventions_and_bad_inputs():
    a = cube()
    empty = np.zeros_like(a)
    assert hausdorff95(empty, empty, ANISOTROPIC) == 0.0  # both agree there is nothing
    assert math.isnan(hausdorff95(a, empty, ANISOTROPIC))  # no distance to an empty set
    assert math.isnan(hausdorff95(empty, a, ANISOTROPIC))
    with pytest.raises(ValueError, match="one grid"):
        hausdorff95(a, a[:-1], ANISOTROPIC)
    with pytest.raises(ValueError, match="positive voxel sizes"):
        hausdorff95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="positive voxel sizes"):
        hausdorff95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="space has shape"):
        hausdorff95(a, a, Space((5, 5, 5), np.eye(4)))


def test_box_iou_in_mm_by_hand():
    assert box_iou_mm(((0, 0, 0), (10, 10, 10)), ((5, 0, 0), (15, 10, 10))) == pytest.approx(500 / 1500)
    assert box_iou_mm(((0, 0, 0), (10, 10, 10)), ((0, 0, 0), (10, 10, 10))) == 1.0
    assert box_iou_mm(((0, 0, 0), (10, 10, 10)), ((2, 2, 2), (4, 4, 4))) == pytest.approx(8 / 1000)
    assert box_iou_mm(((0, 0, 0), (1, 1, 1)), ((3, 3, 3), (4, 4, 4))) == 0.0
    assert box_iou_mm(None, None) == 1.0 and box_iou_mm(None, ((0, 0, 0), (1, 1, 1))) == 0.0
    # BoundingBox (and its to_dict) count by their world extent: on an anisotropic grid, in mm
    space = Space((10, 10, 10), np.diag([*ANISOTROPIC, 1.0]))
    a, b = bounding_box(cube(low=(2, 2, 2)), space), bounding_box(cube(low=(3, 2, 2)), space)
    assert box_iou_mm(a, b) == pytest.approx(3 / 5) and box_iou_mm(a.to_dict(), b) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="min <= max"):
        box_iou_mm(((1, 0, 0), (0, 1, 1)), ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(ValueError, match="dimensions"):
        box_iou_mm(((0, 0), (1, 1)), ((0, 0, 0), (1, 1, 1)))


def test_box_iou_in_mm_is_measured_in_the_world_not_in_voxels():
    # a grid of 1 x 1 x 4 mm voxels: a shift of one voxel along k moves the box 4 mm
    space = Space((10, 10, 10), np.diag([1.0, 1.0, 4.0, 1.0]))
    a = bounding_box(cube(low=(2, 2, 2), size=(4, 4, 4)), space)  # k extent 1.5..5.5 voxels = 6..22 mm
    b = bounding_box(cube(low=(2, 2, 3), size=(4, 4, 4)), space)  # 10..26 mm
    assert box_iou_mm(a, b) == pytest.approx(12 / 20)
    # the same physical boxes from a grid with 2 mm voxels along k: comparable across grids
    fine = Space((10, 10, 20), np.diag([1.0, 1.0, 2.0, 1.0]))
    c = bounding_box(cube(shape=(10, 10, 20), low=(2, 2, 5), size=(4, 4, 8)), fine)  # 9..25 mm: 13/(16+16-13)
    assert box_iou_mm(a, c) == pytest.approx(13 / 19)


def test_segmentation_scores_of_two_cubes_with_known_overlap():
    space = Space((12, 12, 12), np.diag([*ANISOTROPIC, 1.0]))
    truth = cube(shape=(12, 12, 12), low=(2, 2, 2))  # 4 x 4 x 4
    prediction = cube(shape=(12, 12, 12), low=(3, 2, 2))  # overlap 3 x 4 x 4 = 48 of 64
    scores = segmentation_scores(prediction, truth, space)
    assert scores.dice == pytest.approx(0.75) and scores.iou == pytest.approx(0.6)
    assert scores.hd95 == pytest.approx(ANISOTROPIC[0])  # shifted one voxel along i
    assert scores.box_ious == pytest.approx((0.6,)) and scores.box_iou == pytest.approx(0.6)
    assert scores.found == (True,) and scores.lesions_found == 1.0
    assert scores.predicted_lesions == 1 and scores.true_lesions == 1
    # explicit predicted boxes (a segmentation's lesions) give the same as the prediction's components
    given = segmentation_scores(prediction, truth, space, boxes=[bounding_box(prediction, space)])
    assert given == scores


def test_segmentation_scores_per_lesion_and_degenerate_cases():
    space = Space((20, 20, 20), oblique_lpi_affine(spacing=ANISOTROPIC))
    first, second = cube((20, 20, 20), (2, 2, 2), (4, 4, 4)), cube((20, 20, 20), (12, 12, 12), (3, 3, 3))
    truth = first | second
    stray = cube((20, 20, 20), (2, 15, 2), (2, 2, 2))
    scores = segmentation_scores(first | stray, truth, space)
    assert scores.true_lesions == 2 and scores.predicted_lesions == 2
    assert scores.box_ious == pytest.approx((1.0, 0.0)) and scores.found == (True, False)
    assert scores.box_iou == pytest.approx(0.5) and scores.lesions_found == 0.5
    assert scores.dice == pytest.approx(2 * 64 / (72 + 91))
    nothing = segmentation_scores(np.zeros_like(truth), truth, space)
    assert nothing.dice == 0.0 and nothing.iou == 0.0 and math.isnan(nothing.hd95)
    assert nothing.box_ious == (0.0, 0.0) and nothing.found == (False, False) and nothing.predicted_lesions == 0
    record = nothing.to_dict()
    assert record["hd95_mm"] is None and record["box_iou"] == 0.0
    json.dumps(record, allow_nan=False)  # strict JSON
    no_lesion = segmentation_scores(np.zeros_like(truth), np.zeros_like(truth), space)
    assert no_lesion.dice == 1.0 and no_lesion.hd95 == 0.0 and no_lesion.true_lesions == 0
    assert math.isnan(no_lesion.box_iou) and no_lesion.to_dict()["box_iou"] is None
    with pytest.raises(ValueError, match="one shape"):
        segmentation_scores(truth, truth, Space((5, 5, 5), np.eye(4)))


def test_the_benchmark_scores_with_the_library_functions():
    source = (REPO / "benchmarks" / "weak_segmentation.py").read_text()
    assert "segmentation_scores" in source and "def hausdorff95" not in source and "compute_hausdorff" not in source


# ------------------------------------------------------------------------------ faithfulness
class WeightedSum(nn.Module):
    """logit_0 = Σ w ⊙ x over voxels (and logit_1 = 0): a model whose evidence is known exactly."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights.clone(), requires_grad=False)
        self.batch_sizes: list[int] = []  # one entry per call (a list the forward appends to: medcam3d runs the
        # model through a view whose modules are copies, where an attribute the forward assigns would not persist)

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        logit = (x[:, 0] * self.weights).flatten(1).sum(1)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def test_deletion_of_a_weighted_sum_by_hand():
    weights = torch.tensor([8.0, 1.0, 4.0, 2.0, 6.0, 3.0, 7.0, 5.0]).view(2, 2, 2)
    x = torch.ones(1, 2, 2, 2)
    model = WeightedSum(weights)
    curve = deletion_curve(model, x, weights, 0, steps=8, baseline="zero", score="logit", batch_size=4)
    expected = 36.0 - np.cumsum([0, 8, 7, 6, 5, 4, 3, 2, 1])  # the largest weights go first
    np.testing.assert_allclose(curve.scores, expected)
    np.testing.assert_allclose(curve.fractions, np.arange(9) / 8)
    assert curve.auc == pytest.approx(np.sum((expected[1:] + expected[:-1]) / 2) / 8)
    inserted = insertion_curve(model, x, weights, 0, steps=8, baseline="zero", score="logit")
    np.testing.assert_allclose(inserted.scores, np.cumsum([0, 8, 7, 6, 5, 4, 3, 2, 1]))
    # only the first half of the ranking, in 4 steps: the area is the mean score over that range
    half = deletion_curve(model, x, weights, 0, steps=4, baseline="zero", score="logit", max_fraction=0.5)
    np.testing.assert_allclose(half.fractions, [0, 0.125, 0.25, 0.375, 0.5])
    np.testing.assert_allclose(half.scores, [36, 28, 21, 15, 10])
    assert half.auc == pytest.approx((36 + 2 * 28 + 2 * 21 + 2 * 15 + 10) / 2 * 0.125 / 0.5)
    with pytest.raises(ValueError, match="max_fraction"):
        deletion_curve(model, x, weights, 0, max_fraction=0.0)


def test_deletion_drops_fastest_with_the_true_weights():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(12, 12, 12, generator=generator)
    x = 0.5 + torch.rand(1, 12, 12, 12, generator=generator)  # positive: the order of w is the order of w·x
    model = WeightedSum(0.02 * weights)
    options = dict(steps=16, baseline="zero", task="multilabel", batch_size=8)  # probability = sigmoid(logit)
    random_map = torch.rand(12, 12, 12, generator=generator)
    areas = {name: perturbation_curves(model, x, heat, 0, **options)
             for name, heat in (("true", weights), ("random", random_map), ("inverted", -weights))}
    deletion = {k: v["deletion"].auc for k, v in areas.items()}
    insertion = {k: v["insertion"].auc for k, v in areas.items()}
    assert deletion["true"] < deletion["random"] < deletion["inverted"]
    assert insertion["true"] > insertion["random"] > insertion["inverted"]
    for curves in areas.values():  # both ends are the same for every map
        assert curves["deletion"].scores[0] == pytest.approx(curves["insertion"].scores[-1])
        assert curves["deletion"].scores[-1] == pytest.approx(curves["insertion"].scores[0]) == pytest.approx(0.5)


def test_curves_are_batched_and_independent_of_the_batch_size():
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(6, 6, 6, generator=generator)
    model = WeightedSum(weights)
    x = torch.rand(1, 1, 6, 6, 6, generator=generator)  # a batch of one is accepted
    batched = perturbation_curves(model, x, weights, 0, steps=20, batch_size=8, baseline="mean")
    assert len(model.batch_sizes) == math.ceil(42 / 8) and max(model.batch_sizes) == 8
    single = perturbation_curves(model, x, weights, 0, steps=20, batch_size=1, baseline="mean")
    for mode in ("deletion", "insertion"):
        np.testing.assert_allclose(batched[mode].scores, single[mode].scores, rtol=1e-6)
        assert batched[mode].baseline == "mean"


def test_a_feature_grid_map_is_upsampled_trilinearly():
    feature = torch.zeros(2, 3, 4)
    feature[1, 2, 0] = 1.0
    upsampled = map_to_input_grid(feature, (8, 12, 16))
    expected = F.interpolate(feature[None, None], size=(8, 12, 16), mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(upsampled, expected)
    peak = np.unravel_index(int(upsampled.argmax()), upsampled.shape)
    assert 4 <= peak[0] < 8 and 8 <= peak[1] < 12 and 0 <= peak[2] < 4  # inside the cell's block of voxels
    # a scanner-space-like map resampled through world coordinates
    space = Space((4, 4, 4), np.diag([2.0, 2.0, 2.0, 1.0]))
    fine = Space((8, 8, 8), np.diag([1.0, 1.0, 1.0, 1.0]) @ np.array([[1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5], [0, 0, 0, 1.0]]))
    flat = map_to_input_grid(np.ones((4, 4, 4)), (8, 8, 8), heat_space=space, input_space=fine)
    assert flat.shape == (8, 8, 8) and float(flat.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="axes"):
        map_to_input_grid(torch.zeros(4, 4), (8, 8, 8))


def test_baselines():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    mean, text = baseline_volume(x, "mean")
    torch.testing.assert_close(mean[1], torch.full((4, 4, 4), float(x[1].mean())))
    assert text == "mean"
    blurred, text = baseline_volume(x, "blur", blur_sigma=1.0)
    assert blurred.shape == x.shape and text == "blur(sigma=1)"
    assert float(blurred[0].std()) < float(x[0].std())
    assert float(baseline_volume(x, 2.5)[0].max()) == 2.5 and baseline_volume(x, "zero")[0].abs().sum() == 0
    with pytest.raises(ValueError, match="baseline must be"):
        baseline_volume(x, "noise")
    with pytest.raises(ValueError, match="shape"):
        baseline_volume(x, torch.zeros(3))


# ------------------------------------------------------------------------------ completeness
def test_completeness_on_flatten_and_gap_heads():
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = flatten_linear_cnn((4, 4, 4), classes=3)
    before = {k: v.clone() for k, v in flat.state_dict().items()}
    result = completeness(flat, x, target="all")
    assert result is not None and result.head == "flatten+linear" and result.layer == "2"
    assert result.errors.shape == (2, 3) and result.max_abs_error < 1e-5
    np.testing.assert_allclose(result.bias, flat[-1].bias.detach().numpy(), rtol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in flat.state_dict().items())
    gap = gap_linear_cnn(classes=4)
    result = completeness(gap, x, target=[1, 3])
    assert result.head == "gap+linear" and list(result.class_indices) == [1, 3] and result.max_abs_error < 1e-5


def test_completeness_is_none_where_the_head_does_not_allow_it():
    torch.manual_seed(0)
    mlp_head = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 8), nn.ReLU(),
                             nn.Linear(8, 2)).eval()
    x = torch.randn(1, 1, 4, 4, 4)
    assert completeness(mlp_head, x, layer="1") is None
    with pytest.raises(ValueError, match="flatten \\+ one Linear"):
        completeness(mlp_head, x, layer="1", strict=True)


# ------------------------------------------------------------------- the experiment, exactly
@pytest.fixture(scope="module")
def experiment():
    path = REPO / "benchmarks" / "experiment_gradcam_vs_hirescam.py"
    spec = importlib.util.spec_from_file_location("experiment_gradcam_vs_hirescam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hirescam_is_zero_where_the_linear_weights_are_zero_and_gradcam_is_not(experiment):
    x = experiment.make_input(0)
    model = experiment.flatten_model(0)
    region = experiment.region_mask()
    weights = model[-1].weight.detach()[0].view(experiment.CHANNELS, *region.shape)
    support = (weights != 0).any(dim=0).numpy()
    np.testing.assert_array_equal(support, region)  # the class's weights live exactly on R
    hires = experiment.maps(model, x, "hirescam", relu=False)
    grad = experiment.maps(model, x, "gradcam", relu=False)
    assert np.all(hires[~support] == 0.0)  # exactly zero, not just small
    assert np.abs(hires[support]).max() > 0
    assert np.abs(grad[~support]).max() > np.abs(grad[support]).max()  # Grad-CAM peaks where no weight is
    with torch.no_grad():
        logit = float(model(x)[0, 0])
    assert hires.sum() == pytest.approx(logit - float(model[-1].bias[0]), abs=1e-5)  # completeness
    assert abs(grad.sum() - (logit - float(model[-1].bias[0]))) > 0.1


def test_on_a_gap_head_hirescam_and_gradcam_agree(experiment):
    x = experiment.make_input(0)
    model = experiment.gap_model(0)
    hires = experiment.maps(model, x, "hirescam", relu=False)
    grad = experiment.maps(model, x, "gradcam", relu=False)
    np.testing.assert_allclose(hires, grad, rtol=1e-5, atol=1e-9)
