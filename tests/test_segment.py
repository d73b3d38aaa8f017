"""Seed → expand → constrain (medcam3d.segment) on planted lesions whose masks are known exactly;
the harder held-out phantoms; the weakly-supervised demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _images import oblique_lpi_affine
from scipy import ndimage

from medcam3d import io
from medcam3d.errors import InputError, SpaceError, UsageError
from medcam3d.heatmap import Heatmap
from medcam3d.segment import gated_maps, segment
from medcam3d.segment_records import METHODS, Segmentation, SegmentSettings
from medcam3d.space import Space

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.8, 2.0)
SHAPE = (72, 64, 36)


def _grid(shape=SHAPE, spacing=SPACING, origin=(-20.0, -15.0, 4.0), affine=None) -> Space:
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = origin
    return Space(shape, affine)


def _world(space: Space) -> np.ndarray:
    """(I, J, K, 3) RAS mm of every voxel centre."""
    ijk = np.indices(space.shape).reshape(3, -1).T.astype(float)
    return space.voxel_to_world(ijk).reshape(*space.shape, 3)


def _scan(space: Space, balls, *, noise=12.0, seed=0):
    """Tissue (40 HU) with noise, plus balls ``(centre_mm, radius_mm, contrast_hu)``: the image and
    each ball's exact mask (voxel centres inside)."""
    rng = np.random.default_rng(seed)
    xyz = _world(space)
    image = 40.0 + noise * rng.standard_normal(space.shape)
    masks = []
    for centre, radius, contrast in balls:
        inside = np.linalg.norm(xyz - np.asarray(centre), axis=-1) <= radius
        image[inside] += contrast
        masks.append(inside)
    return image.astype(np.float32), masks


def _feature_map(space: Space, peaks, *, cell=8.0, sigma=9.0, class_index=0, name="lesion") -> Heatmap:
    """A coarse map (``cell`` mm cells covering ``space``) made of Gaussian bumps at ``peaks`` (mm):
    what a CAM of a last layer looks like, not aligned with the scan's voxels."""
    corners = space.voxel_to_world(np.array([[0, 0, 0], np.asarray(space.shape) - 1], dtype=float))
    low = corners.min(0) - cell / 2
    shape = tuple(int(np.ceil(v)) + 1 for v in (corners.max(0) - low) / cell)
    affine = np.diag([cell, cell, cell, 1.0])
    affine[:3, 3] = low
    grid = Space(shape, affine)
    xyz = _world(grid)
    data = np.zeros(shape, dtype=np.float32)
    for centre, height in peaks:
        data += height * np.exp(-np.sum((xyz - np.asarray(centre)) ** 2, axis=-1) / (2 * sigma**2))
    return Heatmap(data.astype(np.float32), grid, "hirescam", "synthetic", class_index, name)


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --------------------------------------------------------------------------------------------
# Planted lesions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random_walker", "region_growing"])
def test_a_map_peaked_inside_a_bright_ball_recovers_the_ball(method):
    space = _grid()
    centre = np.array([8.0, 10.0, 40.0])
    image, (ball,) = _scan(space, [(centre, 7.0, 120.0)])
    # the map's peak is 2.5 mm off the ball's centre and 8 mm wide: only the image can give the edge
    heat = _feature_map(space, [(centre + [2.5, -1.0, 1.0], 1.0)])
    result = segment(image, space, [heat], method=method)
    assert _dice(result.mask(0), ball) > 0.9
    assert len(result.lesions) == 1
    lesion = result.lesions[0]
    assert np.allclose(lesion.box.centre_mm, centre, atol=1.5)
    assert lesion.label == 1 and lesion.class_name == "lesion"
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * 7.0**3, rel=0.15)


def test_seed_expand_constrain_beats_the_thresholded_map():
    space = _grid()
    centre = np.array([8.0, 10.0, 40.0])
    image, (ball,) = _scan(space, [(centre, 6.0, 120.0)])
    heat = _feature_map(space, [(centre + [2.0, 1.0, -1.0], 1.0)])
    expanded = _dice(segment(image, space, [heat]).mask(0), ball)
    thresholded = max(_dice(segment(image, space, [heat], method="threshold", candidate=t, background=0.0).mask(0), ball)
                      for t in (0.3, 0.5, 0.7, 0.9))
    assert expanded > 0.9 > thresholded


