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
