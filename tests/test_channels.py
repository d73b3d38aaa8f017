"""Several input channels (MR sequences) per case: reading, preprocessing, the CLI, cohorts, bundles.

The channels of a case are stacked in order on the first channel's grid (another grid is
resampled onto it, with a warning); every output lies on that grid and is named after it; a
count that is not the model's input channels is refused before the model runs (exit 2).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d import io
from medcam3d.cli import main
from medcam3d.errors import ChannelGridWarning, CohortError, InputError
from medcam3d.jobs.cases import collect_cases
from medcam3d.space import Space, resample
from _images import oblique_lpi_affine, planted_scan
from conftest import TINY_NETWORK, TINY_NETWORK_ARGS

SHAPE = (45, 41, 19)


def _write_config(path: Path, in_channels: int = 2) -> Path:
    """The tiny DenseNet with ``in_channels`` inputs and seeded random weights (weights: none)."""
    args = {**TINY_NETWORK_ARGS, "in_channels": in_channels}
    text = (f"model:\n  network: {TINY_NETWORK}\n  args: {json.dumps(args)}\n  weights: none\n"
            "task: multilabel\nclass_names: [bright, dark]\nlayer: auto\n"
            "preprocessing:\n  - {name: Orientation, axcodes: RAS}\n  - {name: EnsureChannelFirst}\n"
            "  - {name: Spacing, pixdim: [2.5, 2.5, 2.5]}\n"
            "  - {name: ScaleIntensityRange, a_min: 0, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}\n"
            "  - {name: ResizeWithPadOrCrop, spatial_size: [24, 24, 24]}\n"
            "output: {pictures: false}\n")
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two sequences on one oblique grid (a bright ball; the second: inverted contrast, another ball),
    a third on a coarser, shifted grid, and the 2-channel and 1-channel configs."""
    root = tmp_path_factory.mktemp("channels")
    affine = oblique_lpi_affine()
    space = Space(SHAPE, affine)
    first, _ = planted_scan(SHAPE, affine, (affine @ [22, 20, 9, 1])[:3], radius_mm=8, seed=0)
    second, _ = planted_scan(SHAPE, affine, (affine @ [12, 28, 6, 1])[:3], radius_mm=6, seed=1)
    io.write(root / "t1.nii.gz", first, space)
    io.write(root / "t2.nii.gz", 500.0 - second, space)
    coarse = affine.copy()
    coarse[:3, :3] *= 1.5
    coarse[:3, 3] += [3.0, -2.0, 1.5]
    other = Space((30, 28, 13), coarse)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in other.shape], indexing="ij"))
    io.write(root / "flair.nii.gz", (ijk[0] * 3 + ijk[1] * 2 + ijk[2]).astype(np.float32), other)
    return {"root": root, "space": space, "two": _write_config(root / "two.yaml", 2),
            "one": _write_config(root / "one.yaml", 1)}


# ------------------------------------------------------------------------------------------ reading
def test_read_channels_stacks_in_order_on_one_grid(scans):
    root = scans["root"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelGridWarning)  # one grid: no warning
        stacked, space = io.read_channels([root / "t1.nii.gz", root / "t2.nii.gz"])
    assert stacked.shape == (2, *SHAPE) and stacked.dtype == np.float32
    assert space.isclose(scans["space"])
    np.testing.assert_array_equal(stacked[0], io.read(root / "t1.nii.gz")[0])
    np.testing.assert_array_equal(stacked[1], io.read(root / "t2.nii.gz")[0])


