"""The command line with models as users ship them: MONAI bundles, templates without weights, 4D files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medcam3d.cli import main
from _images import oblique_lpi_affine, planted_scan
from conftest import write_tiny_config, write_tiny_model
from test_bundles import write_bundle


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    affine = oblique_lpi_affine()
    image, _ = planted_scan((30, 26, 12), affine, centre_mm=(50.0, -45.0, 30.0))
    nib.save(nib.Nifti1Image(image, affine), root / "scan.nii.gz")
    return root / "scan.nii.gz"


def test_a_bundle_is_explained_with_its_own_preprocessing_behind_trust(scan, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle")
    config = tmp_path / "bundle.yaml"
    config.write_text(f"model: {{bundle: {bundle}}}\ntask: multilabel\n")
    args = ["explain", "--config", str(config), "--image", str(scan), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--trust" in capsys.readouterr().err
    assert main([*args, "--trust"]) == 0
    folder = tmp_path / "out" / "scan"
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert {f["class"] for f in summary["findings"]} == {"bright", "dark"}  # class names from the bundle's metadata
    feature = nib.load(folder / "scan_hirescam_bright_feature.nii.gz")
    assert feature.shape == (2, 2, 2)  # the bundle's 16³ input through the tiny DenseNet (stride 8)
    # the feature grid sits in the scan's world: its centre lies inside the scan's field of view
    source = nib.load(scan)
    centre = feature.affine @ [0.5, 0.5, 0.5, 1]
    voxel = np.linalg.solve(source.affine, centre)[:3]
    assert np.all(voxel > -0.5) and np.all(voxel < np.asarray(source.shape) - 0.5)


def test_a_config_without_weights_is_refused_unless_random_weights(scan, tmp_path, capsys):
    write_tiny_model(tmp_path)
    config = write_tiny_config(tmp_path / "config.yaml", size=16, spacing=None)
    template = tmp_path / "template.yaml"
    template.write_text(config.read_text().replace("  weights: weights.pt\n", ""))
    args = ["explain", "--config", str(template), "--image", str(scan), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "model.weights is missing" in capsys.readouterr().err
    assert main([*args, "--random-weights"]) == 0
    assert "random parameters" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "scan" / "summary.json").read_text(encoding="utf-8"))
    assert summary["run"]["random_weights"] is True
    assert main(["layers", "--config", str(template), "--shape", "1", "16", "16", "16"]) == 0  # no weights needed


def test_info_describes_a_4d_file_from_its_header(scan, tmp_path, capsys):
    source = nib.load(scan)
    data = np.asarray(source.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data, data], axis=-1), source.affine), tmp_path / "four.nii.gz")
    assert main(["info", "--image", str(tmp_path / "four.nii.gz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["volumes"] == 3 and list(info["spatial_shape"]) == [30, 26, 12]
    assert main(["info", "--image", str(tmp_path / "missing.nii.gz")]) == 2


def test_explain_segment_writes_a_label_map_and_lesion_boxes(tmp_path):
    from medcam3d import io

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    image = repo / "data_samples" / "case_02.nii.gz"  # one bright_round lesion (see data_samples/cases.csv)
    assert main(["explain", "--config", str(repo / "configs" / "demo.yaml"), "--image", str(image), "--segment",
                 "--no-pictures", "--scan-maps", "none", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "case_02"
    labels, space = io.read(folder / "case_02_hirescam_segmentation.nii.gz", dtype=None)
    truth, truth_space = io.read(repo / "data_samples" / "case_02_mask.nii.gz", dtype=None)
    assert space.isclose(truth_space, atol=1e-3) and labels.shape == truth.shape
    lesions = json.loads((folder / "case_02_hirescam_lesions.json").read_text(encoding="utf-8"))
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["segmentation"]["lesions"] and lesions
    found = labels == 1
    overlap = np.logical_and(found, truth == 1).sum()
    assert overlap > 0  # the bright_round segmentation meets the true lesion
