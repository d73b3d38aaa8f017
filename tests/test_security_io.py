"""A scan from someone else can never run code, read files elsewhere, or give silently wrong geometry.

Tests of the checks :func:`medcam3d.io.read` makes before it loads voxels (DICOM slice geometry,
NIfTI sform/qform, voxel types and sizes, detached MetaImage/NRRD data files, sizes claimed by
headers) and of the header codes :func:`medcam3d.io.write` stores. Every file is built here.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import logging
import math
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medcam3d import errors, io, orientation
from medcam3d.space import Space

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def no_voxels_read():
    """Reading voxel data raises (nibabel's array proxy, SimpleITK's readers; headers may be read): proves that a
    refusal came from the header, before the file's data was touched."""
    from nibabel.arrayproxy import ArrayProxy

    def refuse(*args, **kwargs):
        raise AssertionError("the voxel data was read")

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((ArrayProxy, "__array__"), (ArrayProxy, "__getitem__"), (sitk.ImageFileReader, "Execute"),
                            (sitk.ImageSeriesReader, "Execute")):
            patch.setattr(owner, name, refuse)
        yield


@contextlib.contextmanager
def never_opened_for_reading(*paths):
    """Opening any of ``paths`` (or what a link among them points to) for reading raises, from Python (``open``,
    ``os.open``) or SimpleITK: proves that a path was refused from its type (``lstat``/``stat``) alone. Opening
    for writing (a test's FIFO writer) is left alone."""
    import builtins
    import io as _io
    import os

    guarded = {os.path.abspath(p) for p in paths} | {os.path.realpath(p) for p in paths}
    opened: list[str] = []

    def check(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            text = os.fsdecode(path)
            if os.path.abspath(text) in guarded or os.path.realpath(text) in guarded:
                opened.append(text)
                raise AssertionError(f"{text} was opened")

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if not flags & (os.O_WRONLY | os.O_RDWR):
            check(path)
        return real_os_open(path, flags, *args, **kwargs)

    def sitk_call(original):
        def call(self, *args, **kwargs):
            names = list(self.GetFileNames()) if hasattr(self, "GetFileNames") else [self.GetFileName()]
            for name in names:
                check(name)
            return original(self, *args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", guarded_open)
        patch.setattr(_io, "open", guarded_open)
        patch.setattr(os, "open", guarded_os_open)
        for reader, name in ((sitk.ImageFileReader, "Execute"), (sitk.ImageFileReader, "ReadImageInformation"),
                             (sitk.ImageSeriesReader, "Execute")):
            patch.setattr(reader, name, sitk_call(getattr(reader, name)))
        yield opened
SERIES_UID = "1.2.826.0.1.3680043.8.498.77"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ------------------------------------------------------------------------------ helpers


def write_series(directory, positions, orientations=AXIAL, size=(4, 5), pixel_spacing=(0.5, 0.5), uid=SERIES_UID, rgb=False):
    """One DICOM file per slice with the given ImagePositionPatient (LPS mm) and orientation(s).

    Slice k holds the value ``k + 1`` everywhere, so the order of the assembled volume shows.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(orientations[0], (int, float)):
        orientations = [orientations] * len(positions)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (pos, iop) in enumerate(zip(positions, orientations)):
        if rgb:
            piece = sitk.Image(list(size), sitk.sitkVectorUInt8, 3)
        else:
            piece = sitk.Image(list(size), sitk.sitkInt16) + (k + 1)
        piece.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0])))  # (x, y) = (column, row)
        piece.SetMetaData("0008|0060", "CT")
        piece.SetMetaData("0020|000d", "1.2.826.0.1.3680043.8.498.2")
        piece.SetMetaData("0020|000e", uid)
        piece.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0020|0032", "\\".join(repr(float(v)) for v in pos))
        piece.SetMetaData("0020|0037", "\\".join(repr(float(v)) for v in iop))
        piece.SetMetaData("0028|0030", "\\".join(repr(float(v)) for v in pixel_spacing))
        writer.SetFileName(str(directory / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return directory


def axial_positions(zs, x=10.0, y=-20.0):
    return [(x, y, float(z)) for z in zs]


def nifti_bytes(path):
    """The uncompressed bytes of a NIfTI file (.nii or .nii.gz)."""
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if str(path).endswith(".gz") else raw


def patch_nifti(path, **fields):
    """Overwrite NIfTI-1 header fields in place, bypassing nibabel's checks and fixes."""
    offsets = {"pixdim": (76, "<8f"), "sform_code": (254, "<h"), "qform_code": (252, "<h"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h")}
    data = bytearray(nifti_bytes(path))
    for name, value in fields.items():
        offset, fmt = offsets[name]
        struct.pack_into(fmt, data, offset, *(value if isinstance(value, (list, tuple)) else [value]))
    Path(path).write_bytes(gzip.compress(bytes(data)) if str(path).endswith(".gz") else bytes(data))
    return path


def oblique_affine(seed=4, spacing=(0.7, 1.3, 2.5), origin=(-81.5, 42.25, 17.0)):
    a = np.eye(4)
    a[:3, :3] = Rotation.random(random_state=seed).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def itk_ras(path, ijk):
    """World position (RAS mm) of voxel ``ijk`` as SimpleITK reads the file."""
    img = sitk.ReadImage(str(path))
    x, y, z = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
    return np.array([-x, -y, z])


def nibabel_ras(path, ijk):
    return (nib.load(str(path)).affine @ [*ijk, 1.0])[:3]


# ------------------------------------------------------------------------------ 1. DICOM geometry


def test_even_dicom_series_reads_with_its_geometry(tmp_path):
    """Control: an evenly spaced oblique series still reads, slice k where its header puts it."""
    rot = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    origin = np.array([-30.0, 12.5, 80.0])
    positions = [origin + k * 1.25 * normal for k in range(6)]
    write_series(tmp_path / "s", positions, tuple(row) + tuple(col))
    arr, space = io.read(tmp_path / "s")
    assert arr.shape == (4, 5, 6)
    np.testing.assert_array_equal(arr[0, 0], np.arange(1, 7))
    np.testing.assert_allclose(space.spacing, [0.5, 0.5, 1.25], atol=1e-4)
    lps = positions[3]
    np.testing.assert_allclose(space.voxel_to_world([0, 0, 3]), [-lps[0], -lps[1], lps[2]], atol=1e-3)


def test_dicom_duplicated_slice_is_refused(tmp_path):
    write_series(tmp_path / "s", axial_positions([0.0, 3.0, 6.0, 6.0, 9.0]))
    with pytest.raises(errors.GeometryError, match=r"duplicated slice.*slice00[23]\.dcm.*slice00[23]\.dcm.*6 mm.*Export the series again"):
        io.read(tmp_path / "s")


def test_dicom_missing_slice_is_refused(tmp_path):
    write_series(tmp_path / "s", axial_positions([0.0, 3.0, 6.0, 12.0, 15.0]))
    with pytest.raises(errors.GeometryError, match=r"1 missing slice.*slice002\.dcm.*6 mm.*slice003\.dcm.*12 mm.*2 times the spacing of 3 mm") as info:
        io.read(tmp_path / "s")
    assert "allow_uneven_slices=True" in str(info.value) and "series=<uid>" in str(info.value)
    # SimpleITK alone reads it with one (wrong) average spacing of 3.75 mm
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    assert reader.Execute().GetSpacing()[2] == pytest.approx(3.75)


def test_dicom_uneven_gaps_are_refused(tmp_path):
    write_series(tmp_path / "s", axial_positions([-99.5, 103.0, 104.3, 105.5]))
    with pytest.raises(errors.GeometryError, match=r"uneven slice spacing.*-99\.5.*103.*104\.3.*105\.5"):
        io.read(tmp_path / "s")


def test_dicom_small_unevenness_within_tolerance_reads(tmp_path):
    # 1 % of the spacing plus 1e-3 mm is tolerated (rounded positions in real exports)
    write_series(tmp_path / "s", axial_positions([0.0, 2.0004, 4.0, 6.0155, 8.0]))
    assert io.read(tmp_path / "s")[0].shape == (4, 5, 5)
    write_series(tmp_path / "t", axial_positions([0.0, 2.0, 4.0, 6.05, 8.0]))
    with pytest.raises(errors.GeometryError, match="uneven"):
        io.read(tmp_path / "t")


def test_dicom_mixed_orientations_are_refused(tmp_path):
    tilted = tuple(Rotation.from_euler("x", 15, degrees=True).as_matrix()[:, :2].T.ravel())
    write_series(tmp_path / "s", axial_positions([0.0, 2.0, 4.0, 6.0]), [AXIAL, AXIAL, tilted, AXIAL])
    with pytest.raises(errors.GeometryError, match=r"different orientations.*slice002\.dcm.*ImageOrientationPatient.*slice000\.dcm") as info:
        io.read(tmp_path / "s")
    assert "Export the series again" in str(info.value)


def test_dicom_in_plane_drift_is_refused(tmp_path):
    # gantry tilt: each slice shifted 0.5 mm in y; SimpleITK would stack them straight
    write_series(tmp_path / "s", [(0.0, 0.5 * k, 2.0 * k) for k in range(5)])
    with pytest.raises(errors.GeometryError, match=r"not stacked along their normal.*slice004\.dcm.*gantry tilt"):
        io.read(tmp_path / "s")


def test_allow_uneven_slices_reads_as_is_with_a_warning(tmp_path, caplog):
    write_series(tmp_path / "s", axial_positions([0.0, 3.0, 6.0, 12.0, 15.0]))
    with caplog.at_level(logging.WARNING, logger="medcam3d.io"):
        arr, _ = io.read(tmp_path / "s", allow_uneven_slices=True)
    assert arr.shape == (4, 5, 5)
    assert any("missing slice" in r.getMessage() and "allow_uneven_slices=True" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(arr[0, 0], [1, 2, 3, 4, 5])  # sorted along the normal
    assert io.read_space(tmp_path / "s", allow_uneven_slices=True).shape == (4, 5, 5)
    with pytest.raises(errors.GeometryError):
        io.read_space(tmp_path / "s")


def test_dicom_slices_sorted_along_the_normal_not_by_file_name(tmp_path):
    # files written in a scrambled order still give slice k at its own position
    zs = [6.0, 0.0, 9.0, 3.0]
    write_series(tmp_path / "s", axial_positions(zs))
    arr, space = io.read(tmp_path / "s")
    np.testing.assert_array_equal(arr[0, 0], [2, 4, 1, 3])  # values k + 1 of files sorted by z
    np.testing.assert_allclose(space.voxel_to_world([0, 0, 0])[2], 0.0, atol=1e-6)
    np.testing.assert_allclose(space.spacing[2], 3.0, atol=1e-6)


def test_dicom_multi_series_folder_keeps_series_choice(tmp_path):
    write_series(tmp_path / "s", axial_positions([0.0, 2.0, 4.0]))
    write_series(tmp_path / "s2", axial_positions([0.0, 2.0, 4.0, 6.0]), uid="1.2.826.0.1.3680043.8.498.78")
    for f in (tmp_path / "s2").iterdir():
        f.rename(tmp_path / "s" / f"b_{f.name}")
    with pytest.raises(errors.ImageReadError, match="2 DICOM series.*series="):
        io.read(tmp_path / "s")
    assert io.read(tmp_path / "s", series="1.2.826.0.1.3680043.8.498.78")[0].shape == (4, 5, 4)


def test_dicom_colour_series_is_refused(tmp_path):
    write_series(tmp_path / "s", axial_positions([0.0, 2.0, 4.0]), rgb=True)
    with pytest.raises(errors.ImageReadError, match="colour pixels.*RGB.*greyscale"):
        io.read(tmp_path / "s")


def test_dicom_file_linked_from_outside_needs_trust(tmp_path):
    write_series(tmp_path / "s", axial_positions([0.0, 2.0, 4.0]))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "s" / "slice002.dcm").rename(outside / "slice002.dcm")
    (tmp_path / "s" / "slice002.dcm").symlink_to(outside / "slice002.dcm")
    with pytest.raises(errors.UntrustedFileError, match=r"slice002\.dcm.*outside the DICOM folder.*trust=True"):
        io.read(tmp_path / "s")
    assert io.read(tmp_path / "s", trust=True)[0].shape == (4, 5, 3)


# ------------------------------------------------------------------------------ 2. NIfTI sform / qform


def test_disagreeing_sform_and_qform_log_a_warning(tmp_path, caplog):
    a = oblique_affine()
    b = a.copy()
    b[:3, 3] += [4.0, 0.0, 0.0]
    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), None)
    img.set_sform(a, code=2)
    img.set_qform(b, code=1)
    nib.save(img, tmp_path / "two.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medcam3d.io"):
        _, space = io.read(tmp_path / "two.nii.gz")
    np.testing.assert_allclose(space.affine, a, atol=1e-5)  # nibabel's choice: the sform
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("sform (code 2)" in m and "qform (code 1)" in m and "disagree" in m and "4 mm" in m for m in messages), messages
    # agreeing forms (float32 rounding only) are quiet
    caplog.clear()
    img.set_qform(a, code=1)
    nib.save(img, tmp_path / "one.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medcam3d.io"):
        io.read(tmp_path / "one.nii.gz")
    assert not [r for r in caplog.records if "disagree" in r.getMessage()]


@pytest.mark.parametrize(
    "like_codes, expected",
    [(None, (1, 1)), ((2, 4), (2, 4)), ((2, 0), (2, 2)), ((0, 3), (3, 3)), ((0, 0), (1, 1)), ("nrrd", (1, 1))],
)
def test_written_sform_and_qform_hold_the_same_affine(tmp_path, like_codes, expected):
    affine = oblique_affine(seed=11)
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    space = Space(data.shape, affine)
    like = None
    if like_codes == "nrrd":
        like = io.write(tmp_path / "scan.nrrd", data, space)
    elif like_codes is not None:
        src = nib.Nifti1Image(data, None)
        other = affine.copy()
        other[:3, 3] -= 9.0  # the source's own forms may disagree: the written file must not
        src.set_sform(affine, code=like_codes[0])
        src.set_qform(other, code=like_codes[1])
        like = tmp_path / "scan.nii.gz"
        nib.save(src, like)
    # 3D heatmap, 4D multi-class map and a uint8 mask follow the same rule
    outputs = [
        io.write(tmp_path / "heat.nii.gz", data, space, like=like),
        io.write(tmp_path / "maps.nii.gz", np.stack([data, 2 * data]), space, like=like),
        io.write(tmp_path / "mask.nii.gz", data > 0.5, space, like=like),
    ]
    for out in outputs:
        hdr = nib.load(out).header
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == expected
        np.testing.assert_allclose(hdr.get_sform(), affine, atol=1e-4)
        np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-4)
        for ijk in [(0, 0, 0), (4, 5, 6), (1, 2, 3)]:
            truth = space.voxel_to_world(ijk)
            np.testing.assert_allclose(nibabel_ras(out, ijk), truth, atol=1e-3)
            if out.name != "maps.nii.gz":
                np.testing.assert_allclose(itk_ras(out, ijk), truth, atol=1e-3)
        assert io.read_space(out) == space


def test_sheared_affine_is_kept_in_the_sform_only(tmp_path):
    sheared = np.diag([1.0, 2.0, 3.0, 1.0])
    sheared[0, 1] = 0.8
    space = Space((5, 6, 7), sheared)
    data = np.ones(space.shape, np.float32)
    for like in (None, nib.Nifti1Image(data, np.eye(4))):
        out = io.write(tmp_path / "shear.nii.gz", data, space, like=like)
        hdr = nib.load(out).header
        assert int(hdr["sform_code"]) >= 1 and int(hdr["qform_code"]) == 0
        np.testing.assert_allclose(hdr.get_sform(), sheared, atol=1e-6)
        np.testing.assert_allclose(nibabel_ras(out, (1, 2, 3)), (sheared @ [1, 2, 3, 1])[:3], atol=1e-5)
        # SimpleITK cannot represent shear: it must refuse, not place the image elsewhere
        try:
            where = itk_ras(out, (1, 2, 3))
        except RuntimeError as e:
            assert "orthonormal" in str(e)
        else:
            np.testing.assert_allclose(where, (sheared @ [1, 2, 3, 1])[:3], atol=1e-3)


def test_nearly_sheared_affine_does_not_get_an_approximate_qform(tmp_path):
    # below Space's shear tolerance, but over a long axis the quaternion is off by > 1 % of a voxel
    a = np.diag([0.5, 0.5, 0.5, 1.0])
    a[0, 1] = 0.5 * 8e-5
    space = Space((400, 400, 3), a)
    assert not space.is_sheared
    out = io.write(tmp_path / "near.nii", np.zeros(space.shape, np.uint8), space)
    hdr = nib.load(out).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 0)  # sform only, exact
    np.testing.assert_allclose(hdr.get_sform(), a, atol=1e-7)
    for reader in (nibabel_ras, itk_ras):
        np.testing.assert_allclose(reader(out, (399, 399, 2)), (a @ [399, 399, 2, 1])[:3], atol=1e-3)