def test_a_channel_on_another_grid_is_resampled_onto_the_first_with_a_warning(scans):
    root = scans["root"]
    with pytest.warns(ChannelGridWarning, match=r"channel 1 \('.*flair\.nii\.gz'"):
        stacked, space = io.read_channels([root / "t1.nii.gz", root / "flair.nii.gz"])
    assert space.isclose(scans["space"]) and stacked.shape == (2, *SHAPE)
    values, grid = io.read(root / "flair.nii.gz")
    expected = resample(values, grid, scans["space"], mode="linear")
    np.testing.assert_allclose(stacked[1], expected, rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(stacked[1]) > 0.3 * stacked[1].size  # the fields of view overlap


# ------------------------------------------------------------------------------------ preprocessing
def test_preprocess_of_a_list_is_the_channels_preprocessed_alike(scans):
    from medcam3d.config import load_config
    from medcam3d.preprocess import preprocess

    root, config = scans["root"], load_config(scans["two"])
    x, space = preprocess([root / "t1.nii.gz", root / "t2.nii.gz"], config.preprocessing)
    assert tuple(x.shape) == (2, 24, 24, 24)  # EnsureChannelFirst in the config adds no second channel axis
    assert space.isclose(scans["space"])
    for channel, name in enumerate(["t1.nii.gz", "t2.nii.gz"]):
        alone, _ = preprocess(root / name, config.preprocessing)
        np.testing.assert_allclose(x[channel].numpy(), alone[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(x.affine), np.asarray(alone.affine), atol=1e-6)


def test_explainer_preprocess_takes_a_list(scans):
    import medcam3d

    root = scans["root"]
    explainer = medcam3d.Explainer.from_config(scans["two"])
    x, space = explainer.preprocess([str(root / "t1.nii.gz"), str(root / "t2.nii.gz")])
    assert tuple(x.shape) == (2, 24, 24, 24) and space.isclose(scans["space"])
    explanation = explainer(x, target="all")
    assert explanation.maps.shape[:2] == (1, 2)


def test_a_bundle_chain_stacks_the_channels_and_resamples_other_grids(scans):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from medcam3d.preprocess_bundle import BundlePreprocessing

    root = scans["root"]
    chain = BundlePreprocessing(Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")]), "image",
                                root / "inference.json")
    x, space = chain([root / "t1.nii.gz", root / "t2.nii.gz"])
    assert tuple(x.shape) == (2, *SHAPE) and space.isclose(scans["space"])
    np.testing.assert_allclose(x[1].numpy(), io.read(root / "t2.nii.gz")[0], atol=1e-4)
    with pytest.warns(ChannelGridWarning, match="channel 1"):
        x, _ = chain([root / "t1.nii.gz", root / "flair.nii.gz"])
    stacked, _ = io.read_channels([root / "t1.nii.gz", root / "flair.nii.gz"])
    np.testing.assert_allclose(x[1].numpy(), stacked[1], atol=1e-3)


# ---------------------------------------------------------------------------------------------- CLI
def _explain(config: Path, images: list[Path], out: Path, *extra: str) -> int:
    return main(["explain", "--config", str(config), *[a for p in images for a in ("--image", str(p))],
                 "--method", "hirescam", "--target", "all", "--out", str(out), *extra])


def test_explain_two_channels_writes_maps_on_the_first_channels_grid(scans, tmp_path):
    root = scans["root"]
    assert _explain(scans["two"], [root / "t1.nii.gz", root / "flair.nii.gz"], tmp_path) == 0
    folder = tmp_path / "t1"  # named after the first channel
    heat = nib.load(folder / "t1_hirescam_bright.nii.gz")
    assert heat.shape == SHAPE
    np.testing.assert_allclose(heat.affine, nib.load(root / "t1.nii.gz").affine, atol=1e-5)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["channels"] == [str(root / "t1.nii.gz"), str(root / "flair.nii.gz")]
    assert summary["image"] == str(root / "t1.nii.gz")
    assert [c["path"] for c in summary["run"]["inputs"]["channels"]] == [
        str((root / name).resolve()) for name in ("t1.nii.gz", "flair.nii.gz")]


def test_the_channels_order_matters(scans, tmp_path):
    root = scans["root"]
    t1, t2 = root / "t1.nii.gz", root / "t2.nii.gz"
    assert _explain(scans["two"], [t1, t2], tmp_path, "--id", "forward") == 0
    assert main(["explain", "--config", str(scans["two"]), "--channels", str(t2), str(t1), "--method", "hirescam",
                 "--target", "all", "--out", str(tmp_path), "--id", "swapped"]) == 0
    one = nib.load(tmp_path / "forward" / "forward_hirescam_bright_feature.nii.gz").get_fdata()
    other = nib.load(tmp_path / "swapped" / "swapped_hirescam_bright_feature.nii.gz").get_fdata()
    assert one.shape == other.shape
    assert np.abs(one - other).max() > 1e-3 * np.abs(one).max()


@pytest.mark.parametrize("config, count", [("two", 1), ("two", 3), ("one", 2)])
def test_a_channel_count_that_is_not_the_models_is_refused_in_one_line(scans, tmp_path, capsys, config, count):
    root = scans["root"]
    images = [root / "t1.nii.gz", root / "t2.nii.gz", root / "flair.nii.gz"][:count]
    assert _explain(scans[config], images, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    error = [line for line in err if "error" in line]
    assert len(error) == 1, err
    expected = 2 if config == "two" else 1
    assert f"has {count} channel" in error[0] and f"model takes {expected} channel" in error[0]
    assert not (tmp_path / "out").exists()


def test_the_count_is_checked_before_the_model_is_loaded(scans, tmp_path, monkeypatch, capsys):
    import medcam3d.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(medcam3d.models, "load_configured", refuse)
    root = scans["root"]
    assert _explain(scans["one"], [root / "t1.nii.gz", root / "t2.nii.gz"], tmp_path) == 2
    assert "model takes 1 channel" in capsys.readouterr().err


def test_load_case_refuses_a_wrong_count_before_the_model_runs(scans):
    from medcam3d.jobs.case_loading import load_case
    from medcam3d.models import build_network

    root = scans["root"]
    model = build_network(TINY_NETWORK, {**TINY_NETWORK_ARGS, "in_channels": 2})
    with pytest.raises(InputError, match="has 1 channel, but the model takes 2"):
        load_case(root / "t1.nii.gz", None, model=model)  # one scan, read by medcam3d: the preprocessed input
    with pytest.raises(InputError, match="has 3 channels"):
        load_case([root / "t1.nii.gz", root / "t2.nii.gz", root / "t1.nii.gz"], None, model=model)


# ------------------------------------------------------------------------------------------ cohorts
def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def test_batch_takes_channel_columns(scans, tmp_path):
    root = scans["root"]
    table = _csv(root / "channels.csv", ["id", "image_0000", "image_0001"],
                 [["p1", "t1.nii.gz", "t2.nii.gz"], ["p2", "t2.nii.gz", "flair.nii.gz"]])
    cases = collect_cases(table)
    assert [c.id for c in cases] == ["p1", "p2"]
    assert cases[1].channels == [root / "t2.nii.gz", root / "flair.nii.gz"] and cases[1].image == root / "t2.nii.gz"
    out = tmp_path / "cohort"
    args = ["batch", "--config", str(scans["two"]), "--inputs", str(table), "--out", str(out), "--method", "hirescam",
            "--quiet", "--workers", "0"]
    assert main(args) == 0
    summary = json.loads((out / "p2" / "summary.json").read_text())
    assert summary["channels"] == [str(root / "t2.nii.gz"), str(root / "flair.nii.gz")]
    heat = nib.load(out / "p2" / "p2_hirescam_bright.nii.gz")
    assert heat.shape == SHAPE  # the first channel's (t2's) grid
    before = (out / "p1" / "summary.json").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert (out / "p1" / "summary.json").stat().st_mtime_ns == before  # same channels: skipped


@pytest.mark.parametrize("header, row, message", [
    (["image_0000", "image_0002"], ["t1.nii.gz", "t2.nii.gz"], "skip image_0001"),
    (["image", "image_0001"], ["t1.nii.gz", "t2.nii.gz"], "both a 'image' column and channel columns"),
    (["image_0000", "image_0001"], ["t1.nii.gz", ""], "empty 'image_0001'"),
    (["image_0000", "image_0001", "IMAGE_0001"], ["t1.nii.gz", "t2.nii.gz", "t2.nii.gz"], "appears twice"),
])
def test_bad_channel_columns_are_refused_in_one_line(scans, tmp_path, capsys, header, row, message):
    table = _csv(scans["root"] / f"bad_{len(header)}_{header[-1]}_{bool(row[-1])}.csv", header, [row])
    with pytest.raises(CohortError, match=message):
        collect_cases(table)
    assert main(["batch", "--config", str(scans["two"]), "--inputs", str(table), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0]


def _folder(path: Path, names: list[str], source: Path) -> Path:
    path.mkdir()
    data = source.read_bytes()
    for name in names:
        (path / name).write_bytes(data)
    return path


def test_a_folder_in_nnunet_naming_groups_the_channels_of_each_case(scans, tmp_path):
    folder = _folder(tmp_path / "imagesTs", ["BRATS_002_0001.nii.gz", "BRATS_001_0000.nii.gz", "BRATS_001_0001.nii.gz",
                                             "BRATS_002_0000.nii.gz"], scans["root"] / "t1.nii.gz")
    cases = collect_cases(folder)
    assert [c.id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert [p.name for p in cases[1].channels] == ["BRATS_002_0000.nii.gz", "BRATS_002_0001.nii.gz"]
    assert cases[1].image.name == "BRATS_002_0000.nii.gz"


def test_a_case_missing_a_channel_in_a_folder_is_named(scans, tmp_path):
    folder = _folder(tmp_path / "imagesTs", ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"],
                     scans["root"] / "t1.nii.gz")
    with pytest.raises(CohortError, match=r"case 'b' lacks channel\(s\) 0001 \(b_0001\.nii\.gz not found\)"):
        collect_cases(folder)


def test_a_folder_of_plain_scans_is_not_grouped(scans, tmp_path):
    folder = _folder(tmp_path / "scans", ["scan_2023.nii.gz", "scan_2024.nii.gz"], scans["root"] / "t1.nii.gz")
    cases = collect_cases(folder)
    assert [c.id for c in cases] == ["scan_2023", "scan_2024"] and not any(c.channels for c in cases)
    one = _folder(tmp_path / "single", ["p_0000.nii.gz", "q_0000.nii.gz"], scans["root"] / "t1.nii.gz")
    cases = collect_cases(one)  # nnU-Net naming with one channel: cases p and q of one scan each
    assert [c.id for c in cases] == ["p", "q"] and not any(c.channels for c in cases)


@pytest.mark.parametrize("command", ["batch", "evaluate"])
def test_a_cohort_of_the_wrong_channel_count_is_refused_before_any_case_runs(scans, tmp_path, capsys, command):
    root = scans["root"]
    table = _csv(root / f"two_for_one_{command}.csv", ["image_0000", "image_0001"], [["t1.nii.gz", "t2.nii.gz"]])
    extra = ["--quiet"] + (["--methods", "hirescam"] if command == "evaluate" else [])
    assert main([command, "--config", str(scans["one"]), "--inputs", str(table), "--out", str(tmp_path / "o"),
                 *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "has 2 channels, but the model takes 1 channel" in err[0], err
    assert not (tmp_path / "o").exists()
