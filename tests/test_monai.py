"""MONAI integration (medcam3d.monai): HeatmapInferer, SaveHeatmapsd and the example bundle run with
MONAI's own bundle runner, checked against the engine (Explainer + heatmap.to_scanner_space)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.inferers import SimpleInferer

from medcam3d import io
from medcam3d.explainer import Explainer
from medcam3d.heatmap import to_scanner_space
from medcam3d.errors import InferenceModeError
from medcam3d.monai import HeatmapInferer, SaveHeatmapsd, explanation_of
from medcam3d.monai_meta import HEATMAP_KEY, MissingHeatmapsError, original_space
from medcam3d.monai_example import (
    EXAMPLE_CLASSES,
    inference_config,
    write_example_bundle,
    write_scans,
)
from medcam3d.sliding import explain_sliding_window
from medcam3d.space import Space

ROOT = Path(__file__).resolve().parents[1]


def _parsed(bundle: Path, config: str = "inference.json") -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    return parser


def _network(parser: ConfigParser, bundle: Path) -> torch.nn.Module:
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return network.eval()


def _engine_heatmaps(parser, network, scan: Path, class_names):
    """What medcam3d's engine gives for one scan: the bundle's preprocessing, Explainer, to_scanner_space."""
    preprocessing = parser.get_parsed_content("preprocessing")
    x = preprocessing({"image": str(scan)})["image"]
    result = Explainer(network, class_names=class_names)(x[None], "all")
    return result, to_scanner_space(result, io.read_space(scan))


@pytest.fixture()
def batch():
    """A preprocessed MONAI batch of two small scans and the example network."""
    parser = ConfigParser({"net": {"_target_": "DenseNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                   "init_features": 4, "growth_rate": 4, "block_config": [2, 2]}})
    torch.manual_seed(0)
    network = parser.get_parsed_content("net").eval()
    x = MetaTensor(torch.rand(2, 1, 32, 32, 32), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])).double())
    x.is_batch = True
    return network, x


# ------------------------------------------------------------------------------------ the bundle


def test_bundle_run_with_monai_runner_writes_the_engines_maps(tmp_path):
    bundle = write_example_bundle(tmp_path / "bundle", scans=0)
    scans = write_scans(tmp_path / "scans", 3)  # RAS, LPS and an oblique scan; batches of 2 and 1
    out = tmp_path / "eval"
    from monai.bundle import run

    run(run_id="run", config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle), dataset_dir=str(tmp_path / "scans"),
        output_dir=str(out), **{"postprocessing#transforms#0#output_dtype": "float32"})

    parser = _parsed(bundle)
    network = _network(parser, bundle)
    with open(out / "predictions.csv", newline="") as handle:
        probabilities = {row[0]: [float(v) for v in row[1:]] for row in csv.reader(handle)}
    for scan in scans:
        result, expected = _engine_heatmaps(parser, network, scan, EXAMPLE_CLASSES)
        # the inferer's output is the network's: the saved probabilities are sigmoid(logits)
        np.testing.assert_allclose(probabilities[str(scan)], torch.sigmoid(result.logits[0]).tolist(), rtol=1e-5)
        stem = scan.name[: -len(".nii.gz")]
        for heatmap in expected.values():
            data, space = io.read(out / stem / f"{stem}_heatmap_hirescam_{heatmap.label}.nii.gz")
            assert space == io.read_space(scan)  # on the scan's own grid
            assert heatmap.data.max() > 0
            np.testing.assert_allclose(data, heatmap.data, rtol=1e-5, atol=1e-6 * float(heatmap.data.max()))
            descrip = nib.load(out / stem / f"{stem}_heatmap_hirescam_{heatmap.label}.nii.gz").header["descrip"].tobytes()
            assert descrip.startswith(f"medcam3d hirescam layer={result.layer}".encode())


def test_heatmap_config_differs_from_plain_in_the_inferer_and_one_post_transform():
    plain = inference_config({"_target_": "DenseNet121"}, [], ["a"], heatmaps=False)
    maps = inference_config({"_target_": "DenseNet121"}, [], ["a"], heatmaps=True)
    assert {k for k in plain if plain[k] != maps[k]} == {"inferer", "postprocessing"}
    assert plain["inferer"]["_target_"] == "SimpleInferer"
    assert maps["inferer"]["_target_"] == "medcam3d.monai.HeatmapInferer"
    post_plain, post_maps = plain["postprocessing"]["transforms"], maps["postprocessing"]["transforms"]
    assert post_maps[1:] == post_plain and post_maps[0]["_target_"] == "medcam3d.monai.SaveHeatmapsd"


@pytest.mark.slow
def test_demo_bundle_maps_equal_medcam3d_explain_cli(tmp_path):
    """The demo model as a bundle (configs/demo.yaml), run by MONAI, against `medcam3d explain`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_monai_inference import demo_bundle
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    bundle = demo_bundle(tmp_path / "demo")
    for scan in (bundle / "data").glob("*.nii.gz"):
        if scan.name != "case_03.nii.gz":  # LPI, 97 x 79 x 99
            scan.unlink()
    from monai.bundle import run

    run(run_id="run", config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
        output_dir=str(tmp_path / "eval"), meta_file=str(bundle / "configs" / "metadata.json"),
        **{"postprocessing#transforms#0#output_dtype": "float32"})
    done = subprocess.run([sys.executable, "-m", "medcam3d", "explain", "--config", str(ROOT / "configs" / "demo.yaml"),
                           "--image", str(bundle / "data" / "case_03.nii.gz"), "--target", "all", "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    space = io.read_space(bundle / "data" / "case_03.nii.gz")
    for name in ("bright_round", "dark_elongated"):
        bundle_map, bundle_space = io.read(tmp_path / "eval" / "case_03" / f"case_03_heatmap_hirescam_{name}.nii.gz")
        # the CLI's exact feature-grid map, placed on the scan by the engine's resampling
        (feature_file,) = (tmp_path / "cli").rglob(f"*hirescam_{name}_feature.nii.gz")
        feature, feature_space = io.read(feature_file)
        from medcam3d.space import resample

        expected = resample(feature, feature_space, space)
        assert bundle_space == space
        np.testing.assert_allclose(bundle_map, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


# ------------------------------------------------------------------------------------ the inferer


def test_inferer_output_is_the_networks_and_maps_are_the_explainers(batch):
    network, x = batch
    inferer = HeatmapInferer(target="all", class_names=["a", "b", "c"])
    with torch.no_grad():  # as SupervisedEvaluator runs it
        pred = inferer(x, network)
        plain = SimpleInferer()(x, network)
    assert isinstance(pred, MetaTensor) and not pred.requires_grad
    torch.testing.assert_close(pred.as_tensor(), plain.as_tensor(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.affine, x.affine)
    assert HEATMAP_KEY not in x.meta  # the image's metadata are left alone
    expected = Explainer(network, class_names=["a", "b", "c"])(x, "all")
    result = explanation_of(pred)
    assert result.maps.shape == (2, 3, 4, 4, 4) and float(result.maps.max()) > 0
    torch.testing.assert_close(result.maps, expected.maps, rtol=1e-5, atol=1e-7)
    assert result.class_names == ["a", "b", "c"] and result.layer == expected.layer
    np.testing.assert_allclose(result.input_affine, np.broadcast_to(np.asarray(x.affine), (2, 4, 4)))
    torch.testing.assert_close(inferer.last.maps, expected.maps, rtol=1e-5, atol=1e-7)


def test_decollated_samples_carry_their_own_maps(batch):
    network, x = batch
    with torch.no_grad():
        pred = HeatmapInferer(target=[2, 0])(x, network)
    items = decollate_batch({"pred": pred, "image": x})
    for b, item in enumerate(items):
        one = explanation_of(item["pred"])
        assert one.maps.shape == (1, 2, 4, 4, 4)
        assert one.class_indices.tolist() == [[2, 0]]
        torch.testing.assert_close(one.maps[0], explanation_of(pred, sample=b).maps[0])
        torch.testing.assert_close(one.logits[0], pred[b].as_tensor())
    assert not torch.equal(items[0]["pred"].meta[HEATMAP_KEY]["maps"], items[1]["pred"].meta[HEATMAP_KEY]["maps"])


def test_inference_mode_is_refused_with_the_fix(batch):
    network, x = batch
    with torch.inference_mode(), pytest.raises(InferenceModeError, match="torch.no_grad"):
        HeatmapInferer()(x, network)


def test_amp_auto_follows_the_callers_autocast(batch):
    network, x = batch
    inferer = HeatmapInferer(target=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = inferer(x, network)
    assert inferer.explainer(network).amp == "bf16"
    expected = Explainer(network, amp="bf16")(x, 0)
    torch.testing.assert_close(explanation_of(pred).maps, expected.maps)
    with torch.no_grad():
        inferer(x, network)
    assert inferer.explainer(network).amp is None


def test_extra_network_arguments_and_callables_are_refused(batch):
    network, x = batch
    with pytest.raises(TypeError, match="input alone"):
        HeatmapInferer()(x, network, 3)
    with pytest.raises(TypeError, match="nn.Module"):
        HeatmapInferer()(x, lambda t: network(t))


def test_sliding_window_inferer_segmentation_output_and_maps():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                  torch.nn.Upsample(scale_factor=2), torch.nn.Conv3d(4, 2, 1)).eval()
    x = MetaTensor(torch.rand(1, 1, 30, 28, 20), affine=torch.eye(4).double())
    inferer = HeatmapInferer(layer="3", target="all", roi_size=16, overlap=0.5)
    with torch.no_grad():
        pred = inferer(x, network)
    assert pred.shape == (1, 2, 30, 28, 20)  # the input's grid, as SlidingWindowInferer returns it
    expected = explain_sliding_window(Explainer(network, layer="3"), x, "all", roi_size=16, overlap=0.5)
    torch.testing.assert_close(pred.as_tensor(), expected.logits[:, :, :30, :28, :20])
    result = explanation_of(pred)
    torch.testing.assert_close(result.maps, expected.maps)
    assert result.input_shape == expected.input_shape  # the padded grid the maps were assembled on


# ------------------------------------------------------------------------------------ the saver


def _sample(tmp_path, network):
    """One decollated prediction of a scan loaded and preprocessed with MONAI, the scan, the batch and
    the preprocessing."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        Spacingd,
    )

    scan = write_scans(tmp_path / "in", 3)[2]  # the oblique one
    scan = scan.rename(scan.with_name("scan.nii.gz"))
    preprocessing = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
                             Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(2.5, 2.5, 2.5)),
                             ResizeWithPadOrCropd(keys="image", spatial_size=(32, 32, 32))])
    x = list_data_collate([preprocessing({"image": str(scan)})])["image"]
    with torch.no_grad():
        pred = HeatmapInferer(class_names=["a", "b", "c"])(x, network)
    return decollate_batch({"pred": pred, "image": x})[0], scan, x, preprocessing


def test_saver_inverts_to_the_scan_grid_as_the_engine_and_as_monai_invertd(batch, tmp_path):
    network, _ = batch
    item, scan, x, preprocessing = _sample(tmp_path, network)
    saver = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "out", output_postfix="cam", normalized=True,
                          output_dtype="float32")
    out = saver(item)
    assert out is not item and out["pred"] is item["pred"]
    names = sorted(p.name for p in saver.written)
    assert names == [f"scan_cam_hirescam_{c}{norm}.nii.gz" for c in "abc" for norm in ("", "_norm")]
    assert all(p.parent == tmp_path / "out" / "scan" for p in saver.written)
    assert sorted(p.name for p in (tmp_path / "out" / "scan").iterdir()) == names  # no staging left
    expected = to_scanner_space(Explainer(network, class_names=["a", "b", "c"])(x, "all"), io.read_space(scan))
    for h in expected.values():
        data, space = io.read(tmp_path / "out" / "scan" / f"scan_cam_hirescam_{h.label}.nii.gz")
        assert space == io.read_space(scan)
        np.testing.assert_allclose(data, h.data, rtol=1e-5, atol=1e-7)
        norm, _ = io.read(tmp_path / "out" / "scan" / f"scan_cam_hirescam_{h.label}_norm.nii.gz")
        assert norm.max() == pytest.approx(1.0) and norm.min() == pytest.approx(0.0, abs=1e-6)
    # the default storage: uint8 with the raw scale in scl_slope/scl_inter, within half a step
    quantised = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "q")
    quantised(item)
    for h, path in zip(expected.values(), quantised.written):
        assert nib.load(path).get_data_dtype() == np.uint8
        data, _ = io.read(path)
        step = float(h.data.max() - h.data.min()) / 255
        np.testing.assert_allclose(data, h.data, atol=0.51 * step)
    # MONAI's own inverse (upsample to the input grid, then Invertd's replay) lands in the same place
    import torch.nn.functional as F
    from monai.transforms import Invertd

    result = explanation_of(item["pred"])
    upsampled = F.interpolate(result.maps, size=result.input_shape, mode="trilinear", align_corners=False)[0]
    image = item["image"]
    maps = MetaTensor(upsampled, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="maps", transform=preprocessing, orig_keys="image", nearest_interp=False)(
        {"maps": maps, "image": image})["maps"]
    assert tuple(inverted.shape[1:]) == io.read_space(scan).shape
    # F.interpolate(align_corners=False) places the cells by that convention: compare with the maps placed so
    from dataclasses import replace

    convention = to_scanner_space(replace(result, placement="align_corners", receptive_field=None), io.read_space(scan))
    for t, h in enumerate(convention.values()):
        r = np.corrcoef(np.asarray(inverted[t]).ravel(), h.data.ravel())[0, 1]
        assert r > 0.99  # two interpolations there, one here: close, not equal


def test_lps_metadata_are_converted(batch, tmp_path):
    """A reader that keeps LPS (ITKReader(affine_lps_to_ras=False)) gives the same maps in the same place."""
    from medcam3d.orientation import ras_to_lps

    network, _ = batch
    item, scan, x, _ = _sample(tmp_path, network)
    lps = x.clone()
    lps.meta = dict(x.meta)
    lps.meta["affine"] = torch.stack([torch.from_numpy(ras_to_lps(a.numpy())) for a in x.meta["affine"]])
    lps.meta["original_affine"] = torch.stack([torch.from_numpy(ras_to_lps(np.asarray(a)))
                                               for a in x.meta["original_affine"]])
    lps.meta["space"] = ["LPS"]
    with torch.no_grad():
        pred = HeatmapInferer(class_names=["a", "b", "c"])(lps, network)
    item_lps = decollate_batch({"pred": pred})[0]
    assert original_space(item_lps["pred"].meta) == original_space(item["pred"].meta) == io.read_space(scan)
    np.testing.assert_allclose(explanation_of(item_lps["pred"]).input_affine, explanation_of(item["pred"]).input_affine)
    for ha, hb in zip(SaveHeatmapsd(keys="pred").heatmaps(item["pred"]),
                      SaveHeatmapsd(keys="pred").heatmaps(item_lps["pred"])):
        assert ha.space == hb.space
        np.testing.assert_allclose(ha.data, hb.data, rtol=1e-5, atol=1e-7)


def test_saver_naming_conventions_and_four_d(batch, tmp_path):
    network, _ = batch
    item, scan, _, _ = _sample(tmp_path, network)
    flat = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "flat", separate_folder=False, output_ext=".nii")
    flat(item)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [
        "scan_heatmap_hirescam_a.nii", "scan_heatmap_hirescam_b.nii", "scan_heatmap_hirescam_c.nii"]
    rooted = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "rooted", data_root_dir=tmp_path)
    rooted(item)
    assert (tmp_path / "rooted" / "in" / "scan" / "scan_heatmap_hirescam_a.nii.gz").is_file()  # input folders kept
    four = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "four", four_d=True, orig_key="image")
    four(item)
    (path,) = four.written
    assert path == tmp_path / "four" / "scan" / "scan_heatmap_hirescam.nii.gz"
    image = nib.load(path)
    assert image.shape == (*io.read_space(scan).shape, 3)
    assert image.header["descrip"].tobytes().startswith(b"medcam3d hirescam")
    feature = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "feature", grid="feature")
    feature(item)
    result = explanation_of(item["pred"])
    for h, path in zip(result.feature_maps().values(), feature.written, strict=True):  # the exact feature-grid maps
        data, space = io.read(path)
        assert space == h.space and data.shape == result.feature_shape
        np.testing.assert_allclose(data, h.data, rtol=1e-6)
    nrrd = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "nrrd", output_ext="nrrd")
    nrrd(item)
    assert [p.name for p in nrrd.written] == [f"scan_heatmap_hirescam_{c}.nrrd" for c in "abc"]
    data, space = io.read(nrrd.written[0])
    assert space == io.read_space(scan)
    np.testing.assert_allclose(data, nrrd.heatmaps(item["pred"])[0].data, rtol=1e-6)


def test_saver_refuses_foreign_files_and_paths_outside_output_dir(batch, tmp_path):
    network, _ = batch
    item, scan, _, _ = _sample(tmp_path, network)
    saver = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "out")
    saver(item)
    saver(item)  # its own files: replaced
    foreign = tmp_path / "out" / "scan" / "scan_heatmap_hirescam_a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(foreign))
    with pytest.raises(FileExistsError, match="not written by medcam3d"):
        saver(item)
    assert nib.load(foreign).shape == (2, 2, 2)
    SaveHeatmapsd(keys="pred", output_dir=tmp_path / "out", overwrite=True)(item)
    assert nib.load(foreign).shape == io.read_space(scan).shape
    outside = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "o2", data_root_dir=tmp_path / "in" / "deeper")
    with pytest.raises(ValueError, match="outside output_dir"):
        outside(item)


def test_background_saver_writes_the_same_files_and_raises_its_errors(batch, tmp_path, monkeypatch, caplog):
    import threading

    import medcam3d.monai as monai_module

    network, _ = batch
    item, scan, _, _ = _sample(tmp_path, network)
    plain = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "plain", normalized=True)
    plain(item)
    background = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "bg", normalized=True, background=True, max_pending=1)
    assert background(item) is not item
    written = background.wait()
    assert sorted(p.name for p in written) == sorted(p.name for p in plain.written)
    for path in plain.written:
        other = tmp_path / "bg" / "scan" / path.name
        np.testing.assert_array_equal(np.asanyarray(nib.load(other).dataobj), np.asanyarray(nib.load(path).dataobj))
        np.testing.assert_array_equal(nib.load(other).affine, nib.load(path).affine)
    assert not [p for p in (tmp_path / "bg" / "scan").iterdir() if p.name.startswith(".")]  # no staging left
    assert background.wait() == []  # nothing pending

    # the maps are taken when the call returns: a slow write blocks the next call only past max_pending
    release, started = threading.Event(), threading.Event()
    original = monai_module.save_scan_maps

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(monai_module, "save_scan_maps", slow)
    slow_saver = SaveHeatmapsd(keys="pred", output_dir=tmp_path / "slow", background=True, max_pending=1)
    slow_saver(item)  # returns while the write waits
    assert started.wait(30) and not (tmp_path / "slow" / "scan" / "scan_heatmap_hirescam_a.nii.gz").exists()
    release.set()
    assert len(slow_saver.wait()) == 3
    monkeypatch.setattr(monai_module, "save_scan_maps", original)

    # an error of a background write (a file medcam3d did not write) is raised by wait(), and nothing is replaced
    foreign = tmp_path / "bg" / "scan" / "scan_heatmap_hirescam_a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(foreign))
    background(item)
    import concurrent.futures
    import logging
    import weakref

    from medcam3d.monai_writes import report_at_exit

    concurrent.futures.wait([future for _, future in background._writes.pending])
    with caplog.at_level(logging.ERROR, logger="medcam3d.monai_writes"):
        report_at_exit(weakref.ref(background._writes))  # what runs at exit when nobody waited
    assert "could not be written: FileExistsError" in caplog.text
    background(item)
    with pytest.raises(FileExistsError, match="not written by medcam3d"):
        background.wait()
    assert nib.load(foreign).shape == (2, 2, 2)
    with pytest.raises(ValueError, match="max_pending"):
        SaveHeatmapsd(keys="pred", background=True, max_pending=0)


def test_saver_without_maps_or_grid_says_what_to_do(batch, tmp_path):
    network, x = batch
    with torch.no_grad():
        plain = SimpleInferer()(x, network)
    item = decollate_batch({"pred": plain})[0]
    with pytest.raises(MissingHeatmapsError, match="HeatmapInferer"):
        SaveHeatmapsd(keys="pred", output_dir=tmp_path)(item)
    with torch.no_grad():
        pred = HeatmapInferer()(x, network)  # a tensor made in memory: no file grid in its metadata
    with pytest.raises(ValueError, match="decollate"):
        SaveHeatmapsd(keys="pred", output_dir=tmp_path)({"pred": pred})  # a whole batch
    item = decollate_batch({"pred": pred})[0]
    from medcam3d.errors import SpaceError

    with pytest.raises(SpaceError, match="LoadImage"):
        SaveHeatmapsd(keys="pred", output_dir=tmp_path)(item)
    grid = Space((40, 40, 60), np.diag([1.6, 1.6, 1.0, 1.0]))
    saver = SaveHeatmapsd(keys="pred", output_dir=tmp_path, scanner_space=grid)
    saver(item)
    assert [p.name for p in saver.written] == [f"0_heatmap_hirescam_class{c}.nii.gz" for c in range(3)]
    assert io.read_space(saver.written[0]) == grid


# ------------------------------------------------------------------------------------ the docs


def doc_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks ``(language, code)`` of one ``## section`` of docs/monai.md."""
    text = (ROOT / "docs" / "monai.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    parts = body.split("```")
    return [(block.split("\n", 1)[0].strip(), block.split("\n", 1)[1]) for block in parts[1::2]]


def doc_workspace(tmp_path: Path) -> Path:
    """A folder with the repository's configs and samples, where the docs' relative paths work."""
    import shutil

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data_samples", tmp_path / "data_samples")
    return tmp_path


@pytest.mark.slow
def test_docs_with_monai_examples_run(tmp_path):
    cwd = doc_workspace(tmp_path)
    blocks = doc_blocks("With MONAI")
    assert [language for language, _ in blocks] == ["bash", "diff", "python"]
    script = blocks[0][1].replace(".venv/bin/python", sys.executable)
    done = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("predictions.csv", "case_0/case_0_heatmap_hirescam_bright.nii.gz",
                 "case_1/case_1_heatmap_hirescam_dark.nii.gz"):
        assert (cwd / "out" / "bundle" / "eval" / name).is_file(), name
    # the diff shown is the difference between the two configs the example bundle holds
    plain = json.loads((cwd / "out/bundle/configs/inference_plain.json").read_text())
    maps = json.loads((cwd / "out/bundle/configs/inference.json").read_text())
    added = [line[1:].strip().rstrip(",") for line in blocks[1][1].splitlines() if line.startswith("+")]
    assert json.loads(added[0].split(":", 1)[1]) == maps["inferer"]
    assert json.loads(added[1]) == maps["postprocessing"]["transforms"][0]
    assert maps["postprocessing"]["transforms"][1:] == plain["postprocessing"]["transforms"]

    done = subprocess.run([sys.executable, "-c", blocks[2][1]], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['bright_round', 'dark_elongated'] (1, 2, 16, 16, 16)" in done.stdout
    for case in range(1, 7):
        for name in ("bright_round", "dark_elongated"):
            path = cwd / "out" / "monai" / f"case_0{case}" / f"case_0{case}_heatmap_hirescam_{name}.nii.gz"
            assert io.read_space(path) == io.read_space(cwd / "data_samples" / f"case_0{case}.nii.gz")
