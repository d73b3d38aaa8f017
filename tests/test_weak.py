"""The learned weakly-supervised segmenter (medcam3d.weak): SEC's three losses on planted cases with
known answers, seeds at an absolute level, a tiny end-to-end training run, and the CLI on the samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medcam3d import weak
from medcam3d.errors import InputError, UsageError
from medcam3d.space import Space

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ GWRP


def test_gwrp_is_max_at_zero_mean_at_one_and_between_in_between():
    values = torch.rand(3, 500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weak.gwrp(values, 0.0), values.max(-1).values)
    assert torch.allclose(weak.gwrp(values, 1.0), values.mean(-1))
    ordered = torch.sort(values, descending=True).values
    previous = values.max(-1).values
    for decay in (0.5, 0.9, 0.99, 0.999):
        weights = decay ** torch.arange(500, dtype=torch.float64)
        expected = (ordered.double() * weights).sum(-1) / weights.sum()
        pooled = weak.gwrp(values, decay)
        assert torch.allclose(pooled.double(), expected, atol=1e-6)
        assert torch.all(pooled <= previous + 1e-6) and torch.all(pooled >= values.mean(-1) - 1e-6)
        previous = pooled  # a larger decay counts more of the lower values: the pooled score falls
    with pytest.raises(UsageError, match="decay"):
        weak.gwrp(values, 1.5)


def test_gwrp_has_gradients_only_where_its_weights_are():
    values = torch.tensor([[0.1, 0.9, 0.5, 0.7]], requires_grad=True)
    weak.gwrp(values, 0.5).sum().backward()
    # sorted 0.9, 0.7, 0.5, 0.1 with weights 1, 0.5, 0.25, 0.125 (sum 1.875)
    expected = torch.tensor([[0.125, 1.0, 0.25, 0.5]]) / 1.875
    assert torch.allclose(values.grad, expected)


# ------------------------------------------------------------------------------------------ seed loss


def test_seed_loss_ignores_unlabelled_voxels_and_weighs_classes_equally():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, 6, generator=generator)
    seeds = torch.full((2, 6, 6, 6), weak.IGNORE, dtype=torch.uint8)
    seeds[0, :2] = 0  # 72 background seeds
    seeds[1, 3, 3, 3] = 1  # one seed of class 0 (label 1)
    seeds[1, 0, 0, 0] = 2  # one seed of class 1 (label 2)
    loss = weak.seed_loss(logits, seeds)
    changed = logits.clone()
    changed[seeds[:, None].expand_as(changed) == weak.IGNORE] = 50.0 * torch.randn(int((seeds == weak.IGNORE).sum()) * 3,
                                                                                     generator=generator)
    assert torch.allclose(weak.seed_loss(changed, seeds), loss)  # unlabelled voxels do not count
    log_p = torch.log_softmax(logits, 1)
    expected = (-log_p[0, 0, :2].mean() - log_p[1, 1, 3, 3, 3] - log_p[1, 2, 0, 0, 0]) / 3  # one mean per class
    assert torch.allclose(loss, expected)
    uniform = torch.zeros_like(logits)
    assert torch.allclose(weak.seed_loss(uniform, seeds), torch.tensor(math.log(3.0)))
    assert weak.seed_loss(logits, torch.full_like(seeds, weak.IGNORE)).item() == 0.0


def test_the_supervised_reference_weighs_a_small_lesion_like_the_background():
    """The upper bound's cross-entropy is class-balanced: a 1-voxel lesion the network calls background
    costs a third of its -log p (3 classes present), not 1/432 of it as in a plain mean."""
    from medcam3d.weak.training import supervised_losses

    masks = torch.zeros((2, 6, 6, 6), dtype=torch.long)
    masks[0, 3, 3, 3] = 1
    masks[1, 1, 1, 1] = 2
    logits = torch.zeros((2, 3, 6, 6, 6))
    logits[:, 0] = 8.0  # background everywhere, lesions included
    losses = supervised_losses(logits, masks)
    log_p = torch.log_softmax(logits, 1)
    background = -log_p[:, 0][masks == 0].mean()
    expected = (background - log_p[0, 1, 3, 3, 3] - log_p[1, 2, 1, 1, 1]) / 3
    torch.testing.assert_close(losses["ce"], expected)
    plain = torch.nn.functional.cross_entropy(logits, masks)
    assert losses["ce"] > 100 * plain
    # the soft Dice (+1 smoothing) of a missed 1-voxel lesion: 1 - (2 p_lesion + 1) / (sum p + 1 + 1)
    p = torch.softmax(logits, 1)[0, 1]
    torch.testing.assert_close(losses["dice"], 1 - (2 * p[3, 3, 3] + 1) / (p.sum() + 2))
    right = torch.where(torch.nn.functional.one_hot(masks, 3).movedim(-1, 1).bool(), 8.0, 0.0)
    better = supervised_losses(right, masks)
    assert better["ce"] < 0.01 and better["dice"] < 0.05


# ------------------------------------------------------------------------------------------ expand loss


def test_expand_loss_known_answer():
    probabilities = torch.zeros(1, 3, 4, 4, 4)
    probabilities[0, 0] = 0.5  # background 0.5 everywhere
    probabilities[0, 1] = 0.4  # class 0, present: 0.4 everywhere, so any GWRP gives 0.4
    probabilities[0, 2] = 0.1  # class 1, absent: 0.1 everywhere ...
    probabilities[0, 2, 0, 0, 0] = 0.3  # ... but 0.3 at one voxel (absent classes are max-pooled)
    probabilities[0, 0, 0, 0, 0] = 0.3
    labels = torch.tensor([[1.0, 0.0]])
    loss = weak.expand_loss(probabilities, labels, decay=0.9, background_decay=1.0)
    background = (0.5 * 63 + 0.3) / 64
    expected = -math.log(0.4) - math.log(1 - 0.3) - math.log(background)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError, match="labels of shape"):
        weak.expand_loss(probabilities, torch.ones(1, 3))


def test_expand_loss_rewards_present_classes_and_punishes_absent_ones():
    def output(class_value: float) -> torch.Tensor:
        p = torch.zeros(1, 2, 8, 8, 8)
        p[0, 1, :2, :2, :2] = class_value
        p[0, 0] = 1 - p[0, 1]
        return p

    present, absent = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    assert weak.expand_loss(output(0.9), present, 0.5) < weak.expand_loss(output(0.2), present, 0.5)
    assert weak.expand_loss(output(0.9), absent, 0.5) > weak.expand_loss(output(0.2), absent, 0.5)


# ------------------------------------------------------------------------------------------ size prior


def _sized(voxels: int, value: float = 1.0, shape=(10, 10, 10)) -> torch.Tensor:
    """Two classes: class 0 is ``value`` on the first ``voxels`` voxels (in raster order), background elsewhere."""
    p = torch.zeros(1, 2, *shape)
    p[0, 1].view(-1)[:voxels] = value
    p[0, 0] = 1 - p[0, 1]
    return p


def test_size_loss_known_answer_zero_within_the_bound():
    present = torch.tensor([[1.0]])
    # 100 of 1000 voxels at 1: mean 0.1; bound 0.02 -> log(0.1 / 0.02) = log 5
    assert weak.size_loss(_sized(100), present, [0.02]).item() == pytest.approx(math.log(5.0), rel=1e-5)
    assert weak.size_loss(_sized(100, 0.5), present, [0.02]).item() == pytest.approx(math.log(2.5), rel=1e-5)
    assert weak.size_loss(_sized(20), present, [0.02]).item() == 0.0  # at the bound: no penalty
    assert weak.size_loss(_sized(5), present, [0.02]).item() == 0.0  # below it: none either (no pull to grow)
    assert weak.size_loss(_sized(100), torch.tensor([[0.0]]), [0.02]).item() == 0.0  # absent: the expand loss's job
    # the mean over (scan, present class) pairs
    two = torch.cat([_sized(100), _sized(40)])
    assert weak.size_loss(two, torch.tensor([[1.0], [1.0]]), [0.02]).item() == pytest.approx(
        (math.log(5.0) + math.log(2.0)) / 2, rel=1e-5)
    with pytest.raises(InputError, match="bounds"):
        weak.size_loss(_sized(10), present, [0.0])
    with pytest.raises(InputError, match="K - 1 bounds"):
        weak.size_loss(_sized(10), present, [0.1, 0.1])


def test_size_loss_shrinks_an_oversized_class_and_leaves_a_lesion_sized_one():
    logits = torch.zeros(1, 2, 10, 10, 10)
    logits[0, 1].view(-1)[:300] = 4.0  # class 0 wins on 300 voxels ...
    logits.requires_grad_(True)
    weak.size_loss(torch.softmax(logits, 1), torch.tensor([[1.0]]), [0.05]).backward()  # ... where 50 are allowed
    assert logits.grad is not None and torch.all(logits.grad[0, 1] > 0)  # descent lowers class 0 everywhere
    small = torch.zeros(1, 2, 10, 10, 10)
    small[0, 0] = 10.0
    small[0, 1].view(-1)[:40] = 20.0  # 40 voxels at ~1, the rest at ~5e-5: within the bound of 50
    small.requires_grad_(True)
    loss = weak.size_loss(torch.softmax(small, 1), torch.tensor([[1.0]]), [0.05])
    assert loss.item() == 0.0 and loss.requires_grad


def test_size_bounds_come_from_the_seeded_map_extent():
    record = {"map_extent_voxels": [100.0, 400.0]}
    assert weak.size_bounds(record, 2.0, 10_000) == pytest.approx([0.02, 0.08])
    assert weak.size_bounds({"map_extent_voxels": [100.0, None]}, 1.0, 10_000) == pytest.approx([0.01, 0.01])
    assert weak.size_bounds({"map_extent_voxels": [None, None]}, 1.0, 10_000) is None
    ball = _bump((21, 21, 21), (10, 10, 10), 3.0, 1.0)
    inside = int((ball >= 0.5).sum())  # a Gaussian's half-maximum region: one connected ball
    assert weak.map_extent(ball, (10, 10, 10), 0.5) == inside
    twin = ball + _bump((21, 21, 21), (3, 3, 3), 0.5, 1.0)  # a separate peak is not counted
    assert weak.map_extent(twin, (10, 10, 10), 0.5) == inside
    assert weak.map_extent(ball, (0, 0, 0), 0.5) == 0


# ------------------------------------------------------------------------------------------ constrain


def _step_case(edge: int, boundary: int, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An image with an edge at ``edge`` (last axis) and a 2-class output switching at ``boundary``."""
    image = torch.zeros(1, 1, 8, 8, 16)
    image[..., edge:] = 1.0
    labels = torch.zeros(1, 8, 8, 16, dtype=torch.long)
    labels[..., boundary:] = 1
    onehot = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float()
    return onehot * confidence + (1 - onehot) * (1 - confidence), image


