"""DICOM export (medcam3d.dicom_export): Parametric Maps and Segmentations that reference their
source series, checked by reading them back with pydicom/highdicom against the source slices in mm."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medcam3d import io
from medcam3d.dicom_export import (
    MANUFACTURER,
    export_dicom,
    read_series,
    write_parametric_map,
    write_segmentation,
)
from medcam3d.errors import ImageReadError, OutputConflictError, SpaceError
from medcam3d.explainer import Explainer
from medcam3d.heatmap import Heatmap, to_scanner_space
from medcam3d.masks import threshold_mask
from medcam3d.orientation import ras_to_lps
from medcam3d.space import Space

SHAPE = (20, 16, 9)  # columns (i), rows (j), slices (k)
SPACING = (0.7, 0.9, 2.5)  # mm between columns, between rows, between slices


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_ct_series(folder, volume: np.ndarray, *, rotation=(6.0, -4.0, 9.0), origin=(-21.5, 13.0, 48.0),
                    series_uid: str | None = None, seed: int = 0) -> list[Dataset]:
    """Write ``volume`` (I, J, K HU) as a CT series with pydicom: oblique, files in random order.

    Slice k holds ``volume[:, :, k]``: column i, row j. Returns the datasets in k order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    directions = _rotation(rotation)  # columns: row direction, column direction, slice normal (LPS)
    study, series = generate_uid(), series_uid or generate_uid()
    frame_of_reference = generate_uid()
    rng = np.random.default_rng(seed)
    datasets = []
    for k in range(volume.shape[2]):
        position = np.asarray(origin) + k * SPACING[2] * directions[:, 2]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "pydicom test"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*directions[:, 0], *directions[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.PixelSpacing = [f"{SPACING[1]}", f"{SPACING[0]}"]  # between rows, between columns
        ds.SliceThickness = f"{SPACING[2]}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (volume[:, :, k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{rng.integers(1 << 40):x}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


@pytest.fixture()
def series(tmp_path):
    """A CT series (oblique, anisotropic, shuffled file names), its volume and its grid."""
    rng = np.random.default_rng(1)
    volume = np.round(rng.normal(40, 30, SHAPE)).astype(np.float32)
    folder = tmp_path / "ct"
    datasets = write_ct_series(folder, volume)
    return folder, volume, datasets


def _smooth_map(space: Space, centre_voxel) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in space.shape], indexing="ij"), axis=-1)
    return np.exp(-np.sum(((grid - np.asarray(centre_voxel)) / 3.0) ** 2, axis=-1)).astype(np.float32)


def _frame_source_uid(frame: Dataset) -> str:
    return str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)


