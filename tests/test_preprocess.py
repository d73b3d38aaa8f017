"""Preprocessing configs: MONAI transforms built by name, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medcam3d import io
from medcam3d.errors import PreprocessingError
from medcam3d.preprocess import build_transforms, load_image, preprocess
from medcam3d.space import Space
from _images import oblique_lpi_affine


def test_default_reorients_to_ras_and_keeps_world_positions(tmp_path):
    affine = oblique_lpi_affine()
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    path = tmp_path / "scan.nii.gz"
    io.write(path, data, Space((5, 6, 7), affine))
    x, scanner_space = preprocess(path)
    assert isinstance(x, MetaTensor) and x.shape == (1, 5, 6, 7) and x.dtype == torch.float32
    assert scanner_space.shape == (5, 6, 7)
    input_affine = np.asarray(x.affine, dtype=np.float64)
    # every axis was flipped: voxel (i, j, k) of the input is voxel (4-i, 5-j, 6-k) of the file
    np.testing.assert_array_equal(x[0].numpy(), data[::-1, ::-1, ::-1])
    np.testing.assert_allclose(input_affine @ [0, 0, 0, 1], scanner_space.affine @ [4, 5, 6, 1], atol=1e-4)


def test_bundle_style_names_and_loading_steps_are_accepted():
    compose = build_transforms([{"_target_": "LoadImage"}, {"_target_": "EnsureChannelFirst"}, {"_target_": "Spacing", "pixdim": [2, 2, 2]}])
    assert [type(t).__name__ for t in compose.transforms] == ["Spacing"]


def test_spacing_and_resize_update_the_affine():
    space = Space((20, 18, 16), np.diag([1.0, 1.0, 2.0, 1.0]))
    x, _ = preprocess((np.ones(space.shape, dtype=np.float32), space), [
        {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0]},
        {"name": "ResizeWithPadOrCrop", "spatial_size": [8, 8, 8]},
    ])
    assert x.shape == (1, 8, 8, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x.affine)[:3, :3], axis=0), [2, 2, 2])


@pytest.mark.parametrize(
    "config, text",
    [
        ([{"name": "Orientaton", "axcodes": "RAS"}], "Did you mean 'Orientation'"),
        ([{"name": "Spacingd", "keys": ["image"], "pixdim": [1, 1, 1]}], "dictionary transform"),
        ([{"name": "Spacing", "pixdims": [1, 1, 1]}], r"unknown argument\(s\) \['pixdims'\]"),
        ([{"axcodes": "RAS"}], "no transform 'name'"),
        (["Orientation"], "must be a mapping"),
        ("Orientation", "must be a list"),
        ([{"name": "os.system"}], "not a MONAI transform"),
    ],
)
def test_bad_configs(config, text):
    with pytest.raises(PreprocessingError, match=text):
        build_transforms(config)


def test_failing_transform_is_reported():
    space = Space((4, 4, 4), np.eye(4))
    with pytest.raises(PreprocessingError, match=r"preprocessing\[0\] \(Resize\) failed on an image of shape \(1, 4, 4, 4\): ValueError"):
        preprocess((np.ones((4, 4, 4), np.float32), space), [{"name": "Resize", "spatial_size": [2, 2]}])


def test_load_image_shape_mismatch():
    with pytest.raises(PreprocessingError, match="shape"):
        load_image((np.ones((3, 3, 3)), Space((4, 4, 4), np.eye(4))))


def _one_by_one(transforms, x):
    """The steps applied eagerly, in turn (what the preprocessing gave before it fused a crop)."""
    for transform in transforms:
        x = transform(x, lazy=False) if "lazy" in transform.__call__.__code__.co_varnames else transform(x)
    return x


def test_a_crop_after_resampling_is_one_resampling_with_the_same_values_and_affine(monkeypatch):
    """The demo's chain (Orientation, Spacing, ScaleIntensityRange, ResizeWithPadOrCrop) on a tilted,
    anisotropic scan larger than the crop: fused into one resampling onto the cropped grid, with the
    values (to float32 rounding) and the affine of the steps run one by one, and the resampled grid in
    between never made.
    Where the crop pads an axis (a small scan), nothing is fused and the result is the same too."""
    from medcam3d.preprocess_fusion import find_fusion

    config = [{"name": "Orientation", "axcodes": "RAS"},
              {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear", "padding_mode": "border", "diagonal": True},
              {"name": "ScaleIntensityRange", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
              {"name": "ResizeWithPadOrCrop", "spatial_size": [24, 24, 24]}]
    pipeline = build_transforms(config)
    rng = np.random.default_rng(3)
    for shape, fused in (((70, 64, 30), True), ((20, 16, 9), False)):
        a = np.radians(25.0)
        affine = np.eye(4)
        affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ np.diag([-0.7, -0.9, 2.5])
        affine[:3, 3] = [20.0, -10.0, 5.0]
        scan = MetaTensor(torch.from_numpy(rng.normal(0, 300, shape).astype(np.float32))[None], affine=torch.tensor(affine))
        plan = find_fusion(pipeline.transforms, scan)
        assert (plan is not None) == fused
        if fused:
            assert (plan.resampling, plan.voxelwise, plan.crop) == ((0, 1), (2,), 3)
        made = []
        spacing = type(pipeline.transforms[1])
        original = spacing.__call__

        def spy(self, img, *args, **kwargs):
            out = original(self, img, *args, **kwargs)
            if not out.pending_operations:
                made.append(tuple(out.shape[1:]))
            return out

        monkeypatch.setattr(spacing, "__call__", spy)
        x, _ = preprocess(scan, pipeline)
        monkeypatch.setattr(spacing, "__call__", original)
        expected = _one_by_one(pipeline.transforms, scan.clone())
        assert x.shape == expected.shape == (1, 24, 24, 24)
        # the same interpolation at the same points, up to float32 rounding of the composed matrix (0.05 HU here)
        assert torch.allclose(x, expected.float(), atol=1e-4, rtol=0)
        assert np.allclose(np.asarray(x.affine), np.asarray(expected.affine), atol=1e-9)
        if fused:
            assert made == []  # Spacing's own grid is never made
        else:
            assert len(made) == 1 and min(made[0]) < 24  # the small scan is resampled, then padded
    # the size limit still sees each step's grid: a 0.05 mm Spacing before the crop is refused, never run
    huge = build_transforms([config[0], {**config[1], "pixdim": [0.05, 0.05, 0.05]}, config[3]])
    scan = MetaTensor(torch.zeros(1, 70, 64, 30), affine=torch.tensor(np.diag([0.7, 0.9, 2.5, 1.0])))
    assert find_fusion(huge.transforms, scan) is not None
    with pytest.raises(PreprocessingError, match=r"preprocessing\[1\] \(Spacing\) would make a grid of 967x1135x1451 "):
        preprocess(scan, huge)
