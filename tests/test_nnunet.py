"""nnU-Net v2 model folders: loading (trust rules, errors), nnU-Net's preprocessing with an exact
input affine, fold ensembles through the CLI. A tiny folder (plans.json, dataset.json, 2 folds of
random weights) is written by each test (medcam3d.demo.nnunet_folder). Needs the extra [nnunet]
(.ci/run installs it)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="needs the extra medcam3d[nnunet] (.ci/run installs it)")

from medcam3d import io  # noqa: E402
from medcam3d.config import load_config  # noqa: E402
from medcam3d.demo.nnunet_folder import PLANS, write_model_folder, write_scan  # noqa: E402
from medcam3d.errors import ConfigError, ModelLoadError, UntrustedNetworkError  # noqa: E402
from medcam3d.models import load_nnunet  # noqa: E402
from medcam3d.preprocess_nnunet import NnunetPreprocessing  # noqa: E402
from medcam3d.space import Space  # noqa: E402


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "models")


def _plans(**changes) -> dict:
    plans = copy.deepcopy(PLANS)
    configuration = plans["configurations"]["3d_fullres"]
    for key, value in changes.items():
        if key in ("transpose_forward", "transpose_backward"):
            plans[key] = value
        else:
            configuration[key] = value
    return plans


def test_folds_load_with_their_own_weights(folder: Path):
    model = load_nnunet(folder)
    assert model.folds == ["0", "1"] and model.class_names == ["background", "lesion"]
    assert model.patch_size == (16, 16, 16) and model.input_channels == 1
    saved = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    for key, value in model.network.folds[1].state_dict().items():
        assert torch.equal(value, saved[key]), key
    one = load_nnunet(folder, folds=[1])
    assert one.folds == ["1"] and torch.equal(one.network.folds[0].state_dict()[key], saved[key])


def test_input_affine_places_a_planted_point(tmp_path: Path):
    """A bright cube planted in the scan is, after crop + transpose + resampling, where the input's affine says."""
    plans = _plans(transpose_forward=[0, 2, 1], transpose_backward=[0, 2, 1], spacing=[4.0, 1.25, 1.25])
    folder = write_model_folder(tmp_path / "models", plans=plans)
    model = load_nnunet(folder)
    shape, spacing = (40, 36, 12), (1.0, 1.0, 4.0)
    scan = np.zeros(shape, np.float32)
    scan[4:36, 3:33, 1:11] = 50.0  # the body: cropped to it
    scan[24:27, 10:13, 6:9] = 300.0  # the planted point, centre voxel (25, 11, 7)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # not RAS-aligned axes
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(spacing)
    affine[:3, 3] = (10.0, -30.0, 5.0)
    space = Space(shape, affine)
    x, scanner_space = NnunetPreprocessing(model.plans, model.dataset, "3d_fullres", folder)((scan, space))
    assert scanner_space is space
    assert tuple(x.shape) == (1, 10, 26, 24)  # (k, i, j): transposed, cropped to the body (10, 32, 30), resampled
    values = x[0].numpy()
    bright = values > values.max() * 0.5
    weights = np.where(bright, values, 0.0)
    index = np.stack(np.nonzero(weights)).astype(float)
    centroid = (index * weights[bright]).sum(1) / weights[bright].sum()
    world = (np.asarray(x.affine) @ np.append(centroid, 1.0))[:3]
    assert np.allclose(world, space.voxel_to_world(np.array([25.0, 11.0, 7.0])), atol=0.3)
    # the body's first voxel (after the crop) is where the affine puts the first input voxel, within half a voxel
    corner = (np.asarray(x.affine) @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
    body_corner = space.voxel_to_world(np.array([4.0, 3.0, 1.0]))
    assert np.all(np.abs(corner - body_corner) <= 0.5 * np.array([1.25, 1.25, 4.0]).max())


def test_input_affine_is_exact_on_a_ramp(tmp_path: Path):
    """A linear ramp in world x is reproduced by cubic resampling: input values == ramp(world(n)) inside."""
    folder = write_model_folder(tmp_path / "models", plans=_plans(spacing=[2.0, 1.6, 1.6]))
    model = load_nnunet(folder)
    shape = (30, 26, 20)
    affine = np.diag([1.2, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-7.0, 3.0, 11.0)
    space = Space(shape, affine)
    world = space.voxel_to_world(np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3))
    scan = (100.0 + 2.0 * world[:, 0]).reshape(shape).astype(np.float32)
    x, _ = NnunetPreprocessing(model.plans, model.dataset, "3d_fullres", folder)((scan, space))
    props = PLANS["foreground_intensity_properties_per_channel"]["0"]
    grid = np.stack(np.meshgrid(*map(np.arange, x.shape[1:]), indexing="ij"), -1).reshape(-1, 3).astype(float)
    placed = (np.c_[grid, np.ones(len(grid))] @ np.asarray(x.affine).T)[:, :3]
    expected = (np.clip(100.0 + 2.0 * placed[:, 0], props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    inside = np.all((grid >= 3) & (grid < np.array(x.shape[1:]) - 3), axis=1)
    assert np.abs(x[0].numpy().reshape(-1)[inside] - expected[inside]).max() < 0.02


@pytest.mark.slow
def test_cli_maps_per_fold_their_mean_on_the_scan_grid(tmp_path: Path):
    from medcam3d.cli import main

    folder = write_model_folder(tmp_path / "models")
    image = write_scan(tmp_path / "case_0000.nii.gz")
    config = tmp_path / "nnunet.yaml"
    config.write_text(f"model:\n  nnunet: {folder}\n  configuration: 3d_fullres\n  folds: [0, 1]\n"
                      "  checkpoint: checkpoint_final.pth\ntask: segmentation\ntarget: [1]\n", encoding="utf-8")
    assert main(["explain", "--config", str(config), "--image", str(image), "--out", str(tmp_path / "out")]) == 0
    case = tmp_path / "out" / "case_0000"
    feature = {name: io.read(case / f"case_0000_{name}_lesion_feature.nii.gz")
               for name in ("hirescam", "hirescam_fold0", "hirescam_fold1")}
    (mean, mean_space), (f0, space0), (f1, _) = feature["hirescam"], feature["hirescam_fold0"], feature["hirescam_fold1"]
    assert mean_space.isclose(space0) and np.abs(mean - (f0 + f1) / 2).max() <= 1e-3 * max(1.0, np.abs(mean).max())
    assert np.abs(f0 - f1).max() > 1e-3  # the folds differ, so the mean is not one of them
    scan_map, scan_map_space = io.read(case / "case_0000_hirescam_lesion.nii.gz")
    _, scan_space = io.read(image)
    assert scan_map.shape == scan_space.shape and scan_map_space.isclose(scan_space, atol=1e-4)
    summary = json.loads((case / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["placement"]) == {"hirescam", "hirescam_fold0", "hirescam_fold1"}


def test_a_class_outside_the_allow_list_needs_trust(tmp_path: Path):
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"] = dict(plans["configurations"]["3d_fullres"]["architecture"],
                                                                 network_class_name="mypackage.nets.MyUNet")
    folder = write_model_folder(tmp_path / "models", plans=plans)
    with pytest.raises(UntrustedNetworkError, match="mypackage.nets.MyUNet.*--trust"):
        load_nnunet(folder)
    with pytest.raises(ModelLoadError, match="cannot be imported"):
        load_nnunet(folder, trust=True)
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    folder = write_model_folder(tmp_path / "other", plans=plans)
    with pytest.raises(UntrustedNetworkError, match="nonlin names 'os.system', outside torch.nn"):
        load_nnunet(folder)


def test_cli_refuses_without_trust_in_one_line(tmp_path: Path, capsys):
    from medcam3d.cli import main

    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "mypackage.nets.MyUNet"
    folder = write_model_folder(tmp_path / "models", plans=plans)
    image = write_scan(tmp_path / "case_0000.nii.gz")
    config = tmp_path / "nnunet.yaml"
    config.write_text(f"model:\n  nnunet: {folder}\n", encoding="utf-8")
    assert main(["explain", "--config", str(config), "--image", str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mypackage.nets.MyUNet" in err and "Traceback" not in err


def test_errors_name_the_problem(folder: Path):
    with pytest.raises(ModelLoadError, match=r"no configuration '2d'; it has '3d_fullres'"):
        load_nnunet(folder, configuration="2d")
    with pytest.raises(ModelLoadError, match=r"no fold_3/ \(folds present: 0, 1\)"):
        load_nnunet(folder, folds=[0, 3])
    (folder / "fold_0" / "checkpoint_final.pth").rename(folder / "fold_0" / "checkpoint_best.pth")
    with pytest.raises(ModelLoadError, match="fold_0/checkpoint_final.pth does not exist"):
        load_nnunet(folder)
    torch.save({"network_weights": {}, "evil": Path("x")}, folder / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_nnunet(folder, folds=[1])
    (folder / "plans.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="plans.json is not valid JSON"):
        load_nnunet(folder)
    (folder / "plans.json").unlink()
    with pytest.raises(ModelLoadError, match="no plans.json"):
        load_nnunet(folder)


def test_config_keys(tmp_path: Path, folder: Path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  nnunet: {folder}\n  folds: [0, 1]\n", encoding="utf-8")
    spec = load_config(config).model
    assert spec.nnunet == folder and spec.folds == (0, 1) and spec.configuration == "3d_fullres"
    for bad, message in ((f"  nnunet: {folder}\n  folds: [0, 0]\n", "lists a fold twice"),
                         (f"  nnunet: {folder}\n  weights: w.pt\n", "not used with model.nnunet"),
                         (f"  nnunet: {folder}\n  checkpoint: ../x.pth\n", "a file name in each fold folder"),
                         ("  network: torch.nn.Conv3d\n  folds: [0]\n", "only used with model.nnunet")):
        config.write_text("model:\n" + bad, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_config(config)