def _check_geometry(obj: Dataset, datasets: list[Dataset], space: Space) -> list[int]:
    """Every frame lies on the source slice it references (position, orientation, spacing in mm);
    returns the k of each frame."""
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
    assert obj.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert obj.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert obj.PatientID == datasets[0].PatientID
    referenced = obj.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} == set(by_uid)
    shared = obj.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in datasets[0].ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in datasets[0].PixelSpacing], rtol=1e-6)
    lps = ras_to_lps(space.affine)
    ks = []
    for frame in obj.PerFrameFunctionalGroupsSequence:
        k = by_uid[_frame_source_uid(frame)]
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_allclose(position, [float(v) for v in datasets[k].ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(position, lps[:3, 3] + k * lps[:3, 2], atol=1e-4)  # voxel (0, 0, k) in mm
        ks.append(k)
    return ks


def test_read_series_orders_nothing_but_finds_the_series_and_matches_medcam3d_grid(series):
    folder, volume, datasets = series
    found = read_series(folder)
    assert {ds.SOPInstanceUID for ds in found} == {ds.SOPInstanceUID for ds in datasets}
    assert all("PixelData" not in ds for ds in found)  # headers only
    array, space = io.read(folder)
    np.testing.assert_array_equal(array, volume)  # the helper writes what medcam3d reads back
    assert space.shape == SHAPE
    np.testing.assert_allclose(space.spacing, SPACING, rtol=1e-6)


def test_parametric_map_round_trip_geometry_and_values(series, tmp_path):
    folder, _, datasets = series
    space = io.read_space(folder)
    data = _smooth_map(space, (12, 5, 6))
    heatmap = Heatmap(data, space, "hirescam", "features.norm5", 1, "nodule", 2.5)
    path = write_parametric_map(heatmap, folder, tmp_path / "out" / "pm.dcm")

    pm = pydicom.dcmread(path)
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert pm.Manufacturer == MANUFACTURER
    assert pm.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    ks = _check_geometry(pm, datasets, space)
    assert sorted(ks) == list(range(SHAPE[2]))
    values = pm.pixel_array  # (frames, rows, columns), float32
    assert values.dtype == np.float32 and values.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    for f, k in enumerate(ks):
        np.testing.assert_array_equal(values[f], data[:, :, k].T)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    # highdicom reads it as a parametric map too
    parsed = hd.pm.ParametricMap.from_dataset(pm)
    assert parsed.SOPInstanceUID == pm.SOPInstanceUID


def test_segmentation_round_trip_with_highdicom(series, tmp_path):
    folder, _, datasets = series
    space = io.read_space(folder)
    masks = [_smooth_map(space, (5, 5, 2)) > 0.4, _smooth_map(space, (14, 10, 6)) > 0.2]
    masks[1][:, :, 0] = False  # an empty slice of a segment stays a frame (no frame dropped)
    path = write_segmentation(masks, space, folder, tmp_path / "seg.dcm", labels=["bright", "dark"],
                              algorithm="medcam3d hirescam")

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["bright", "dark"]
    _check_geometry(seg, datasets, space)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets], segment_numbers=[1, 2],
        combine_segments=False)  # (slices, rows, columns, segments)
    for s, mask in enumerate(masks):
        np.testing.assert_array_equal(pixels[..., s].astype(bool), np.swapaxes(mask, 0, 2))


def test_export_dicom_of_an_engine_explanation(series, tmp_path):
    folder, _, datasets = series
    array, space = io.read(folder)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    from monai.data import MetaTensor

    x = MetaTensor(torch.from_numpy(array)[None, None] / 100, affine=torch.from_numpy(np.array(space.affine)))
    result = Explainer(model, layer="0", class_names=["bright", "dark"])(x, "all")
    heatmaps = to_scanner_space(result, space)
    files = export_dicom(heatmaps, folder, tmp_path / "dicom", threshold=0.5)
    assert [f.name for f in files] == ["heatmap_hirescam_bright.dcm", "heatmap_hirescam_dark.dcm",
                                       "heatmap_hirescam_seg.dcm"]
    for h, path in zip(heatmaps.values(), files[:2]):
        pm = pydicom.dcmread(path)
        ks = _check_geometry(pm, datasets, space)
        np.testing.assert_allclose(pm.pixel_array, np.stack([h.data[:, :, k].T for k in ks]), rtol=1e-6)
    seg = hd.seg.segread(files[2])
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets], segment_numbers=[1, 2],
        combine_segments=False)
    for s, h in enumerate(heatmaps.values()):
        np.testing.assert_array_equal(pixels[..., s].astype(bool), np.swapaxes(threshold_mask(h.data, "fraction", 0.5), 0, 2))


@pytest.mark.parametrize("change", ["shifted", "flipped", "feature grid"])
def test_a_map_off_the_series_grid_is_refused(series, tmp_path, change):
    folder, _, _ = series
    space = io.read_space(folder)
    if change == "shifted":  # half a slice along the normal
        affine = np.array(space.affine)
        affine[:3, 3] += affine[:3, 2] / 2
        grid = Space(space.shape, affine)
    elif change == "flipped":  # the same voxels with the i axis reversed
        affine = np.array(space.affine)
        affine[:3, 3] += affine[:3, 0] * (space.shape[0] - 1)
        affine[:3, 0] *= -1
        grid = Space(space.shape, affine)
    else:
        grid = Space((5, 4, 9), np.array(space.affine) @ np.diag([4, 4, 1, 1]))
    heatmap = Heatmap(np.ones(grid.shape, np.float32), grid, "hirescam", "l", 0)
    with pytest.raises(SpaceError, match="series' own grid"):
        write_parametric_map(heatmap, folder, tmp_path / "pm.dcm")
    assert not (tmp_path / "pm.dcm").exists()


