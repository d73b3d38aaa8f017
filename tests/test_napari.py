"""The napari plugin: manifest, reader, Explain widget (worker thread), screenshot, threshold, writer, errors.

Runs under Xvfb (pytest-xvfb starts it). Set ``MEDCAM3D_UPDATE_SCREENSHOT=1`` to rewrite
``docs/napari_screenshot.png`` from the screenshot test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.demo.synthetic import grid_from_codes
from medcam3d.napari._reader import layer_grid, napari_get_reader, read_image
from medcam3d.napari._sample_data import demo_case
from medcam3d.napari._widget import ExplainWidget, explain_image, mask_from_heatmap, set_view
from medcam3d.napari._writer import write_heatmap, write_mask

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "napari_screenshot.png"
FAILING = """
model:
  network: monai.networks.nets.DenseNet
  args: {spatial_dims: 3, in_channels: 2, out_channels: 2, init_features: 4, growth_rate: 4, block_config: [1]}
task: multilabel
class_names: [a, b]
preprocessing:
  - {name: Orientation, axcodes: RAS}
"""


@pytest.fixture(scope="module")
def case():
    """The shipped demo case 1 (LPS, 0.8 x 0.8 x 2.5 mm) and the demo model.

    ``data_samples/cases.csv`` records that the demo model's HiResCAM peak of ``bright_round``
    lies inside that lesion (label 1) on this case.
    """
    samples = ROOT / "data_samples"
    return SimpleNamespace(scan=samples / "case_01.nii.gz", mask=samples / "case_01_mask.nii.gz",
                           config=ROOT / "configs" / "demo.yaml", name="case_01", class_name="bright_round",
                           class_index=0)


def _lesion(case, layer) -> np.ndarray:
    """The true lesion of the case's class, on the layer's (possibly reordered) grid."""
    labels, space = io.read(case.mask, dtype=None)
    lesion, affine, _ = layer_grid(labels == case.class_index + 1, space)
    np.testing.assert_allclose(affine, layer.metadata["affine"], atol=1e-4)
    return lesion


@pytest.fixture
def notifications():
    """Messages of the napari notifications dispatched during the test."""
    from napari.utils.notifications import notification_manager

    messages: list[str] = []

    def record(notification) -> None:
        messages.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)


def _settle(qtbot, widget) -> None:
    """Wait for the widget's background workers (explaining, listing layers) to end."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)


# --------------------------------------------------------------------------------------------


def test_manifest_is_valid_and_napari_discovers_the_plugin(case):
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", "medcam3d", "--imports"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout

    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    assert manager.get_manifest("medcam3d").name == "medcam3d"
    assert any(r.plugin_name == "medcam3d" for r in manager.iter_compatible_readers([str(case.scan)]))
    assert any(w.plugin_name == "medcam3d" for w in manager.iter_compatible_writers(["image"]))
    assert any(w.plugin_name == "medcam3d" for w in manager.iter_compatible_writers(["labels"]))
    assert "Explain" in [w.display_name for w in manager.iter_widgets() if w.plugin_name == "medcam3d"]
    assert "demo_case" in [s.key for name, samples in manager.iter_sample_data() if name == "medcam3d" for s in samples]
    assert napari_get_reader(str(case.scan)) is not None
    assert napari_get_reader(str(ROOT / "data_samples" / "demo_model.pt")) is None


