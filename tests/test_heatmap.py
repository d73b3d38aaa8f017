"""Normalization: [0, 1], never inverted, never NaN."""

from __future__ import annotations

import torch

import medcam3d


def test_normalize_per_map_range_and_order():
    maps = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 7 + 3
    normed = medcam3d.normalize(maps)
    flat = normed.flatten(2)
    torch.testing.assert_close(flat.amin(2), torch.zeros(2, 3))
    torch.testing.assert_close(flat.amax(2), torch.ones(2, 3))
    assert torch.equal(flat.argmax(2), maps.flatten(2).argmax(2))  # not inverted
    expected = (maps[1, 2] - maps[1, 2].min()) / (maps[1, 2].max() - maps[1, 2].min())
    torch.testing.assert_close(normed[1, 2], expected)


def test_normalize_flat_map_gives_zeros_not_nan():
    maps = torch.randn(1, 2, 3, 3, 3)
    maps[0, 1] = 4.2
    normed = medcam3d.normalize(maps)
    assert not torch.isnan(normed).any()
    assert torch.equal(normed[0, 1], torch.zeros(3, 3, 3))
    assert normed[0, 0].max() == 1


def test_normalize_single_map():
    single = torch.arange(8.0).reshape(2, 2, 2)
    torch.testing.assert_close(medcam3d.normalize(single, spatial_dims=3), single / 7)


# ----------------------------------------------------------- scan-grid maps and their storage
import gzip  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from medcam3d import io  # noqa: E402
from medcam3d.heatmap import Heatmap  # noqa: E402
from medcam3d.scan_maps import ScanGridMap, save_heatmaps, save_scan_maps  # noqa: E402
from medcam3d.io import Scaling  # noqa: E402
from medcam3d.space import Space, feature_space, resample  # noqa: E402


def _case(oblique: bool = False, seed: int = 0, values=None):
    """A feature-grid map (3x4x3 cells of a 24x32x24 input) and an L-P-S scan grid partly outside it."""
    rng = np.random.default_rng(seed)
    scan_affine = np.diag([-0.9, -1.1, 2.0, 1.0])
    scan_affine[:3, 3] = [30.0, 40.0, -20.0]
    scan = Space((45, 41, 19), scan_affine)
    if oblique:
        angle = np.deg2rad(9.0)
        turn = np.eye(4)
        turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        input_affine = turn @ np.diag([2.0, 2.0, 2.0, 1.0])
    else:
        input_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    input_affine[:3, 3] = [-8.0, -5.0, -15.0]
    grid = feature_space(Space((24, 32, 24), input_affine), (3, 4, 3))
    data = rng.random((3, 4, 3)).astype(np.float32) if values is None else np.asarray(values, np.float32)
    heat = Heatmap(data, grid, "hirescam", "layer", 1, "lesion", 2.5)
    return heat, scan


@pytest.mark.parametrize("oblique", [False, True])
def test_scan_grid_map_peak_and_range_are_those_of_the_whole_map(oblique):
    for seed in range(6):
        heat, scan = _case(oblique, seed)
        if seed == 1:  # a plateau: the maximum on a border cell is held across the edge band
            heat = Heatmap(np.where(np.arange(36).reshape(3, 4, 3) == 0, 5.0, heat.data).astype(np.float32), heat.space,
                           "hirescam", "layer", 1)
        view = ScanGridMap(heat, scan, fill=0.0)
        assert view.dense == oblique
        whole = resample(heat.data, heat.space, scan)
        voxel, world = view.peak()
        assert voxel == np.unravel_index(np.argmax(whole), whole.shape)  # the first maximum in C order
        np.testing.assert_allclose(world, scan.voxel_to_world(np.asarray(voxel, float)))
        np.testing.assert_allclose(view.value_range(), (whole.min(), whole.max()), atol=1e-6)
        np.testing.assert_allclose(view.to_heatmap().data, whole, atol=1e-6)
        np.testing.assert_allclose(view.plane(1, 7), whole[:, 7, :], atol=1e-6)