# ------------------------------------------------------------------------------ 3. voxel types and sizes


def test_complex_and_rgb_nifti_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)), tmp_path / "complex.nii.gz")
    with pytest.raises(errors.ImageReadError, match="complex voxels.*magnitude"):
        io.read(tmp_path / "complex.nii.gz")
    with pytest.raises(errors.ImageReadError, match="complex"):
        io.read(tmp_path / "complex.nii.gz", dtype=None)
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(errors.ImageReadError, match="RGB.*scalar intensity.*greyscale"):
        io.read(tmp_path / "rgb.nii.gz")


def test_complex_and_colour_nrrd_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkComplexFloat32), str(tmp_path / "complex.nrrd"))
    with pytest.raises(errors.ImageReadError, match="complex voxels"):
        io.read(tmp_path / "complex.nrrd")
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    text = (tmp_path / "rgb.nrrd").read_bytes()
    (tmp_path / "rgb.nrrd").write_bytes(text.replace(b"kinds: vector ", b"kinds: RGB-color ", 1))
    with pytest.raises(errors.ImageReadError, match="colour voxels.*RGB-color"):
        io.read(tmp_path / "rgb.nrrd", volume=0)


@pytest.mark.parametrize("bad", [0.0, -0.0, float("nan"), -2.0, 1e5, 1e-6])
@pytest.mark.parametrize("qform_code", [0, 1])
def test_nifti_bad_pixdim_is_refused(tmp_path, bad, qform_code):
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None)
    path = tmp_path / "scan.nii"
    nib.save(img, path)
    patch_nifti(path, pixdim=[1.0, 1.0, bad, 1.0, 1.0, 1.0, 1.0, 1.0], sform_code=0, qform_code=qform_code)
    with pytest.raises(errors.GeometryError, match=r"voxel size along axis 1 .*pixdim.*Expected a finite size between") as info:
        io.read(path)
    assert isinstance(info.value, errors.ImageReadError) and isinstance(info.value, ValueError)
    with pytest.raises(errors.GeometryError):
        io.read_space(path)