def test_reader_widget_heatmap_and_screenshot(make_napari_viewer, qtbot, case, tmp_path, notifications):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    source = nib.load(case.scan)
    assert image.name == case.name and image.data.shape == source.shape and image.metadata["axes"] == (0, 1, 2)
    assert image.metadata["affine"].dtype == np.float64
    np.testing.assert_allclose(image.metadata["affine"], source.affine, atol=1e-5)
    np.testing.assert_allclose(image.affine.affine_matrix, image.metadata["affine"], atol=1e-9)
    assert image.metadata["path"] == str(case.scan)
    lesion = _lesion(case, image)

    # The pure function: one heatmap per class, on the scan's grid and placement.
    result = explain_image(image.data, image.metadata["affine"], case.config, name=image.name, metadata=image.metadata)
    names = [kwargs["name"] for _, kwargs, _ in result]
    assert names == ["case_01 · hirescam · bright_round", "case_01 · hirescam · dark_elongated"]
    data, kwargs, kind = result[case.class_index]
    assert kind == "image" and data.shape == image.data.shape and data.dtype == np.float32
    np.testing.assert_allclose(kwargs["affine"], image.metadata["affine"])
    assert lesion[np.unravel_index(np.argmax(data), data.shape)]

    # The real widget: the demo config is preselected; explain one class in a worker thread.
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    assert widget.image_layer.value is image and widget.method.value == "hirescam"
    assert widget.config.value == case.config
    assert widget.target_class.choices == ("all classes", "bright_round", "dark_elongated")
    qtbot.waitUntil(lambda: len(widget.target_layer.choices) > 1, timeout=20000)
    assert "class_layers.relu" in widget.target_layer.choices
    widget.target_class.value = case.class_name
    widget.run_button.native.click()
    assert widget.worker is not None and not widget.run_button.enabled  # running in the background
    name = f"case_01 · hirescam · {case.class_name}"
    qtbot.waitUntil(lambda: name in viewer.layers and widget.run_button.enabled, timeout=30000)
    assert notifications == []
    assert [layer.name for layer in viewer.layers] == ["case_01", name]
    heat = viewer.layers[name]
    assert heat.data.shape == image.data.shape
    np.testing.assert_allclose(heat.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_allclose(heat.metadata["affine"], image.metadata["affine"])
    meta = heat.metadata
    assert meta["method"] == "hirescam" and meta["class"] == case.class_name and meta["layer"] == "class_layers.relu"
    assert 0.5 < meta["probability"] < 1 and meta["score"] > 0
    assert lesion[np.unravel_index(np.argmax(heat.data), heat.data.shape)]
    np.testing.assert_array_equal(heat.data, data)  # the widget and the pure function agree
    assert heat.blending == "translucent" and heat.opacity == pytest.approx(0.6)
    assert heat.colormap.colors[0][3] == 0 and heat.colormap.colors[-1][3] == 1  # alpha ramps up from 0
    assert heat.contrast_limits == [0.0, pytest.approx(float(heat.data.max()))]

    # Screenshot, axial through the peak, anterior up: the lesion is coloured, far pixels are grey.
    viewer.window.resize(1500, 900)
    set_view(viewer, "axial")
    viewer.dims.set_point(2, meta["peak_mm"][2])
    lesion_layer = viewer.add_labels(lesion.astype(np.uint8), affine=image.affine.affine_matrix, opacity=1.0,
                                     visible=False, name="lesion")
    viewer.window._qt_window.grab()  # warm-up: the first canvas screenshot is black otherwise
    viewer.reset_view()
    with_heat = viewer.screenshot(canvas_only=True, flash=False)
    heat.visible = False
    grey = viewer.screenshot(canvas_only=True, flash=False)
    lesion_layer.visible = True
    truth = viewer.screenshot(canvas_only=True, flash=False)
    viewer.layers.remove(lesion_layer)
    heat.visible = True
    _save_png(tmp_path / "overlay.png", with_heat)
    _save_png(tmp_path / "lesion.png", truth)

    colour = np.abs(with_heat[..., :3].astype(int) - grey[..., :3].astype(int)).sum(-1)
    under_lesion = np.abs(truth[..., :3].astype(int) - grey[..., :3].astype(int)).sum(-1) > 30
    assert under_lesion.sum() > 200
    assert np.median(colour[under_lesion]) > 60  # the overlay covers the lesion
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])  # the scan alone is grey
    rows, cols = np.nonzero(under_lesion)
    yy, xx = np.mgrid[: colour.shape[0], : colour.shape[1]]
    far = np.hypot(yy - rows.mean(), xx - cols.mean()) > 0.4 * min(colour.shape)
    body = far & (grey[..., :3].max(-1) > 40)  # scan pixels (not air) far from the lesion
    assert body.sum() > 2000
    assert (colour[body] <= 3).mean() > 0.95  # ... are shown as the plain grey scan
    if os.environ.get("MEDCAM3D_UPDATE_SCREENSHOT") == "1":
        viewer.layers.selection.active = heat  # its controls (colormap, opacity, blending) in the picture
        _save_png(SCREENSHOT, viewer.screenshot(canvas_only=False, flash=False))
    _settle(qtbot, widget)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from imageio.v3 import imwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    imwrite(path, pixels)