def test_flat_map_has_no_peak():
    heat, scan = _case(values=np.zeros((3, 4, 3)))
    assert ScanGridMap(heat, scan).peak() is None
    assert ScanGridMap(heat, scan, fill=0.0).value_range() == (0.0, 0.0)
    negative, _ = _case(values=-np.ones((3, 4, 3)))
    assert ScanGridMap(negative, scan, fill=-1.0).peak() is None  # -1 everywhere, the fill included
    # Heatmap.peak follows the same rule (it returned the first voxel of a flat map before).
    assert heat.peak() is None and negative.peak() is None
    peaked, _ = _case(values=np.where(np.arange(36).reshape(3, 4, 3) == 7, 2.0, 1.0))
    voxel, world = peaked.peak()
    assert voxel == (0, 2, 1) and world.shape == (3,)
    np.testing.assert_allclose(world, peaked.space.voxel_to_world(np.asarray(voxel, float)))


def _read_all(path):
    """The voxels through nibabel, SimpleITK and medcam3d.io, as float arrays in (i, j, k) order."""
    by_nibabel = nib.load(path).get_fdata()
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    by_itk = np.transpose(array, tuple(range(array.ndim - 1, -1, -1))) if image.GetNumberOfComponentsPerPixel() == 1 \
        else np.moveaxis(np.transpose(array, (2, 1, 0, 3)), -1, -1)
    by_io = io.read(path, volume=0)[0] if by_nibabel.ndim == 4 else io.read(path)[0]
    return by_nibabel, by_itk, by_io


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
@pytest.mark.parametrize("compress", [True, False])
def test_quantised_maps_round_trip_in_nibabel_and_simpleitk(tmp_path, dtype, compress):
    heat, scan = _case(seed=3)
    source = tmp_path / "scan.nii.gz"
    io.write(source, np.zeros(scan.shape, np.float32), scan)
    view = ScanGridMap(heat, scan, fill=0.0)
    files = save_scan_maps([view], tmp_path, prefix="case", like=source, dtype=dtype, compress=compress)
    ext = ".nii.gz" if compress else ".nii"
    assert [f.name for f in files] == [f"case_hirescam_lesion{ext}", f"case_hirescam_lesion_norm{ext}"]
    whole = resample(heat.data, heat.space, scan)
    low, high = whole.min(), whole.max()
    precision = Scaling.for_range(low, high, dtype).precision
    assert precision == {"uint8": (high - low) / 510, "int16": (high - low) / 131068, "float32": 0.0}[dtype]
    image = nib.load(files[0])
    assert image.get_data_dtype() == np.dtype(dtype) and image.shape == scan.shape
    np.testing.assert_allclose(image.affine, scan.affine, atol=1e-5)
    assert int(image.header["sform_code"]) == int(nib.load(source).header["sform_code"])
    assert b"hirescam" in image.header["descrip"].tobytes()
    for values in _read_all(files[0]):
        assert np.abs(values - whole).max() <= precision * (1 + 1e-5) + 1e-6
    normalized = (whole - low) / (high - low)
    for values in _read_all(files[1]):
        assert np.abs(values - normalized).max() <= precision / (high - low) * (1 + 1e-5) + 1e-6
        assert values.min() == pytest.approx(0.0, abs=1e-7) and values.max() == pytest.approx(1.0, abs=1e-6)
    if compress:  # a gzip stream of the same bytes as the uncompressed file
        plain = save_scan_maps([view], tmp_path / "plain", prefix="case", like=source, dtype=dtype, compress=False)
        assert gzip.decompress(files[0].read_bytes()) == plain[0].read_bytes()
    if dtype != "float32":  # the _norm copy shares the stored voxels: only the header differs
        raw, norm = (nib.load(f) for f in files)
        np.testing.assert_array_equal(np.asanyarray(raw.dataobj.get_unscaled()), np.asanyarray(norm.dataobj.get_unscaled()))


