"""The command line through main([...]): explain, batch (corrupt file, resume), layers, errors."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.cli import main
from medcam3d.errors import ConfigError, UntrustedModelError
from medcam3d.space import Space
from _images import oblique_lpi_affine, planted_scan
from conftest import write_tiny_config, write_tiny_model

SHAPE = (45, 41, 19)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    affine = oblique_lpi_affine()
    centre = (affine @ [22, 20, 9, 1])[:3]
    image, inside = planted_scan(SHAPE, affine, centre, radius_mm=8)
    io.write(root / "scan.nii.gz", image, Space(SHAPE, affine))
    io.write(root / "scan_mask.nii.gz", inside.astype(np.uint8), Space(SHAPE, affine))
    write_tiny_model(root)
    config = write_tiny_config(root / "config.yaml", output="{normalized: true, pictures: true}")
    return root, config


def test_explain_writes_heatmaps_on_the_scan_grid(setup, tmp_path, capsys):
    root, config = setup
    code = main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--mask",
                 str(root / "scan_mask.nii.gz"), "--method", "hirescam,gradcam", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "probabilities: bright" in out and "peak in lesion" in out
    folder = tmp_path / "scan"
    heat = nib.load(folder / "scan_hirescam_bright.nii.gz")
    source = nib.load(root / "scan.nii.gz")
    assert heat.shape == source.shape
    np.testing.assert_allclose(heat.affine, source.affine, atol=1e-5)
    for suffix in ("_norm.nii.gz", "_feature.nii.gz", "_mask.nii.gz", "_box.json", ".png"):
        assert (folder / f"scan_gradcam_dark{suffix}").is_file(), suffix
    assert nib.load(folder / "scan_hirescam_bright_mask.nii.gz").get_data_dtype() == np.uint8
    summary = json.loads((folder / "summary.json").read_text())
    assert {f["method"] for f in summary["findings"]} == {"hirescam", "gradcam"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging leftovers


def test_batch_records_failures_and_resumes(setup, tmp_path):
    root, config = setup
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("a", "b"):
        (cohort / f"{name}.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    (cohort / "corrupt.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes()[:300])  # truncated
    out = tmp_path / "out"
    assert main(["batch", "--config", str(config), "--inputs", str(cohort), "--out", str(out), "--quiet"]) == 1
    rows = {row["case"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok"
    assert rows["corrupt"]["status"] == "error"
    assert "ImageReadError" in rows["corrupt"]["error"] and "corrupt.nii.gz" in rows["corrupt"]["error"]
    assert not (out / "corrupt").exists()
    # an interrupted run: case b's folder is gone, a half-written staging folder is left behind
    stamp = (out / "a" / "summary.json").stat().st_mtime_ns
    for path in (out / "b").iterdir():
        path.unlink()
    (out / "b").rmdir()
    (out / ".b.partial-xyz").mkdir()
    (cohort / "corrupt.nii.gz").unlink()
    assert main(["batch", "--config", str(config), "--inputs", str(cohort), "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "a" / "summary.json").stat().st_mtime_ns == stamp  # skipped, not redone
    assert (out / "b" / "summary.json").is_file()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    # the earlier run's row of a case that is no longer an input is kept (its folder was never written)
    assert [r["case"] for r in rows] == ["corrupt", "a", "b"]
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert (out / ".b.partial-xyz").is_dir()  # not medcam3d's staging folder (no mark): left alone


def test_batch_from_csv(setup, tmp_path):
    root, config = setup
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image,mask\nfirst,{root / 'scan.nii.gz'},{root / 'scan_mask.nii.gz'}\n")
    assert main(["batch", "--config", str(config), "--inputs", str(table), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    row = next(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    # the recorded check must agree with the written map's peak and the mask (random weights: either outcome)
    heat = nib.load(tmp_path / "o" / "first" / "first_hirescam_bright.nii.gz").get_fdata()
    lesion = nib.load(root / "scan_mask.nii.gz").get_fdata() > 0
    expected = bool(lesion[np.unravel_index(np.argmax(heat), heat.shape)])
    assert row["case"] == "first" and row["hirescam_bright_peak_in_lesion"] == str(expected)


def test_layers_lists_candidates(setup, capsys):
    _, config = setup
    assert main(["layers", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "input (1, 24, 24, 24)" in out and "(1, 8, 3, 3, 3)" in out and "features.norm5" in out and "layer='auto' selects: class_layers.relu" in out


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {network: monai.networks.nets.DenseNet, args: {}, weights: missing.pt}", "weights file"),
        ("model: {network: monai.networks.nets.DenseNet}\nmethd: gradcam", "Did you mean 'method'"),
        ("model: {network: monai.networks.nets.DenseNet}\ntask: regression", "task must be one of"),
        ("model: {network: monai.networks.nets.DenseNet}\nclass_names: bright", "class_names must be a list"),
        ("model: {network: monai.networks.nets.DenseNet}\noutput: {fill: zero}", "output.fill must be a float"),
        ("model: [1, 2", "not valid YAML"),
    ],
)
def test_config_errors_exit_2_and_name_the_key(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["layers", "--config", str(config), "--shape", "1", "8", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.yaml" in err


def test_weights_that_do_not_fit_the_network(setup, tmp_path, capsys):
    root, _ = setup
    config = tmp_path / "mismatch.yaml"
    config.write_text(f"""