def test_constrain_loss_is_zero_on_an_output_consistent_with_its_refinement():
    output, image = _step_case(8, 8, 1.0)  # a hard output that follows the image's edge
    refined = weak.refine(output, image)
    assert torch.equal(refined, output)
    assert weak.constrain_loss(output, refined).item() == 0.0
    soft = torch.softmax(torch.randn(1, 3, 5, 5, 5), 1)
    assert weak.constrain_loss(soft, soft).item() == pytest.approx(0.0, abs=1e-7)  # KL(p || p) = 0


def test_refinement_removes_a_wrong_island_and_respects_the_edge():
    output, image = _step_case(8, 8, 0.7)
    output[0, :, 4, 4, 3] = torch.tensor([0.35, 0.65])  # one voxel wrongly leaning to class 1 inside class 0's side
    refined = weak.refine(output, image, candidate=None)
    assert refined[0, :, 4, 4, 3].argmax().item() == 0  # the island follows its neighbours
    assert torch.equal(refined.argmax(1)[0], (torch.arange(16) >= 8).long().expand(8, 8, 16))  # the edge is kept
    assert weak.constrain_loss(output, refined).item() > 0  # a soft output is pulled towards a confident one
    # without the image's edge (a flat image) the same output is smoothed across the boundary too
    flat = weak.refine(output, torch.zeros_like(image), candidate=None, smoothness_weight=0.0, iterations=1)
    edge = weak.refine(output, image, candidate=None, smoothness_weight=0.0, iterations=1)
    assert torch.all(edge[0, 1, :, :, 7] < flat[0, 1, :, :, 7])  # no class 1 leaks across the edge ...
    assert torch.all(edge[0, 0, :, :, 8] < flat[0, 0, :, :, 8])  # ... nor class 0 the other way
    assert torch.allclose(edge[0, :, :, :, 2:5], flat[0, :, :, :, 2:5])  # away from the edge: the same