def test_two_lesions_of_one_class_give_two_components_with_boxes_at_their_centres():
    # an oblique grid stored L-P-I: the boxes must come out in world mm all the same
    affine = oblique_lpi_affine(spacing=(0.9, 0.9, 2.0), origin=(30.0, 25.0, 70.0))
    space = _grid(shape=(70, 64, 34), affine=affine)
    centre_mm = space.voxel_to_world(np.array([35.0, 32.0, 17.0]))
    centres = [centre_mm + [-12.0, -6.0, -10.0], centre_mm + [10.0, 8.0, 12.0]]
    image, masks = _scan(space, [(c, 6.0, 130.0) for c in centres], seed=1)
    heat = _feature_map(space, [(centres[0] + [1.5, 0.0, 1.0], 1.0), (centres[1] + [-1.0, 1.5, 0.0], 0.8)])
    result = segment(image, space, [heat])
    assert len(result.lesions) == 2
    found = sorted(result.lesions, key=lambda lesion: np.linalg.norm(np.asarray(lesion.box.centre_mm) - centres[0]))
    for lesion, centre, mask in zip(found, centres, masks):
        assert np.linalg.norm(np.asarray(lesion.box.centre_mm) - centre) < 2.0
        assert np.all(np.asarray(lesion.box.world_min) < centre) and np.all(centre < np.asarray(lesion.box.world_max))
        inside = result.labels[tuple(slice(a, b + 1) for a, b in zip(lesion.box.voxel_min, lesion.box.voxel_max))]
        assert (inside == 1).sum() == pytest.approx(lesion.volume_mm3 / abs(np.linalg.det(affine[:3, :3])), rel=1e-6)
    assert _dice(result.mask(0), masks[0] | masks[1]) > 0.9
    components = ndimage.label(result.mask(0), structure=np.ones((3, 3, 3)))[1]
    assert components == 2


def test_competing_classes_each_get_their_own_lesion():
    space = _grid()
    bright, dark = np.array([0.0, 5.0, 30.0]), np.array([15.0, 20.0, 50.0])
    image, (bright_mask, dark_mask) = _scan(space, [(bright, 6.5, 120.0), (dark, 6.5, -90.0)])
    maps = [_feature_map(space, [(bright + [1.0, 1.0, 0.0], 1.0), (dark, 0.3)], class_index=0, name="bright"),
            _feature_map(space, [(dark + [-1.0, 0.0, 1.0], 2.0), (bright, 0.5)], class_index=1, name="dark")]
    result = segment(image, space, maps)
    assert _dice(result.mask(0), bright_mask) > 0.85
    assert _dice(result.mask(1), dark_mask) > 0.85
    assert [lesion.class_index for lesion in result.lesions] == [0, 1]
    assert set(np.unique(result.labels)) == {0, 1, 2}
    assert result.class_names == ("bright", "dark")
    # only the classes asked for are segmented
    only_dark = segment(image, space, maps, classes=[1])
    assert not only_dark.mask(0).any() and _dice(only_dark.mask(1), dark_mask) > 0.85


def test_maps_on_the_scan_grid_work_like_feature_grid_maps():
    space = _grid()
    centre = np.array([8.0, 10.0, 40.0])
    image, (ball,) = _scan(space, [(centre, 7.0, 120.0)])
    heat = _feature_map(space, [(centre + [2.0, 0.0, 0.0], 1.0)])
    from medcam3d.space import resample

    on_scan = np.asarray(resample(heat.data, heat.space, space))[None]
    a = segment(image, space, [heat])
    b = segment(image, space, on_scan)
    assert _dice(a.mask(0), b.mask(0)) > 0.98
    assert _dice(b.mask(0), ball) > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_an_all_zero_or_negative_map_gives_an_empty_result(method):
    space = _grid()
    image, _ = _scan(space, [((8.0, 10.0, 40.0), 7.0, 120.0)])
    for data in (np.zeros((8, 8, 8), np.float32), -np.ones((8, 8, 8), np.float32)):
        heat = Heatmap(data, Space((8, 8, 8), np.diag([8.0, 8.0, 8.0, 1.0])), "hirescam", "x", 0)
        result = segment(image, space, [heat], method=method)
        assert result.labels.shape == space.shape and not result.labels.any()
        assert result.lesions == () and result.regions == ()
        assert json.loads(json.dumps(result.to_dict()))["lesions"] == []


def test_a_flat_image_falls_back_to_the_thresholded_map():
    space = _grid()
    heat = _feature_map(space, [((8.0, 10.0, 40.0), 1.0)])
    result = segment(np.zeros(space.shape, np.float32), space, [heat])
    thresholded = segment(np.zeros(space.shape, np.float32), space, [heat], method="threshold")
    assert len(result.lesions) == 1 and result.mask(0).any()
    assert _dice(result.mask(0), thresholded.mask(0)) > 0.95


