"""The main job's outputs at their stated precision: scan-grid maps (quantised, streamed from the
feature grid), exact peaks and boxes, masks, pictures, and the output options."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet
from torch import nn

from medcam3d import io
from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.jobs.runner import Runner
from medcam3d.models import load_model
from medcam3d.masks import bounding_box, threshold_mask
from medcam3d.space import Resampler, Space, resample
from _images import oblique_lpi_affine, planted_scan

SHAPE = (45, 41, 19)
NETWORK = "{spatial_dims: 3, in_channels: 1, out_channels: 2, init_features: 4, growth_rate: 4, block_config: [1, 1]}"


def _config(root, name: str, diagonal: bool, extra: str = "") -> str:
    path = root / f"{name}.yaml"
    path.write_text(f"""
model:
  network: monai.networks.nets.DenseNet
  args: {NETWORK}
  weights: weights.pt
task: multilabel
class_names: [bright, dark]
method: hirescam
target: all
preprocessing:
  - {{name: Orientation, axcodes: RAS}}
  - {{name: Spacing, pixdim: [2.5, 2.5, 2.5], diagonal: {str(diagonal).lower()}}}
  - {{name: ScaleIntensityRange, a_min: 0, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}}
  - {{name: ResizeWithPadOrCrop, spatial_size: [24, 24, 24]}}
{extra}""")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    affine = oblique_lpi_affine()  # stored L-P-I, oblique, anisotropic, odd-shaped
    centre = (affine @ [22, 20, 9, 1])[:3]
    image, inside = planted_scan(SHAPE, affine, centre, radius_mm=8)
    io.write(root / "scan.nii.gz", image, Space(SHAPE, affine))
    io.write(root / "scan_mask.nii.gz", inside.astype(np.uint8), Space(SHAPE, affine))
    torch.manual_seed(0)
    model = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=4, block_config=(1, 1))
    torch.save(model.state_dict(), root / "weights.pt")
    # Spacing keeps the scan's directions: the feature grid's axes are parallel to the scan's
    # (separable); with diagonal: true the model sees an axis-aligned grid (oblique to the scan).
    return root, {"parallel": _config(root, "parallel", False), "oblique": _config(root, "oblique", True)}


def _reference(folder, stem: str, scan: Space):
    """The scan-grid map resampled at float32 from the job's own _feature file (the exact record)."""
    feature = nib.load(folder / f"{stem}_feature.nii.gz")
    assert feature.get_data_dtype() == np.float32
    grid = Space(feature.shape, feature.affine)
    return resample(np.asarray(feature.dataobj, dtype=np.float32), grid, scan, fill=0.0)


