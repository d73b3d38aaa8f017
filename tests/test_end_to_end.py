"""Scan file → MONAI preprocessing → explain → heatmap in scanner space, checked in world mm.

The scan is oblique, stored L-P-I, anisotropic, odd-shaped, with a non-zero origin. The model's
class-1 logit reads only feature cells near a known world point (planted region), so HiResCAM of
class 1 is non-zero only there: its peak in the scan's own grid must land there in mm.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medcam3d
from medcam3d import io
from medcam3d.heatmap import to_scanner_space
from medcam3d.scan_maps import save_heatmaps
from medcam3d.preprocess import preprocess
from medcam3d.space import Space, resample
from _images import PlantedModel, cells_near, oblique_lpi_affine, planted_scan, write_dicom_series

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (41, 37, 23)
TRANSFORMS = [
    {"name": "Orientation", "axcodes": "RAS"},
    {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
    {"name": "ResizeWithPadOrCrop", "spatial_size": [24, 24, 24]},
]
FEATURE_SHAPE = (6, 6, 6)
STRIDE = 4
REGION_RADIUS_MM = 9.0


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scan")
    affine = oblique_lpi_affine()
    centre = affine @ np.array([20.0, 17.0, 11.0, 1.0])
    image, _ = planted_scan(SHAPE, affine, centre[:3])
    path = directory / "scan_lpi.nii.gz"
    io.write(path, image, Space(SHAPE, affine))
    x, scanner_space = preprocess(path, TRANSFORMS)
    input_affine = np.asarray(x.affine, dtype=np.float64)
    cells = cells_near(input_affine, FEATURE_SHAPE, STRIDE, centre[:3], REGION_RADIUS_MM)
    assert 1 <= cells.sum() <= 20
    model = PlantedModel(FEATURE_SHAPE, cells).eval()
    cell_index = np.argwhere(cells)
    cell_centres = (cell_index * STRIDE + (STRIDE - 1) / 2) @ input_affine[:3, :3].T + input_affine[:3, 3]
    return {"path": path, "image": image, "affine": affine, "centre": centre[:3], "model": model,
            "cells": cells, "cell_centres": cell_centres, "scanner_space": scanner_space, "directory": directory}


def explain_file(case, path):
    x, scanner_space = preprocess(path, TRANSFORMS)
    result = medcam3d.Explainer(case["model"], "hirescam", layer="pool", class_names=["other", "lesion"])(x[None], "all")
    assert result.feature_shape == FEATURE_SHAPE
    return to_scanner_space(result, scanner_space), scanner_space


def planted_cell_centres(case, path):
    """World centres of the planted cells on the input grid this file is preprocessed to.

    Computed from MONAI's own MetaTensor affine (independent of medcam3d.space). MONAI's Spacing
    may place the grid differently for files whose affines differ by float rounding, so the
    planted region is located per file.
    """
    x, _ = preprocess(path, TRANSFORMS)
    input_affine = np.asarray(x.affine, dtype=np.float64)
    cells = np.argwhere(case["cells"])
    return (cells * STRIDE + (STRIDE - 1) / 2) @ input_affine[:3, :3].T + input_affine[:3, 3]


def world_of_all_voxels(space):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in space.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return space.voxel_to_world(ijk)


def assert_planted_region_found(lesion, scanner_space, cell_centres, centre_mm):
    """Peak at a planted cell (up to the scan's voxel size), exactly zero one cell diagonal away."""
    _, peak_mm = lesion.peak()
    assert np.min(np.linalg.norm(cell_centres - peak_mm, axis=1)) <= 3.0
    assert np.linalg.norm(peak_mm - centre_mm) <= REGION_RADIUS_MM + 3.0
    world = world_of_all_voxels(scanner_space)
    nearest = np.min(np.linalg.norm(world[:, None, :] - cell_centres[None], axis=2), axis=1)
    far = nearest > STRIDE * 2.0 * np.sqrt(3) + 1e-6
    assert far.sum() > 0.5 * far.size
    assert np.all(lesion.data.reshape(-1)[far] == 0)
    assert lesion.data.max() > 0


def test_planted_region_found_in_world_mm(case):
    heatmaps, scanner_space = explain_file(case, case["path"])
    assert scanner_space.shape == SHAPE
    np.testing.assert_allclose(scanner_space.affine, case["affine"], atol=1e-5)
    lesion = heatmaps[1]
    assert lesion.class_name == "lesion" and lesion.data.shape == SHAPE and lesion.data.dtype == np.float32
    assert_planted_region_found(lesion, scanner_space, case["cell_centres"], case["centre"])
    # Class 0 reads only the other cells: its peak is elsewhere.
    _, other_peak = heatmaps[0].peak()
    assert np.linalg.norm(other_peak - case["centre"]) > 8.0


def test_saved_heatmaps_overlay_the_source(case, tmp_path):
    heatmaps, _ = explain_file(case, case["path"])
    written = save_heatmaps(heatmaps, tmp_path, prefix="scan", like=case["path"])
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["scan_hirescam_other.nii.gz", "scan_hirescam_other_norm.nii.gz",
         "scan_hirescam_lesion.nii.gz", "scan_hirescam_lesion_norm.nii.gz"]
    )
    source = nib.load(case["path"])
    saved = nib.load(tmp_path / "scan_hirescam_lesion.nii.gz")
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
    assert saved.get_data_dtype() == np.float32
    assert int(saved.header["sform_code"]) == int(source.header["sform_code"])
    assert b"hirescam" in saved.header["descrip"].tobytes() and b"lesion" in saved.header["descrip"].tobytes()
    np.testing.assert_allclose(saved.get_fdata(), heatmaps[1].data, rtol=1e-6)
    normalized = nib.load(tmp_path / "scan_hirescam_lesion_norm.nii.gz").get_fdata()
    assert normalized.min() == 0 and normalized.max() == pytest.approx(1.0)
    four_d = save_heatmaps(heatmaps, tmp_path / "4d", four_d=True, normalized=False)
    stacked = nib.load(four_d[0])
    assert stacked.shape == (*SHAPE, 2)
    np.testing.assert_allclose(stacked.get_fdata()[..., 1], heatmaps[1].data, rtol=1e-6)