model:
  network: monai.networks.nets.DenseNet
  args: {{spatial_dims: 3, in_channels: 1, out_channels: 3, init_features: 4, growth_rate: 4, block_config: [1, 1]}}
  weights: {root / 'weights.pt'}
""")
    assert main(["layers", "--config", str(config), "--shape", "1", "16", "16", "16"]) == 2  # a usage error
    assert "do not fit DenseNet" in capsys.readouterr().err


def test_untrusted_code_is_refused(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text("model: {network: os.system, args: {}}\n")
    assert main(["layers", "--config", str(config), "--shape", "1", "8", "8", "8"]) == 2
    assert "--trust" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["explain", "--image", "x.nii.gz"])
    assert info.value.code == 2


def test_synthetic_demo_finds_planted_lesion(capsys):
    assert main(["demo", "--synthetic", "--size", "48", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "7/7 methods" in out and "hirescam" in out


def test_info_lists_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "hirescam" in out


def test_a_4d_file_needs_a_volume_and_explains_the_chosen_one(setup, tmp_path, capsys):
    root, config = setup
    source = nib.load(root / "scan.nii.gz")
    data = np.asarray(source.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([np.zeros_like(data), data], axis=-1), source.affine), tmp_path / "four.nii.gz")
    args = ["explain", "--config", str(config), "--image", str(tmp_path / "four.nii.gz"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "volume" in capsys.readouterr().err
    assert main([*args, "--volume", "1"]) == 0
    single = tmp_path / "single"
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(single)]) == 0
    chosen = nib.load(tmp_path / "o" / "four" / "four_hirescam_bright_feature.nii.gz").get_fdata()
    np.testing.assert_allclose(chosen, nib.load(single / "scan" / "scan_hirescam_bright_feature.nii.gz").get_fdata(),
                               rtol=1e-5, atol=1e-6)
    table = tmp_path / "cases.csv"
    table.write_text("id,image,volume\nlate,four.nii.gz,1\n")
    assert main(["batch", "--config", str(config), "--inputs", str(table), "--out", str(tmp_path / "b"), "--quiet"]) == 0


# issue 25 item 9
def one_line_error(err: str, command: str) -> str:
    """The single line a failed command printed (nothing else on stderr, no internal-error hint)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"medcam3d {command}: error: "), err
    assert "-vv" not in lines[0] and "Traceback" not in lines[0], err
    return lines[0]