def test_four_d_and_nan_fill(tmp_path):
    heat, scan = _case(seed=4)
    other = Heatmap(heat.data[::-1].copy() * 3.0, heat.space, "hirescam", "layer", 0, "other")
    views = [ScanGridMap(other, scan), ScanGridMap(heat, scan)]
    files = save_scan_maps(views, tmp_path, prefix="case", four_d=True, dtype="uint8")
    assert [f.name for f in files] == ["case_hirescam.nii.gz", "case_hirescam_norm.nii.gz"]
    stacked = nib.load(files[0]).get_fdata()
    assert stacked.shape == (*scan.shape, 2)
    wholes = [resample(h.data, h.space, scan) for h in (other, heat)]
    precision = max(w.max() for w in wholes) / 510
    for t, whole in enumerate(wholes):
        assert np.abs(stacked[..., t] - whole).max() <= precision * (1 + 1e-5)
        assert np.abs(io.read(files[0], volume=t)[0] - whole).max() <= precision * (1 + 1e-5) + 1e-6
        norm = nib.load(files[1]).get_fdata()[..., t]
        assert norm.max() == pytest.approx(1.0) and np.abs(norm - whole / whole.max()).max() <= 1 / 510 + 1e-6
    # NaN outside the field of view cannot be an integer: stored as float32
    nan_files = save_scan_maps([ScanGridMap(heat, scan, fill=float("nan"))], tmp_path / "nan", prefix="c", normalized=False)
    image = nib.load(nan_files[0])
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.get_fdata(), resample(heat.data, heat.space, scan, fill=np.nan), atol=1e-6,
                               equal_nan=True)


def test_save_heatmaps_of_arrays_keeps_float32_and_quantises_on_request(tmp_path):
    heat, scan = _case(seed=5)
    whole = ScanGridMap(heat, scan).to_heatmap()
    exact = save_heatmaps([whole], tmp_path, prefix="a")
    assert nib.load(exact[0]).get_data_dtype() == np.float32
    np.testing.assert_array_equal(nib.load(exact[0]).get_fdata(), whole.data)
    small = save_heatmaps([whole], tmp_path / "q", prefix="a", dtype="int16", normalized=False)
    assert np.abs(nib.load(small[0]).get_fdata() - whole.data).max() <= (whole.data.max() - whole.data.min()) / 131068 + 1e-7


# ----------------------------------------------------------- maps by class
def _heat(index: int, name: str | None) -> medcam3d.heatmap.Heatmap:
    from medcam3d.heatmap import Heatmap
    from medcam3d.space import Space

    return Heatmap(data=np.full((2, 2, 2), float(index), np.float32), space=Space((2, 2, 2), np.eye(4)),
                   method="hirescam", layer="features", class_index=index, class_name=name)


def test_class_maps_with_some_classes_named_are_keyed_by_index_and_found_by_both():
    from medcam3d.heatmap import ClassMaps

    maps = ClassMaps([_heat(3, "nodule"), _heat(7, None), _heat(5, "effusion")])
    assert list(maps) == [3, 7, 5]  # not every class named: the keys are the class indices, in target order
    assert [heat.class_index for heat in maps.values()] == [3, 7, 5] == [heat.class_index for heat in maps.list()]
    assert maps["nodule"] is maps[3] and maps["effusion"] is maps[np.int64(5)] and maps[7].class_name is None
    assert "nodule" in maps and 7 in maps and "7" not in maps and 0 not in maps and True not in maps
    for key in ("7", 0, "lesion"):
        with pytest.raises(KeyError, match=f"no map for class {key!r}: these maps are for 3, 7, 5 "):
            maps[key]
    named = ClassMaps([_heat(3, "nodule"), _heat(5, "effusion"), _heat(3, "nodule")])
    assert list(named) == ["effusion", "nodule"] and named[3] is named["nodule"]  # a repeat: once, the last
    with pytest.raises(KeyError, match="these maps are for 'effusion', 'nodule' "):
        named[0]
    same = ClassMaps([_heat(1, "x"), _heat(2, "x")])  # one name for two classes: keyed by index
    assert list(same) == [1, 2] and same["x"] is same[2]