def test_refine_only_touches_the_candidate_region():
    p = torch.zeros(1, 2, 12, 12, 12)
    p[:, 0] = 0.99
    p[:, 1] = 0.01
    p[0, :, 6, 6, 6] = torch.tensor([0.2, 0.8])
    image = torch.rand(1, 1, 12, 12, 12)
    refined = weak.refine(p, image, margin=1)
    assert torch.equal(refined[..., :4, :, :], p[..., :4, :, :])  # outside the box around the candidate: as it was
    assert not torch.equal(refined[..., 5:8, 5:8, 5:8], p[..., 5:8, 5:8, 5:8])


# ------------------------------------------------------------------------------------------ seeds


def _bump(shape, centre, sigma, height):
    grid = np.indices(shape).astype(np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return height * np.exp(-d2 / (2 * sigma**2))


def test_seeds_at_an_absolute_level_find_both_lesions_of_one_class():
    shape = (32, 32, 32)
    strong, weaker = (8, 8, 8), (22, 24, 20)
    maps = np.stack([_bump(shape, strong, 2.0, 1.0) + _bump(shape, weaker, 2.0, 0.4), np.zeros(shape)]).astype(np.float32)
    settings = weak.SeedSettings(smooth=0.0, max_peaks=2, region_radius=1.5, region_fraction=0.6,
                                 background_fraction=0.25, background_distance=5.0)
    seeds = weak.find_seeds(maps, [True, False], [0.3, 1.0], settings)
    assert sorted(p[1] for p in seeds.peaks) == [strong, weaker]  # 0.4 < 0.5 x the maximum: a relative rule misses it
    for centre in (strong, weaker):
        assert seeds.labels[centre] == 1
    assert seeds.labels[0, 31, 0] == 0  # far and low: confident background
    assert seeds.labels[8, 8, 12] == weak.IGNORE  # near a seed: unlabelled
    labelled = np.argwhere(seeds.labels == 1)
    assert all(min(np.linalg.norm(v - np.array(c)) for c in (strong, weaker)) <= 1.5 for v in labelled)
    # a level above the weaker peak keeps only the strong one
    assert [p[1] for p in weak.find_seeds(maps, [True, False], [0.5, 1.0], settings).peaks] == [strong]


def test_dense_background_beyond_the_reach_of_every_seed():
    shape = (32, 32, 32)
    peak = (10, 10, 10)
    # a broad map (sigma 8): low nowhere near the lesion, so the low-map rule leaves most of the scan unlabelled
    maps = np.stack([_bump(shape, peak, 8.0, 1.0), np.zeros(shape)]).astype(np.float32)
    base = dict(smooth=0.0, region_radius=1.0, background_fraction=0.25, background_distance=3.0)
    sparse = weak.find_seeds(maps, [True, False], [0.5, 1.0], weak.SeedSettings(**base))
    dense = weak.find_seeds(maps, [True, False], [0.5, 1.0], weak.SeedSettings(**base, background_reach=6.0))
    distance = np.linalg.norm(np.indices(shape) - np.array(peak)[:, None, None, None], axis=0)
    assert sparse.labels[peak] == dense.labels[peak] == 1
    assert sparse.labels[20, 10, 10] == weak.IGNORE  # 10 voxels away, the map still high: unlabelled ...
    assert dense.labels[20, 10, 10] == 0  # ... but beyond the reach of the seed: background
    far = distance > 6.0 + 1.0 + 1e-6  # beyond the reach of every seed voxel (seed region radius 1)
    assert (dense.labels[far] == 0).all()
    assert (dense.labels[(distance <= 6.0) & (distance > 1.0)] == weak.IGNORE).all()  # within the reach: left to the losses
    assert (dense.labels == 0).sum() > 1.5 * (sparse.labels == 0).sum()
    # a present class without a seed (its peak below the level): no dense background, the lesion may be anywhere
    unseeded = weak.find_seeds(maps, [True, True], [0.5, 1.0], weak.SeedSettings(**base, background_reach=6.0))
    assert unseeded.labels[20, 10, 10] == weak.IGNORE
    with pytest.raises(UsageError, match="background_reach"):
        weak.SeedSettings(background_distance=5.0, background_reach=2.0)


def test_a_scan_without_classes_is_background_everywhere_and_levels_need_negatives():
    maps = np.random.default_rng(0).random((2, 6, 6, 6)).astype(np.float32)
    seeds = weak.find_seeds(maps, [False, False], [0.1, 0.1])
    assert (seeds.labels == 0).all() and seeds.peaks == []
    assert weak.calibrate_levels([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0]], 0.5).tolist() == [0.3, 1.0]
    with pytest.raises(InputError, match="present in every training scan"):
        weak.calibrate_levels([[0.2], []], 0.9)


