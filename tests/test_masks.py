"""Masks, boxes and peaks from heatmaps, in voxels and world mm."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from medcam3d import io
from medcam3d.masks import bounding_box, largest_component, otsu_threshold, peak, save_box, threshold_mask
from medcam3d.space import Space
from _images import oblique_lpi_affine


@pytest.fixture
def heat():
    values = np.zeros((21, 17, 13), dtype=np.float32)
    values[4:9, 3:7, 2:5] = 1.0  # big blob
    values[6, 5, 3] = 2.0  # its peak
    values[15:17, 12:14, 9:11] = 0.8  # small blob
    return values


def test_fraction_percentile_otsu(heat):
    assert threshold_mask(heat, "fraction", 0.5).sum() == 5 * 4 * 3
    assert threshold_mask(heat, "fraction", 0.35).sum() == 5 * 4 * 3 + 8
    assert threshold_mask(heat, "fraction", 0.9).sum() == 1
    top = threshold_mask(heat, "percentile", 99.0)
    assert top.sum() == int(np.ceil(0.01 * heat.size)) or top.sum() == (heat >= np.percentile(heat, 99)).sum()
    otsu = threshold_mask(heat, "otsu")
    assert otsu[6, 5, 3] and not otsu[0, 0, 0]
    assert threshold_mask(np.zeros((3, 3, 3)), "otsu").sum() == 0


def test_largest_component(heat):
    mask = threshold_mask(heat, "fraction", 0.3, keep_largest=True)
    assert mask.sum() == 60 and not mask[15, 12, 9]
    labels, count = ndimage.label(largest_component(heat > 0))
    assert count == 1


def test_otsu_separates_two_levels():
    values = np.concatenate([np.full(100, 1.0), np.full(50, 5.0)])
    assert 1.0 < otsu_threshold(values) < 5.0


def test_bad_thresholds(heat):
    with pytest.raises(ValueError, match="one of"):
        threshold_mask(heat, "median")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        threshold_mask(heat, "fraction", 1.5)
    bad = heat.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(bad)


def test_box_and_peak_in_world_mm(heat, tmp_path):
    affine = oblique_lpi_affine()
    space = Space(heat.shape, affine)
    box = bounding_box(threshold_mask(heat, "fraction", 0.5, keep_largest=True), space)
    assert box.voxel_min == (4, 3, 2) and box.voxel_max == (8, 6, 4) and box.voxels == 60
    np.testing.assert_allclose(box.size_mm, np.array([5, 4, 3]) * [0.9, 1.1, 2.5])
    np.testing.assert_allclose(box.centre_mm, affine @ [6, 4.5, 3, 1][:4] if False else (affine @ [6, 4.5, 3, 1])[:3])
    corner = (affine @ [3.5, 2.5, 1.5, 1])[:3]
    assert min(np.linalg.norm(np.array(box.world_corners) - corner, axis=1)) < 1e-9
    assert np.all(np.array(box.world_min) <= corner) and np.all(corner <= np.array(box.world_max))
    voxel, world = peak(heat, space)
    assert voxel == (6, 5, 3)
    np.testing.assert_allclose(world, (affine @ [6, 5, 3, 1])[:3])
    path = save_box(tmp_path / "box.json", box, peak_mm=world)
    loaded = json.loads(path.read_text())
    assert loaded["box"]["voxel_min"] == [4, 3, 2] and loaded["peak_mm"] == list(world)
    assert bounding_box(np.zeros(heat.shape, bool), space) is None
    # and the mask saved as uint8 overlays the scan
    io.write(tmp_path / "mask.nii.gz", threshold_mask(heat), space)
    array, saved_space = io.read(tmp_path / "mask.nii.gz")
    assert saved_space == space and array.sum() == threshold_mask(heat).sum()


def test_2d_box():
    mask = np.zeros((9, 7), bool)
    mask[2:4, 1:6] = True
    box = bounding_box(mask, Space((9, 7), np.diag([2.0, 3.0, 1.0, 1.0])))
    assert box.voxel_min == (2, 1) and box.size_mm == (4.0, 15.0)


def test_box_json_is_strict_with_nan_values(tmp_path):
    """NaN/Inf (a degenerate box or peak) are written as null: strict JSON that any parser reads."""
    box = bounding_box(np.ones((3, 4, 2), bool), Space((3, 4, 2), np.eye(4)))
    box = replace(box, centre_mm=(float("nan"), 1.0, 2.0), size_mm=(3.0, float("inf"), 2.0),
                  world_corners=[[float("-inf"), 0.0, 0.0], *box.world_corners[1:]])
    path = save_box(tmp_path / "box.json", box, peak_mm=(np.float32("nan"), np.float64(2.5), 1.0),
                    peak_voxel=np.array([1, 2, 0]), score=float("nan"), mass=np.float32(0.25))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    loaded = json.loads(text, parse_constant=refuse)
    assert loaded["box"]["centre_mm"] == [None, 1.0, 2.0] and loaded["box"]["size_mm"] == [3.0, None, 2.0]
    assert loaded["box"]["world_corners"][0] == [None, 0.0, 0.0] and loaded["box"]["voxels"] == 24
    assert loaded["peak_mm"] == [None, 2.5, 1.0] and loaded["peak_voxel"] == [1, 2, 0]
    assert loaded["score"] is None and loaded["mass"] == 0.25


def test_json_outputs_are_written_with_the_usual_permissions(tmp_path):
    import os

    path = save_box(tmp_path / "box.json", None)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["box.json"]  # no temporary left


# ------------------------------------------------------------ masks as runs, from the feature grid
import math  # noqa: E402

from medcam3d.masks import Runs, superlevel_runs  # noqa: E402
from medcam3d.space import Resampler  # noqa: E402


def _parallel_grids(rng):
    """A random feature grid and a scan grid whose axes are a signed permutation of its axes."""
    n = tuple(int(v) for v in rng.integers(1, 6, 3))
    source = Space(n, np.diag([*rng.uniform(5, 20, 3), 1.0]))
    local = np.zeros((4, 4))
    for target_axis, source_axis in enumerate(rng.permutation(3)):
        local[source_axis, target_axis] = rng.choice([-1, 1]) * rng.uniform(0.5, 3.0)
    local[:3, 3] = rng.uniform(-20, 20, 3)
    local[3, 3] = 1.0
    return source, Space(tuple(int(v) for v in rng.integers(1, 30, 3)), local)


@pytest.mark.parametrize("seed", range(40))
def test_superlevel_runs_equal_thresholding_the_resampled_map(seed):
    rng = np.random.default_rng(seed)
    source, target = _parallel_grids(rng)
    resampler = Resampler(source, target)
    data = rng.random(source.shape).astype(np.float32)
    if seed % 3 == 0:
        data[data < 0.5] = 0  # flat zero regions, as after a ReLU
    fill = float([0.0, 0.7, -1.0][seed % 3])
    whole = resampler(data, fill=fill)
    threshold = float(rng.uniform(0.2, 1.0)) * whole.max()
    runs = superlevel_runs(resampler, data, threshold, fill=fill)
    expected = whole >= threshold
    differ = runs.to_array() != expected
    assert not differ.any() or np.abs(whole[differ] - threshold).max() < 1e-5  # only float32 rounding ties
    if differ.any():
        return
    largest = runs.largest()
    reference = largest_component(expected) if expected.any() else expected
    np.testing.assert_array_equal(largest.to_array(), reference)
    assert largest.box(target) == bounding_box(reference, target)
    if largest.voxels:  # written in slabs along the last axis, column-major
        k = target.shape[2]
        parts = [largest.slab(a, min(a + 3, k)) for a in range(0, k, 3)]
        arrays = [p if isinstance(p, np.ndarray) else np.zeros((*target.shape[:2], p.count // math.prod(target.shape[:2])),
                                                                np.uint8, order="F") for p in parts]
        assert all(not isinstance(p, np.ndarray) and p.value == b"\0" or p.dtype == np.uint8 and p.flags["F_CONTIGUOUS"]
                   for p in parts)
        np.testing.assert_array_equal(np.concatenate(arrays, axis=2).astype(bool), reference)


def test_runs_of_arrays_and_ties_of_the_largest_component(heat):
    mask = heat > 0.5
    runs = Runs.from_array(mask)
    np.testing.assert_array_equal(runs.to_array(), mask)
    assert runs.voxels == mask.sum()
    np.testing.assert_array_equal(runs.largest().to_array(), largest_component(mask))
    # two components of the same size: the one whose first voxel comes first in C order wins
    twins = np.zeros((6, 6, 6), bool)
    twins[4:6, 0:2, 0:2] = True
    twins[0:2, 4:6, 4:6] = True
    np.testing.assert_array_equal(Runs.from_array(twins).largest().to_array(), largest_component(twins))
    # diagonal neighbours (26-connectivity) join
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    assert Runs.from_array(diagonal).largest().voxels == 3
    assert Runs.from_array(np.zeros((4, 4, 4), bool)).largest().box(Space((4, 4, 4), np.eye(4))) is None


def test_flat_map_has_no_peak():
    space = Space((4, 5, 6), np.eye(4))
    assert peak(np.zeros((4, 5, 6)), space) is None
    assert peak(np.full((4, 5, 6), 3.0), space) is None