@pytest.mark.parametrize("command", ["explain", "batch"])
def test_an_out_folder_under_a_file_is_a_usage_error(setup, tmp_path, capsys, command):
    root, config = setup
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    inputs = ["--image", str(root / "scan.nii.gz")] if command == "explain" else ["--inputs", str(root / "scan.nii.gz")]
    for out in (blocker / "sub", blocker / "sub" / "deeper", blocker):
        assert main([command, "--config", str(config), *inputs, "--out", str(out)]) == 2
        line = one_line_error(capsys.readouterr().err, command)
        assert str(blocker) in line and "file, not a folder" in line
    assert blocker.read_text() == "not a folder"


def test_a_read_only_out_folder_is_a_usage_error(setup, tmp_path, capsys, monkeypatch):
    root, config = setup
    args = ["explain", "--config", str(config), "--image", str(root / "scan.nii.gz")]
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # as root a chmod does not stop writing: the folder answers like a read-only file system does
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    assert main([*args, "--out", str(locked / "out")]) == 2
    line = one_line_error(capsys.readouterr().err, "explain")
    assert str(locked) in line and "cannot write" in line
    monkeypatch.setattr(os, "access", real_access)

    # a PermissionError raised later, while writing, is a usage error too, with the path it concerns
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main([*args, "--out", str(tmp_path / "elsewhere")]) == 2
    line = one_line_error(capsys.readouterr().err, "explain")
    assert "Permission denied" in line and "elsewhere" in line


def _unavailable_devices() -> list:
    import torch

    devices = [] if torch.backends.mps.is_available() else ["mps", "mps:0"]
    if not torch.cuda.is_available():
        devices += ["cuda", "cuda:0"]
    if torch.cuda.device_count() < 8:
        devices.append("cuda:7")
    return devices + ["tpu", "banana", "cuda:-1"]


@pytest.mark.parametrize("device", _unavailable_devices())
def test_an_unavailable_device_is_a_usage_error(setup, tmp_path, capsys, device):
    root, config = setup
    out = tmp_path / "out"
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out),
                 "--device", device]) == 2
    line = one_line_error(capsys.readouterr().err, "explain")
    assert device.split(":")[0] in line and "--device" in line
    assert not out.exists()  # refused before anything was written
    assert main(["demo", "--out", str(out), "--device", device]) == 2
    one_line_error(capsys.readouterr().err, "demo")


@pytest.mark.parametrize("shape, words", [
    (["3", "24", "24", "24"], "3 channels"),  # the model takes 1 channel (torch's reason is quoted)
    (["1", "2", "2", "2"], "kernel"),  # smaller than the network's kernels
    (["1", "100000", "100000", "100000"], "voxels"),  # 10^15 voxels
    (["24", "24", "24"], "3D inputs"),  # a spatial shape without the channels
])
def test_a_shape_the_model_cannot_take_is_a_usage_error(setup, capsys, shape, words):
    root, config = setup
    assert main(["layers", "--config", str(config), "--shape", *shape]) == 2
    line = one_line_error(capsys.readouterr().err, "layers")
    assert words in line and "--shape" in line


def test_an_empty_image_path_is_a_usage_error(setup, tmp_path, capsys):
    root, config = setup
    assert main(["explain", "--config", str(config), "--image", "", "--out", str(tmp_path / "o")]) == 2
    assert "--image is empty" in one_line_error(capsys.readouterr().err, "explain")


