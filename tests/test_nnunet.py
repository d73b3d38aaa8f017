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
    # (k, i, j): transposed, cropped to the body (10, 32, 30), resampled to (10, 26, 24), then padded to the
    # patch's 16 on the first axis (3 before, 3 after) as nnU-Net's predictor pads
    assert tuple(x.shape) == (1, 16, 26, 24) and float(x[0, :3].abs().max()) == float(x[0, 13:].abs().max()) == 0.0
    values = x[0].numpy()
    bright = values > values.max() * 0.5
    weights = np.where(bright, values, 0.0)
    index = np.stack(np.nonzero(weights)).astype(float)
    centroid = (index * weights[bright]).sum(1) / weights[bright].sum()
    world = (np.asarray(x.affine) @ np.append(centroid, 1.0))[:3]
    assert np.allclose(world, space.voxel_to_world(np.array([25.0, 11.0, 7.0])), atol=0.3)
    # the body's first voxel (after the crop) is where the affine puts the first input voxel after the padding
    # (input voxel (3, 0, 0)), within half a voxel
    corner = (np.asarray(x.affine) @ np.array([3.0, 0.0, 0.0, 1.0]))[:3]
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


# ------------------------------------------------------------------------------ mirror test-time augmentation


COARSE = "encoder.stages.2"  # the tiny U-Net's bottleneck: feature stride 4


def _sliding(explainer, roi=16):
    from medcam3d.sliding import explain_sliding_window

    return lambda x, target: explain_sliding_window(explainer, x, target, roi_size=roi, overlap=0.5)


def _symmetric(shape=(24, 24, 24), seed=0) -> torch.Tensor:
    """A (1, 1, *shape) input equal to its own flip along every spatial axis."""
    r = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(seed))
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    return sum(torch.flip(r, list(f)) if f else r for f in flips) / len(flips)


def test_mirror_axes_come_from_the_checkpoint(folder: Path):
    assert load_nnunet(folder).mirror_axes == () and load_nnunet(folder).network.mirror_axes == ()
    mirrored = load_nnunet(folder, mirror=True)
    assert mirrored.mirror_axes == (0, 1, 2) and mirrored.network.mirror_axes == (0, 1, 2)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["inference_allowed_mirroring_axes"] = (1, 2)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    assert load_nnunet(folder, mirror=True).mirror_axes == (1, 2)
    checkpoint["inference_allowed_mirroring_axes"] = (0, 3)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelLoadError, match="inference_allowed_mirroring_axes must list distinct spatial axes"):
        load_nnunet(folder, mirror=True)


def test_mirrored_map_of_a_symmetric_input_is_its_own_flip(folder: Path):
    from medcam3d import Explainer
    from medcam3d.mirror import explain_mirrored, mirror_combinations

    assert mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    # the bottleneck: a cell grid of stride 4, whose cells' receptive fields are not centred mirror-symmetrically
    explainer = Explainer(load_nnunet(folder, folds=[0]).network.folds[0], "hirescam", layer=COARSE)
    x = _symmetric()
    calls = []

    def explain(batch, target):
        calls.append(batch)
        return _sliding(explainer)(batch, target)

    plain = explain(x, [1]).maps[0, 0]
    mirrored = explain_mirrored(explain, x, [1], (0, 1, 2))
    assert len(calls) == 1 + 8 and mirrored.maps.shape == (1, 1, 6, 6, 6)
    maps = mirrored.maps[0, 0]
    scale = float(maps.abs().max())
    assert scale > 0
    for axis in range(3):
        assert torch.allclose(maps, torch.flip(maps, [axis]), atol=1e-5 * scale), axis
        # the network is not mirror-symmetric: one pass alone is not (so the check above can fail)
        assert float((plain - torch.flip(plain, [axis])).abs().max()) > 1e-3 * float(plain.abs().max())
    assert mirrored.logits.shape == (1, 2, 24, 24, 24)
    assert torch.allclose(mirrored.logits, torch.flip(mirrored.logits, [2, 3, 4]), atol=1e-5)


def test_mirror_pads_before_it_flips(folder: Path):
    """On a grid that is not a multiple of the feature stride, each pass flips the padded grid: the result equals
    that of the input padded by hand, cell for cell."""
    from medcam3d import Explainer
    from medcam3d.mirror import explain_mirrored

    explainer = Explainer(load_nnunet(folder, folds=[0]).network.folds[0], "hirescam", layer=COARSE)
    x = torch.randn((1, 1, 22, 23, 24), generator=torch.Generator().manual_seed(1))
    found = explain_mirrored(_sliding(explainer), x, [1], (0, 1, 2))
    assert found.input_shape == (24, 24, 24) and found.maps.shape == (1, 1, 6, 6, 6)
    by_hand = explain_mirrored(_sliding(explainer), torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2)), [1], (0, 1, 2))
    assert torch.allclose(found.maps, by_hand.maps, atol=1e-6 * float(by_hand.maps.abs().max()))
    from medcam3d.errors import InputError

    with pytest.raises(InputError, match="mirror axes \\[3\\] are outside"):
        explain_mirrored(_sliding(explainer), x, [1], (3,))
    torch.manual_seed(0)
    strided = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    direct = Explainer(strided, "hirescam", layer="0")  # 23 voxels -> 12 cells: a flip would not fall on the cells
    with pytest.raises(InputError, match="multiple of the feature grid"):
        explain_mirrored(lambda b, t: direct(b, t), x, [1], (1,))
    assert explain_mirrored(lambda b, t: direct(b, t), x, [1], (0, 2)).maps.shape == (1, 1, 11, 12, 12)