def test_seed_settings_are_checked():
    with pytest.raises(UsageError, match="quantile"):
        weak.SeedSettings(quantile=1.0)
    with pytest.raises(UsageError, match="max_peaks"):
        weak.SeedSettings(max_peaks=0)
    with pytest.raises(UsageError, match="decay"):
        weak.TrainSettings(decay=2.0)


# ------------------------------------------------------------------------------------------ end to end


def _tiny_set(count: int = 8, size: int = 16) -> weak.TrainingSet:
    """Noisy cubes; class 0 is a bright blob, present in every other scan."""
    rng = np.random.default_rng(0)
    images = np.clip(0.3 + 0.03 * rng.standard_normal((count, 1, size, size, size)), 0, 1).astype(np.float32)
    labels = np.zeros((count, 2), dtype=np.float32)  # class 1 ("other") is never present
    for i in range(0, count, 2):
        centre = rng.integers(4, size - 4, 3)
        images[i, 0] += (_bump((size,) * 3, centre, 1.5, 0.5) > 0.2) * 0.5
        labels[i, 0] = 1.0
    space = Space((size,) * 3, np.diag([2.0, 2.0, 2.0, 1.0]))
    return weak.TrainingSet(torch.from_numpy(images), torch.from_numpy(labels), space, ["blob", "other"])


