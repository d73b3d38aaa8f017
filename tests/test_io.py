"""Tests of medcam3d.io: formats, LPS<->RAS, 4D volumes, atomic writes and clear errors."""

from __future__ import annotations

import gzip
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from medcam3d import io
from medcam3d.io import writing
from medcam3d.space import Space
from _images import write_dicom_series


def _oblique_affine(seed=0, spacing=(0.7, 1.3, 2.5), origin=(-81.5, 42.25, 17.0)):
    a = np.eye(4)
    a[:3, :3] = Rotation.random(random_state=seed).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


@pytest.fixture
def io_scan():
    """(data, space): random float32 volume of odd shape on an oblique anisotropic grid."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 9, 5)).astype(np.float32)
    return data, Space((7, 9, 5), _oblique_affine())


def _hand_built_lps_image():
    """SimpleITK image, LPS: direction I, origin (10, 20, 30), spacing (1, 2, 3), voxel (1, 2, 3) = 7."""
    img = sitk.Image([4, 5, 6], sitk.sitkInt16)
    img.SetOrigin((10.0, 20.0, 30.0))
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetPixel((1, 2, 3), 7)
    assert img.TransformIndexToPhysicalPoint((1, 2, 3)) == (11.0, 24.0, 39.0)
    return img


def _files(directory):
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------ NIfTI


def test_nifti_round_trip_default_codes(tmp_path, io_scan):
    data, space = io_scan
    out = io.write(tmp_path / "heat.nii.gz", torch.from_numpy(data), space, descrip="hires_cam layer4 c=3")
    assert out == tmp_path / "heat.nii.gz" and _files(tmp_path) == ["heat.nii.gz"]
    arr, s2 = io.read(out)
    assert arr.dtype == np.float32 and arr.shape == (7, 9, 5)
    np.testing.assert_array_equal(arr, data)
    assert s2 == space
    np.testing.assert_allclose(s2.affine, space.affine, atol=1e-5)
    hdr = nib.load(out).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert hdr.get_xyzt_units()[0] == "mm"
    assert hdr.get_data_dtype() == np.float32
    assert hdr["descrip"].item() == b"hires_cam layer4 c=3"
    # qform holds the same (rotation-only) affine
    np.testing.assert_allclose(hdr.get_qform(), space.affine, atol=1e-4)


def test_nifti_like_copies_codes_and_units(tmp_path, io_scan):
    data, space = io_scan
    scan = nib.Nifti1Image(data, space.affine)
    scan.set_sform(space.affine, code=2)
    scan.set_qform(space.affine, code=4)
    scan.header.set_xyzt_units("mm", "sec")
    nib.save(scan, tmp_path / "scan.nii.gz")

    for like in (tmp_path / "scan.nii.gz", str(tmp_path / "scan.nii.gz"), scan):
        p = io.write(tmp_path / "heat.nii", data * 2, space, like=like, descrip="x" * 100)
        hdr = nib.load(p).header
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 4)
        assert hdr.get_xyzt_units() == ("mm", "sec")
        assert hdr["descrip"].item() == b"x" * 80  # truncated to the field's 80 bytes

    # read -> write(like=) -> read keeps data, affine and codes
    arr, s = io.read(tmp_path / "scan.nii.gz")
    io.write(tmp_path / "copy.nii.gz", arr, s, like=tmp_path / "scan.nii.gz")
    arr2, s2 = io.read(tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(arr2, arr)
    np.testing.assert_array_equal(s2.affine, s.affine)
    hdr = nib.load(tmp_path / "copy.nii.gz").header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 4)

    # a like= without any code must not lose the affine
    bare = nib.Nifti1Image(data, None)
    bare.set_sform(None, code=0)
    bare.set_qform(None, code=0)
    p = io.write(tmp_path / "bare.nii.gz", data, space, like=bare)
    assert int(nib.load(p).header["sform_code"]) == 1
    assert io.read(p)[1] == space


def test_nifti_dtypes(tmp_path, io_scan):
    data, space = io_scan
    mask = data > 0
    p = io.write(tmp_path / "mask.nii.gz", mask, space)
    assert nib.load(p).get_data_dtype() == np.uint8
    arr, _ = io.read(p, dtype=None)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, mask.astype(np.uint8))
    arr, _ = io.read(p)  # default: float32
    assert arr.dtype == np.float32 and arr.sum() == mask.sum()
    labels = np.arange(data.size, dtype=np.int64).reshape(data.shape)
    p = io.write(tmp_path / "labels.nii.gz", labels, space)
    assert nib.load(p).get_data_dtype() == np.int32
    np.testing.assert_array_equal(io.read(p, dtype=None)[0], labels)
    p = io.write(tmp_path / "f64.nii.gz", data.astype(np.float64), space)
    assert nib.load(p).get_data_dtype() == np.float32
    p = io.write(tmp_path / "i16.nii.gz", data, space, dtype=np.int16)
    assert io.read(p, dtype=None)[0].dtype == np.int16


def test_nifti_4d_volumes(tmp_path, io_scan):
    data, space = io_scan
    maps = np.stack([data, -data, data * 3])  # channel-first (T, *shape)
    p = io.write(tmp_path / "maps.nii.gz", maps, space)
    assert nib.load(p).shape == (7, 9, 5, 3)
    with pytest.raises(io.VolumeError, match=r"\(7, 9, 5, 3\).*volume=<index>"):
        io.read(p)
    arr, s = io.read(p, volume=1)
    np.testing.assert_array_equal(arr, -data)
    assert s == space
    np.testing.assert_array_equal(io.read(p, volume=-1)[0], data * 3)
    with pytest.raises(IndexError, match="3 volumes"):
        io.read(p, volume=3)
    # (1, *shape) is stored as a single 3D volume
    p1 = io.write(tmp_path / "one.nii.gz", data[None], space)
    assert nib.load(p1).shape == (7, 9, 5)
    # NIfTI (I, J, K, 1) is a 3D image
    nib.save(nib.Nifti1Image(data[..., None], space.affine), tmp_path / "t1.nii.gz")
    np.testing.assert_array_equal(io.read(tmp_path / "t1.nii.gz")[0], data)


def test_nifti_2d_round_trip(tmp_path):
    a = np.diag([0.5, 0.25, 1.0, 1.0])
    a[:3, 3] = [3, 4, 5]
    space = Space((6, 4), a)
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    p = io.write(tmp_path / "slice.nii.gz", data, space)
    arr, s = io.read(p)
    assert s.shape == (6, 4)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(s.voxel_to_world([2, 3]), [4.0, 4.75, 5.0])


def test_sheared_nifti_reads_with_warning(tmp_path, io_scan):
    data, _ = io_scan
    sheared = np.diag([1.0, 2.0, 3.0, 1.0])
    sheared[0, 1] = 0.8
    nib.save(nib.Nifti1Image(data, sheared), tmp_path / "shear.nii.gz")
    with pytest.warns(io.ShearWarning, match="sheared"):
        arr, s = io.read(tmp_path / "shear.nii.gz")
    np.testing.assert_allclose(s.affine, sheared)
    # NIfTI can store it (in the sform) ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", io.ShearWarning)
        p = io.write(tmp_path / "shear_out.nii.gz", arr, s)
        np.testing.assert_allclose(io.read(p)[1].affine, sheared, atol=1e-6)
    # ... SimpleITK formats cannot: clear error, no file
    with pytest.raises(io.UnwritableImageError, match="sheared.*NIfTI"):
        io.write(tmp_path / "shear.nrrd", arr, s)
    assert not (tmp_path / "shear.nrrd").exists()


# ------------------------------------------------------------------------------ SimpleITK formats


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_itk_round_trip_and_lps(tmp_path, io_scan, ext):
    data, space = io_scan
    p = io.write(tmp_path / f"heat{ext}", data, space)
    assert _files(tmp_path) == [f"heat{ext}"]
    arr, s = io.read(p)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(s.affine, space.affine, atol=1e-9)
    # independently, with SimpleITK: (x, y, z) index order and LPS physical points
    img = sitk.ReadImage(str(p))
    assert img.GetSize() == (7, 9, 5)
    assert img.GetPixel((6, 2, 3)) == pytest.approx(float(data[6, 2, 3]))
    ras = space.voxel_to_world([6, 2, 3])
    lps = img.TransformIndexToPhysicalPoint((6, 2, 3))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
    assert io.read_space(p) == space
    # multi-volume: channel-first in, vector image on disk, volume= on reading
    maps = np.stack([data, data + 1])
    pm = io.write(tmp_path / f"maps{ext}", maps, space)
    assert sitk.ReadImage(str(pm)).GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_array_equal(io.read(pm, volume=1)[0], data + 1)


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".nhdr", ".mhd"])
def test_hand_built_lps_image(tmp_path, ext):
    img = _hand_built_lps_image()
    sitk.WriteImage(img, str(tmp_path / f"scan{ext}"))
    arr, s = io.read(tmp_path / f"scan{ext}", dtype=None)
    assert arr.shape == (4, 5, 6) and arr.dtype == np.int16
    assert arr[1, 2, 3] == 7 and arr.sum() == 7
    np.testing.assert_allclose(s.voxel_to_world([1, 2, 3]), [-11.0, -24.0, 39.0])
    np.testing.assert_allclose(s.spacing, [1.0, 2.0, 3.0])
    assert s.orientation == ("L", "P", "S")


def test_itk_oblique_direction_matches_simpleitk_points(tmp_path):
    img = sitk.Image([5, 4, 3], sitk.sitkFloat32)
    rot = Rotation.random(random_state=9).as_matrix()
    img.SetDirection(rot.ravel().tolist())
    img.SetSpacing((0.5, 1.5, 2.5))
    img.SetOrigin((-3.0, 7.0, 11.0))
    sitk.WriteImage(img, str(tmp_path / "o.nrrd"))
    _, s = io.read(tmp_path / "o.nrrd")
    for idx in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        x, y, z = img.TransformIndexToPhysicalPoint(idx)
        np.testing.assert_allclose(s.voxel_to_world(idx), [-x, -y, z], atol=1e-9)


def test_dicom_series(tmp_path):
    write_dicom_series(_hand_built_lps_image(), tmp_path / "series")
    arr, s = io.read(tmp_path / "series")
    assert arr.shape == (4, 5, 6) and arr.dtype == np.float32
    assert arr[1, 2, 3] == 7 and arr.sum() == 7
    np.testing.assert_allclose(s.voxel_to_world([1, 2, 3]), [-11.0, -24.0, 39.0], atol=1e-6)
    np.testing.assert_allclose(s.spacing, [1.0, 2.0, 3.0], atol=1e-6)
    assert io.read_space(tmp_path / "series") == s
    # two series in one directory: ask which
    write_dicom_series(_hand_built_lps_image(), tmp_path / "series", series_uid="1.2.826.0.1.3680043.8.498.9")
    with pytest.raises(io.ImageReadError, match="2 DICOM series.*series="):
        io.read(tmp_path / "series")
    arr2, _ = io.read(tmp_path / "series", series="1.2.826.0.1.3680043.8.498.9")
    assert arr2[1, 2, 3] == 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.ImageReadError, match="no DICOM series"):
        io.read(tmp_path / "empty")


# ------------------------------------------------------------------------------ read errors


def test_read_errors(tmp_path, io_scan):
    data, space = io_scan
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        io.read(tmp_path / "missing.nii.gz")
    io.write(tmp_path / "a.nii.gz", data, space)
    with pytest.raises(io.ImageNotFoundError, match="Did you mean.*a.nii.gz"):
        io.read(tmp_path / "a.nii")

    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(io.ImageReadError, match="garbage.nii.gz"):
        io.read(tmp_path / "garbage.nii.gz")
    full = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="trunc.nii.gz.*(truncated|corrupt)"):
        io.read(tmp_path / "trunc.nii.gz")
    raw = gzip.decompress(full)
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(io.ImageReadError, match="trunc.nii"):
        io.read(tmp_path / "trunc.nii")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(io.ImageReadError, match="bad.nrrd"):
        io.read(tmp_path / "bad.nrrd")

    (tmp_path / "scan.png").write_bytes(b"x")
    with pytest.raises(io.UnsupportedFormatError, match=r"'\.png'.*\.nii\.gz.*\.nrrd.*\.mha"):
        io.read(tmp_path / "scan.png")

    hdr = nib.Nifti1Header()  # sform with a zero row: a singular voxel -> world map
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data, None, header=hdr), tmp_path / "singular.nii.gz")
    with pytest.raises(io.ImageReadError, match="singular.nii.gz.*determinant"):
        io.read(tmp_path / "singular.nii.gz")

    nan = data.copy()
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, space.affine), tmp_path / "nan.nii.gz")
    with pytest.raises(io.NonFiniteError, match="1 NaN.*allow_nan=True"):
        io.read(tmp_path / "nan.nii.gz")
    arr, _ = io.read(tmp_path / "nan.nii.gz", allow_nan=True)
    assert np.isnan(arr[1, 2, 3]) and np.isnan(arr).sum() == 1
    with pytest.raises(IndexError, match="single volume"):
        io.read(tmp_path / "a.nii.gz", volume=2)


# ------------------------------------------------------------------------------ write errors


def test_write_bad_inputs_leave_no_file(tmp_path, io_scan):
    data, space = io_scan
    with pytest.raises(io.UnwritableImageError, match=r"\(7, 9, 6\).*\(7, 9, 5\)"):
        io.write(tmp_path / "h.nii.gz", np.zeros((7, 9, 6)), space)
    with pytest.raises(ValueError, match=r"\(2, 3, 7, 9, 5\)"):
        io.write(tmp_path / "h.nii.gz", np.zeros((2, 3, 7, 9, 5)), space)
    with pytest.raises(io.UnsupportedFormatError, match=r"\.nii\.gz.*\.nrrd.*\.mha"):
        io.write(tmp_path / "h.png", data, space)
    with pytest.raises(io.UnsupportedFormatError):
        io.write(tmp_path / "h.mhd", data, space)  # detached header: not atomic
    with pytest.raises(io.OutputDirectoryError, match="does not exist"):
        io.write(tmp_path / "nope" / "h.nii.gz", data, space)
    with pytest.raises(FileNotFoundError):
        io.write(tmp_path / "h.nii.gz", data, space, like=tmp_path / "missing.nii.gz")
    assert _files(tmp_path) == []


def test_write_permission_error(tmp_path, io_scan, monkeypatch):
    data, space = io_scan
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(writing.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(PermissionError, match="locked.*not writable"):
        io.write(locked / "h.nii.gz", data, space)
    assert _files(locked) == []
    # access() may say yes while creating the file fails (ACLs, read-only mounts)
    monkeypatch.setattr(writing.os, "access", real_access)

    def no_create(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(writing.os, "open", no_create)  # (one os module) creating the temporary file fails
    with pytest.raises(io.OutputPermissionError, match="locked"):
        io.write(locked / "h.nii.gz", data, space)
    assert _files(locked) == []


def test_write_failure_midway_is_atomic(tmp_path, io_scan, monkeypatch):
    data, space = io_scan
    p = io.write(tmp_path / "h.nii.gz", data, space)
    before = p.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(io.ImageWriteError, match="h.nii.gz.*disk full"):
        io.write(p, data * 2, space)
    assert _files(tmp_path) == ["h.nii.gz"] and p.read_bytes() == before  # old file intact
    with pytest.raises(io.ImageWriteError):
        io.write(tmp_path / "new.nii.gz", data, space)
    assert _files(tmp_path) == ["h.nii.gz"]

    def interrupted(img, filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.write(tmp_path / "new.nii.gz", data, space)
    assert _files(tmp_path) == ["h.nii.gz"]


def test_write_file_permissions_follow_umask(tmp_path, io_scan):
    data, space = io_scan
    old = os.umask(0o022)
    try:
        p = io.write(tmp_path / "h.nii.gz", data, space)
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644


def test_lps_ras_helpers():
    a = _oblique_affine(3)
    b = io.lps_to_ras(a)
    np.testing.assert_array_equal(b[:2], -a[:2])
    np.testing.assert_array_equal(b[2:], a[2:])
    np.testing.assert_array_equal(io.ras_to_lps(b), a)


# ------------------------------------------------------------------------------ describe


def test_describe_4d_nifti_without_reading_voxels(tmp_path, io_scan, monkeypatch):
    import json

    from nibabel.arrayproxy import ArrayProxy

    data, space = io_scan
    p = io.write(tmp_path / "maps.nii.gz", np.stack([data, -data, data * 3]).astype(np.int16), space, dtype=np.int16)

    def no_voxels(*args, **kwargs):
        raise AssertionError("describe read voxel data")

    monkeypatch.setattr(ArrayProxy, "__array__", no_voxels)
    monkeypatch.setattr(ArrayProxy, "_get_scaled", no_voxels)
    with pytest.raises(Exception, match="describe read voxel data"):  # the patch does stop voxel reads
        io.read(p, volume=0)
    info = io.describe(p)
    assert isinstance(info, io.ImageInfo) and info.format == "NIfTI" and info.dtype == "int16"
    assert info.shape == (7, 9, 5, 3) and info.spatial_shape == (7, 9, 5) and info.volumes == 3
    np.testing.assert_allclose(info.affine, space.affine, atol=1e-5)
    np.testing.assert_allclose(info.spacing, space.spacing, atol=1e-5)
    assert info.orientation == space.orientation and info.series == ()
    assert "3 volumes of 7 x 9 x 5 voxels (pass volume=<index>, 0 to 2), int16" in str(info)
    assert json.loads(json.dumps(info.to_dict()))["shape"] == [7, 9, 5, 3]
    # a single volume, a 2D image, and (I, J, K, 1) which read() treats as 3D
    one = io.describe(io.write(tmp_path / "one.nii.gz", data, space))
    assert one.shape == (7, 9, 5) and one.volumes == 1 and one.dtype == "float32"
    nib.save(nib.Nifti1Image(data[..., None], space.affine), tmp_path / "t1.nii.gz")
    assert io.describe(tmp_path / "t1.nii.gz").shape == (7, 9, 5)
    flat = io.describe(io.write(tmp_path / "slice.nii.gz", data[:, :, 0], Space((7, 9), np.diag([0.5, 0.25, 1.0, 1.0]))))
    assert flat.shape == flat.spatial_shape == (7, 9) and flat.orientation == ("R", "A") and flat.spacing == (0.5, 0.25)


def test_describe_itk_files(tmp_path):
    img = _hand_built_lps_image()
    sitk.WriteImage(img, str(tmp_path / "scan.nrrd"))
    info = io.describe(tmp_path / "scan.nrrd")
    assert (info.format, info.shape, info.dtype, info.volumes) == ("NRRD", (4, 5, 6), "int16", 1)
    assert info.orientation == ("L", "P", "S")
    assert io.read_space(tmp_path / "scan.nrrd") == Space(info.spatial_shape, info.affine)
    series = sitk.JoinSeries([sitk.Cast(img, sitk.sitkFloat32)] * 2)  # 4D: (4, 5, 6, 2)
    sitk.WriteImage(series, str(tmp_path / "four.mha"))
    info = io.describe(tmp_path / "four.mha")
    assert (info.format, info.shape, info.volumes, info.dtype) == ("MetaImage", (4, 5, 6, 2), 2, "float32")


def test_describe_dicom_folder_with_two_series(tmp_path):
    folder = tmp_path / "study"
    write_dicom_series(_hand_built_lps_image(), folder, description="T1 axial", modality="MR")
    oblique = sitk.Image([3, 4, 5], sitk.sitkInt16)
    oblique.SetSpacing((0.8, 0.9, 2.5))
    oblique.SetOrigin((-5.0, 7.0, 11.0))
    oblique.SetDirection(tuple(Rotation.from_euler("xyz", [10, -5, 20], degrees=True).as_matrix().reshape(-1)))
    write_dicom_series(oblique, folder, series_uid="1.2.826.0.1.3680043.8.498.9", description="oblique CT")
    info = io.describe(folder)
    assert info.format == "DICOM" and info.shape is None and info.affine is None and len(info.series) == 2
    by_uid = {s.uid: s for s in info.series}
    first, second = by_uid["1.2.826.0.1.3680043.8.498.1"], by_uid["1.2.826.0.1.3680043.8.498.9"]
    assert (first.description, first.modality, first.slices, first.shape) == ("T1 axial", "MR", 6, (4, 5, 6))
    assert (second.description, second.modality, second.slices, second.shape) == ("oblique CT", "CT", 5, (3, 4, 5))
    assert first.orientation == ("L", "P", "S") and first.problem is None and second.problem is None
    for s in info.series:  # the grid from the headers is the grid read() assembles
        _, space = io.read(folder, series=s.uid)
        assert space.shape == s.shape
        np.testing.assert_allclose(s.affine, space.affine, atol=1e-4)
        np.testing.assert_allclose(s.spacing, space.spacing, atol=1e-4)
    text = str(info)
    assert "2 series (pass series=<uid> to choose)" in text and '"T1 axial" (MR): 6 slices, 4 x 5 x 6 voxels' in text
    assert [s["uid"] for s in info.to_dict()["series"]] == [s.uid for s in info.series]
    # one series: the folder's grid is the series' grid
    write_dicom_series(_hand_built_lps_image(), tmp_path / "single")
    single = io.describe(tmp_path / "single")
    assert single.shape == (4, 5, 6) and Space(single.shape, single.affine) == io.read_space(tmp_path / "single")


def test_describe_says_when_a_grid_is_oblique(tmp_path):
    """A DICOM series tilted 10-20 degrees was shown as plain 'LPS', without its matrix (NIfTI showed the matrix)."""
    oblique = sitk.Image([3, 4, 5], sitk.sitkInt16)
    oblique.SetSpacing((0.8, 0.9, 2.5))
    oblique.SetDirection(tuple(Rotation.from_euler("z", 20, degrees=True).as_matrix().reshape(-1)))
    write_dicom_series(oblique, tmp_path / "oblique")
    write_dicom_series(_hand_built_lps_image(), tmp_path / "axial")
    (series,) = io.describe(tmp_path / "oblique").series
    assert series.oblique_degrees == pytest.approx(20, abs=1e-3)
    text = str(series)
    assert "LPS (oblique: axes up to 20° from the scanner's" in text and "voxel -> RAS mm: " in text
    assert io.describe(tmp_path / "oblique").to_dict()["oblique_degrees"] == pytest.approx(20, abs=1e-3)
    (axial,) = io.describe(tmp_path / "axial").series
    assert axial.oblique_degrees == pytest.approx(0, abs=1e-6) and "oblique" not in str(axial)
    affine = np.diag([0.9, 0.9, 2.5, 1.0])
    affine[:3, :3] = Rotation.from_euler("x", 7, degrees=True).as_matrix() @ affine[:3, :3]
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine), tmp_path / "tilted.nii.gz")
    assert "(oblique: axes up to 7° from the scanner's" in str(io.describe(tmp_path / "tilted.nii.gz"))


def test_describe_reports_what_read_would_refuse_and_refuses_hostile_headers(tmp_path):
    write_dicom_series(_hand_built_lps_image(), tmp_path / "gap")
    os.remove(tmp_path / "gap" / "1_slice003.dcm")
    with pytest.raises(io.GeometryError, match="missing slice"):
        io.read(tmp_path / "gap")
    (series,) = io.describe(tmp_path / "gap").series
    assert series.slices == 5 and "1 missing slice" in series.problem and "problem: " in str(series)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.raw").write_bytes(bytes(64))
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "evil.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = ../elsewhere/secret.raw\n")
    with pytest.raises(io.UntrustedFileError):
        io.describe(tmp_path / "scans" / "evil.mhd")
    (tmp_path / "scans" / "big.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 400 400 400\nElementType = MET_FLOAT\nElementDataFile = big.raw\n")
    (tmp_path / "scans" / "big.raw").write_bytes(bytes(64))
    with pytest.raises(io.ImageTooLargeError):
        io.describe(tmp_path / "scans" / "big.mhd")