def _runner(tmp_path: Path, folder: Path, mirror: bool):
    from medcam3d.jobs.runner import Runner
    from medcam3d.models import load_configured

    config = tmp_path / f"mirror_{mirror}.yaml"
    config.write_text(f"model:\n  nnunet: {folder}\n  mirror: {str(mirror).lower()}\ntask: segmentation\ntarget: [1]\n",
                      encoding="utf-8")
    configured = load_configured(load_config(config))
    return Runner(configured.config, configured.model, reader=configured.preprocessing)


def test_runner_mirrors_only_when_asked(tmp_path: Path, folder: Path):
    from medcam3d.folds import mean_explanation
    from medcam3d.sliding import explain_sliding_window

    x = torch.randn((1, 1, 20, 24, 28), generator=torch.Generator().manual_seed(2))
    plain, mirrored = _runner(tmp_path, folder, False), _runner(tmp_path, folder, True)
    assert plain.mirror_axes == () and mirrored.mirror_axes == (0, 1, 2)
    found = plain._explain_all(x, [1])
    assert [e.method for e in found] == ["hirescam", "hirescam_fold0", "hirescam_fold1"]
    # mirror: false is the explanation without mirroring, bit for bit
    for explanation, explainer in zip(found[1:], plain.fold_explainers[0]):
        alone = explain_sliding_window(explainer, x, [1], roi_size=(16, 16, 16), overlap=0.5, mode="gaussian")
        assert torch.equal(explanation.maps, alone.maps) and torch.equal(explanation.logits, alone.logits)
    assert torch.equal(found[0].maps, mean_explanation(found[1:]).maps)
    # mirror: true averages 8 passes per fold, so the maps change
    flipped = mirrored._explain_all(x, [1])
    assert flipped[1].maps.shape == found[1].maps.shape
    assert float((flipped[1].maps - found[1].maps).abs().max()) > 1e-3 * float(found[1].maps.abs().max())


def test_explain_method_uses_every_fold(tmp_path: Path, folder: Path):
    """What evaluate and the napari service call: the folds' mean, as explain writes it, not the first fold's map."""
    runner = _runner(tmp_path, folder, False)
    x = torch.randn((1, 1, 20, 24, 28), generator=torch.Generator().manual_seed(3))
    mean = runner.explain_method(0, x, target=[1])
    written = runner._explain_all(x, [1])
    assert mean.method == "hirescam" and torch.equal(mean.maps, written[0].maps)
    assert float((mean.maps - written[1].maps).abs().max()) > 1e-3 * float(written[1].maps.abs().max())


def test_a_case_smaller_than_the_patch_is_padded_half_before_half_after_as_nnunet_predicts():
    """nnU-Net's predictor pads a case smaller than the patch with zeros, half before and the odd voxel
    after (pad_nd_image); the network's instance norms see that padding, so medcam3d pads the same way.
    The padded grid's affine keeps every original voxel at its world position."""
    from medcam3d.preprocess_nnunet import pad_to_patch

    data = np.arange(3 * 5 * 8, dtype=np.float32).reshape(1, 3, 5, 8) + 1.0
    affine = np.array([[0.0, 0.0, 2.0, 10.0], [0.0, 1.5, 0.0, -4.0], [-1.0, 0.0, 0.0, 7.0], [0, 0, 0, 1.0]])
    padded, padded_affine = pad_to_patch(data, affine, (4, 8, 6))
    assert padded.shape == (1, 4, 8, 8)  # axis 0: 1 after; axis 1: 3 = 1 before + 2 after; axis 2 not smaller
    assert np.array_equal(padded[:, 0:3, 1:6, :], data) and padded.sum() == data.sum()
    assert padded[0, 3].max() == 0 and padded[0, :, 0].max() == 0 and padded[0, :, 6:].max() == 0
    voxel = np.array([2.0, 4.0, 7.0, 1.0])  # an original voxel, and the same voxel on the padded grid
    assert np.allclose(affine @ voxel, padded_affine @ (voxel + [0.0, 1.0, 0.0, 0.0]))
    same, same_affine = pad_to_patch(data, affine, (3, 5, 8))
    assert same is data and same_affine is affine
