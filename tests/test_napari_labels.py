"""The napari plugin with label maps (issue 22): labels open as Labels layers, nearest neighbour, on the scan's grid;
``--four-d`` maps as one heatmap per class; everything saved on the scan's own grid; the config's defaults.

A real viewer under Xvfb, like ``test_napari.py`` (skipped with the reason where Qt cannot start, see conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

import nibabel as nib  # noqa: E402
from scipy import ndimage  # noqa: E402

from medcam3d import io  # noqa: E402
from medcam3d.demo.synthetic import grid_from_codes  # noqa: E402
from medcam3d.errors import LayerNotFoundError  # noqa: E402
from medcam3d.heatmap import Heatmap  # noqa: E402
from medcam3d.scan_maps import save_heatmaps  # noqa: E402
from medcam3d.space import Space, resample  # noqa: E402
from medcam3d.napari._grid import resample_labels  # noqa: E402
from medcam3d.napari._reader import read_image  # noqa: E402
from medcam3d.napari._service import explain_image  # noqa: E402
from medcam3d.napari._shared import checksum, heatmap_name  # noqa: E402
from medcam3d.napari._widget import ExplainWidget  # noqa: E402
from test_napari import _segment, _threshold  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"
CONFIG = ROOT / "configs" / "demo.yaml"


def _labels_class():
    from napari.layers import Labels

    return Labels


def _world_corners(layer) -> np.ndarray:
    shape = layer.data.shape
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return np.asarray([layer.data_to_world(c) for c in corners], dtype=float)


def _save(viewer, layer, path: Path) -> nib.Nifti1Image:
    """Save ``layer`` through napari with the medcam3d writer and load the file with nibabel."""
    viewer.layers.selection = {layer}
    [written] = viewer.layers.save(str(path), selected=True, plugin="medcam3d")
    return nib.load(written)


def _settle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=60000)


def _config(tmp_path: Path, **changes: str) -> Path:
    """configs/demo.yaml with its weights found from ``tmp_path`` and top-level keys replaced."""
    lines = []
    for line in CONFIG.read_text(encoding="utf-8").splitlines():
        key = line.split(":", 1)[0]
        if key in changes:
            continue
        lines.append(line.replace("../data_samples/", f"{SAMPLES}/"))
    lines += [f"{key}: {value}" for key, value in changes.items()]
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """``medcam3d explain --four-d --segment`` of the oblique case_04: its 4D maps, _mask, _feature and
    _segmentation files."""
    from medcam3d.cli import main

    out = tmp_path_factory.mktemp("four_d")
    assert main(["explain", "--config", str(CONFIG), "--image", str(SAMPLES / "case_04.nii.gz"), "--four-d",
                 "--segment", "--no-pictures", "--out", str(out)]) == 0
    folder = out / "case_04"
    return SimpleNamespace(folder=folder, maps=folder / "case_04_hirescam.nii.gz",
                           norm=folder / "case_04_hirescam_norm.nii.gz",
                           segmentation=folder / "case_04_hirescam_segmentation.nii.gz",
                           feature=[folder / f"case_04_hirescam_{c}_feature.nii.gz" for c in ("bright_round", "dark_elongated")])


# ------------------------------------------------------------------------------------------- the rule


def test_label_rule_on_names_types_and_counts(tmp_path):
    """Whole non-negative values; <= 256 distinct with a hint (name, intent, descrip), else integer and <= 64."""
    from medcam3d.napari._labels import FEW_LABELS, MAX_LABELS, label_names, label_values

    space = grid_from_codes("LPS", (0.9, 0.9, 2.5), (20, 18, 8), centre=(5.0, -10.0, 20.0))
    rng = np.random.default_rng(4)
    regions = rng.choice(np.array([0, 3, 7, 250], dtype=np.int16), size=space.shape)
    grey = rng.integers(0, 200, size=space.shape).astype(np.uint8)  # 200 grey levels: an 8-bit scan
    many = rng.integers(0, 300, size=space.shape).astype(np.uint16)
    cases = {
        "regions.nii.gz": (regions, "labels"),  # few integer values, no hint
        "regions_float.nii.gz": (regions.astype(np.float32), "image"),  # whole floats need a hint
        "lesion_seg.nii.gz": (regions.astype(np.float32), "labels"),  # ... which the name gives
        "grey.nii.gz": (grey, "image"),  # more than FEW_LABELS values, no hint
        "grey_labels.nii.gz": (grey, "labels"),  # <= MAX_LABELS with a hint
        "many_mask.nii.gz": (many, "image"),  # more than MAX_LABELS values
        "negative_mask.nii.gz": (regions - 1, "image"),  # negative values: no labels
        "half_mask.nii.gz": (regions.astype(np.float32) + 0.5, "image"),  # not whole
    }
    for name, (array, kind) in cases.items():
        io.write(tmp_path / name, array, space)
        [(data, kwargs, found)] = read_image(str(tmp_path / name))
        assert found == kind, name
        if kind == "labels":
            assert data.dtype == np.uint8 and set(np.unique(data)) == set(np.unique(array).astype(int)), name
            assert kwargs["metadata"]["medcam3d"] == "labels" and kwargs["metadata"]["labels"] == sorted(set(np.unique(array).astype(int)))
    # the NIfTI intent (NIFTI_INTENT_LABEL) and a labels descrip are hints too
    image = nib.Nifti1Image(grey, space.affine)
    image.header.set_intent(1002)
    nib.save(image, tmp_path / "intent.nii.gz")
    assert read_image(str(tmp_path / "intent.nii.gz"))[0][2] == "labels"
    io.write(tmp_path / "described.nii.gz", grey, space, descrip="labels 0 bg 1 liver")
    [(_, kwargs, kind)] = read_image(str(tmp_path / "described.nii.gz"))
    assert kind == "labels" and kwargs["metadata"]["label_names"] == {0: "bg", 1: "liver"}
    assert kwargs["features"]["name"][:2] == ["bg", "liver"]
    # the function itself: None for scans, values for label maps (a CT fails on the strided sample)
    ct = rng.normal(-500, 400, size=(64, 64, 32)).astype(np.int16)
    assert label_values(ct) is None and label_values(grey, FEW_LABELS) is None
    np.testing.assert_array_equal(label_values(regions), [0, 3, 7, 250])
    assert label_values(many, MAX_LABELS) is None and label_values(np.full((4, 4, 4), np.nan)) is None
    assert label_names("medcam3d segment random_walker: 0 bg, 1 bright_round, 2 dark_elongated") == {
        0: "bg", 1: "bright_round", 2: "dark_elongated"}
    assert label_names("medcam3d mask fraction 0.5 of medcam3d hirescam layer=x class=0:a") == {}


def test_ground_truth_segmentation_and_saved_masks_open_as_labels(make_napari_viewer, qtbot, explained, tmp_path):
    Labels = _labels_class()
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(SAMPLES / "case_01.nii.gz"), plugin="medcam3d")
    [truth] = viewer.open(str(SAMPLES / "case_01_mask.nii.gz"), plugin="medcam3d")
    assert isinstance(truth, Labels) and truth.data.dtype == np.uint8 and truth.data.shape == scan.data.shape
    stored = np.asanyarray(nib.load(SAMPLES / "case_01_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(truth.data, stored)  # LPS, axis-aligned: the file's voxels as they are
    np.testing.assert_allclose(_world_corners(truth), _world_corners(scan), atol=1e-6)
    assert truth.metadata["labels"] == [0, 1, 2] and truth.metadata["label_names"][2] == "dark_elongated"
    # its own colours: 0 transparent, 1 and 2 opaque and told apart; the scan shows through
    colours = np.asarray(truth.colormap.map(np.array([0, 1, 2])))
    assert colours[0][3] == 0
    assert colours[1][3] > 0.9 and colours[2][3] > 0.9 and np.abs(colours[1][:3] - colours[2][:3]).max() > 0.2
    assert 0 < truth.opacity < 1 and scan.colormap.name == "gray"

    # the CLI's segmentation (oblique case_04): labels on the scan's display grid
    [scan4] = viewer.open(str(SAMPLES / "case_04.nii.gz"), plugin="medcam3d")
    [segmentation] = viewer.open(str(explained.segmentation), plugin="medcam3d")
    assert isinstance(segmentation, Labels) and segmentation.data.shape == scan4.data.shape
    np.testing.assert_allclose(segmentation.metadata["affine"], scan4.metadata["affine"], atol=1e-9)
    assert set(np.unique(segmentation.data)) == set(np.unique(np.asanyarray(nib.load(explained.segmentation).dataobj)))
    assert segmentation.metadata["label_names"][1] == "bright_round"

    # a mask the plugin saved, under a name without any hint: Labels again, same values
    widget = ExplainWidget(viewer)
    data, kwargs, _ = explain_image(scan.data, scan.metadata["affine"], CONFIG, name=scan.name, metadata=scan.metadata,
                                    target="bright_round")[0]
    heat = viewer.add_image(data, **kwargs)
    widget.reset_choices()
    widget.heatmap.value = heat
    mask, _box = _threshold(qtbot, widget)
    _save(viewer, mask, tmp_path / "reviewed.nii.gz")
    [again] = viewer.open(str(tmp_path / "reviewed.nii.gz"), plugin="medcam3d")
    assert isinstance(again, Labels)  # saved on the scan's grid (the mask itself is on the map's 2 mm grid)
    on_scan = resample_labels(mask.data, Space(mask.data.shape, mask.metadata["affine"]),
                              Space(again.data.shape, again.metadata["affine"]))
    np.testing.assert_array_equal(again.data, on_scan)
    assert not [layer for _, layer in widget._scan_choices() if layer is not scan and layer is not scan4]


def test_oblique_label_map_is_resampled_nearest_and_label_3_survives_saving(make_napari_viewer, tmp_path):
    """case_04_mask on a 10-degree oblique grid: linear resampling made label 1 20 pieces of 619 voxels."""
    Labels = _labels_class()
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(SAMPLES / "case_04.nii.gz"), plugin="medcam3d")
    [labels] = viewer.open(str(SAMPLES / "case_04_mask.nii.gz"), plugin="medcam3d")
    truth, space = io.read(SAMPLES / "case_04_mask.nii.gz", dtype=None)
    assert isinstance(labels, Labels) and labels.metadata["resampled"] and labels.data.shape == scan.data.shape
    np.testing.assert_allclose(labels.metadata["affine"], scan.metadata["affine"], atol=1e-9)  # the scan's grid
    np.testing.assert_allclose(labels.affine.affine_matrix, scan.affine.affine_matrix, atol=1e-9)
    assert set(np.unique(labels.data)) == {0, 1, 2}  # nothing blended into new values
    shown = Space(labels.data.shape, labels.metadata["affine"])
    for value in (1, 2):
        inside = labels.data == value
        assert ndimage.label(inside)[1] == 1, value  # one piece
        assert abs(int(inside.sum()) - int((truth == value).sum())) <= 0.05 * (truth == value).sum(), value
        centre = shown.voxel_to_world(np.argwhere(inside).mean(0)[None])[0]
        true_centre = space.voxel_to_world(np.argwhere(truth == value).mean(0)[None])[0]
        assert np.all(np.abs(centre - true_centre) < np.asarray(space.spacing)), (value, centre, true_centre)
    # the linear way, for contrast: many pieces
    linear = np.rint(resample(truth.astype(np.float32), space, shown)).astype(np.uint8)
    assert ndimage.label(linear == 1)[1] > 1

    # paint label 3, save through the plugin: the file's own grid, label 3 kept; reopened: label 3 again
    labels.data[np.asarray(labels.data == 2)] = 3
    labels.refresh()
    painted = int((labels.data == 3).sum())
    written = _save(viewer, labels, tmp_path / "edited.nii.gz")
    assert written.shape == space.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, space.affine, atol=1e-5)
    back = np.asanyarray(written.dataobj)
    assert set(np.unique(back)) == {0, 1, 3}
    overlap = 2 * int(((back == 3) & (truth == 2)).sum()) / int((back == 3).sum() + (truth == 2).sum())
    assert overlap > 0.95  # nearest there and back: the same voxels but a few on the edge (12 of 313)
    [reopened] = viewer.open(str(tmp_path / "edited.nii.gz"), plugin="medcam3d")
    assert isinstance(reopened, Labels) and reopened.metadata["labels"] == [0, 1, 3]
    assert abs(int((reopened.data == 3).sum()) - painted) <= 0.05 * painted


# ------------------------------------------------------------------------------------------- --four-d


def test_four_d_maps_open_as_one_heatmap_per_class(make_napari_viewer, explained, tmp_path):
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(SAMPLES / "case_04.nii.gz"), plugin="medcam3d")
    maps = viewer.open(str(explained.maps), plugin="medcam3d")
    norms = viewer.open(str(explained.norm), plugin="medcam3d")
    assert [layer.name for layer in maps] == [heatmap_name("case_04", "hirescam", "class_layers.relu", c, p)
                                              for c, p in (("bright_round", 0.83), ("dark_elongated", 0.76))]
    assert [layer.name for layer in norms] == [f"{layer.name} · normalized" for layer in maps]
    assert [layer.metadata["class_index"] for layer in maps] == [0, 1]
    assert maps[0].colormap.name != maps[1].colormap.name  # one colour per class
    for t, layer in enumerate(maps):
        meta = layer.metadata
        assert meta["medcam3d"] == "heatmap" and meta["volume"] == t and layer.data.shape == scan.data.shape
        np.testing.assert_allclose(meta["affine"], scan.metadata["affine"], atol=1e-9)
        # the class's exact _feature map was picked up, and the shown map is it on the scan's display grid
        # (resampled once, as Explain shows it: not the stored uint8 map resampled again)
        feature, grid = io.read(explained.feature[t])
        np.testing.assert_array_equal(meta["feature_map"], feature)
        expected = resample(feature, grid, Space(layer.data.shape, meta["affine"]))
        np.testing.assert_allclose(layer.data, expected, atol=1e-7)
        assert meta["checksum"] == checksum(layer.data)  # the writer saves it from the feature grid
    assert norms[1].metadata["max"] == pytest.approx(1.0, abs=0.01)  # scaled by its range on the file grid
    # the widget explains the scan only; the maps are heatmaps to threshold or segment
    widget = ExplainWidget(viewer)
    widget.reset_choices()
    assert [layer for _, layer in widget._scan_choices()] == [scan]
    assert [layer for _, layer in widget._heatmap_choices()] == [*maps, *norms]

    # a class list longer than the 80-byte descrip: cut there, whole in the header extension
    space = grid_from_codes("RAS", (2.0, 2.0, 2.0), (10, 9, 8), centre=(0.0, 0.0, 0.0))
    names = ["bright_round_lesion", "dark_elongated_lesion", "third_class_with_a_long_name"]
    rng = np.random.default_rng(0)
    heatmaps = [Heatmap(rng.random(space.shape).astype(np.float32), space, "gradcam", "features.block4", i, n)
                for i, n in enumerate(names)]
    [path, _norm] = save_heatmaps(heatmaps, tmp_path, prefix="case", four_d=True, dtype="uint8")
    assert len(nib.load(path).header["descrip"].tobytes().rstrip(b"\0")) == 80
    layers = read_image(str(path))
    assert [kwargs["metadata"]["class"] for _, kwargs, _ in layers] == names
    assert [kwargs["name"] for _, kwargs, _ in layers] == [heatmap_name("case", "gradcam", "features.block4", n)
                                                            for n in names]


# ------------------------------------------------------------------------------------------- saving on the scan's grid


@pytest.mark.parametrize("case", ["case_04", "case_05"], ids=["oblique", "stored LIP"])
def test_segment_and_masks_are_saved_on_the_scans_own_grid(make_napari_viewer, qtbot, case, tmp_path):
    """Issue 22: case_04 was written 163x158x65 axis-aligned instead of 151x129x55; case_05 as LPI 151x41x155."""
    viewer = make_napari_viewer()
    source = nib.load(SAMPLES / f"{case}.nii.gz")
    [scan] = viewer.open(str(SAMPLES / f"{case}.nii.gz"), plugin="medcam3d")
    assert scan.data.shape != source.shape  # shown on another grid: resampled (case_04) or reordered (case_05)
    widget = ExplainWidget(viewer)
    for data, kwargs, kind in explain_image(scan.data, scan.metadata["affine"], CONFIG, name=scan.name,
                                            metadata=scan.metadata, target="bright_round"):
        if kind == "image":
            heat = viewer.add_image(data, **kwargs)
    widget.reset_choices()
    widget.image_layer.value, widget.heatmap.value = scan, heat
    labels, *_ = _segment(qtbot, widget)
    mask, *_ = _threshold(qtbot, widget)
    truth = np.asanyarray(nib.load(SAMPLES / f"{case}_mask.nii.gz").dataobj)
    for layer, name in ((labels, "segmentation.nii.gz"), (mask, "mask.nii.gz"), (scan, "scan.nii.gz")):
        written = _save(viewer, layer, tmp_path / name)
        assert written.shape == source.shape, name
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        if layer is not scan:
            saved = np.asanyarray(written.dataobj)
            assert written.get_data_dtype() == np.uint8 and set(np.unique(saved)) <= set(np.unique(layer.data))
            if (truth == 1).any() and layer is labels:  # the lesion it found is the true one, on the file's grid
                assert (saved[truth == 1] == 1).mean() > 0.5
            if not scan.metadata["resampled"] and layer is labels:  # reordered only: the same voxels, in the file's order
                np.testing.assert_array_equal(saved.transpose(scan.metadata["axes"]), layer.data)
            if layer is mask:  # on the map's 2 mm grid: saved by nearest neighbour onto the file's grid
                expected = resample_labels(layer.data, Space(layer.data.shape, layer.metadata["affine"]),
                                           Space(source.shape, source.affine))
                np.testing.assert_array_equal(saved, expected)
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "scan.nii.gz").dataobj), np.asanyarray(source.dataobj))
    _settle(qtbot, widget)


# ------------------------------------------------------------------------------------------- the config's defaults


def test_probability_text_keeps_the_side_of_one_half():
    from medcam3d.napari._shared import probability_text

    assert [probability_text(p) for p in (0.67, 0.496, 0.504, 0.5, 0.07, 0.004, 0.997, 1.0, 0.0, 0.4996)] == [
        "0.67", "0.496", "0.504", "0.50", "0.07", "0.004", "0.997", "1.00", "0.00", "0.4996"]
    assert heatmap_name("case_05", "hirescam", "class_layers.relu", "bright_round", 0.496).endswith("(p=0.496)")


def test_widget_takes_the_configs_defaults_and_refuses_a_missing_layer_like_the_cli(make_napari_viewer, qtbot,
                                                                                    tmp_path, capsys):
    from medcam3d.cli import main
    from medcam3d.napari._shared import probability_text

    viewer = make_napari_viewer()
    [scan] = viewer.open(str(SAMPLES / "case_02.nii.gz"), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    assert (widget.method.value, widget.target_layer.value, widget.target_class.value,
            widget.output_activation.value) == ("hirescam", "auto", "all classes", "auto")  # demo.yaml's
    widget.config.value = _config(tmp_path, method="gradcam", layer="class_layers.relu", target="1",
                                  output_activation="sigmoid")
    assert (widget.method.value, widget.target_layer.value, widget.target_class.value,
            widget.output_activation.value) == ("gradcam", "class_layers.relu", "dark_elongated", "sigmoid")
    _settle(qtbot, widget)
    assert widget.target_layer.value == "class_layers.relu"  # kept once the model's layers are listed
    widget.config.value = _config(tmp_path, target="predicted")
    assert widget.target_class.value == "predicted"
    widget.config.value = _config(tmp_path, target="[bright_round, dark_elongated]")
    assert widget.target_class.value == "bright_round, dark_elongated"
    assert widget._targets["bright_round, dark_elongated"] == ["bright_round", "dark_elongated"]

    # output_activation and method reach the explanation: the same probability as the command line's
    config = _config(tmp_path, method="gradcam", target="dark_elongated", output_activation="sigmoid")
    widget.config.value = config
    _settle(qtbot, widget)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.run_button.enabled and not widget.busy, timeout=60000)
    [heat] = [layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]
    assert heat.metadata["method"] == "gradcam" and heat.metadata["class"] == "dark_elongated"
    assert heat.metadata["output_activation"] == "sigmoid"
    out = tmp_path / "cli"
    assert main(["explain", "--config", str(config), "--image", str(SAMPLES / "case_02.nii.gz"), "--no-pictures",
                 "--out", str(out)]) == 0
    import json

    cli_p = json.loads((out / "case_02" / "summary.json").read_text())["probabilities"]["dark_elongated"]
    assert heat.metadata["probability"] == pytest.approx(cli_p, abs=1e-5)
    default_p = explain_image(scan.data, scan.metadata["affine"], CONFIG, name="x", metadata=scan.metadata,
                              target="dark_elongated")[0][1]["metadata"]["probability"]
    assert abs(default_p - cli_p) > 1e-3  # sigmoid on logits changes p: the setting did reach the model
    assert f"p={probability_text(cli_p)}" in heat.name and f"p={probability_text(cli_p)}" in widget.status.value

    # a layer the model lacks: the command line's error class and text, not a silent 'auto'
    missing = _config(tmp_path, layer="class_layers.nope")
    capsys.readouterr()
    assert main(["explain", "--config", str(missing), "--image", str(SAMPLES / "case_02.nii.gz"), "--no-pictures",
                 "--out", str(tmp_path / "refused")]) == 2
    cli_error = capsys.readouterr().err.strip().split("error: ", 1)[1]
    widget.config.value = missing
    assert widget.target_layer.value == "class_layers.nope"
    _settle(qtbot, widget)
    assert widget.target_layer.value == "class_layers.nope"  # still, after the model's layers are listed
    failures = []
    worker = widget.run()
    worker.returned.connect(failures.append)
    qtbot.waitUntil(lambda: widget.run_button.enabled and not widget.busy, timeout=60000)
    [failure] = failures
    assert isinstance(failure.error, LayerNotFoundError) and str(failure.error) == cli_error
    assert widget.status.value.endswith(cli_error[:200]) or cli_error[:200] in widget.status.value
    assert len([layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]) == 1
    _settle(qtbot, widget)
