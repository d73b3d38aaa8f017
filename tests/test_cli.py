"""The command line through main([...]): explain, batch (corrupt file, resume), layers, errors."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.cli import main
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