@pytest.mark.parametrize("geometry", ["parallel", "oblique"])
def test_default_outputs_hold_what_they_claim(setup, tmp_path, geometry):
    root, configs = setup
    assert main(["explain", "--config", configs[geometry], "--image", str(root / "scan.nii.gz"), "--mask",
                 str(root / "scan_mask.nii.gz"), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "scan"
    scan_space = Space(SHAPE, nib.load(root / "scan.nii.gz").affine)
    summary = json.loads((folder / "summary.json").read_text())
    lesion = nib.load(root / "scan_mask.nii.gz").get_fdata() > 0
    for finding in summary["findings"]:
        stem = f"scan_hirescam_{finding['class']}"
        feature = nib.load(folder / f"{stem}_feature.nii.gz")
        assert Resampler(Space(feature.shape, feature.affine), scan_space).separable == (geometry == "parallel")
        whole = _reference(folder, stem, scan_space)
        low, high = float(whole.min()), float(whole.max())
        stored = nib.load(folder / f"{stem}.nii.gz")
        assert stored.get_data_dtype() == np.uint8 and stored.shape == SHAPE
        np.testing.assert_allclose(stored.affine, scan_space.affine, atol=1e-5)
        assert np.abs(stored.get_fdata() - whole).max() <= (high - low) / 510 * (1 + 1e-4) + 1e-6
        norm = nib.load(folder / f"{stem}_norm.nii.gz").get_fdata()
        if high > low:
            assert np.abs(norm - (whole - low) / (high - low)).max() <= 1 / 510 + 1e-5
            voxel = np.unravel_index(np.argmax(whole), whole.shape)
            assert finding["peak_voxel"] == list(voxel)
            np.testing.assert_allclose(finding["peak_mm"], scan_space.voxel_to_world(np.asarray(voxel, float)), atol=1e-9)
            assert finding["peak_in_lesion"] == bool(lesion[voxel])
        else:
            assert finding["peak_voxel"] is None and finding["peak_mm"] is None
        mask = threshold_mask(whole, "fraction", 0.5, keep_largest=True)
        written = np.asarray(nib.load(folder / f"{stem}_mask.nii.gz").dataobj)
        assert written.dtype == np.uint8
        np.testing.assert_array_equal(written.astype(bool), mask)
        box = json.loads((folder / f"{stem}_box.json").read_text())
        expected = bounding_box(mask, scan_space)
        assert (box["box"] is None) == (expected is None)
        if expected is not None:
            assert box["box"]["voxel_min"] == list(expected.voxel_min)
            assert box["box"]["voxel_max"] == list(expected.voxel_max)
            assert box["box"]["voxels"] == expected.voxels
            np.testing.assert_allclose(box["box"]["world_min"], expected.world_min)
        assert (folder / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_output_options_choose_what_is_written(setup, tmp_path):
    root, configs = setup
    scan = str(root / "scan.nii.gz")
    assert main(["explain", "--config", configs["parallel"], "--image", scan, "--out", str(tmp_path / "a"),
                 "--scan-maps", "none", "--no-pictures", "--no-masks"]) == 0
    names = sorted(p.name for p in (tmp_path / "a" / "scan").iterdir())
    assert names == sorted(["scan_hirescam_bright_feature.nii.gz", "scan_hirescam_dark_feature.nii.gz",
                            "scan_hirescam_bright_box.json", "scan_hirescam_dark_box.json", "summary.json"])
    assert main(["explain", "--config", configs["parallel"], "--image", scan, "--out", str(tmp_path / "b"),
                 "--scan-maps", "predicted", "--four-d", "--no-compress", "--scan-dtype", "int16", "--no-pictures",
                 "--no-boxes", "--no-masks", "--no-normalized"]) == 0
    folder = tmp_path / "b" / "scan"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["scan_hirescam.nii", "scan_hirescam_bright_feature.nii", "scan_hirescam_dark_feature.nii",
                            "summary.json"])
    stacked = nib.load(folder / "scan_hirescam.nii")
    assert stacked.get_data_dtype() == np.int16 and stacked.shape == (*SHAPE, 1)
    probabilities = json.loads((folder / "summary.json").read_text())["probabilities"]
    predicted = max(probabilities, key=probabilities.get)
    whole = _reference_plain(folder, f"scan_hirescam_{predicted}", Space(SHAPE, nib.load(scan).affine))
    span = float(whole.max() - whole.min())
    assert np.abs(stacked.get_fdata()[..., 0] - whole).max() <= span / 131068 * (1 + 1e-4) + 1e-6
    # a config's output section does the same, and is checked
    with pytest.raises(Exception, match="scan_maps must be one of"):
        load_config(_config(root, "bad", False, "output: {scan_maps: some}"))


def _reference_plain(folder, stem: str, scan: Space):
    feature = nib.load(folder / f"{stem}_feature.nii")
    return resample(np.asarray(feature.dataobj, dtype=np.float32), Space(feature.shape, feature.affine), scan)


class _NegativeClass(nn.Module):
    """Conv -> ReLU (activations >= 0) -> GAP -> Linear: class 0's weights are all negative, so its
    HiResCAM map (gradient x activation, then ReLU) is zero everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.fill_(0.05)
            self.conv.bias.fill_(0.1)
            self.head.weight.copy_(torch.tensor([[-1.0, -2.0, -0.5], [1.0, 2.0, 0.5]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def test_a_flat_map_has_no_peak_anywhere(setup, tmp_path):
    root, configs = setup
    runner = Runner(load_config(configs["parallel"]), _NegativeClass(), layer="act", device="cpu")
    result = runner.run_case(root / "scan.nii.gz", tmp_path, mask=root / "scan_mask.nii.gz")
    flat, other = result.findings
    assert flat["class"] == "bright" and flat["peak_voxel"] is None and flat["peak_mm"] is None
    assert flat["peak_in_lesion"] is False and flat["box_mm"] is None
    assert other["peak_voxel"] is not None
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert summary["findings"][0]["peak_mm"] is None  # null in JSON
    row = result.row()
    assert row["hirescam_bright_peak_mm"] == "" and row["hirescam_dark_peak_mm"] != ""
    from medcam3d.jobs.report import write_csv

    table = list(csv.DictReader(write_csv(tmp_path / "rows.csv", [row]).open()))
    assert table[0]["hirescam_bright_peak_mm"] == ""
    assert (tmp_path / "scan" / "scan_hirescam_bright.png").is_file()
    assert nib.load(tmp_path / "scan" / "scan_hirescam_bright.nii.gz").get_fdata().max() == 0


def test_cohort_hands_scans_over_in_shared_memory():
    from monai.data import DataLoader

    from medcam3d.jobs.cohort import _as_arrays, _as_tensors
    from medcam3d.jobs.case_loading import LoadedCase

    scan = np.asfortranarray(np.random.default_rng(0).random((7, 6, 5), dtype=np.float32))
    labels = np.zeros((7, 6, 5), np.uint8)
    labels[2, 3, 1] = 2
    loaded = LoadedCase(torch.zeros(1, 4, 4, 4), Space((7, 6, 5), np.eye(4)), scan, labels)
    sent = _as_tensors(loaded)
    assert isinstance(sent.scan, torch.Tensor) and isinstance(sent.labels, torch.Tensor)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return sent

    for item in DataLoader(Items(), batch_size=1, num_workers=1, collate_fn=lambda items: items[0]):
        back = _as_arrays(item)
        assert isinstance(back.scan, np.ndarray) and back.scan.flags["F_CONTIGUOUS"]
        np.testing.assert_array_equal(back.scan, scan)
        np.testing.assert_array_equal(back.labels, labels)
    assert _as_arrays(None) is None and _as_arrays(loaded) is loaded


@pytest.mark.slow
def test_job_benchmark_smoke_run(tmp_path):
    """benchmarks/bench_job.py --quick runs the floor and the job and prints stages and ratios (no timing checks)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_job.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--scenarios", "mr", "--cases", "2",
                           "--keep", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for text in ("explain / floor: wall", "batch / floor loop: wall", "process wall time", "peak RSS (MiB)",
                 "scan-grid maps: quantise + gzip + write", "pictures", "ratios (goal: <= 1.5)"):
        assert text in done.stdout, text
    written = sorted(p.name for p in (tmp_path / "out-mr-0").glob("*/*"))
    assert any(name.endswith("_lesion.nii.gz") for name in written) and any(name.endswith(".png") for name in written)


def test_cohort_leaves_a_core_to_each_reader():
    import os

    from medcam3d.jobs.cohort import _threads_beside_workers

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with _threads_beside_workers(1):
        assert torch.get_num_threads() == max(1, min(before, cores - 1))
    assert torch.get_num_threads() == before
    with _threads_beside_workers(0):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("mode, expected", [("positive", ["dark"]), ("predicted", ["dark"]), ("none", []),
                                            ("all", ["bright", "dark"])])
def test_scan_maps_for_positive_or_predicted_classes(setup, tmp_path, mode, expected):
    import dataclasses

    root, configs = setup
    config = load_config(configs["parallel"])
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, scan_maps=mode, pictures=False))
    model = _NegativeClass()  # class "bright": logit < 0 (p < 0.5); "dark": logit > 0
    result = Runner(config, model, layer="act", device="cpu").run_case(root / "scan.nii.gz", tmp_path)
    assert result.probabilities["bright"] < 0.5 < result.probabilities["dark"]
    folder = tmp_path / "scan"
    written = sorted(p.name[len("scan_hirescam_"):-len(".nii.gz")] for p in folder.glob("scan_hirescam_*.nii.gz")
                     if not p.name.endswith(("_feature.nii.gz", "_norm.nii.gz", "_mask.nii.gz")))
    assert written == expected
    assert len(list(folder.glob("*_feature.nii.gz"))) == 2  # the quantitative record is always written