@pytest.mark.parametrize("bad", [0.0, 1e5, 1e-6, -0.0])
def test_nifti_sform_with_absurd_spacing_is_refused(tmp_path, bad):
    hdr = nib.Nifti1Header()
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, bad, 0, 0], [0, 0, 1, 0]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None, header=hdr), tmp_path / "s.nii.gz")
    with pytest.raises(errors.GeometryError, match="voxel size along axis 1"):
        io.read(tmp_path / "s.nii.gz")


@pytest.mark.parametrize("spacing", ["0 1 1", "-0 1 1", "nan 1 1", "-2 1 1", "1e5 1 1", "1 1e-6 1"])
def test_metaimage_bad_spacing_is_refused(tmp_path, spacing):
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementSpacing = {spacing}\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    (tmp_path / "s.mha").write_bytes(header.encode() + bytes(range(8)))
    with pytest.raises(errors.GeometryError, match="voxel size along axis"):
        io.read(tmp_path / "s.mha")


# ------------------------------------------------------------------------------ 4. detached data files


def mhd(path, data_file, extra=""):
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = 4 4 2\nElementType = MET_UCHAR\n{extra}ElementDataFile = {data_file}\n"
    )
    return path


def nhdr(path, data_file, attached=False):
    text = f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nencoding: raw\ndata file: {data_file}\n"
    path.write_bytes(text.encode() + (b"\n" + bytes(32) if attached else b""))
    return path


