"""Masks, boxes and peaks from heatmaps, in voxels and world mm."""

from __future__ import annotations

import json

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


def test_json_outputs_are_written_with_the_usual_permissions(tmp_path):
    import os

    path = save_box(tmp_path / "box.json", None)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["box.json"]  # no temporary left