def test_native_feature_resolution_heatmap_is_placed_exactly(case, tmp_path):
    x, _ = preprocess(case["path"], TRANSFORMS)
    result = medcam3d.Explainer(case["model"], layer="pool")(x[None], "all")
    native = result.feature_maps()  # the feature grid, its exact affine
    assert native[1].data.shape == FEATURE_SHAPE
    # The feature cell with the largest value is a planted cell; its world centre matches.
    voxel, world = native[1].peak()
    assert case["cells"][voxel]
    assert np.min(np.linalg.norm(case["cell_centres"] - world, axis=1)) < 1e-4
    native[1].save(tmp_path / "native.nii.gz")
    assert np.allclose(nib.load(tmp_path / "native.nii.gz").affine, native[1].space.affine, atol=1e-5)


def test_same_scan_stored_as_ras_gives_the_same_world_heatmap(case, tmp_path):
    canonical = nib.as_closest_canonical(nib.load(case["path"]))
    ras_path = tmp_path / "scan_ras.nii.gz"
    nib.save(canonical, ras_path)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    lpi, lpi_space = explain_file(case, case["path"])
    ras, ras_space = explain_file(case, ras_path)
    np.testing.assert_allclose(lpi[1].peak()[1], ras[1].peak()[1], atol=1e-4)
    # Voxel centres coincide (a flip), so resampling is exact: the maps agree voxel by voxel.
    moved = resample(ras[1].data, ras_space, lpi_space)
    np.testing.assert_allclose(moved, lpi[1].data, rtol=1e-4, atol=1e-5 * float(lpi[1].data.max()))