def test_threshold_to_mask_and_writer_keep_the_scanner_affine(make_napari_viewer, qtbot, case, tmp_path):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    for data, kwargs, kind in explain_image(image.data, image.metadata["affine"], case.config, name=image.name,
                                            metadata=image.metadata, target=case.class_name):
        viewer.add_image(data, **kwargs)
    widget.reset_choices()
    heat = viewer.layers[f"case_01 · hirescam · {case.class_name}"]
    assert widget.heatmap.value is heat
    widget.threshold_method.value = "fraction"
    widget.threshold_value.value = 0.5
    mask, box = widget.make_mask()
    assert mask.name == f"{heat.name} · mask" and mask.data.dtype == np.uint8
    assert mask.data.shape == image.data.shape and mask.data.any()
    np.testing.assert_allclose(mask.affine.affine_matrix, image.affine.affine_matrix)
    assert mask.data[np.unravel_index(np.argmax(heat.data), heat.data.shape)] == 1
    assert box.nshapes == 12 and mask.metadata["box"]["voxels"] == int(mask.data.sum())
    lesion = _lesion(case, image)
    assert (mask.data.astype(bool) & lesion).sum() > 0.5 * lesion.sum()  # the mask covers most of the lesion
    assert "mm" in widget.box.value

    # Writers (through napari's save, which picks the medcam3d writer by layer type).
    viewer.layers.selection = {heat}
    [heat_file] = viewer.layers.save(str(tmp_path / "heat.nii.gz"), selected=True, plugin="medcam3d")
    viewer.layers.selection = {mask}
    [mask_file] = viewer.layers.save(str(tmp_path / "mask.nii.gz"), selected=True, plugin="medcam3d")
    source = nib.load(case.scan)
    for path, dtype, data in ((heat_file, np.float32, heat.data), (mask_file, np.uint8, mask.data)):
        saved = nib.load(path)
        assert saved.get_data_dtype() == dtype and saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
        assert int(saved.header["sform_code"]) == int(source.header["sform_code"])
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), data)
    assert "hirescam" in nib.load(heat_file).header["descrip"].tobytes().decode()
    _settle(qtbot, widget)


def test_reordered_axes_round_trip(tmp_path):
    """A scan stored as coronal slices (L-I-P) is shown with R-A-S-ordered axes and saved back as stored."""
    space = grid_from_codes("LIP", (0.8, 0.9, 2.5), (20, 24, 7), centre=(10.0, -20.0, 30.0))
    array = np.random.default_rng(0).random(space.shape, dtype=np.float32)
    io.write(tmp_path / "coronal.nii.gz", array, space)
    [(data, kwargs, kind)] = read_image(str(tmp_path / "coronal.nii.gz"))
    assert kind == "image" and kwargs["metadata"]["axes"] == (0, 2, 1) and data.shape == (20, 7, 24)
    corner = np.array([3, 5, 2, 1.0])  # a voxel (i, j, k) of the file lands at the same place in the world
    np.testing.assert_allclose(kwargs["affine"] @ corner[[0, 2, 1, 3]], space.affine @ corner)
    [written] = write_heatmap(str(tmp_path / "back.nii.gz"), data, {"metadata": kwargs["metadata"]})
    back = nib.load(written)
    np.testing.assert_allclose(back.affine, space.affine, atol=1e-5)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), array)
    masks = mask_from_heatmap(data, kwargs["metadata"]["affine"], "percentile", 99.0, metadata=kwargs["metadata"])
    [written] = write_mask(str(tmp_path / "mask.nii.gz"), masks[0][0], {"metadata": masks[0][1]["metadata"]})
    assert nib.load(written).get_data_dtype() == np.uint8 and nib.load(written).shape == space.shape