@pytest.fixture
def secret(tmp_path):
    """A 32-byte file outside the folder that holds the headers."""
    (tmp_path / "private").mkdir()
    s = tmp_path / "private" / "secret.raw"
    s.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "scans").mkdir()
    return s


@pytest.mark.parametrize("kind", ["mhd", "mha", "nhdr", "nrrd"])
def test_data_file_outside_the_header_folder_is_refused(tmp_path, secret, kind):
    scans = tmp_path / "scans"
    write = (lambda p, v: mhd(p, v)) if kind in ("mhd", "mha") else (lambda p, v: nhdr(p, v, attached=kind == "nrrd"))
    for value, reason in [(str(secret), "absolute path"), ("../private/secret.raw", "leads out"), ("/etc/passwd", "absolute path")]:
        header = write(scans / f"scan.{kind}", value)
        with pytest.raises(errors.UntrustedFileError, match=f"{reason}.*trust=True") as info:
            io.read(header)
        assert isinstance(info.value, PermissionError) and isinstance(info.value, errors.ImageReadError)
        with pytest.raises(errors.UntrustedFileError):
            io.read_space(header)
    # a link in the folder that leads out is refused too
    (scans / "link.raw").symlink_to(secret)
    with pytest.raises(errors.UntrustedFileError, match="leads out"):
        io.read(write(scans / f"scan.{kind}", "link.raw"))
    # the user may trust it
    header = write(scans / f"scan.{kind}", "../private/secret.raw")
    arr, _ = io.read(header, trust=True, dtype=None)
    assert bytes(arr.transpose(2, 1, 0).ravel()) == secret.read_bytes()


@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
def test_data_file_in_the_header_folder_reads(tmp_path, kind):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.raw").write_bytes(bytes(range(32)))
    header = mhd(tmp_path / "scan.mhd", "sub/data.raw") if kind == "mhd" else nhdr(tmp_path / "scan.nhdr", "./sub/data.raw")
    arr, _ = io.read(header, dtype=None)
    assert arr.shape == (4, 4, 2) and arr[1, 0, 0] == 1 and arr[0, 1, 0] == 4


@pytest.mark.parametrize(
    "header",
    [
        "mhd:LIST\na.raw\nb.raw",
        "mhd:LIST 2D\na.raw\nb.raw",
        "mhd:slice%03d.raw 1 2 1",
        "nhdr:LIST\na.raw\nb.raw",
        "nhdr:slice%03d.raw 1 2 1",
        "nhdr:slice%03d.raw 1 2 1 2",
    ],
)
def test_lists_and_patterns_of_data_files_need_trust(tmp_path, header):
    kind, value = header.split(":", 1)
    for name in ("a.raw", "b.raw", "slice001.raw", "slice002.raw"):
        (tmp_path / name).write_bytes(bytes(16))
    path = mhd(tmp_path / "scan.mhd", value) if kind == "mhd" else nhdr(tmp_path / "scan.nhdr", value)
    with pytest.raises(errors.UntrustedFileError, match="list or pattern of several data files.*trust=True"):
        io.read(path)


@pytest.mark.parametrize(
    "line",
    [
        "elementdatafile = scan.raw\nElementDataFile = /etc/passwd",  # MetaIO ignores the first
        "ElementDataFile\r\n= /etc/passwd",  # key and value on two lines
        "ElementDataFile := ../private/secret.raw",
        "Comment = ElementDataFile\nElementDataFile = /etc/passwd",
    ],
)
def test_metaimage_header_tricks_are_refused(tmp_path, secret, line):
    (tmp_path / "scans" / "scan.raw").write_bytes(bytes(32))
    path = tmp_path / "scans" / "scan.mhd"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\n" + line + "\n", newline=""
    )
    with pytest.raises(errors.ImageReadError, match="is refused|trust=True"):
        io.read(path)


@pytest.mark.parametrize(
    "lines",
    [
        "DATA FILE: /etc/passwd",  # teem reads field names case-insensitively
        "data file:=scan.raw\ndata file: ../private/secret.raw",
        "data file: scan.raw\ndatafile: ../private/secret.raw",
    ],
)
def test_nrrd_header_tricks_are_refused(tmp_path, secret, lines):
    (tmp_path / "scans" / "scan.raw").write_bytes(bytes(32))
    path = tmp_path / "scans" / "scan.nhdr"
    path.write_text(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nencoding: raw\n{lines}\n")
    with pytest.raises(errors.ImageReadError, match="2 'data file' lines.*is refused|absolute path.*trust=True"):
        io.read(path)


# ------------------------------------------------------------------------------ 5. sizes claimed by headers


def _assert_refused_fast_and_small(path, match, **kwargs):
    """Refused from the header: no voxel data read, and nothing near the claimed gigabytes allocated."""
    tracemalloc.start()
    try:
        with no_voxels_read(), pytest.raises(errors.ImageTooLargeError, match=match) as info:
            io.read(path, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2, peak  # nothing near the claimed gigabytes was allocated
    assert isinstance(info.value, MemoryError) and isinstance(info.value, errors.ImageReadError)
    return info.value


@pytest.mark.parametrize("name", ["bomb.nii", "bomb.nii.gz"])
def test_nifti_header_claiming_gigabytes_is_refused_at_once(tmp_path, name):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), path)
    patch_nifti(path, dim=[3, 1200, 1200, 1200, 1, 1, 1, 1])
    assert path.stat().st_size < 4096
    claimed = 1200**3 * 4
    error = _assert_refused_fast_and_small(path, f"claims {claimed} bytes of voxel data.*the file holds")
    assert "(1200, 1200, 1200)" in str(error) and "Export it again" in str(error)


def test_gzip_bound_allows_real_compression(tmp_path):
    # zeros compress ~1000:1 and are still read
    path = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), path)
    assert path.stat().st_size * 100 < 64**3 * 4
    assert io.read(path)[0].shape == (64, 64, 64)


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_itk_header_claiming_gigabytes_is_refused_at_once(tmp_path, ext):
    path = tmp_path / f"bomb{ext}"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkFloat32), str(path), False)
    raw = path.read_bytes()
    raw = raw.replace(b"DimSize = 8 8 8", b"DimSize = 1200 1200 1200").replace(b"sizes: 8 8 8", b"sizes: 1200 1200 1200")
    path.write_bytes(raw)
    assert path.stat().st_size < 4096
    _assert_refused_fast_and_small(path, f"claims {1200**3 * 4} bytes of voxel data.*the file holds 2048 bytes")


def test_compressed_itk_header_claiming_too_much_is_refused(tmp_path):
    path = tmp_path / "bomb.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkFloat32), str(path), True)
    path.write_bytes(path.read_bytes().replace(b"DimSize = 8 8 8", b"DimSize = 1200 1200 1200"))
    _assert_refused_fast_and_small(path, "compressed data, which expand to at most")