@pytest.mark.parametrize("kind", ["nrrd", "dicom"])
def test_same_result_through_simpleitk_formats(case, tmp_path, kind):
    image = np.round(case["image"]).astype(np.int16)
    if kind == "nrrd":
        path = tmp_path / "scan.nrrd"
        io.write(path, image, Space(SHAPE, case["affine"]))
    else:
        # Built by hand with SimpleITK in LPS, independently of medcam3d.io.
        affine = case["affine"]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        flip = np.diag([-1.0, -1.0, 1.0])
        volume = sitk.GetImageFromArray(np.transpose(image, (2, 1, 0)).copy())
        volume.SetSpacing(tuple(spacing))
        volume.SetOrigin(tuple(flip @ affine[:3, 3]))
        volume.SetDirection(tuple((flip @ affine[:3, :3] / spacing).flatten()))
        path = tmp_path / "series"
        write_dicom_series(volume, path)
    heatmaps, scanner_space = explain_file(case, path)
    expected = case["affine"]
    if kind == "dicom":
        # DICOM slices are ordered along row × column, so this left-handed (L-P-I) grid comes
        # back with its slice axis reversed: the same voxels in the world, indexed from the end.
        expected = expected @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(scanner_space.affine, expected, atol=1e-4)
    assert scanner_space.shape == SHAPE
    assert_planted_region_found(heatmaps[1], scanner_space, planted_cell_centres(case, path), case["centre"])


def test_plain_tensor_needs_input_space(case):
    x, scanner_space = preprocess(case["path"], TRANSFORMS)
    result = medcam3d.Explainer(case["model"], layer="pool")(x[None].as_tensor(), 1)
    with pytest.raises(ValueError, match="input_space=Space"):
        to_scanner_space(result, scanner_space)
    given = Space(tuple(x.shape[1:]), np.asarray(x.affine))
    heat = to_scanner_space(result, scanner_space, input_space=given)[1]
    with_meta = medcam3d.Explainer(case["model"], layer="pool")(x[None], 1).to_scanner_space(scanner_space)[1]
    np.testing.assert_array_equal(heat.data, with_meta.data)


def test_explainer_from_config_gives_the_maps_of_the_steps_by_hand(tmp_path):
    """The README's quick-start: from_config + preprocess + one sample equals the steps by hand; maps by class."""
    from medcam3d.config import load_config
    from medcam3d.models import load_model

    config = load_config(ROOT / "configs" / "demo.yaml")
    scan = ROOT / "data_samples" / "case_04.nii.gz"
    explainer = medcam3d.Explainer.from_config(config)
    assert (explainer.method.name, explainer.class_names, explainer.target) == (config.method, config.class_names, "all")
    x, scanner_space = explainer.preprocess(scan)
    maps = explainer(x).to_scanner_space(scanner_space)  # one sample, no batch axis; the config's target
    assert list(maps) == ["bright_round", "dark_elongated"] and len(maps) == 2
    by_hand_x, by_hand_space = preprocess(scan, config.preprocessing)
    by_hand = medcam3d.Explainer(load_model(config), class_names=config.class_names,
                                 placement=config.placement)(by_hand_x[None], "all")
    for index, name in enumerate(config.class_names):
        assert maps[name] is maps[index]
        np.testing.assert_array_equal(maps[name].data, by_hand.to_scanner_space(by_hand_space)[index].data)
    only = explainer(x, target="dark_elongated")
    assert list(only.to_scanner_space(scanner_space)) == ["dark_elongated"]
    assert only.feature_maps()[1].class_name == "dark_elongated"  # an int is the class index, not a position
    with pytest.raises(KeyError, match="no map for class 0"):
        only.to_scanner_space(scanner_space)[0]
    with pytest.raises(TypeError, match="feature_maps"):
        only.to_scanner_space(None)