def _blob_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()


def test_tiny_training_run_gives_a_loadable_segmenter(tmp_path):
    from medcam3d.models import load_model

    data = _tiny_set()
    segmenter = weak.train_segmenter(
        data, _blob_classifier(), method="gradxinput", seed_settings=weak.SeedSettings(smooth=1.0, quantile=0.5),
        settings=weak.TrainSettings(epochs=1, batch_size=4), network_options={"channels": [4, 8], "strides": [2],
                                                                              "num_res_units": 0})
    assert data.seeds is not None and data.seeds.shape == (8, 16, 16, 16)
    assert (data.seeds[1::2] == 0).all()  # scans labelled without the class: background everywhere
    assert segmenter.provenance["seeds"]["method"] == "gradxinput" and len(segmenter.history) == 1
    assert set(segmenter.history[0]) >= {"seed", "expand", "constrain"}
    config_path, weights, info = weak.save_segmenter(segmenter, tmp_path / "seg.yaml", preprocessing=None)
    state = torch.load(weights, weights_only=True)  # a plain state_dict
    assert set(state) == set(segmenter.model.state_dict())
    config, model = weak.load_segmenter(config_path)
    assert config.task == "segmentation" and config.class_names == ["background", "blob", "other"]
    assert type(load_model(config)).__name__ == "UNet"
    assert json.loads(info.read_text())["seeds"]["levels"] == segmenter.provenance["seeds"]["levels"]
    x = data.batch(torch.tensor([0]))[0]
    result = weak.segment_scan(model, x, data.space, ["blob", "other"], input_space=data.space)
    assert result.labels.shape == data.space.shape and result.settings.method == "learned"
    out = result.save(tmp_path / "labels.nii.gz", tmp_path / "lesions.json")
    assert out[0].is_file() and json.loads(out[1].read_text())["settings"]["method"] == "learned"