@pytest.mark.parametrize("error", [
    ConfigError("Preprocessing failed: LoadImage could not read it.\n\n=== Transform input info ===\n"
                "Traceback (most recent call last):\n  File \"/x/monai/transforms/io/array.py\", line 266, in __call__\n"
                "    img = reader.read(filename)\nRuntimeError: itk could not find a suitable ImageIO"),
    UntrustedModelError("Weights only load failed. This file can still be loaded, to do so you have two options\n"
                        "\t(1) In PyTorch 2.6, we changed the default value of the `weights_only` argument\n\n"
                        "\t(2) Alternatively, to load with `weights_only=True` please check the recommended steps"),
    RuntimeError("internal: something\nbroke\n\nhere"),
])
def test_every_error_is_printed_on_one_line(monkeypatch, capsys, error):
    import medcam3d.cli.parser as cli_parser

    def fail(args):
        raise error

    monkeypatch.setattr(cli_parser, "cmd_info", fail)
    code = main(["info"])
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    first = str(error).splitlines()[0].rstrip(".")
    assert first in err
    if "Traceback" in str(error):  # the traceback's own last line: the cause
        assert "RuntimeError: itk could not find a suitable ImageIO" in err and "array.py" not in err
    assert code == (1 if isinstance(error, RuntimeError) else 2)


def test_sigterm_in_process_is_handled_like_ctrl_c(monkeypatch, capsys):
    import signal

    import medcam3d.cli.parser as cli_parser

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return 0

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli_parser, "cmd_info", killed)
    assert main(["info"]) == 143
    assert capsys.readouterr().err.strip() == "medcam3d info: terminated."
    assert signal.getsignal(signal.SIGTERM) == previous  # restored for the caller


def test_sigterm_stops_a_batch_like_ctrl_c(setup, tmp_path):
    """SIGTERM to the whole process group (as systemd, docker stop and schedulers send it): one line,
    exit 143, no staging folder left by the main process, the DataLoader worker or the writer."""
    import shutil
    import signal
    import subprocess
    import sys

    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(40):
        shutil.copy(root / "scan.nii.gz", scans / f"case{i:02d}.nii.gz")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "medcam3d", "batch", "--config", str(config), "--inputs", str(scans),
                                "--out", str(out), "--quiet", "--workers", "1", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if out.is_dir() and sum(1 for p in out.iterdir() if (p / "summary.json").is_file()) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "medcam3d batch: terminated.", err
    assert "Traceback" not in err
    left = [p.name for p in out.iterdir() if p.name.startswith(".")]  # staging folders, temporary files, the lock
    assert not left, left
    done = [p for p in out.iterdir() if (p / "summary.json").is_file()]
    assert 2 <= len(done) < 40