def test_existing_files_are_replaced_only_when_medcam3d_wrote_them(series, tmp_path):
    folder, _, _ = series
    space = io.read_space(folder)
    heatmap = Heatmap(_smooth_map(space, (3, 3, 3)), space, "gradcam", "l", 0)
    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(b"not ours")
    with pytest.raises(OutputConflictError, match="not written by medcam3d"):
        write_parametric_map(heatmap, folder, foreign)
    assert foreign.read_bytes() == b"not ours"
    ours = write_parametric_map(heatmap, folder, tmp_path / "ours.dcm")
    first = pydicom.dcmread(ours).SOPInstanceUID
    write_parametric_map(heatmap, folder, ours)  # ours: replaced
    assert pydicom.dcmread(ours).SOPInstanceUID != first
    with pytest.raises(OutputConflictError):
        write_parametric_map(heatmap, folder, ours, overwrite=False)


def test_read_series_needs_a_choice_between_several_series(series, tmp_path):
    folder, volume, _ = series
    other = write_ct_series(folder, volume, series_uid=generate_uid(), seed=5)
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_series(folder)
    chosen = read_series(folder, series=str(other[0].SeriesInstanceUID))
    assert {ds.SOPInstanceUID for ds in chosen} == {ds.SOPInstanceUID for ds in other}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM image"):
        read_series(tmp_path / "empty")


@pytest.mark.slow
def test_docs_dicom_example_runs(tmp_path):
    """The "DICOM / PACS" example of docs/monai.md, run from a copy of the samples."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "monai.md").read_text(encoding="utf-8")
    section = text.split("\n## DICOM / PACS\n", 1)[1].split("\n## ", 1)[0]
    (code,) = [block.split("\n", 1)[1] for block in section.split("```")[1::2] if block.startswith("python")]
    shutil.copytree(root / "configs", tmp_path / "configs")
    shutil.copytree(root / "data_samples", tmp_path / "data_samples")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['heatmap_hirescam_bright_round.dcm', 'heatmap_hirescam_dark_elongated.dcm', 'heatmap_hirescam_seg.dcm']" \
        in done.stdout
    assert "['bright_round', 'dark_elongated']" in done.stdout
    series = tmp_path / "out" / "dicom" / "ct_series"
    space = io.read_space(series)  # the sample's voxels; DICOM readers stack slices along +normal (LPI -> LPS)
    normal = ras_to_lps(space.affine)[:3, 2]
    datasets = sorted(read_series(series), key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient],
                                                                        normal)))
    for name in ("heatmap_hirescam_bright_round.dcm", "heatmap_hirescam_seg.dcm"):
        obj = pydicom.dcmread(tmp_path / "out" / "dicom" / "export" / name)
        ks = _check_geometry(obj, datasets, space)
        assert sorted(set(ks)) == list(range(space.shape[2]))  # every slice (a SEG frame per slice and segment)


def test_source_slices_without_slice_thickness_are_exported_unchanged(series, tmp_path):
    """SliceThickness is type 2 (may be absent); the grid's slice spacing stands in, on copies."""
    folder, _, _ = series
    datasets = read_series(folder)
    for ds in datasets:
        del ds.SliceThickness
    space = io.read_space(folder)
    path = write_parametric_map(Heatmap(_smooth_map(space, (4, 4, 4)), space, "gradcam", "l", 0), datasets,
                                tmp_path / "pm.dcm")
    measures = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(SPACING[2])
    assert all("SliceThickness" not in ds for ds in datasets)