def test_max_bytes_caps_what_is_read(tmp_path):
    data = np.ones((16, 16, 16), np.int16)
    for ext in (".nii.gz", ".nrrd"):
        path = io.write(tmp_path / f"scan{ext}", data, Space(data.shape, np.eye(4)))
        with pytest.raises(errors.ImageTooLargeError, match=r"more than max_bytes=4096.*raise the limit \(--max-image-bytes on the command line, max_bytes= to medcam3d.io.read.*none"):
            io.read(path, max_bytes=4096)
        assert io.read(path, max_bytes=None)[0].shape == (16, 16, 16)
        assert io.read(path, max_bytes=10**6)[0].shape == (16, 16, 16)
    write_series(tmp_path / "s", axial_positions([0.0, 1.0, 2.0]))
    with pytest.raises(errors.ImageTooLargeError, match="max_bytes=100"):
        io.read(tmp_path / "s", max_bytes=100)
    with pytest.raises(ValueError, match="max_bytes"):
        io.read(path, max_bytes=0)


def test_default_max_bytes_is_16_gib():
    import inspect

    assert io.DEFAULT_MAX_BYTES == 16 * 1024**3
    assert inspect.signature(io.read).parameters["max_bytes"].default == io.DEFAULT_MAX_BYTES


# ------------------------------------------------------------------------------ 6. one LPS <-> RAS flip, no import cycle


def _imports(path):
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_space_does_not_import_io_and_orientation_is_a_leaf():
    space = sorted((ROOT / "medcam3d" / "space").glob("*.py"))
    assert len(space) >= 2  # the package's modules
    assert not {m for path in space for m in _imports(path) if m in ("..io", "medcam3d.io") or m.startswith(("..io.", "medcam3d.io."))}
    assert {m for m in _imports(ROOT / "medcam3d" / "orientation.py") if m.startswith((".", "medcam3d"))} == {".errors"}
    assert io.lps_to_ras is orientation.lps_to_ras and io.ras_to_lps is orientation.ras_to_lps
    a = oblique_affine()
    np.testing.assert_array_equal(orientation.ras_to_lps(orientation.lps_to_ras(a)), a)
    with pytest.raises(errors.SpaceError, match="4x4"):
        orientation.lps_to_ras(np.eye(3))