def test_segment_scan_puts_labels_and_boxes_on_the_scan_grid():
    class Planted(torch.nn.Module):
        """Class 0 wins inside a cube of the input grid, background elsewhere."""

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 0] = 2.0
            logits[:, 1, 4:8, 4:8, 4:8] = 5.0
            return logits

    input_space = Space((16, 16, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    scan = Space((32, 32, 32), np.diag([1.0, 1.0, 1.0, 1.0]) @ np.array(
        [[1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5], [0, 0, 0, 1]], dtype=float))
    result = weak.segment_scan(Planted(), torch.zeros(1, 16, 16, 16), scan, ["cube"], input_space=input_space)
    assert len(result.lesions) == 1
    box = result.lesions[0].box
    # input voxels 4..7 cover 7..16 mm (edges), scan voxels i cover i-1..i mm centred at i-0.5: about 8..15
    assert box.voxel_min == pytest.approx((8, 8, 8), abs=1) and box.voxel_max == pytest.approx((15, 15, 15), abs=1)
    assert (result.labels == 1).sum() == pytest.approx(8**3, rel=0.35)
    assert weak.segment_scan(Planted(), torch.zeros(1, 16, 16, 16), scan, ["cube"], input_space=input_space,
                             classes=[]).labels.max() == 0



def test_a_threshold_labels_the_lesions_the_segmenter_is_unsure_of(tmp_path, capsys):
    """Probabilities (background, a, b): a sure cube of class a (0.9), an unsure cube of class b
    (0.3, background 0.4 there), and a faint haze of class a (0.15) elsewhere. The most probable
    label finds only the sure cube; threshold 0.25 also the unsure one (as class b) and not the haze."""

    class Planted(torch.nn.Module):
        def forward(self, x):
            p = torch.zeros(x.shape[0], 3, *x.shape[2:])
            p[:, 0], p[:, 1], p[:, 2] = 0.8, 0.15, 0.05
            p[:, :, 2:5, 2:5, 2:5] = torch.tensor([0.05, 0.9, 0.05])[:, None, None, None]
            p[:, :, 9:12, 9:12, 9:12] = torch.tensor([0.4, 0.3, 0.3 + 1e-3])[:, None, None, None]
            p[:, :, 9:12, 9:12, 9:11] = torch.tensor([0.4, 0.25, 0.35])[:, None, None, None]
            return p.log()  # softmax gives p back

    space = Space((16, 16, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    x = torch.zeros(1, 16, 16, 16)
    plain = weak.segment_scan(Planted(), x, space, ["a", "b"], input_space=space)
    assert [(l.class_name, l.box.voxel_min) for l in plain.lesions] == [("a", (2, 2, 2))]
    assert (plain.labels == 1).sum() == 27 and (plain.labels == 2).sum() == 0
    sure = weak.segment_scan(Planted(), x, space, ["a", "b"], input_space=space,
                             settings=weak.SegmenterSettings(threshold=0.25))
    assert [(l.class_name, l.box.voxel_min, l.box.voxel_max) for l in sure.lesions] == [
        ("a", (2, 2, 2), (4, 4, 4)), ("b", (9, 9, 9), (11, 11, 11))]
    assert (sure.labels == 2).sum() == 27 and (sure.labels == 1).sum() == 27  # the haze (0.15) stays background
    assert weak.label_voxels(np.array([[0.5], [0.3], [0.2]]), 0.3).tolist() == [1]
    assert weak.label_voxels(np.array([[0.5], [0.3], [0.2]])).tolist() == [0]
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(UsageError, match=r"threshold must lie in \(0, 1\) \(a probability"):
            weak.SegmenterSettings(threshold=bad)

    from medcam3d.cli import main

    code = main(["segment", "--config", str(ROOT / "configs" / "demo.yaml"), "--image",
                 str(ROOT / "data_samples" / "case_01.nii.gz"), "--out", str(tmp_path / "o"), "--threshold", "1.5"])
    assert code == 2 and "--threshold must be a probability strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.skipif(not (ROOT / "data_samples" / "cases.csv").is_file(), reason="the samples are not shipped")
def test_cli_weak_train_then_segment_on_the_samples(tmp_path, capsys):
    from medcam3d.cli import main

    out = tmp_path / "segmenter"
    code = main(["weak-train", "--config", str(ROOT / "configs" / "demo.yaml"), "--inputs",
                 str(ROOT / "data_samples" / "cases.csv"), "--out", str(out), "--train-cases", "4", "--epochs", "1",
                 "--batch-size", "4", "--channels", "4", "8", "--seed-method", "gradxinput"])
    assert code == 0, capsys.readouterr().err
    config = out / "weak_segmenter.yaml"
    assert config.is_file() and (out / "weak_segmenter.pt").is_file() and (out / "weak_segmenter.json").is_file()
    info = json.loads((out / "weak_segmenter.json").read_text())
    assert info["train_cases"] == 4 and info["seeds"]["method"] == "gradxinput"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weak_segmenter.pt").write_text("mine")
    assert main(["weak-train", "--config", str(ROOT / "configs" / "demo.yaml"), "--inputs",
                 str(ROOT / "data_samples" / "cases.csv"), "--out", str(tmp_path / "mine"), "--epochs", "1"]) == 2
    assert (tmp_path / "mine" / "weak_segmenter.pt").read_text() == "mine"

    results = tmp_path / "segmented"
    code = main(["segment", "--config", str(config), "--image", str(ROOT / "data_samples" / "case_01.nii.gz"),
                 "--out", str(results)])
    assert code == 0, capsys.readouterr().err
    folder = results / "case_01"
    labels_file = folder / "case_01_learned_segmentation.nii.gz"
    lesions = json.loads((folder / "case_01_learned_lesions.json").read_text())
    assert lesions["settings"]["method"] == "learned"
    from medcam3d import io

    labels, space = io.read(labels_file, dtype=None)
    _, scan_space = io.read(ROOT / "data_samples" / "case_01.nii.gz")
    assert space.isclose(scan_space, atol=1e-3) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert json.loads((folder / "summary.json").read_text())["segmentation"]["method"] == "learned"


SHIPPED = ROOT / "data_samples" / "weak_segmenter" / "weak_segmenter.yaml"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped segmenter is not present")
def test_cli_segment_with_the_shipped_segmenter(tmp_path, capsys):
    """`medcam3d segment` end to end with the shipped weights on a sample with both classes."""
    from medcam3d import io
    from medcam3d.cli import main

    scan = ROOT / "data_samples" / "case_04.nii.gz"
    code = main(["segment", "--config", str(SHIPPED), "--image", str(scan), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "out" / "case_04"
    labels, space = io.read(folder / "case_04_learned_segmentation.nii.gz", dtype=None)
    _, scan_space = io.read(scan)
    assert space.isclose(scan_space, atol=1e-3) and labels.shape == scan_space.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}  # background and both classes of the sample
    lesions = json.loads((folder / "case_04_learned_lesions.json").read_text())
    assert lesions["settings"]["method"] == "learned"
    found = lesions["lesions"]
    assert {entry["class_name"] for entry in found} == {"bright_round", "dark_elongated"}
    for entry in found:  # every box lies on the scan's grid
        low, high = np.asarray(entry["box"]["voxel_min"]), np.asarray(entry["box"]["voxel_max"])
        assert np.all(low >= 0) and np.all(high < np.asarray(scan_space.shape)) and np.all(low <= high)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped segmenter is not present")
def test_the_shipped_segmenter_segments_the_lesions_and_nothing_in_a_scan_without_one(tmp_path, capsys):
    """The shipped weights depend on the image: the lesions of case_04 (both classes) are found where the
    masks are, and case_05 (no lesion) gets no label; the earlier weights were a fixed blob."""
    from medcam3d import io
    from medcam3d.cli import main

    out = tmp_path / "out"
    for case in ("case_04", "case_05"):
        scan = str(ROOT / "data_samples" / f"{case}.nii.gz")
        assert main(["segment", "--config", str(SHIPPED), "--image", scan, "--out", str(out)]) == 0, capsys.readouterr().err
    labels, _ = io.read(out / "case_04" / "case_04_learned_segmentation.nii.gz", dtype=None)
    truth, _ = io.read(ROOT / "data_samples" / "case_04_mask.nii.gz", dtype=None)
    for label in (1, 2):
        predicted, true = labels == label, truth == label
        assert 2 * (predicted & true).sum() / (predicted.sum() + true.sum()) > 0.4, label  # 0.59 / 0.64 when shipped
    empty, _ = io.read(out / "case_05" / "case_05_learned_segmentation.nii.gz", dtype=None)
    assert not empty.any()


def test_prior_bias_starts_the_network_at_the_size_prior():
    path, args = weak.network_args("unet", 2, {"channels": [4, 8], "strides": [2], "num_res_units": 1})
    torch.manual_seed(0)
    model = weak.make_network(path, args)
    name = weak.set_prior_bias(model, [0.001, 0.004])
    assert name is not None
    bias = dict(model.named_modules())[name].bias
    assert torch.allclose(bias, torch.tensor([0.0, math.log(0.001 / 0.995), math.log(0.004 / 0.995)]))
    with torch.no_grad():
        p = torch.softmax(model(torch.rand(2, 1, 16, 16, 16)), 1)
    mean = p.flatten(2).mean(-1).mean(0)
    # the rest of the logits are small at initialisation: each class starts near its bound, far below 1/3
    assert 0.0002 < mean[1] < 0.005 and 0.001 < mean[2] < 0.02 and mean[0] > 0.97
    assert weak.set_prior_bias(torch.nn.Linear(2, 5), [0.01, 0.01]) is None  # no output layer with 3 biases
    with pytest.raises(InputError, match="bound"):
        weak.set_prior_bias(model, [0.6, 0.6])


def test_cli_weak_train_refuses_bad_size_prior_options(tmp_path, capsys):
    from medcam3d.cli import main

    base = ["weak-train", "--config", str(ROOT / "configs" / "demo_weak.yaml"), "--demo-cases", "2", "--out",
            str(tmp_path / "out")]
    assert main([*base, "--size-factor", "0"]) == 2
    assert "size_factor must be > 0" in capsys.readouterr().err
    assert main([*base, "--background-reach", "1", "--seed-quantile", "0.5"]) == 2  # below background_distance (5)
    assert "background_reach" in capsys.readouterr().err
    assert main([*base, "--seed-radius", "-1"]) == 2
    assert "region_radius must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([*base, "--background-reach", "far"])
    assert stop.value.code == 2 and "'none'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "weak_segmenter.pt").exists()