def test_pictures_drawn_beside_the_writing_equal_those_drawn_in_line(setup, tmp_path):
    """The picture thread draws the same PNGs (byte for byte) as one painter in the main thread."""
    from medcam3d.heatmap import heatmaps_of
    from medcam3d.scan_maps import ScanGridMap
    from medcam3d.jobs.report import SlicePainter

    root, configs = setup
    config = load_config(configs["oblique"])
    runner = Runner(config, load_model(config), device="cpu")
    runner.run_case(root / "scan.nii.gz", tmp_path)
    folder = tmp_path / "scan"
    summary = json.loads((folder / "summary.json").read_text())
    case = runner.explain_case(root / "scan.nii.gz", tmp_path / "again")
    painter = SlicePainter(case.loaded.scan, case.loaded.scanner_space)
    for heat, finding in zip(heatmaps_of(case.explanations[0]), summary["findings"], strict=True):
        view = ScanGridMap(heat, case.loaded.scanner_space)
        p = summary["probabilities"][heat.label]
        expected = painter.save(tmp_path / f"{heat.label}.png", view, peak_voxel=finding["peak_voxel"],
                                title=f"scan · hirescam · {heat.label} (p = {p:.2f})")
        assert (folder / f"scan_hirescam_{heat.label}.png").read_bytes() == expected.read_bytes()


def test_a_failing_picture_publishes_nothing(setup, tmp_path, monkeypatch):
    """An error in the picture thread fails the case: no case folder, no staging folder left."""
    from medcam3d.jobs.report import SlicePainter

    root, configs = setup
    config = load_config(configs["parallel"])
    runner = Runner(config, load_model(config), device="cpu")
    calls = []

    def failing_save(self, path, heat, **options):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full while drawing")
        return original(self, path, heat, **options)

    original = SlicePainter.save
    monkeypatch.setattr(SlicePainter, "save", failing_save)
    with pytest.raises(OSError, match="disk full while drawing"):
        runner.run_case(root / "scan.nii.gz", tmp_path)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