def test_lps_metatensor_does_not_need_medcam3d_io():
    code = (
        "import sys, numpy as np, torch\n"
        "from monai.data import MetaTensor\n"
        "from medcam3d.space import Space\n"
        "t = MetaTensor(torch.zeros(1, 2, 3, 4), affine=torch.eye(4), meta={'space': 'LPS'})\n"
        "s = Space.of(t)\n"
        "assert np.allclose(s.affine, np.diag([-1.0, -1.0, 1.0, 1.0])), s.affine\n"
        "assert 'medcam3d.io' not in sys.modules, 'medcam3d.io was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------ issue 25: helpers


def pydicom_series(folder, n=3, rows=4, cols=5, pixel_spacing=("0.5", "0.5"), orientation=("1", "0", "0", "0", "1", "0"),
                   step=2.0, pixel_data=None):
    """A CT series written with pydicom, header values as given (strings, so malformed ones stay as they are).

    Slice k lies at (0, 0, k * step) mm (LPS) and holds the value k + 1; ``None`` leaves a tag out.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.90.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.92"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.93"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImagePositionPatient = ["0", "0", f"{k * step:g}"]
        if orientation is not None:
            ds.ImageOrientationPatient = list(orientation)
        if pixel_spacing is not None:
            ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixel_data if pixel_data is not None else np.full((rows, cols), k + 1, np.int16).tobytes()
        ds.save_as(folder / f"s{k:03d}.dcm", enforce_file_format=True)
    return folder


def _refused_fast_and_small(call, error, match, peak_bytes=100 * 1024**2):
    """``call()`` raises ``error`` matching ``match`` before any voxel data is read, within ``peak_bytes`` of traced
    memory."""
    tracemalloc.start()
    try:
        with no_voxels_read(), pytest.raises(error, match=match) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < peak_bytes, peak
    return info.value


def _one_line(text):
    return "\n" not in str(text).strip()


# ------------------------------------------------------------------------------ issue 25, item 1: header line ends


def _nrrd_cr_headers(secret):
    return {
        "cr": f"NRRD0004\rtype: uchar\rdimension: 3\rsizes: 4 4 2\rencoding: raw\rdata file: {secret}\r",
        "mixed": f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nencoding: raw\rdata file: {secret}\n",
        "cr cr lf": f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nencoding: raw\r\r\ndata file: {secret}\n",
    }


@pytest.mark.parametrize("kind", ["cr", "mixed", "cr cr lf"])
def test_nrrd_header_with_a_bare_cr_is_refused(tmp_path, secret, kind):
    """The NRRD reader ends a line at a bare CR: such a header hides a data file outside the folder."""
    path = tmp_path / "scans" / "scan.nhdr"
    path.write_bytes(_nrrd_cr_headers(secret)[kind].encode())
    if kind != "cr cr lf":  # SimpleITK itself follows the hidden line to the secret
        assert bytes(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ravel()) == secret.read_bytes()
    for call in (io.read, io.read_space, io.describe):
        with pytest.raises(errors.ImageReadError, match="bare carriage return.*lines ending in LF or CR LF") as info:
            call(path)
        assert _one_line(info.value)
    with pytest.raises(errors.ImageReadError, match="bare carriage return"):
        io.read(path, trust=True)
    # the same header with CR LF line ends (Windows) reads, and is checked like any other
    crlf = tmp_path / "scans" / "crlf.nhdr"
    crlf.write_bytes(f"NRRD0004\r\ntype: uchar\r\ndimension: 3\r\nsizes: 4 4 2\r\nencoding: raw\r\ndata file: {secret}\r\n".encode())
    with pytest.raises(errors.UntrustedFileError, match="absolute path"):
        io.read(crlf)
    (tmp_path / "scans" / "scan.raw").write_bytes(bytes(range(32)))
    crlf.write_bytes(b"NRRD0004\r\ntype: uchar\r\ndimension: 3\r\nsizes: 4 4 2\r\nencoding: raw\r\ndata file: scan.raw\r\n")
    assert io.read(crlf, dtype=None)[0][1, 0, 0] == 1


@pytest.mark.parametrize(
    "header",
    [
        b"ElementType = MET_UCHAR\rElementDataFile = SECRET\n",  # a key after a CR
        b"ElementType = MET_UCHAR\nElementDataFile = scan.raw\r/../../private/secret.raw\n",  # MetaIO's value goes on
    ],
)
def test_metaimage_header_with_a_bare_cr_is_refused(tmp_path, secret, header):
    scans = tmp_path / "scans"
    (scans / "scan.raw").write_bytes(bytes(32))
    (scans / "scan.raw\r").mkdir()  # so that MetaIO's value 'scan.raw<CR>/../../private/secret.raw' resolves
    path = scans / "scan.mhd"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\n" + header.replace(b"SECRET", str(secret).encode()))
    for call in (io.read, io.read_space, io.describe):
        with pytest.raises(errors.ImageReadError, match="bare carriage return"):
            call(path)


def test_cli_info_and_explain_refuse_a_cr_header(tmp_path, secret, capsys):
    from conftest import write_tiny_config, write_tiny_model
    from medcam3d.cli import main

    path = tmp_path / "scans" / "scan.nhdr"
    path.write_bytes(_nrrd_cr_headers(secret)["mixed"].encode())
    assert main(["info", "--image", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bare carriage return" in err and _one_line(err)
    write_tiny_model(tmp_path)
    config = write_tiny_config(tmp_path / "config.yaml")
    assert main(["explain", "--config", str(config), "--image", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "bare carriage return" in capsys.readouterr().err


# ------------------------------------------------------------------------------ issue 25, item 5: tiny files that cost gigabytes


def test_dicom_header_claiming_more_pixels_than_the_file_holds_is_refused(tmp_path):
    """Rows = Columns = 40000 with 10 bytes of pixel data: compared with the file's size, as for NIfTI."""
    folder = pydicom_series(tmp_path / "big", n=1, rows=40000, cols=40000, pixel_data=bytes(10))
    for call in (io.read, io.read_space, io.describe):
        error = _refused_fast_and_small(lambda: call(folder), errors.ImageTooLargeError,
                                        r"s000.dcm': the header claims 3200000000 bytes.*the file holds \d+ bytes")
        assert isinstance(error, MemoryError) and _one_line(error)


def _gzip_nifti_of_zeros(path, shape, dtype=np.uint8):
    """A .nii.gz whose gzip stream really holds ``shape`` zeros, compressed at level 9 (~1000:1)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    buffer = __import__("io").BytesIO()
    header.write_to(buffer)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(buffer.getvalue() + bytes(4))  # the header and its 4 extension bytes (vox_offset 352)
        left, chunk = math.prod(shape) * np.dtype(dtype).itemsize, bytes(1 << 24)
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    return path


def test_gzip_nifti_that_expands_to_gigabytes_is_refused(tmp_path):
    """A 0.3 MB .nii.gz whose stream really holds 650^3 bytes: reading it as float32 would take 1.4 GB."""
    path = _gzip_nifti_of_zeros(tmp_path / "bomb.nii.gz", (650, 650, 650))
    assert path.stat().st_size < 400_000
    for call in (io.read, io.describe):
        error = _refused_fast_and_small(lambda: call(path), errors.ImageTooLargeError,
                                        r"compressed data \(\d+ times its size\), more than max_expansion=100.*or none \(--max-expansion on the command line, max_expansion= to")
        assert _one_line(error)
    assert io.DEFAULT_MAX_EXPANSION == 100 and io.EXPANSION_FREE_BYTES == 1024**3
    # the same kind of file below 1 GiB (an empty mask) reads
    small = _gzip_nifti_of_zeros(tmp_path / "mask.nii.gz", (256, 256, 64))
    assert io.read(small, dtype=None)[0].shape == (256, 256, 64)


def test_bzip2_nrrd_claiming_gigabytes_is_refused(tmp_path):
    """bzip2 has no fixed ratio bound: the expansion limit catches it before SimpleITK allocates."""
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1200 1200 1200\nendian: little\nencoding: bzip2\n\n" + bz2_bytes())
    _refused_fast_and_small(lambda: io.read(path), errors.ImageTooLargeError, "more than max_expansion=100")


def bz2_bytes():
    import bz2

    return bz2.compress(bytes(1 << 20))


def test_4d_nifti_volume_reads_only_that_volume(tmp_path):
    data = np.arange(24 * 24 * 24 * 120, dtype=np.int16).reshape(24, 24, 24, 120) % 1000
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    one_volume = 24**3 * 4  # float32
    tracemalloc.start()
    try:
        arr, space = io.read(path, volume=7)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(errors.VolumeError, match="120 volumes.*pass volume=<index>"):
            io.read(path)  # found from the header: nothing is read
        _, refused_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(arr, data[..., 7].astype(np.float32))
    assert space.shape == (24, 24, 24)
    assert peak < 8 * one_volume, peak  # the whole file as float32 is 120 volumes
    assert refused_peak < 120 * one_volume / 10, refused_peak
    arr, _ = io.read(path, volume=-1, dtype=None)
    assert arr.dtype == np.int16 and np.array_equal(arr, data[..., -1])


def test_read_volumes_reads_a_4d_file_once(tmp_path):
    data = np.random.default_rng(0).integers(0, 100, (5, 4, 3, 6)).astype(np.int16)
    for name in ("maps.nii.gz", "maps.nrrd"):
        path = tmp_path / name
        if name.endswith(".nii.gz"):
            nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        else:
            sitk.WriteImage(sitk.GetImageFromArray(data.transpose(3, 2, 1, 0).copy(), isVector=False), str(path))
        volumes, space = io.read_volumes(path, dtype=None)
        assert volumes.shape == (6, 5, 4, 3) and space.shape == (5, 4, 3)
        for t in range(6):
            np.testing.assert_array_equal(volumes[t], data[..., t])
            np.testing.assert_array_equal(io.read(path, volume=t, dtype=None)[0], data[..., t])
        with pytest.raises(errors.VolumeError, match="6 volumes, more than max_volumes=5"):
            io.read_volumes(path, max_volumes=5)


def test_napari_reader_opens_a_4d_file_once_and_caps_its_layers(tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from medcam3d.napari import _reader

    reads = []
    read = io.read
    monkeypatch.setattr(io, "read", lambda *args, **kwargs: reads.append(kwargs) or read(*args, **kwargs))
    data = np.random.default_rng(1).integers(0, 100, (6, 5, 4, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "maps.nii.gz")
    layers = _reader.read_image(str(tmp_path / "maps.nii.gz"))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["maps [0]", "maps [1]", "maps [2]"]
    for t, (layer, kwargs, _) in enumerate(layers):
        np.testing.assert_array_equal(layer, data[..., t])
        assert kwargs["metadata"]["volume"] == t
    assert len(reads) <= 1, reads  # not once more per volume
    # a time series of 300 volumes (the 64^3 x 300 took 349 s): refused at once, naming what to do
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 300), np.uint8), np.eye(4)), tmp_path / "series.nii.gz")
    error = _refused_fast_and_small(lambda: _reader.read_image(str(tmp_path / "series.nii.gz")), errors.VolumeError,
                                    f"300 volumes.*at most {_reader.MAX_VOLUME_LAYERS}.*--volume")
    assert _one_line(error)


def test_dicom_folder_of_too_many_files_is_refused_before_any_is_opened(tmp_path, monkeypatch):
    """10,000 slices of 2x2 pixels took 75-149 s: a folder of more than max_slices files is refused at once."""
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(io.DEFAULT_MAX_SLICES + 1):
        (folder / f"{k:05d}.dcm").touch()

    def no_scan(*args, **kwargs):
        raise AssertionError("GDCM scanned the folder")

    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs", staticmethod(no_scan))
    for call in (io.read, io.read_space, io.describe):
        error = _refused_fast_and_small(lambda: call(folder), errors.ImageTooLargeError,
                                        f"holds {io.DEFAULT_MAX_SLICES + 1} files, more than max_slices=5000.*--max-slices on the command line, max_slices= to medcam3d.io.read; none lifts it")
        assert _one_line(error)
    monkeypatch.undo()
    write_series(tmp_path / "s", axial_positions([0.0, 1.0, 2.0]))
    with pytest.raises(errors.ImageTooLargeError, match="holds 3 files, more than max_slices=2"):
        io.read(tmp_path / "s", max_slices=2)
    assert io.read(tmp_path / "s", max_slices=3)[0].shape == (4, 5, 3)
    assert io.read(tmp_path / "s", max_slices=None)[0].shape == (4, 5, 3)


@pytest.mark.parametrize("size", [150.0, 1e4])
def test_absurd_voxel_sizes_are_refused_with_an_override(tmp_path, size):
    """Real scans have voxels of at most a few cm; 10 m was accepted."""
    assert io.MAX_VOXEL_MM == 100.0
    affine = np.diag([1.0, 1.0, size, 1.0])
    path = io.write(tmp_path / "scan.nii.gz", np.zeros((4, 4, 4), np.float32), Space((4, 4, 4), affine))
    for call in (io.read, io.read_space, io.describe):
        with pytest.raises(errors.GeometryError, match=f"axis 2 .* is {size:g} mm, more than max_voxel_mm=100.*max_voxel_mm") as info:
            call(path)
        assert _one_line(info.value)
    assert io.read(path, max_voxel_mm=None)[1].spacing[2] == pytest.approx(size)
    assert io.read(path, max_voxel_mm=2 * size)[1].spacing[2] == pytest.approx(size)
    thick = io.write(tmp_path / "thick.nii.gz", np.zeros((4, 4, 4), np.float32), Space((4, 4, 4), np.diag([1, 1, 40.0, 1])))
    assert io.read(thick)[1].spacing[2] == pytest.approx(40.0)  # thick slabs (a few cm) still read
    mha = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(mha))
    mha.write_bytes(mha.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = 1 1 {size:g}".encode()))
    with pytest.raises(errors.GeometryError, match="max_voxel_mm=100"):
        io.read(mha)
    folder = pydicom_series(tmp_path / "dicom", pixel_spacing=(f"{size:g}", "0.5"))
    with pytest.raises(errors.GeometryError, match="PixelSpacing.*max_voxel_mm"):
        io.read(folder)


def test_reading_limits_name_their_flag_and_the_flag_lifts_them(tmp_path, capsys):
    """Each reading limit's message names the command-line flag that lifts it, and the flag works."""
    from medcam3d import cli

    path = io.write(tmp_path / "scan.nii.gz", np.zeros((4, 4, 4), np.float32), Space((4, 4, 4), np.diag([1, 1, 150.0, 1])))
    try:
        assert cli.main(["info", "--image", str(path)]) == 2
        assert "--max-voxel-mm on the command line" in capsys.readouterr().err
        assert cli.main(["info", "--image", str(path), "--max-voxel-mm", "200"]) == 0
        assert "150" in capsys.readouterr().out
        assert cli.main(["info", "--image", str(path), "--max-voxel-mm", "none"]) == 0
        with pytest.raises(SystemExit):
            cli.main(["info", "--image", str(path), "--max-voxel-mm", "-3"])
        io.set_read_limits(max_voxel_mm=120.0)
        with pytest.raises(errors.GeometryError, match="max_voxel_mm=120"):
            io.read(path)
        assert io.read(path, max_voxel_mm=None)[1].spacing[2] == pytest.approx(150.0)  # an explicit argument wins
    finally:
        io.set_read_limits()
    with pytest.raises(errors.UsageError, match="unknown reading limit"):
        io.set_read_limits(max_files=3)


def test_limits_must_be_positive_or_none(tmp_path):
    path = io.write(tmp_path / "scan.nii.gz", np.zeros((4, 4, 4), np.float32), Space((4, 4, 4), np.eye(4)))
    for name, bad in [("max_expansion", 0), ("max_voxel_mm", -1.0), ("max_slices", 2.5), ("max_bytes", True)]:
        with pytest.raises(errors.UsageError, match=f"{name} must be a positive"):
            io.read(path, **{name: bad})


# ------------------------------------------------------------------------------ issue 25, item 6: DICOM geometry


@pytest.mark.parametrize(
    "tags, match",
    [
        ({"pixel_spacing": ("0", "0")}, r"PixelSpacing \(0028,0030\) is \[0, 0\]: a pixel size is 0"),
        ({"pixel_spacing": ("0.5", "0")}, r"PixelSpacing .* is 0 \(SimpleITK would read 1 mm\)"),
        ({"pixel_spacing": ("-0.5", "0.5")}, r"PixelSpacing .* a pixel size is negative \(-0.5 mm\)"),
        ({"pixel_spacing": ("0.7",)}, r"PixelSpacing .* 1 value\(s\): expected 2 numbers"),
        ({"pixel_spacing": None}, r"no PixelSpacing .* would assume 1 mm"),
        ({"orientation": ("1", "0", "0", "0.0871557", "0.9961947", "0")}, r"5 degrees apart .* expected a right angle"),
        ({"orientation": ("2", "0", "0", "0", "2", "0")}, r"lengths 2 and 2, expected unit vectors"),
        ({"orientation": ("1", "0")}, r"ImageOrientationPatient \(0020,0037\) is \[1, 0\], 2 value\(s\): expected 6"),
        ({"orientation": ("1", "0"), "n": 1}, r"2 value\(s\): expected 6"),
        ({"orientation": ("1", "0", "0", "0", "1", "nan")}, r"expected 6 finite numbers"),
    ],
)
def test_malformed_dicom_geometry_is_refused_everywhere(tmp_path, tags, match):
    from medcam3d.cli import main

    folder = pydicom_series(tmp_path / "series", **tags)
    calls = [io.read, io.read_space, io.describe, lambda f: io.read(f, allow_uneven_slices=True)]
    for call in calls:
        with pytest.raises(errors.GeometryError, match=match) as info:
            call(folder)
        assert _one_line(info.value)
    assert main(["info", "--image", str(folder)]) == 2


def test_dicom_grid_of_read_and_describe_is_one(tmp_path):
    """One function builds the grid from the headers: read, read_space and describe give the same affine,
    for an orientation within the tolerance (rounded to 4 decimals) and for one slice."""
    row = np.array([0.9848, 0.1736, 0.0])  # 10 degrees, rounded as some scanners write it
    col = np.array([-0.1736, 0.9848, 0.0])
    orientation = tuple(f"{v:.4f}" for v in (*row, *col))
    for n in (4, 1):
        folder = pydicom_series(tmp_path / f"s{n}", n=n, orientation=orientation, pixel_spacing=("0.8", "0.6"), step=2.5)
        _, space = io.read(folder)
        info = io.describe(folder)
        np.testing.assert_array_equal(info.affine, space.affine)
        np.testing.assert_array_equal(io.read_space(folder).affine, space.affine)
        assert not space.is_sheared
        np.testing.assert_allclose(space.spacing, [0.6, 0.8, 2.5 if n > 1 else space.spacing[2]], rtol=1e-6)


def test_describe_of_a_folder_of_several_series_reports_a_malformed_one(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, axial_positions([0.0, 1.0, 2.0]))
    pydicom_series(folder, pixel_spacing=("0", "0"))
    info = io.describe(folder)
    problems = {s.uid: s.problem for s in info.series}
    assert problems[SERIES_UID] is None
    assert "PixelSpacing" in problems["1.2.826.0.1.3680043.8.498.92"]
    with pytest.raises(errors.GeometryError, match="PixelSpacing"):
        io.read(folder, series="1.2.826.0.1.3680043.8.498.92")
    assert io.read(folder, series=SERIES_UID)[0].shape == (4, 5, 3)


# ------------------------------------------------------------------------------ issue 25, item 9: messages of reading


def test_metaimage_ndims_10_says_what_is_wrong(tmp_path):
    (tmp_path / "scan.raw").write_bytes(bytes(32))
    for dims in ("4 4 2", "4 4 2 1 1 1 1 1 1 1"):
        path = mhd(tmp_path / "scan.mhd", "scan.raw").read_text().replace("NDims = 3", "NDims = 10").replace("4 4 2", dims)
        (tmp_path / "scan.mhd").write_text(path)
        with pytest.raises(errors.ImageReadError, match="NDims = 10; expected 2 to 5 dimensions") as info:
            io.read(tmp_path / "scan.mhd")
        assert "No such file" not in str(info.value) and _one_line(info.value)
    (tmp_path / "scan.mhd").write_text(mhd(tmp_path / "scan.mhd", "scan.raw").read_text().replace("4 4 2", "4 4"))
    with pytest.raises(errors.ImageReadError, match="DimSize = '4 4' but NDims = 3; expected 3 numbers"):
        io.read(tmp_path / "scan.mhd")


def test_singular_transform_matrix_is_named(tmp_path):
    (tmp_path / "scan.raw").write_bytes(bytes(32))
    for matrix in ("0 0 0 0 0 0 0 0 0", "1 0 0 1 0 0 0 0 1"):
        path = mhd(tmp_path / "scan.mhd", "scan.raw", extra=f"TransformMatrix = {matrix}\n")
        for call in (io.read, io.describe, io.read_space):
            with pytest.raises(errors.GeometryError, match=r"direction matrix \(TransformMatrix = .*\) is singular") as info:
                call(path)
            assert _one_line(info.value)


def test_messages_of_the_cpp_readers_are_caught(tmp_path, capfd, caplog):
    """MetaIO and ITK print to the process's stderr; they become one line of medcam3d's error or log."""
    (tmp_path / "scan.raw").write_bytes(bytes(32))
    path = tmp_path / "scan.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementTypo = MET_UCHAR\nElementDataFile = scan.raw\n")
    capfd.readouterr()
    with pytest.raises(errors.ImageReadError, match="could not parse the header .*ElementType required and not defined") as info:
        io.read(path)
    assert _one_line(info.value) and "No such file" not in str(info.value)
    write_series(tmp_path / "uneven", axial_positions([0.0, 1.0, 2.0, 4.5]))
    with caplog.at_level(logging.WARNING, logger="medcam3d.io"):
        io.read(tmp_path / "uneven", allow_uneven_slices=True)
    out, err = capfd.readouterr()
    assert "ElementType required" not in err and "WARNING: In" not in err and "Non uniform sampling" not in err, err
    assert any("uneven slice spacing" in r.getMessage() and _one_line(r.getMessage()) for r in caplog.records)
    print("stderr works again", file=sys.stderr)
    assert "stderr works again" in capfd.readouterr().err