def test_reader_formats(tmp_path):
    """NRRD, a DICOM folder and a 4D NIfTI (one layer per volume) are placed like medcam3d.io reads them."""
    import SimpleITK as sitk

    from _images import write_dicom_series

    space = grid_from_codes("LPS", (0.7, 0.8, 2.0), (12, 10, 6), centre=(5.0, -10.0, 20.0))
    array = np.random.default_rng(1).integers(0, 1000, size=space.shape).astype(np.float32)
    io.write(tmp_path / "scan.nrrd", array, space)
    io.write(tmp_path / "maps.nii.gz", np.stack([array, 2 * array]), space)
    write_dicom_series(sitk.ReadImage(str(tmp_path / "scan.nrrd"), sitk.sitkInt16), tmp_path / "dicom")
    (tmp_path / "notes").mkdir()
    assert napari_get_reader(str(tmp_path / "notes")) is None
    for path, names in (("scan.nrrd", ["scan"]), ("dicom", ["dicom"]), ("maps.nii.gz", ["maps [0]", "maps [1]"])):
        reader = napari_get_reader(str(tmp_path / path))
        assert reader is not None, path
        layers = reader(str(tmp_path / path))
        assert [kwargs["name"] for _, kwargs, _ in layers] == names
        for volume, (data, kwargs, _) in enumerate(layers):
            np.testing.assert_allclose(kwargs["metadata"]["affine"], space.affine, atol=1e-4)
            np.testing.assert_allclose(data, array * (volume + 1), atol=1e-3)


def test_sample_case_lookup(tmp_path, monkeypatch):
    """cases.csv names the case; without it the first case_* file; without a folder a generated case."""
    from medcam3d.napari import _sample_data

    (tmp_path / "case_02.nii.gz").write_bytes(b"")
    (tmp_path / "case_02_mask.nii.gz").write_bytes(b"")
    (tmp_path / "case_07.nii.gz").write_bytes(b"")
    assert _sample_data.find_demo_case(tmp_path) == (tmp_path / "case_02.nii.gz", tmp_path / "case_02_mask.nii.gz")
    (tmp_path / "cases.csv").write_text("case_id,file,mask\ncase_09,case_09.nii.gz,\ncase_07,case_07.nii.gz,\n")
    assert _sample_data.find_demo_case(tmp_path) == (tmp_path / "case_07.nii.gz", None)  # case_09 is missing

    monkeypatch.setattr(_sample_data, "DATA_SAMPLES", tmp_path / "absent")
    image, lesions = demo_case()
    assert image[1]["name"] == "demo_case" and image[1]["metadata"]["path"] is None
    assert image[2] == "image" and lesions[2] == "labels" and image[0].shape == lesions[0].shape
    assert set(np.unique(lesions[0])) == {0, 1, 2}  # both lesions present


@pytest.mark.filterwarnings("error:Private attribute access")  # the plugin uses napari's public API only
def test_errors_become_notifications_and_the_viewer_stays_usable(make_napari_viewer, qtbot, case, tmp_path,
                                                                  notifications):
    (tmp_path / "failing.yaml").write_text(FAILING)  # builds, then fails in the forward pass (2 input channels)
    (tmp_path / "bad.yaml").write_text("model: {network: monai.networks.nets.DenseNet}\nclas_names: [a]\n")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("medcam3d", "Explain")  # Plugins > medcam3d > Explain
    assert isinstance(widget, ExplainWidget)
    assert widget.run() is None and "no 3D image layer" in notifications[-1]

    # The sample menu's case: the first case of data_samples/cases.csv, with its lesions (hidden).
    layers = viewer.open_sample("medcam3d", "demo_case")
    assert [layer.name for layer in layers] == ["case_01", "case_01 lesions"]
    assert layers[0].metadata["path"] == str(case.scan) and not layers[1].visible
    _settle(qtbot, widget)

    widget.config.value = tmp_path / "bad.yaml"  # a typo in a key
    assert "clas_names" in notifications[-1] and "class_names" in notifications[-1]
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.run_button.enabled and "could not explain" in notifications[-1], timeout=20000)

    widget.config.value = tmp_path / "failing.yaml"
    count = len(notifications)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(notifications) > count, timeout=20000)
    assert "could not explain case_01" in notifications[-1] and "Traceback" not in notifications[-1]
    assert [layer.name for layer in viewer.layers] == ["case_01", "case_01 lesions"]

    # Still usable: the demo config explains the sample.
    widget.config.value = case.config
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: "case_01 · hirescam · dark_elongated" in viewer.layers and widget.run_button.enabled,
                    timeout=30000)
    _settle(qtbot, widget)