def test_big_scans_are_only_touched_around_the_candidates():
    space = _grid(shape=(320, 320, 200), spacing=(0.7, 0.7, 1.0), origin=(0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    image = (40.0 + 10.0 * rng.standard_normal(space.shape, dtype=np.float32)).astype(np.float32)
    centre = np.array([110.0, 120.0, 90.0])
    box = tuple(slice(int((centre[a] - 10) / space.spacing[a]), int((centre[a] + 10) / space.spacing[a])) for a in range(3))
    ijk = np.indices(tuple(s.stop - s.start for s in box)).reshape(3, -1).T + [s.start for s in box]
    xyz = space.voxel_to_world(ijk.astype(float)).reshape(*[s.stop - s.start for s in box], 3)
    inside = np.linalg.norm(xyz - centre, axis=-1) <= 7.0
    image[box][inside] += 120.0
    heat = _feature_map(space, [(centre + [2.0, 0.0, 1.0], 1.0)], sigma=10.0)
    result = segment(image, space, [heat])
    assert len(result.lesions) == 1
    crop_voxels = sum(int(np.prod(r.seeds.shape)) for r in result.regions)
    assert crop_voxels < 0.01 * np.prod(space.shape)
    truth = np.zeros(space.shape, dtype=bool)
    truth[box] = inside
    assert _dice(result.mask(0), truth) > 0.9


# --------------------------------------------------------------------------------------------
# Results, files and bad inputs
# --------------------------------------------------------------------------------------------


def test_to_dict_and_save_round_trip(tmp_path):
    space = _grid()
    centre = np.array([8.0, 10.0, 40.0])
    image, _ = _scan(space, [(centre, 7.0, 120.0)])
    result = segment(image, space, [_feature_map(space, [(centre, 1.0)])])
    assert isinstance(result, Segmentation)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["settings"]["method"] == "random_walker"
    assert payload["classes"] == [{"index": 0, "name": "lesion", "label": 1}]
    assert payload["lesions"][0]["box"]["centre_mm"] == pytest.approx(list(result.lesions[0].box.centre_mm))
    assert payload["regions"][0]["seeds"]["foreground"] > 0
    labels_path, boxes_path = result.save(tmp_path / "seg.nii.gz", tmp_path / "seg.json")
    data, read_space = io.read(labels_path)
    assert np.array_equal(np.asarray(data), result.labels) and read_space.isclose(space)
    assert json.loads(boxes_path.read_text())["lesions"] == payload["lesions"]


def test_bad_inputs_give_clear_errors():
    space = _grid()
    image, _ = _scan(space, [((8.0, 10.0, 40.0), 7.0, 120.0)])
    heat = _feature_map(space, [((8.0, 10.0, 40.0), 1.0)])
    with pytest.raises(InputError, match="3D volume"):
        segment(image[..., 0], space, [heat])
    with pytest.raises(SpaceError, match="grid has shape"):
        segment(image[:-1], space, [heat])
    bad = Heatmap(np.full(heat.data.shape, np.nan, np.float32), heat.space, "hirescam", "x", 0)
    with pytest.raises(InputError, match="NaN"):
        segment(image, space, [bad])
    with pytest.raises(InputError, match="no map for class"):
        segment(image, space, [heat], classes=[1])
    with pytest.raises(InputError, match="Heatmap"):
        segment(image, space, ["not a map"])
    with pytest.raises(InputError, match=r"\(C, \*scan shape\)"):
        segment(image, space, np.zeros((1, 3, 3, 3)))
    with pytest.raises(InputError, match="at least one"):
        segment(image, space, [])
    with pytest.raises(UsageError, match="Did you mean 'random_walker'"):
        segment(image, space, [heat], method="random walk")
    with pytest.raises(UsageError, match="unknown setting"):
        segment(image, space, [heat], treshold=0.5)
    with pytest.raises(UsageError, match="background"):
        SegmentSettings(candidate=0.4, background=0.5)
    with pytest.raises(UsageError, match="fraction"):
        SegmentSettings(foreground=1.5)
    with pytest.raises(ValueError):  # every error is also the builtin it stands for
        SegmentSettings(margin_mm=-1.0)


def test_gated_maps_keep_the_fine_evidence_where_the_gate_is():
    fine_space = Space((8, 8, 8), np.diag([4.0, 4.0, 4.0, 1.0]))
    coarse_space = Space((4, 4, 4), np.diag([8.0, 8.0, 8.0, 1.0]) @ np.array(
        [[1, 0, 0, 0.25], [0, 1, 0, 0.25], [0, 0, 1, 0.25], [0, 0, 0, 1.0]]))  # cell centres of 2 x 2 x 2 fine cells
    fine = Heatmap(np.ones((8, 8, 8), np.float32), fine_space, "layercam", "early", 0)
    gate_data = np.zeros((4, 4, 4), np.float32)
    gate_data[1, 1, 1] = 2.0
    gate_data[3, 3, 3] = -1.0
    gate = Heatmap(gate_data, coarse_space, "hirescam", "last", 0)
    (fused,) = gated_maps([fine], [gate])
    assert fused.space == fine_space and fused.method == "layercam*hirescam"
    assert fused.data.max() == pytest.approx(1.0, abs=1e-5) and fused.data.min() == 0.0
    assert np.argmax(fused.data) in {np.ravel_multi_index(v, (8, 8, 8)) for v in [(2, 2, 2), (2, 2, 3), (3, 3, 3)]}
    assert fused.data[7, 7, 7] == 0.0  # a negative gate removes the evidence
    with pytest.raises(InputError, match="different classes"):
        gated_maps([fine], [Heatmap(gate_data, coarse_space, "hirescam", "last", 1)])


# --------------------------------------------------------------------------------------------
# The harder held-out phantoms
# --------------------------------------------------------------------------------------------


def test_harder_phantoms_are_reproducible_small_and_separate():
    from medcam3d.demo import synthetic

    grid = synthetic.sample_grids()["ras_aniso"]
    counts, placements = [], set()
    for seed in range(synthetic.HARD_SEED0, synthetic.HARD_SEED0 + 8):
        phantom, where = synthetic.make_hard_phantom(seed)
        again, where_again = synthetic.make_hard_phantom(seed)
        assert where == where_again and [l.as_dict() for l in phantom.lesions] == [l.as_dict() for l in again.lesions]
        assert len(where) == len(phantom.lesions)
        placements.update(where)
        base = synthetic.make_phantom(seed)
        assert np.allclose(phantom.body_centre, base.body_centre) and phantom.noise_hu == base.noise_hu  # same anatomy code
        for lesion in phantom.lesions:
            limit = 6.0 * 1.1 if lesion.class_index == 0 else 12.0
            assert lesion.extent <= limit + 1e-9
        for a in phantom.lesions:
            for b in phantom.lesions:
                if a is not b:
                    assert np.linalg.norm(a.centre - b.centre) >= a.extent + b.extent + synthetic.HARD_GAP_MM - 1e-9
        counts.append([sum(l.class_index == c for l in phantom.lesions) for c in range(2)])
    _, labels, info = synthetic.make_hard_case(synthetic.HARD_SEED0 + 3, grid)
    assert [entry["placement"] for entry in info["lesions"]] == synthetic.make_hard_phantom(synthetic.HARD_SEED0 + 3)[1]
    for c in (1, 2):  # each lesion is its own connected component on the grid
        expected = sum(entry["label"] == c for entry in info["lesions"])
        assert ndimage.label(labels == c, structure=np.ones((3, 3, 3)))[1] == expected
    assert any(2 in row for row in counts)  # two lesions of one class occur
    assert placements >= {"organ", "fat", "bone"}


# --------------------------------------------------------------------------------------------
# The weakly-supervised demo model
# --------------------------------------------------------------------------------------------


def test_weakly_supervised_weights_are_small_and_load_safely_into_the_demo_network():
    import torch

    from medcam3d.demo import train

    path = ROOT / "data_samples" / "demo_model_weak.pt"
    assert path.stat().st_size < 300 * 1024
    model = train.build_model()
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: the same network as the shipped one
    metrics = json.loads((ROOT / "data_samples" / "metrics_weak.json").read_text())
    assert metrics["training"]["localization_weight"] == 0


def test_harder_cases_are_written_on_demand_for_medcam3d_evaluate(tmp_path):
    from medcam3d.demo import synthetic
    from medcam3d.demo.train import write_hard_cases
    from medcam3d.jobs.cases import collect_cases

    rows = write_hard_cases(tmp_path, 2)
    assert [row["seed"] for row in rows] == [synthetic.HARD_SEED0, synthetic.HARD_SEED0 + 1]
    cases = collect_cases(tmp_path / "cases.csv")
    assert [case.id for case in cases] == [row["case_id"] for row in rows]
    grid = synthetic.sample_grids()[rows[1]["grid"]]
    _, labels, info = synthetic.make_hard_case(rows[1]["seed"], grid)
    mask, space = io.read(tmp_path / rows[1]["mask"])
    assert space.isclose(grid) and np.array_equal(np.asarray(mask), labels)
    assert rows[1]["labels"] == ";".join(info["labels_present"])