def test_an_empty_image_path_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from medcam3d.cli import main

    monkeypatch.chdir(tmp_path)  # '' used to mean the current folder, read as a DICOM folder
    for call in (io.read, io.describe, io.read_space):
        with pytest.raises(errors.ImageNotFoundError, match="no image path given"):
            call("")
    assert main(["info", "--image", ""]) == 2
    assert "--image is empty" in capsys.readouterr().err
    assert main(["explain", "--config", "c.yaml", "--image", "", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "--image is empty" in err and "lies inside" not in err


def unblock_fifo_later(fifo, seconds=10.0):
    """If something opens ``fifo`` for reading and waits for a writer, let it go after ``seconds`` (it then reads
    nothing): a test of a reader that waits fails on its time limit instead of hanging the test run."""
    import os
    import threading

    def release():
        time.sleep(seconds)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
        except OSError:
            pass

    threading.Thread(target=release, daemon=True).start()


@pytest.mark.parametrize("name", ["scan.nrrd", "scan.mha", "scan.nhdr", "scan.nii.gz", "scan.nii"])
def test_a_fifo_or_device_named_like_an_image_is_refused_unopened(tmp_path, name):
    """A FIFO named scan.nrrd made info wait forever for a writer; a link to /dev/zero reads without end."""
    import os

    fifo = tmp_path / name
    os.mkfifo(fifo)
    unblock_fifo_later(fifo)
    device = tmp_path / f"zero_{name}"
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        for call in (io.read, io.read_space, io.describe):
            with never_opened_for_reading(path) as opened, \
                    pytest.raises(errors.ImageReadError, match="is not a regular file .a FIFO, socket or device") as info:
                call(path)
            assert opened == [] and _one_line(info.value)  # refused from its type: never opened


def test_napari_reader_refuses_a_cr_header(tmp_path, secret):
    pytest.importorskip("napari")
    from medcam3d.napari import _reader

    path = tmp_path / "scans" / "scan.nhdr"
    for kind in ("cr", "mixed"):
        path.write_bytes(_nrrd_cr_headers(secret)[kind].encode())
        with pytest.raises(errors.ImageReadError, match="bare carriage return"):
            _reader.read_image(str(path))


def test_a_read_that_fails_prints_its_error_line_alone(tmp_path, capsys):
    """A folder without DICOM printed GDCM's 'No Series were found' as a warning line above the error."""
    from medcam3d.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    assert main(["info", "--image", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no DICOM series" in err, err