def test_layers_on_a_torchscript_config(setup, tmp_path, capsys):
    """A TorchScript config is listed with its own weights (it was always refused as 'cannot be re-initialised')."""
    import torch
    from monai.networks.nets import DenseNet

    from conftest import TINY_NETWORK_ARGS

    root, _ = setup
    net = DenseNet(**{**TINY_NETWORK_ARGS, "block_config": tuple(TINY_NETWORK_ARGS["block_config"])})
    net.load_state_dict(torch.load(root / "weights.pt", weights_only=True))
    torch.jit.save(torch.jit.script(net.eval()), str(tmp_path / "tiny.ts"))
    config = tmp_path / "ts.yaml"
    config.write_text("model: {torchscript: tiny.ts}\ntask: multilabel\nclass_names: [bright, dark]\n"
                      "preprocessing:\n  - {name: ResizeWithPadOrCrop, spatial_size: [24, 24, 24]}\n")
    assert main(["layers", "--config", str(config), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 24, 24, 24)" in out and "layer='auto' selects: class_layers.relu" in out
    assert main(["layers", "--config", str(config)]) == 2  # TorchScript still needs --trust
    assert "--trust" in one_line_error(capsys.readouterr().err, "layers")


def test_explain_never_replaces_the_maps_of_another_scan(setup, tmp_path, capsys):
    """t1.nii.gz and t1.nrrd both make case id t1: the second is refused with the id to give it."""
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    values, space = io.read(root / "scan.nii.gz")
    io.write(scans / "t1.nii.gz", values, space)
    io.write(scans / "t1.nrrd", values, space)
    out = tmp_path / "out"
    command = ["explain", "--config", str(config), "--out", str(out), "--no-pictures"]
    assert main([*command, "--image", str(scans / "t1.nii.gz")]) == 0
    first = (out / "t1" / "summary.json").read_text()
    capsys.readouterr()
    assert main([*command, "--image", str(scans / "t1.nrrd")]) == 2
    line = one_line_error(capsys.readouterr().err, "explain")
    assert "t1.nii.gz" in line and "--id t1_nrrd" in line and "another --out" in line
    assert (out / "t1" / "summary.json").read_text() == first  # untouched
    assert main([*command, "--image", str(scans / "t1.nrrd"), "--id", "t1_nrrd"]) == 0
    assert json.loads((out / "t1_nrrd" / "summary.json").read_text())["image"] == str(scans / "t1.nrrd")
    assert main([*command, "--image", str(scans / "t1.nii.gz")]) == 0  # the same scan again: its folder is redone
    assert main([*command, "--image", str(scans / "t1.nii.gz"), "--id", "../x"]) == 2


@pytest.mark.parametrize("option, words", [
    (["--target", "brigth"], "Unknown class name 'brigth'. Did you mean 'bright'?"),
    (["--target", "bright,7"], "Class index 7 is out of range"),
    (["--image", "missing.nii.gz"], "--image 'missing.nii.gz' does not exist"),
    (["--mask", "missing_mask.nii.gz"], "--mask 'missing_mask.nii.gz' does not exist"),
    (["--layer", "features.nrom5"], "Layer 'features.nrom5' not found in DenseNet. Did you mean 'features.norm5'"),
])
def test_mistakes_are_reported_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, option, words):
    import medcam3d.models.loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(medcam3d.models.loading, "load_model", never)
    monkeypatch.setattr(medcam3d.models.loading, "load_bundle", never)
    root, config = setup
    image = [] if option[0] == "--image" else ["--image", str(root / "scan.nii.gz")]
    assert main(["explain", "--config", str(config), *image, *option, "--out", str(tmp_path / "o")]) == 2
    assert words in one_line_error(capsys.readouterr().err, "explain")
    if option[0] in ("--target", "--layer"):
        assert main(["batch", "--config", str(config), "--inputs", str(root), *option, "--out", str(tmp_path / "b")]) == 2
        assert words in one_line_error(capsys.readouterr().err, "batch")


def test_info_names_the_files_of_a_dicom_folder_that_gdcm_cannot_parse(tmp_path, capsys):
    """GDCM's series scan stops at a malformed file with a raw error and no file name (exit 1 before)."""
    pydicom = pytest.importorskip("pydicom")
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from _images import write_dicom_series

    folder = tmp_path / "study"
    image = sitk.Image([4, 5, 6], sitk.sitkInt16)
    image.SetSpacing((0.8, 0.8, 2.0))
    write_dicom_series(image, folder)
    # an RT dose whose 15 frames (GridFrameOffsetVector) hold more bytes than its pixel data
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dose = Dataset()
    dose.file_meta = meta
    dose.SOPClassUID, dose.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dose.Modality, dose.SeriesInstanceUID, dose.StudyInstanceUID = "RTDOSE", generate_uid(), generate_uid()
    dose.Rows = dose.Columns = 10
    dose.BitsAllocated = dose.BitsStored = 32
    dose.HighBit, dose.PixelRepresentation, dose.SamplesPerPixel = 31, 0, 1
    dose.PhotometricInterpretation = "MONOCHROME2"
    dose.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    dose.GridFrameOffsetVector = [float(i) for i in range(15)]
    dose.PixelData = bytes(800)
    dose.save_as(folder / "dose.dcm", enforce_file_format=True)
    assert main(["info", "--image", str(folder)]) == 2
    err = capsys.readouterr().err
    line = one_line_error(err, "info")
    assert "'dose.dcm'" in line and "Move them out of the folder" in line
    assert "RuntimeError" not in err and "invalid logic" not in err and "ITK" not in err
    (folder / "dose.dcm").unlink()
    assert main(["info", "--image", str(folder)]) == 0
