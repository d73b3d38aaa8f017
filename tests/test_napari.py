"""The napari plugin: manifest, reader, oblique scans, Explain widget, colour, masks, writers, teardown, saved outputs.

Runs under Xvfb (pytest-xvfb starts it). Every scenario takes screenshots into its ``tmp_path``;
set ``MEDCAM3D_SCREENSHOT_DIR=<folder>`` to keep a copy of each for review, and
``MEDCAM3D_UPDATE_SCREENSHOT=1`` to rewrite ``docs/napari_screenshot.png`` (oblique case, 2D) and
``docs/napari_screenshot_3d.png`` (the same in 3D) from the oblique-case test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.demo.synthetic import grid_from_codes
from medcam3d.masks import threshold_mask
from medcam3d.space import Space
from medcam3d.napari import _masking, _models, _widget
from medcam3d.napari._grid import axis_aligned_grid, layer_grid, resample_labels
from medcam3d.napari._reader import napari_get_reader, read_image
from medcam3d.napari._sample_data import demo_case, oblique_case
from medcam3d.napari._grid import napari_affine
from medcam3d.napari._lazy import shape_of
from medcam3d.napari._shared import ascii_text, checksum, heatmap_colormap, heatmap_name
from medcam3d.napari._masking import mask_from_heatmap, segment_from_heatmap, threshold_problem
from medcam3d.napari._service import SCALES, colour_limits, explain_image
from medcam3d.napari._view import set_view
from medcam3d.napari._widget import ExplainWidget
from medcam3d.space import resample
from _images import planted_scan
from medcam3d.napari._writer import write_heatmap, write_mask

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"
CONFIG = ROOT / "configs" / "demo.yaml"
SCREENSHOT = ROOT / "docs" / "napari_screenshot.png"
SCREENSHOT_3D = ROOT / "docs" / "napari_screenshot_3d.png"
FAILING = """
model:
  network: monai.networks.nets.DenseNet
  args: {spatial_dims: 3, in_channels: 2, out_channels: 2, init_features: 4, growth_rate: 4, block_config: [1]}
  weights: none  # random parameters on purpose: this config only has to fail in the forward pass
task: multilabel
class_names: [a, b]
preprocessing:
  - {name: Orientation, axcodes: RAS}
"""


@pytest.fixture(scope="module")
def case():
    """The shipped demo case 1 (LPS, 0.8 x 0.8 x 2.5 mm) and the demo model.

    ``data_samples/cases.csv`` records that the demo model's HiResCAM peak of ``bright_round``
    lies inside that lesion (label 1) on this case, with p = 0.67.
    """
    return SimpleNamespace(scan=SAMPLES / "case_01.nii.gz", mask=SAMPLES / "case_01_mask.nii.gz", config=CONFIG,
                           name="case_01", class_name="bright_round", class_index=0)


def _lesion(case, layer) -> np.ndarray:
    """The true lesion of the case's class, on the layer's (possibly reordered) grid."""
    labels, space = io.read(case.mask, dtype=None)
    lesion, affine, _ = layer_grid(labels == case.class_index + 1, space)
    np.testing.assert_allclose(affine, layer.metadata["affine"], atol=1e-4)
    return lesion


def _scan_voxel(layer, point) -> tuple[int, ...]:
    """The voxel of a scan layer's data (level 0 of a pyramid) at a world point (RAS mm)."""
    voxel = np.linalg.solve(np.asarray(layer.metadata["affine"]), [*point, 1.0])[:3]
    return tuple(int(v) for v in np.round(voxel))


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


@pytest.fixture
def fresh_listings(monkeypatch):
    """Empty target-layer caches, so that a test sees what a new napari session does."""
    monkeypatch.setattr(_models, "_LISTINGS", {})
    monkeypatch.setattr(_models, "_INPUT_SHAPES", {})


def _settle(qtbot, widget) -> None:
    """Wait for the widget's background workers (explaining, listing layers) to end."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=60000)


def _explain_with_widget(qtbot, widget) -> list:
    """Press Explain and wait for the run to end; the heatmap layers it made or refreshed."""
    _settle(qtbot, widget)
    widget.run_button.native.click()
    assert widget.worker is not None and not widget.run_button.enabled  # running in the background
    qtbot.waitUntil(lambda: widget.run_button.enabled and not widget.busy, timeout=60000)
    return [layer for layer in widget._viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]


def _segment(qtbot, widget) -> list:
    """Press Segment (in a worker thread) and wait for it: the layers it added ([] when it refused or failed)."""
    worker = widget.make_segmentation()
    if worker is None:
        return []
    assert not widget.segment_button.enabled  # running in the background, the viewer stays usable
    qtbot.waitUntil(lambda: widget.segment_button.enabled and not widget.busy, timeout=60000)
    return list(widget.segmented)


def _threshold(qtbot, widget) -> list:
    """Press Threshold to mask (in a worker thread) and wait for it: the layers it added ([] when refused or failed)."""
    worker = widget.make_mask()
    if worker is None:
        return []
    assert not widget.mask_button.enabled  # running in the background, the viewer stays usable
    qtbot.waitUntil(lambda: widget.mask_button.enabled and not widget.busy, timeout=60000)
    return list(widget.masked)


def _shot(path: Path, pixels: np.ndarray) -> None:
    """Save a screenshot (and a copy in $MEDCAM3D_SCREENSHOT_DIR for review)."""
    from imageio.v3 import imwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    imwrite(path, pixels)
    if os.environ.get("MEDCAM3D_SCREENSHOT_DIR"):
        folder = Path(os.environ["MEDCAM3D_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        imwrite(folder / path.name, pixels)


def _warm_up(viewer) -> None:
    viewer.window._qt_window.grab()  # the first canvas screenshot is black otherwise
    overlays = viewer.canvas.overlays  # the scale bar and coloured axes (on by default) would count as drawn pixels
    overlays.scale_bar.visible = overlays.axes.visible = False


# --------------------------------------------------------------------------------------------


def test_manifest_is_valid_and_napari_discovers_the_plugin(case):
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", "medcam3d", "--imports"],
                          capture_output=True, text=True, timeout=120, check=False)
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
    samples = [s.key for name, samples in manager.iter_sample_data() if name == "medcam3d" for s in samples]
    assert samples == ["demo_case", "oblique_case"]
    assert napari_get_reader(str(case.scan)) is not None
    assert napari_get_reader(str(SAMPLES / "demo_model.pt")) is None


def test_reader_widget_heatmap_and_screenshot(make_napari_viewer, qtbot, case, tmp_path, notifications):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    source = nib.load(case.scan)
    assert image.name == case.name and image.data.shape == source.shape and image.metadata["axes"] == (0, 1, 2)
    assert image.data.dtype == np.int16 and image.metadata["dtype"] == np.dtype(np.int16).str  # as stored
    assert image.metadata["affine"].dtype == np.float64 and not image.metadata["resampled"]
    np.testing.assert_allclose(image.metadata["affine"], source.affine, atol=1e-5)
    np.testing.assert_allclose(image.affine.affine_matrix, image.metadata["affine"], atol=1e-9)
    assert image.metadata["path"] == str(case.scan)
    # Opens in the axial view: slicing S, anterior up, patient right on the left, R/A/S in mm.
    assert viewer.dims.axis_labels == ("R", "A", "S") and image.axis_labels == ("R", "A", "S")
    assert viewer.dims.order == (2, 1, 0)
    assert [str(unit) for unit in viewer.dims.units] == ["millimeter"] * 3
    assert tuple(str(v.value) for v in viewer.scene.camera.orientation2d) == ("up", "left")
    lesion = _lesion(case, image)

    # The pure function: one heatmap per class, on the model's feature grid, placed by its affine.
    result = explain_image(image.data, image.metadata["affine"], case.config, name=image.name, metadata=image.metadata)
    names = [kwargs["name"] for _, kwargs, _ in result]
    assert names == ["case_01 · hirescam · class_layers.relu · bright_round (p=0.67)",
                     "case_01 · hirescam · class_layers.relu · dark_elongated (p=0.77)"]
    assert all(kind == "image" for *_, kind in result)  # the model saw the whole scan: no field-of-view outline
    data, kwargs, kind = result[case.class_index]
    assert data.shape == kwargs["metadata"]["feature_map"].shape == (16, 16, 16) and data.dtype == np.float32
    np.testing.assert_allclose(kwargs["affine"], kwargs["metadata"]["feature_affine"])
    assert lesion[_scan_voxel(image, kwargs["metadata"]["peak_mm"])]
    assert result[0][1]["colormap"].name != result[1][1]["colormap"].name  # one colour per class

    # The real widget: the demo config is preselected; explain one class in a worker thread.
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    assert widget.image_layer.value is image and widget.method.value == "hirescam"
    assert widget.config.value == case.config
    assert widget.target_class.choices == ("all classes", "bright_round", "dark_elongated")
    qtbot.waitUntil(lambda: len(widget.target_layer.choices) > 1, timeout=30000)
    assert "class_layers.relu" in widget.target_layer.choices
    widget.target_class.value = case.class_name
    [heat] = _explain_with_widget(qtbot, widget)
    name = heatmap_name("case_01", "hirescam", "class_layers.relu", case.class_name, 0.67)
    assert notifications == []
    assert [layer.name for layer in viewer.layers] == ["case_01", name] and heat.name == name
    assert [s.text for s in widget.steps][:4] == ["loading the model", "preparing case_01", "preprocessing",
                                                  "explaining (hirescam)"]
    assert heat.data.shape == (16, 16, 16)  # the feature grid, drawn through its affine
    np.testing.assert_allclose(heat.affine.affine_matrix, heat.metadata["feature_affine"])
    np.testing.assert_allclose(heat.metadata["affine"], heat.metadata["feature_affine"])
    meta = heat.metadata
    assert meta["method"] == "hirescam" and meta["class"] == case.class_name and meta["layer"] == "class_layers.relu"
    assert 0.5 < meta["probability"] < 1 and meta["score"] > 0 and meta["fov_covers_scan"]
    assert lesion[_scan_voxel(image, meta["peak_mm"])]
    np.testing.assert_allclose(heat.data_to_world(meta["peak_voxel"]), meta["peak_mm"], atol=1e-6)
    np.testing.assert_array_equal(heat.data, data)  # the widget and the pure function agree
    assert heat.blending == "translucent" and heat.opacity == pytest.approx(0.6)
    assert heat.colormap.colors[0][3] == 0 and heat.colormap.colors[-1][3] == 1  # alpha ramps up from 0
    assert heat.contrast_limits == [0.0, pytest.approx(float(heat.data.max()))]  # the only (positive) map

    # Explaining again with another target layer adds a map; the same settings refresh it in place.
    widget.target_layer.value = "features.norm5"
    _explain_with_widget(qtbot, widget)
    other = heatmap_name("case_01", "hirescam", "features.norm5", case.class_name, 0.67)
    assert [layer.name for layer in viewer.layers] == ["case_01", name, other]
    np.testing.assert_array_equal(viewer.layers[name].data, data)  # the first map is untouched
    widget.target_layer.value = "class_layers.relu"
    _explain_with_widget(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["case_01", name, other] and viewer.layers[name] is heat
    viewer.layers.remove(other)

    # Screenshot, axial through the peak, anterior up: the lesion is coloured, far pixels are grey.
    viewer.window.resize(1500, 900)
    set_view(viewer, "axial")
    viewer.dims.set_point(2, meta["peak_mm"][2])
    lesion_layer = viewer.add_labels(lesion.astype(np.uint8), affine=image.affine.affine_matrix, opacity=1.0,
                                     visible=False, name="lesion")
    _warm_up(viewer)
    viewer.reset_view()
    with_heat = viewer.screenshot(canvas_only=True, flash=False)
    heat.visible = False
    grey = viewer.screenshot(canvas_only=True, flash=False)
    lesion_layer.visible = True
    truth = viewer.screenshot(canvas_only=True, flash=False)
    viewer.layers.remove(lesion_layer)
    heat.visible = True
    _shot(tmp_path / "case_01_overlay.png", with_heat)
    _shot(tmp_path / "case_01_lesion.png", truth)

    colour = np.abs(with_heat[..., :3].astype(int) - grey[..., :3].astype(int)).sum(-1)
    under_lesion = np.abs(truth[..., :3].astype(int) - grey[..., :3].astype(int)).sum(-1) > 30
    assert under_lesion.sum() > 200
    assert np.median(colour[under_lesion]) > 60  # the overlay covers the lesion
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])  # the scan alone is grey
    rows, cols = np.nonzero(under_lesion)
    yy, xx = np.mgrid[: colour.shape[0], : colour.shape[1]]
    far = np.hypot(yy - rows.mean(), xx - cols.mean()) > 0.4 * min(colour.shape)
    body = far & (grey[..., :3].max(-1) > 40)  # scan pixels (not air) far from the lesion
    assert body.sum() > 1000  # (the slice through the peak feature cell's centre)
    assert (colour[body] <= 3).mean() > 0.95  # ... are shown as the plain grey scan
    _settle(qtbot, widget)


def _tilted_ball(tmp_path: Path) -> SimpleNamespace:
    """An int16 scan tilted 25 degrees out of plane with a bright ball (radius 9 mm) at a known RAS point."""
    axis = np.array([1.0, 0.4, 0.2]) / np.linalg.norm([1.0, 0.4, 0.2])
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    angle = math.radians(25.0)
    rotation = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    space = grid_from_codes("LPS", (0.9, 0.9, 3.0), (110, 100, 36), centre=(5.0, -10.0, 30.0), rotation=rotation)
    centre = np.array([22.0, 2.0, 48.0])  # far from the grid centre along the slice axis
    world = space.voxel_to_world(np.indices(space.shape).reshape(3, -1).T).reshape(*space.shape, 3)
    distance = np.linalg.norm(world - centre, axis=-1)
    array = np.where(distance <= 9.0, 1000, 0).astype(np.int16) + (world[..., 2] * 2).astype(np.int16)
    path = tmp_path / "tilted.nii.gz"
    io.write(path, array, space)
    return SimpleNamespace(path=path, space=space, array=array, centre=centre)


def _screen_centroid(pixels: np.ndarray, keep) -> np.ndarray:
    rows, cols = np.nonzero(keep(pixels[..., :3].astype(int)))
    assert rows.size > 10, "nothing of that colour on screen"
    return np.array([rows.mean(), cols.mean()])


def test_oblique_scan_is_drawn_where_it_is(make_napari_viewer, qtbot, tmp_path, notifications):
    """napari drops the out-of-plane part of an affine when it draws 2D slices: oblique scans are resampled."""
    ball = _tilted_ball(tmp_path)
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(ball.path), plugin="medcam3d")
    meta = image.metadata
    assert meta["resampled"] and meta["axes"] is None and meta["path"] == str(ball.path)
    assert meta["file_shape"] == ball.space.shape
    np.testing.assert_allclose(meta["file_affine"], ball.space.affine, atol=1e-5)  # the true affine is kept
    linear = image.affine.affine_matrix[:3, :3]
    np.testing.assert_allclose(linear, np.diag(np.diag(linear)))  # axis-aligned: napari draws it exactly
    assert np.allclose(np.diag(linear), [0.9, 0.9, 3.0]) and image.data.dtype == np.int16
    said = [m for m in notifications if "oblique" in m]
    assert len(said) == 1 and "tilted" in said[0] and "resampled" in said[0]
    viewer.open(str(ball.path), plugin="medcam3d")  # once per scan
    assert len([m for m in notifications if "oblique" in m]) == 1
    viewer.layers.remove(viewer.layers[-1])
    # No loss of extent: every corner of the scan lies inside the shown grid.
    shown = Space(image.data.shape, meta["affine"])
    corners = ball.space.voxel_to_world(np.array([[i, j, k] for i in (0, 109) for j in (0, 99) for k in (0, 35)]))
    inside = shown.world_to_voxel(corners)
    assert np.all(inside > -0.5) and np.all(inside < np.array(shown.shape) - 0.5)

    # For known world points, the voxel napari shows there holds that point's value (within one voxel).
    rng = np.random.default_rng(3)
    points = [ball.centre, ball.centre + [8.5, 0, 0], ball.centre + [0, 9.5, 0], ball.centre - [0, 0, 10.0]]
    points += list(ball.space.voxel_to_world(rng.uniform(2, np.array(ball.space.shape) - 3, size=(200, 3))))
    for point in points:
        shown_voxel = _scan_voxel(image, point)  # (napari's world_to_data of a pyramid is in its shown level)
        value = int(image.data[0][shown_voxel])  # the pyramid's full-resolution level, resampled as napari asks
        low = np.maximum(np.floor(ball.space.world_to_voxel(point)).astype(int) - 1, 0)
        near = ball.array[low[0]:low[0] + 4, low[1]:low[1] + 4, low[2]:low[2] + 4]  # file voxels within one voxel
        assert near.min() <= value <= near.max(), (point, value, near.min(), near.max())

    # What napari draws: the ball's cross-section through its centre appears under a marker put at that point.
    viewer.window.resize(1000, 800)
    set_view(viewer, "axial")
    viewer.dims.set_point(2, ball.centre[2])
    assert image.get_value(ball.centre, world=True)[1] >= 1000  # the cursor readout over the ball: (level, value)
    image.contrast_limits = (0, 1200)
    on_slice = [ball.centre[0], ball.centre[1], viewer.dims.point[2]]  # the slice shown (1.5 mm from the centre)
    marker = viewer.add_points([on_slice], size=2.0, face_color="red", border_width=0, name="true centre")
    _warm_up(viewer)
    viewer.reset_view()
    image.visible = False
    marked = viewer.screenshot(canvas_only=True, flash=False)
    _shot(tmp_path / "oblique_marker.png", marked)
    at_marker = _screen_centroid(marked, lambda rgb: (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80))
    image.visible, marker.visible = True, False
    drawn = viewer.screenshot(canvas_only=True, flash=False)
    _shot(tmp_path / "oblique_resampled.png", drawn)
    ball_on_screen = _screen_centroid(drawn, lambda rgb: rgb.min(-1) > 150)
    zoom = viewer.scene.camera.zoom  # screen pixels per mm
    assert np.linalg.norm(ball_on_screen - at_marker) / zoom < 1.0  # within one voxel (0.9 mm)

    # The control: the same voxels placed with the oblique affine (what napari draws without resampling).
    image.visible = False
    tilted = viewer.add_image(ball.array, affine=ball.space.affine, contrast_limits=(0, 1200), name="as stored")
    naive = viewer.screenshot(canvas_only=True, flash=False)
    _shot(tmp_path / "oblique_as_stored.png", naive)
    assert np.linalg.norm(_screen_centroid(naive, lambda rgb: rgb.min(-1) > 150) - at_marker) / zoom > 5.0
    viewer.layers.remove(tilted)


def test_oblique_case_explained_and_saved_on_its_own_grid(make_napari_viewer, qtbot, tmp_path, notifications):
    """The 10-degree sample: maps on the shown grid from the file's own voxels, files on the original grid."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("medcam3d", "Explain")
    [scan, lesions] = viewer.open_sample("medcam3d", "oblique_case")
    assert scan.name == "case_04" and scan.metadata["resampled"] and lesions.metadata["resampled"]
    assert viewer.dims.order == (2, 1, 0)
    file_array, file_space = io.read(SAMPLES / "case_04.nii.gz", dtype=None)
    truth, _ = io.read(SAMPLES / "case_04_mask.nii.gz", dtype=None)
    np.testing.assert_array_equal(lesions.data, resample_labels(truth, file_space, axis_aligned_grid(file_space)))
    heats = _explain_with_widget(qtbot, widget)
    assert [h.name for h in heats] == ["case_04 · hirescam · class_layers.relu · bright_round (p=0.83)",
                                       "case_04 · hirescam · class_layers.relu · dark_elongated (p=0.76)"]
    heat = heats[0]
    assert heat.metadata["explained_on"] == "file grid" and heat.data.shape == (16, 16, 16)  # the feature grid
    np.testing.assert_allclose(heat.affine.affine_matrix, heat.metadata["feature_affine"])  # axis-aligned (demo)
    # The peak (in true RAS mm) lies in the bright lesion of the original file.
    peak = np.round(file_space.world_to_voxel(heat.metadata["peak_mm"])).astype(int)
    assert (truth[tuple(slice(max(v - 1, 0), v + 2) for v in peak)] == 1).any()

    # The model's field of view (64^3 voxels of 2 mm) does not cover the shown grid: outlined (its own grid),
    # and no map outside it (the feature grid lies inside the input grid).
    fov = viewer.layers["case_04 · model field of view"]
    assert fov.metadata["medcam3d"] == "fov" and fov.data.shape == (64, 64, 64) and fov.data.all() and fov.contour == 1
    fov_space = Space(fov.data.shape, fov.metadata["affine"])
    for h in heats:
        cells = Space(h.data.shape, h.metadata["affine"])
        corners = cells.voxel_to_world(np.array([[i, j, k] for i in (0, 15) for j in (0, 15) for k in (0, 15)]))
        inside = fov_space.world_to_voxel(corners)
        assert np.all(inside > -0.5) and np.all(inside < 63.5)
    assert "field of view" in widget.status.value and "p=0.83" in widget.status.value
    names = [layer.name for layer in viewer.layers]
    assert _explain_with_widget(qtbot, widget)[0] is heat  # the same explanation again: refreshed in place
    assert [layer.name for layer in viewer.layers] == names and viewer.layers["case_04 · model field of view"] is fov

    # Saved on the original grid: the scan exactly (int16), the map as an explanation on that grid gives it.
    mask, _box = _threshold(qtbot, widget)
    saved = {}
    for layer, name in ((scan, "scan.nii.gz"), (heat, "heat.nii.gz"), (mask, "mask.nii.gz")):
        viewer.layers.selection = {layer}
        [saved[name]] = viewer.layers.save(str(tmp_path / name), selected=True, plugin="medcam3d")
    for name, dtype in (("scan.nii.gz", np.int16), ("heat.nii.gz", np.float32), ("mask.nii.gz", np.uint8)):
        written = nib.load(saved[name])
        assert written.shape == file_space.shape and written.get_data_dtype() == dtype, name
        np.testing.assert_allclose(written.affine, file_space.affine, atol=1e-5)
        assert all(32 <= b < 127 for b in written.header["descrip"].tobytes().rstrip(b"\0"))
    np.testing.assert_array_equal(np.asanyarray(nib.load(saved["scan.nii.gz"]).dataobj), file_array)
    direct = explain_image(file_array, file_space.affine, CONFIG, name="case_04")  # explained on the file grid
    on_file = resample(direct[0][1]["metadata"]["feature_map"],
                       Space((16, 16, 16), direct[0][1]["metadata"]["feature_affine"]), file_space, fill=0.0)
    saved_heat = np.asanyarray(nib.load(saved["heat.nii.gz"]).dataobj)
    np.testing.assert_allclose(saved_heat, on_file, atol=1e-6)
    expected = threshold_mask(on_file, "fraction", 0.5, keep_largest=True)
    saved_mask = np.asanyarray(nib.load(saved["mask.nii.gz"]).dataobj).astype(bool)
    assert 2 * (saved_mask & expected).sum() / (saved_mask.sum() + expected.sum()) > 0.9  # nearest, back
    assert (saved_mask & (truth == 1)).sum() > 0.5 * (truth == 1).sum()

    # 3D: additive maps in their own colours over a dimmed scan; the outline only in 2D.
    viewer.window.resize(1500, 900)
    viewer.layers.selection.active = heat
    viewer.dims.set_point(2, heat.metadata["peak_mm"][2])
    _warm_up(viewer)
    viewer.reset_view()
    two_d = viewer.screenshot(canvas_only=False, flash=False)
    _shot(tmp_path / "oblique_case_2d.png", two_d)
    mask.visible = viewer.layers[-1].visible = False  # the mask (a solid block in 3D) and its box
    viewer.dims.ndisplay = 3
    viewer.scene.camera.angles = (-15, 30, 150)
    assert all(h.blending == "additive" and h.rendering == "mip" for h in heats)
    assert not fov.visible and scan.opacity == pytest.approx(0.5) and scan.rendering == "attenuated_mip"
    three_d = viewer.screenshot(canvas_only=False, flash=False)
    _shot(tmp_path / "oblique_case_3d.png", three_d)
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    reddish = (canvas[..., 0] > canvas[..., 2] + 60).sum()
    bluish = (canvas[..., 2] > canvas[..., 0] + 60).sum()
    assert reddish > 500 and bluish > 500  # the two classes are told apart
    viewer.dims.ndisplay = 2
    assert all(h.blending == "translucent" for h in heats) and fov.visible and scan.opacity == 1.0
    if os.environ.get("MEDCAM3D_UPDATE_SCREENSHOT") == "1":
        _shot(SCREENSHOT, two_d)
        _shot(SCREENSHOT_3D, three_d)
    _settle(qtbot, widget)


def test_rethreshold_and_undo_keep_hand_edits(make_napari_viewer, qtbot, case):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    for data, kwargs, kind in explain_image(image.data, image.metadata["affine"], case.config, name=image.name,
                                            metadata=image.metadata, target=case.class_name):
        viewer.add_image(data, **kwargs)
    widget.reset_choices()
    heat = viewer.layers[heatmap_name("case_01", "hirescam", "class_layers.relu", case.class_name, 0.67)]
    assert widget.heatmap.value is heat
    widget.threshold_method.value = "fraction"
    widget.threshold_value.value = 0.5
    mask, box = _threshold(qtbot, widget)
    assert mask.name == f"{heat.name} · mask fraction 0.5" and mask.data.dtype == np.uint8
    assert mask.data.shape == (64, 64, 64) and mask.data.any()  # the 8 mm feature grid split into 2 mm voxels
    mask_space = Space(mask.data.shape, mask.metadata["affine"])
    np.testing.assert_allclose(mask.affine.affine_matrix, mask_space.affine)
    assert mask.data[tuple(np.round(mask_space.world_to_voxel(heat.metadata["peak_mm"])).astype(int))] == 1
    assert box.nshapes == 12 and mask.metadata["box"]["voxels"] == int(mask.data.sum())
    lesion = _lesion(case, image)
    on_scan = resample_labels(mask.data, mask_space, Space(image.data.shape, image.metadata["affine"])).astype(bool)
    assert (on_scan & lesion).sum() > 0.5 * lesion.sum()  # the mask covers most of the lesion
    assert "mm" in widget.box.value and mask.name in widget.box.value

    # A hand edit, then "Threshold to mask" again: a new layer; the edit and its undo history stay with the first.
    edit = tuple(int(v) for v in np.argwhere(mask.data == 0)[0])
    mask.brush_size = 1
    mask.paint(edit, 1)
    assert mask.data[edit] == 1
    edited = mask.data.copy()
    again, again_box = _threshold(qtbot, widget)
    assert again is not mask and again.name == f"{mask.name} [2]" and again_box.name.endswith("[2]")
    np.testing.assert_array_equal(mask.data, edited)  # the hand edit is kept
    assert again.data[edit] == 0
    fresh = again.data.copy()
    again.undo()  # Ctrl+Z on the new mask writes nothing stale into it
    np.testing.assert_array_equal(again.data, fresh)
    mask.undo()  # Ctrl+Z on the edited mask undoes the hand edit only
    assert mask.data[edit] == 0 and np.array_equal(mask.data, fresh)
    widget.threshold_method.value = "percentile"
    assert widget.threshold_value.value == 99.0 and widget.threshold_value.max < 100
    _threshold(qtbot, widget)
    assert f"{heat.name} · mask percentile 99" in viewer.layers
    _settle(qtbot, widget)


def test_threshold_runs_in_a_worker_and_cancel_adds_nothing(make_napari_viewer, qtbot, case, monkeypatch):
    """Threshold to mask returns at once (the work is in a worker thread); Cancel during it adds no layer."""
    from medcam3d import masks

    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    for data, kwargs, kind in explain_image(image.data, image.metadata["affine"], case.config, name=image.name,
                                            metadata=image.metadata, target=case.class_name):
        viewer.add_image(data, **kwargs)
    widget.reset_choices()
    _settle(qtbot, widget)
    entered, release = threading.Event(), threading.Event()
    real = masks.threshold_mask

    def held(*args, **kwargs):  # the thresholding waits until the test lets it go on
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(masks, "threshold_mask", held)
    before = [layer.name for layer in viewer.layers]
    worker = widget.make_mask()
    assert worker is widget.mask_worker and worker is not None
    qtbot.waitUntil(entered.is_set, timeout=30000)  # the worker is thresholding ...
    qtbot.waitUntil(lambda: widget.progress.max == 4, timeout=10000)  # ... its steps reach the progress bar ...
    assert [layer.name for layer in viewer.layers] == before  # ... and no layer is there yet
    assert not widget.mask_button.enabled and widget.cancel_button.enabled and not widget.progress.native.isHidden()
    release.set()
    qtbot.waitUntil(lambda: widget.mask_button.enabled and not widget.busy, timeout=60000)
    mask, box = widget.masked
    assert [layer.name for layer in viewer.layers] == [*before, mask.name, box.name]
    assert mask.metadata["medcam3d"] == "mask" and mask.data.any() and mask.name in widget.box.value
    assert not widget.cancel_button.enabled and widget.progress.native.isHidden()

    entered.clear()
    release.clear()
    widget.make_mask()
    qtbot.waitUntil(entered.is_set, timeout=30000)
    widget.cancel_button.native.click()  # Cancel while it thresholds
    release.set()
    qtbot.waitUntil(lambda: widget.mask_button.enabled and not widget.busy, timeout=60000)
    qtbot.wait(50)
    assert [layer.name for layer in viewer.layers] == [*before, mask.name, box.name] and widget.masked == []
    assert widget.box.value.startswith("cancelled") and not widget.cancel_button.enabled


def test_threshold_validation_status_and_ascii(make_napari_viewer, qtbot, case, tmp_path, monkeypatch, notifications):
    """Small things: no zero threshold, no stale box or status, ASCII descrip, int16 stays int16."""
    assert threshold_problem("fraction", 0.0) and threshold_problem("fraction", 1.5)
    assert threshold_problem("percentile", 100.0) and threshold_problem("fraction", 0.3) is None
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mask_from_heatmap(np.ones((4, 4, 4)), np.eye(4), "fraction", 0.0)
    assert ascii_text("case_01 · hirescam · bright_round é") == "case_01 - hirescam - bright_round e"

    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    with pytest.raises(ValueError):
        widget.threshold_value.value = 0.0  # the field refuses 0 ...
    widget.threshold_value.native.setValue(0.0)  # ... and typing 0 gives its smallest value
    assert widget.threshold_value.value == pytest.approx(0.01)

    for data, kwargs, kind in explain_image(image.data, image.metadata["affine"], case.config, name=image.name,
                                            metadata=image.metadata, target=case.class_name):
        viewer.add_image(data, **kwargs)
    widget.reset_choices()
    widget.threshold_value.value = 0.5
    _threshold(qtbot, widget)
    assert widget.box.value.startswith(widget.heatmap.value.name)
    monkeypatch.setattr(_widget, "mask_steps", lambda *a, **k: (_ for _ in ()).throw(ValueError("broken")))
    assert _threshold(qtbot, widget) == [] and widget.box.value == ""  # no old box left on screen
    qtbot.waitUntil(lambda: any("broken" in m for m in notifications), timeout=10000)
    assert "broken" in notifications[-1] and "Traceback" not in notifications[-1]

    # Saving: descrip is ASCII, an int16 scan stays int16 and unchanged.
    for layer, name in ((image, "scan.nii.gz"), (viewer.layers[1], "heat.nii.gz"), (viewer.layers[2], "mask.nii.gz")):
        viewer.layers.selection = {layer}
        viewer.layers.save(str(tmp_path / name), selected=True, plugin="medcam3d")
        descrip = nib.load(tmp_path / name).header["descrip"].tobytes()
        assert all(32 <= b < 127 for b in descrip.rstrip(b"\0")), descrip
    assert b"hirescam" in nib.load(tmp_path / "heat.nii.gz").header["descrip"].tobytes()
    scan = nib.load(tmp_path / "scan.nii.gz")
    assert scan.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(scan.dataobj), np.asanyarray(nib.load(case.scan).dataobj))

    # The status line: a config error, then no config, then a good one; a late result does not hide an error.
    (tmp_path / "bad.yaml").write_text("model: {network: monai.networks.nets.DenseNet}\nclas_names: [a]\n")
    _settle(qtbot, widget)
    widget.config.value = tmp_path / "bad.yaml"
    assert "clas_names" in widget.status.value
    widget.config.value = ""
    assert widget.status.value.startswith("choose a config")
    widget.config.value = case.config
    assert widget.status.value == ""
    widget.run()
    widget.config.value = tmp_path / "bad.yaml"
    qtbot.waitUntil(lambda: widget.run_button.enabled and not widget.busy, timeout=60000)
    assert "clas_names" in widget.status.value  # not the finished run's summary
    _settle(qtbot, widget)


def test_colour_scale_is_shared_and_honest(make_napari_viewer, qtbot):
    """A negative case (p = 0.07) is faint next to a positive one; each-map scaling would make it glow."""
    maps = [{"config": "c", "method": "m", "layer": "l", "max": 4.0, "probability": 0.9},
            {"config": "c", "method": "m", "layer": "l", "max": 8.0, "probability": 0.1},
            {"config": "c", "method": "m", "layer": "other", "max": 2.0, "probability": 0.2}]
    assert colour_limits(maps, SCALES[0]) == [(0.0, 4.0), (0.0, 4.0), (0.0, 2.0)]  # no positive map: its largest
    assert colour_limits(maps, SCALES[1]) == [(0.0, 8.0), (0.0, 8.0), (0.0, 2.0)]
    assert colour_limits(maps, SCALES[2]) == [(0.0, 4.0), (0.0, 8.0), (0.0, 2.0)]

    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    for name in ("case_01", "case_05"):  # positive for both classes; negative for both (p = 0.07, 0.05)
        [scan] = viewer.open(str(SAMPLES / f"{name}.nii.gz"), plugin="medcam3d")
        widget.image_layer.value = scan
        _explain_with_widget(qtbot, widget)
    heats = {layer.name.split(" ·")[0] + " " + layer.metadata["class"]: layer for layer in viewer.layers
             if layer.metadata.get("medcam3d") == "heatmap"}
    assert len(heats) == 4 and "(p=0.07)" in viewer.layers[-2].name
    positive = max(heats["case_01 bright_round"].metadata["max"], heats["case_01 dark_elongated"].metadata["max"])
    assert all(layer.contrast_limits[1] == pytest.approx(positive) for layer in heats.values())
    negative = heats["case_05 bright_round"]
    assert negative.metadata["max"] < 0.35 * positive  # below the colormap's first opaque colour
    widget.scale.value = SCALES[2]
    assert negative.contrast_limits[1] == pytest.approx(negative.metadata["max"])  # would glow as hot
    widget.scale.value = SCALES[0]
    assert negative.contrast_limits[1] == pytest.approx(positive)
    _settle(qtbot, widget)


def test_save_from_the_default_dialog_filter(make_napari_viewer, qtbot, case, tmp_path, monkeypatch):
    """File > Save Selected Layers with the preselected file type writes x.nii.gz (and still x.tif)."""
    from napari._qt import qt_viewer
    from napari.layers import Layer

    filters: list[str] = []

    def save_dialog(target: Path):
        def fake(*_args, filter="", **_kwargs):  # noqa: A002 - Qt's name
            filters.append(filter)
            return str(target), filter.split(";;")[0]  # the dialog's preselected (default) file type

        monkeypatch.setattr(qt_viewer.QFileDialog, "getSaveFileName", staticmethod(fake))

    viewer = make_napari_viewer()
    [image] = viewer.open(str(case.scan), plugin="medcam3d")
    [(data, kwargs, kind)] = explain_image(image.data, image.metadata["affine"], case.config, name=image.name,
                                           metadata=image.metadata, target=case.class_name)
    heat = viewer.add_layer(Layer.create(data, kwargs, kind))
    mask = viewer.add_layer(Layer.create(*mask_from_heatmap(heat.data, heat.metadata["affine"],
                                                            metadata=heat.metadata, name=heat.name)[0]))
    source = nib.load(case.scan)
    for layer, name, dtype in ((heat, "heat.nii.gz", np.float32), (mask, "mask.nii.gz", np.uint8)):
        viewer.layers.selection = {layer}
        save_dialog(tmp_path / name)
        viewer.window._qt_viewer._save_layers_dialog(selected=True)
        assert filters[-1].startswith("medcam3d"), filters[-1]
        saved = nib.load(tmp_path / name)
        assert saved.get_data_dtype() == dtype and saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
        # the layer's own grid (the feature grid; the mask's 2 mm grid) onto the scan's, as the writers do it
        grid, scan_grid = Space(layer.data.shape, layer.metadata["affine"]), Space(source.shape, source.affine)
        expected = resample_labels(layer.data, grid, scan_grid) if layer is mask else \
            resample(heat.metadata["feature_map"], Space((16, 16, 16), heat.metadata["feature_affine"]), scan_grid)
        np.testing.assert_allclose(np.asanyarray(saved.dataobj), expected, atol=1e-6)
    viewer.layers.selection = {heat}
    save_dialog(tmp_path / "heat.tif")  # another file type: napari's own writer, through the same entry
    viewer.window._qt_viewer._save_layers_dialog(selected=True)
    assert (tmp_path / "heat.tif").is_file()


def test_closing_with_two_scans_and_the_second_selected_exits_cleanly(tmp_path):
    script = textwrap.dedent(f"""
        import napari
        from qtpy.QtWidgets import QApplication
        viewer = napari.Viewer(show=False)
        viewer.open({str(SAMPLES / "case_01.nii.gz")!r}, plugin="medcam3d")
        viewer.open({str(SAMPLES / "case_02.nii.gz")!r}, plugin="medcam3d")
        _, widget = viewer.window.add_plugin_dock_widget("medcam3d", "Explain")
        widget.image_layer.value = viewer.layers["case_02"]
        viewer.layers.selection.active = viewer.layers["case_02"]
        QApplication.processEvents()  # the target-layer listing starts in a worker
        viewer.close()
        print("closed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, check=False, env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "closed" in done.stdout and "has been deleted" not in done.stderr


def test_layers_from_elsewhere_warn_and_keep_their_napari_placement(make_napari_viewer, qtbot, case, tmp_path,
                                                                    notifications):
    array, space = io.read(case.scan)
    viewer = make_napari_viewer()
    scan = viewer.add_image(array[::-1], scale=(0.8, 0.8, 2.5), translate=(-60.0, -80.0, -10.0), name="elsewhere")
    widget = ExplainWidget(viewer)
    widget.image_layer.value = scan
    [heat] = _explain_with_widget(qtbot, widget)[:1]
    warned = [m for m in notifications if "not opened by the medcam3d reader" in m]
    assert len(warned) == 1 and "elsewhere" in warned[0]
    placement = np.diag([0.8, 0.8, 2.5, 1.0])
    placement[:3, 3] = (-60.0, -80.0, -10.0)
    np.testing.assert_allclose(heat.metadata["scan_affine"], placement)  # the scan's napari placement was used
    cells = Space(heat.data.shape, heat.metadata["affine"])  # the feature grid, in the world of that placement
    for cell in ([0, 0, 0], [15, 0, 7], [3, 12, 9]):  # the map is drawn where its cells are
        np.testing.assert_allclose(heat.data_to_world(cell), cells.voxel_to_world(cell), atol=1e-9)
    peak = np.unravel_index(np.argmax(heat.data), heat.data.shape)
    np.testing.assert_allclose(heat.metadata["peak_mm"], heat.data_to_world(peak), atol=1e-9)
    viewer.layers.selection = {heat}
    [written] = viewer.layers.save(str(tmp_path / "heat.nii.gz"), selected=True, plugin="medcam3d")
    np.testing.assert_allclose(nib.load(written).affine, placement, atol=1e-5)
    _explain_with_widget(qtbot, widget)
    assert len([m for m in notifications if "not opened by the medcam3d reader" in m]) == 1  # once per layer
    _settle(qtbot, widget)


def test_cancel_progress_and_cached_layer_listing(make_napari_viewer, qtbot, fresh_listings):
    viewer = make_napari_viewer()
    [first] = viewer.open(str(SAMPLES / "case_01.nii.gz"), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    _settle(qtbot, widget)
    listing = widget.layers_worker
    assert listing is not None and "class_layers.relu" in widget.target_layer.choices  # listed once
    [same_grid] = viewer.open(str(SAMPLES / "case_06.nii.gz"), plugin="medcam3d")  # the grid of case_01
    [other_grid] = viewer.open(str(SAMPLES / "case_02.nii.gz"), plugin="medcam3d")
    for scan in (same_grid, other_grid, first):
        widget.image_layer.value = scan
        _settle(qtbot, widget)
        assert "class_layers.relu" in widget.target_layer.choices
    assert widget.layers_worker is listing  # no scan change preprocessed a scan again

    # Cancel: the run stops at its next step and adds nothing.
    widget.image_layer.value = other_grid
    _settle(qtbot, widget)
    before = [layer.name for layer in viewer.layers]
    assert widget.run() is not None and widget.cancel_button.enabled
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: widget.run_button.enabled and not widget.busy, timeout=60000)
    assert [layer.name for layer in viewer.layers] == before
    assert widget.status.value.startswith("cancelled") and not widget.cancel_button.enabled
    assert len(widget.steps) < 7

    # Progress: the steps of a whole run, in order.
    _explain_with_widget(qtbot, widget)
    texts = [step.text for step in widget.steps]
    assert texts == ["loading the model", "preparing case_02", "preprocessing", "explaining (hirescam)",
                     "map 1/2: bright_round", "map 2/2: dark_elongated", "model field of view"]
    assert [step.done for step in widget.steps] == list(range(7)) and widget.steps[-1].total == 7
    assert _models.cached_layers(other_grid.data.shape, other_grid.metadata["affine"], CONFIG) is not None
    _settle(qtbot, widget)


MEMORY = """
import sys
import tracemalloc
import numpy as np
from medcam3d.demo.synthetic import grid_from_codes
from medcam3d.napari._service import explain_steps, load_explainable

def rss(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))

space = grid_from_codes("LPS", (0.8, 0.8, 2.5), (320, 320, 100), centre=(0.0, -20.0, 40.0))
scan = np.full(space.shape, -1000, np.int16)
scan[40:-40, 40:-40, 10:-10] = 40
load_explainable(sys.argv[1])
size, growth, step, start = scan.nbytes, {}, None, rss("VmRSS")
tracemalloc.start()  # NumPy reports its arrays to tracemalloc: exact, unlike RSS (torch's tensors are not seen)
steps = explain_steps(scan, space.affine, sys.argv[1], name="ct")
while True:  # the peak of each step above the memory in use when it began, in scans (int16)
    try:
        following = next(steps)
    except StopIteration as done:
        layers, following = done.value, None
    if step is not None:
        growth["rss " + step.text] = (rss("VmHWM") - start) / size
        growth["numpy " + step.text] = (tracemalloc.get_traced_memory()[1] - traced) / size
    if following is None:
        break
    step, start = following, rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak starts again from now
    tracemalloc.reset_peak()
    traced = tracemalloc.get_traced_memory()[0]
kept = sum(data.nbytes for data, _, _ in layers) / size
print("|".join(f"{key}={value:.2f}" for key, value in growth.items()) + f"|kept={kept:.2f}")
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-memory counters")
def test_memory_per_step_is_what_the_step_keeps(tmp_path):
    """Each step of an explanation takes about what it keeps (in all, it took ~18x the scan on a CT):
    NumPy's peaks per step, exactly (tracemalloc), torch's through the process's peak RSS.

    MONAI's preprocessing (Spacing computes in float64 unless the config says float32) is the one
    step whose peak is the preprocessing's own; it is reported, not bounded, here.
    """
    done = subprocess.run([sys.executable, "-c", MEMORY, str(CONFIG)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, check=False, env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    growth = {key: float(value) for key, value in (item.split("=") for item in done.stdout.strip().split("|"))}
    # In units of the int16 scan (20.48 MB). The peaks of NumPy's arrays (tracemalloc: exact, the same
    # every run): one float32 copy for the model (2x); each map stays on the 16^3 feature grid and the
    # field of view on the 64^3 input grid (no scan-sized array).
    assert growth["numpy preparing ct"] <= 2.05, growth
    # (the first map step also pays about 24 MB once, which the second does not repeat: imports and
    # caches; the second shows what a map itself costs)
    assert growth["numpy map 1/2: bright_round"] <= 1.25 and growth["numpy map 2/2: dark_elongated"] <= 0.01, growth
    assert growth["numpy model field of view"] <= 0.02, growth
    # torch's tensors are not traced: the explanation's whole peak (RSS, which the allocator's reuse of
    # freed pages moves by a scan or two run to run) stays far below one float32 copy of the scan at
    # full size (the model works on its 64^3 input, not the scan)
    assert growth["rss explaining (hirescam)"] * 20.48e6 < 150e6, growth
    assert growth["kept"] == pytest.approx((2 * 16**3 * 4 + 64**3) / 20.48e6, abs=0.006), growth  # 2 maps + outline


def test_reordered_axes_round_trip(tmp_path):
    """A scan stored as coronal slices (L-I-P) is shown with R-A-S-ordered axes and saved back as stored."""
    space = grid_from_codes("LIP", (0.8, 0.9, 2.5), (20, 24, 7), centre=(10.0, -20.0, 30.0))
    array = np.random.default_rng(0).random(space.shape, dtype=np.float32)
    io.write(tmp_path / "coronal.nii.gz", array, space)
    [(data, kwargs, kind)] = read_image(str(tmp_path / "coronal.nii.gz"))
    assert kind == "image" and kwargs["metadata"]["axes"] == (0, 2, 1) and data.shape == (20, 7, 24)
    assert not kwargs["metadata"]["resampled"]  # reordered, not resampled
    slightly = Space(space.shape, space.affine @ np.array([[1, 0, 0, 0], [0, 1, 1e-4, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    io.write(tmp_path / "nearly.nii.gz", array, slightly)  # napari draws this within 0.01 voxel: kept as is
    assert not read_image(str(tmp_path / "nearly.nii.gz"))[0][1]["metadata"]["resampled"]
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
            assert kwargs["axis_labels"] == ("R", "A", "S") and kwargs["units"] == ("mm", "mm", "mm")


def test_sample_case_lookup(tmp_path, monkeypatch):
    """cases.csv names the case; without it the first case_* file; without a folder a generated case."""
    from medcam3d.napari import _sample_data

    (tmp_path / "case_02.nii.gz").write_bytes(b"")
    (tmp_path / "case_02_mask.nii.gz").write_bytes(b"")
    (tmp_path / "case_07.nii.gz").write_bytes(b"")
    assert _sample_data.find_demo_case(tmp_path) == (tmp_path / "case_02.nii.gz", tmp_path / "case_02_mask.nii.gz")
    assert _sample_data.find_demo_case(tmp_path, oblique=True) is None
    (tmp_path / "cases.csv").write_text("case_id,file,mask,grid\ncase_09,case_09.nii.gz,,ras\n"
                                        "case_07,case_07.nii.gz,,lps_oblique\n")
    assert _sample_data.find_demo_case(tmp_path) == (tmp_path / "case_07.nii.gz", None)  # case_09 is missing
    assert _sample_data.find_demo_case(tmp_path, oblique=True) == (tmp_path / "case_07.nii.gz", None)

    monkeypatch.setattr(_sample_data, "DATA_SAMPLES", tmp_path / "absent")
    image, lesions = demo_case()
    assert image[1]["name"] == "demo_case" and image[1]["metadata"]["path"] is None
    assert image[2] == "image" and lesions[2] == "labels" and image[0].shape == lesions[0].shape
    assert set(np.unique(lesions[0])) == {0, 1, 2}  # both lesions present
    image, lesions = oblique_case()
    assert image[1]["metadata"]["resampled"] and shape_of(image[0]) == lesions[0].shape  # a lazy pyramid's level 0
    assert set(np.unique(lesions[0])) == {0, 1, 2}


@pytest.mark.filterwarnings("error:Private attribute access")  # the plugin uses napari's public API only
def test_errors_become_notifications_and_the_viewer_stays_usable(make_napari_viewer, qtbot, case, tmp_path,
                                                                  notifications):
    (tmp_path / "failing.yaml").write_text(FAILING)  # builds, then is refused: 2 input channels, one scan given
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
    qtbot.waitUntil(lambda: widget.run_button.enabled and "could not explain" in notifications[-1], timeout=30000)

    widget.config.value = tmp_path / "failing.yaml"
    count = len(notifications)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(notifications) > count, timeout=30000)
    assert "could not explain case_01" in notifications[-1] and "Traceback" not in notifications[-1]
    assert [layer.name for layer in viewer.layers] == ["case_01", "case_01 lesions"]

    # Still usable: the demo config explains the sample.
    widget.config.value = case.config
    widget.run_button.native.click()
    name = heatmap_name("case_01", "hirescam", "class_layers.relu", "dark_elongated", 0.77)
    qtbot.waitUntil(lambda: name in viewer.layers and widget.run_button.enabled, timeout=60000)
    _settle(qtbot, widget)


# ------------------------------------------------------------------------------ Segment action
PLANTED_SHAPE = (48, 44, 20)
# LPS-stored, anisotropic (0.9 x 0.9 x 2.5 mm), off-origin: what a CT gives
PLANTED_AFFINE = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, 25.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])


def _planted(viewer, *, foreign: bool = False):
    """A scan with a bright ball (the lesion of class 1, 'dark' being class 0) and a medcam3d-style heatmap of
    that class: a Gaussian on an 8 mm feature grid around the ball, shown on the scan's grid."""
    centre = PLANTED_AFFINE @ [24, 20, 9, 1]
    image, inside = planted_scan(PLANTED_SHAPE, PLANTED_AFFINE, centre[:3], radius_mm=7.0, seed=3)
    space = Space(PLANTED_SHAPE, PLANTED_AFFINE)
    feature = Space((8, 8, 8), np.array([[8.0, 0, 0, -30.0], [0, 8.0, 0, -35.0], [0, 0, 8.0, -12.0], [0, 0, 0, 1]]))
    cells = feature.voxel_to_world(np.indices(feature.shape).reshape(3, -1).T.astype(float)).reshape(*feature.shape, 3)
    feature_map = np.exp(-np.sum((cells - centre[:3]) ** 2, axis=-1) / (2 * 8.0 ** 2)).astype(np.float32)
    shown = resample(feature_map, feature, space).astype(np.float32)
    if foreign:  # opened by another reader: napari's scale and translate only
        scan = viewer.add_image(image, name="planted", scale=np.diag(PLANTED_AFFINE)[:3], translate=PLANTED_AFFINE[:3, 3])
    else:
        scan = viewer.add_image(image, name="planted", affine=napari_affine(PLANTED_AFFINE, 3),
                                metadata={"medcam3d": "scan", "affine": PLANTED_AFFINE.copy()})
    meta = {"medcam3d": "heatmap", "method": "hirescam", "layer": "class_layers.relu", "class": "bright",
            "class_index": 1, "affine": PLANTED_AFFINE.copy(), "source": "planted", "feature_map": feature_map,
            "feature_affine": feature.affine.copy(), "checksum": checksum(shown)}
    heat = viewer.add_image(shown, name="planted · hirescam · bright", affine=napari_affine(PLANTED_AFFINE, 3),
                            metadata=meta)
    return scan, heat, inside


def _world_corners(layer, shape) -> np.ndarray:
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return np.asarray([layer.data_to_world(c) for c in corners], dtype=float)


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("foreign", [False, True], ids=["medcam3d placement", "napari scale and translate"])
def test_segment_action_labels_the_planted_lesion_on_the_scan_grid(make_napari_viewer, qtbot, foreign, notifications,
                                                                   tmp_path):
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    scan, heat, inside = _planted(viewer, foreign=foreign)
    widget.reset_choices()
    widget.image_layer.value, widget.heatmap.value = scan, heat
    assert widget.segment_button.text == "Segment" and widget.segment_button.parent is widget.mask_button.parent
    count = len(viewer.layers)
    widget.segment_button.native.click()  # the button beside "Threshold to mask": a worker thread
    assert widget.segment_worker is not None and not widget.segment_button.enabled
    qtbot.waitUntil(lambda: widget.segment_button.enabled and not widget.busy, timeout=60000)
    assert len(viewer.layers) == count + 2
    labels, boxes = viewer.layers[-2], viewer.layers[-1]
    assert labels.name == "planted · segmentation bright" and boxes.name == "planted · lesion boxes bright"
    assert labels.data.shape == scan.data.shape and set(np.unique(labels.data)) == {0, 2}  # label = class 1 + 1
    assert _dice(labels.data == 2, inside) > 0.9  # the planted ball
    # placed where the scan is: every corner voxel at the same world position (mm)
    np.testing.assert_allclose(_world_corners(labels, scan.data.shape), _world_corners(scan, scan.data.shape), atol=1e-6)
    np.testing.assert_allclose(_world_corners(boxes, scan.data.shape), _world_corners(scan, scan.data.shape), atol=1e-6)
    [lesion] = labels.metadata["lesions"]
    where = np.argwhere(inside)
    assert np.all(np.abs(np.asarray(lesion["box"]["voxel_min"]) - where.min(0)) <= 1)
    assert np.all(np.abs(np.asarray(lesion["box"]["voxel_max"]) - where.max(0)) <= 1)
    centre_mm = PLANTED_AFFINE @ [24, 20, 9, 1]
    np.testing.assert_allclose(lesion["box"]["centre_mm"], centre_mm[:3], atol=2.6)  # within a voxel
    assert boxes.nshapes == 12 and labels.metadata["segmentation"]["method"] == "random_walker"
    assert "1 lesion(s)" in widget.box.value and labels.name in widget.box.value
    assert bool(foreign) == any("not opened by the medcam3d reader" in m for m in notifications)
    if not foreign:  # saved as a mask on the scan's grid
        viewer.layers.selection = {labels}
        [saved] = viewer.layers.save(str(tmp_path / "segmentation.nii.gz"), selected=True, plugin="medcam3d")
        written = nib.load(saved)
        np.testing.assert_allclose(written.affine, PLANTED_AFFINE, atol=1e-6)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.data)


def test_segment_again_adds_a_layer_and_keeps_edits_and_errors_are_notifications(make_napari_viewer, qtbot,
                                                                                 monkeypatch, notifications):
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    assert widget.make_segmentation() is None and "no heatmap layer" in notifications[-1]
    scan, heat, inside = _planted(viewer)
    widget.reset_choices()
    widget.image_layer.value, widget.heatmap.value = scan, heat
    labels, _boxes = _segment(qtbot, widget)
    edit = tuple(int(v) for v in np.argwhere(labels.data == 0)[0])
    labels.brush_size = 1
    labels.paint(edit, 2)
    edited = labels.data.copy()
    again, again_boxes = _segment(qtbot, widget)
    assert again is not labels and again.name == f"{labels.name} [2]" and again_boxes.name.endswith("[2]")
    np.testing.assert_array_equal(labels.data, edited)  # the hand edit stays with the first layer
    assert again.data[edit] == 0
    fresh = again.data.copy()
    again.undo()  # nothing stale comes back into the new layer
    np.testing.assert_array_equal(again.data, fresh)
    labels.undo()  # the hand edit only
    np.testing.assert_array_equal(labels.data, fresh)

    # without the feature map (the shown voxels changed), the layer's own data is segmented: the same lesion
    heat.data = heat.data * 2.0
    direct = segment_from_heatmap(scan.data, scan.metadata["affine"], heat.data, heat.metadata["affine"],
                                  scan_name="planted", name=heat.name, metadata=heat.metadata)
    assert _dice(direct[0][0] == 2, inside) > 0.9

    # a flat map: no lesion, said so; a failure: a notification, no traceback, nothing added
    flat = viewer.add_image(np.zeros(scan.data.shape, np.float32), name="flat", affine=napari_affine(PLANTED_AFFINE, 3),
                            metadata={"medcam3d": "heatmap", "class": "bright", "class_index": 1,
                                      "affine": PLANTED_AFFINE.copy()})
    widget.reset_choices()
    widget.heatmap.value = flat
    [empty] = _segment(qtbot, widget)
    assert not empty.data.any() and widget.box.value.endswith("no lesion found")
    count = len(viewer.layers)
    monkeypatch.setattr(_masking, "segment_from_heatmap", lambda *a, **k: (_ for _ in ()).throw(ValueError("broken")))
    assert _segment(qtbot, widget) == [] and widget.box.value == ""
    assert "cannot segment planted" in notifications[-1] and "broken" in notifications[-1]
    assert "Traceback" not in notifications[-1] and len(viewer.layers) == count
    _settle(qtbot, widget)


# ------------------------------------------------------------------------------ saved outputs
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``medcam3d explain`` of the shipped case_02 (RAS, bright_round present, p = 0.80): its saved files."""
    from medcam3d.cli import main

    out = tmp_path_factory.mktemp("explained")
    code = main(["explain", "--config", str(CONFIG), "--image", str(SAMPLES / "case_02.nii.gz"), "--target",
                 "bright_round", "--no-pictures", "--out", str(out)])
    assert code == 0
    stem = out / "case_02" / "case_02_hirescam_bright_round"
    return SimpleNamespace(scan=SAMPLES / "case_02.nii.gz", map=Path(f"{stem}.nii.gz"), norm=Path(f"{stem}_norm.nii.gz"),
                           feature=Path(f"{stem}_feature.nii.gz"), mask=Path(f"{stem}_mask.nii.gz"), name="case_02")


def test_saved_map_opens_as_a_heatmap_and_segments_like_explain(make_napari_viewer, qtbot, saved, notifications):
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(saved.scan), plugin="medcam3d")
    [heat] = viewer.open(str(saved.map), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    widget.reset_choices()
    widget.heatmap.value = heat  # the picker accepts it (a ValueError before)
    assert widget.image_layer.choices == (scan,)  # a map is no scan to explain
    name = heatmap_name("case_02", "hirescam", "class_layers.relu", "bright_round", 0.80)
    assert heat.name == name  # probability from the case's summary.json
    meta = heat.metadata
    assert meta["medcam3d"] == "heatmap" and meta["class"] == "bright_round" and meta["class_index"] == 0
    assert meta["method"] == "hirescam" and meta["layer"] == "class_layers.relu" and meta["source"] == "case_02"
    assert meta["probability"] == pytest.approx(0.8008, abs=1e-3) and meta["score"] > 0
    assert heat.data.dtype == np.float32 and heat.data.shape == scan.data.shape
    np.testing.assert_allclose(heat.metadata["affine"], scan.metadata["affine"], atol=1e-6)
    np.testing.assert_allclose(_world_corners(heat, heat.data.shape), _world_corners(scan, scan.data.shape), atol=1e-6)
    assert heat.colormap.name == heatmap_colormap(0).name and heat.blending == "translucent"
    assert heat.opacity == pytest.approx(0.6) and heat.contrast_limits == [0.0, pytest.approx(meta["max"])]
    assert meta["feature_map"].shape == (16, 16, 16) and meta["checksum"] == checksum(heat.data)

    # Threshold to mask works on it
    widget.threshold_method.value, widget.threshold_value.value = "fraction", 0.5
    mask, _box = _threshold(qtbot, widget)
    assert mask.name == f"{name} · mask fraction 0.5" and mask.data.any()
    saved_mask = io.read(saved.mask, dtype=None)[0]  # the file's own mask: the same threshold on the same map
    assert _dice(mask.data > 0, layer_grid(saved_mask, io.read(saved.mask)[1])[0] > 0) > 0.98

    # The widget's own Explain of the scan: the same metadata keys, the same feature-grid map
    widget.image_layer.value, widget.target_class.value = scan, "bright_round"
    [ours, explained] = _explain_with_widget(qtbot, widget)
    assert ours is heat and explained.name == f"{name} [2]"  # nothing replaced
    assert set(explained.metadata) <= set(meta)
    np.testing.assert_allclose(meta["feature_map"], explained.metadata["feature_map"], atol=1e-6)
    np.testing.assert_allclose(meta["feature_affine"], explained.metadata["feature_affine"], atol=1e-6)
    # the file's map (on the scan's grid) is the explanation's feature-grid map resampled there
    on_scan = resample(explained.data, Space(explained.data.shape, explained.metadata["affine"]),
                       Space(heat.data.shape, heat.metadata["affine"]), fill=0.0)
    np.testing.assert_allclose(heat.data, on_scan, atol=meta["max"] / 254)  # uint8 storage in the file

    # Segment on the saved map labels the same lesion voxels as on the widget's map
    widget.heatmap.value = heat
    from_file, _ = _segment(qtbot, widget)
    widget.heatmap.value = explained
    from_explain, _ = _segment(qtbot, widget)
    assert from_file.name == "case_02 · segmentation bright_round" and set(np.unique(from_file.data)) == {0, 1}
    np.testing.assert_array_equal(from_file.data, from_explain.data)
    truth = layer_grid(io.read(SAMPLES / "case_02_mask.nii.gz", dtype=None)[0] == 1, io.read(saved.scan)[1])[0]
    assert _dice(from_file.data == 1, truth) > 0.5
    assert not any("not opened by the medcam3d reader" in m for m in notifications)
    _settle(qtbot, widget)


def test_saved_norm_feature_and_mask_files(make_napari_viewer, saved, tmp_path):
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(saved.scan), plugin="medcam3d")
    [norm] = viewer.open(str(saved.norm), plugin="medcam3d")
    [feature] = viewer.open(str(saved.feature), plugin="medcam3d")
    [mask] = viewer.open(str(saved.mask), plugin="medcam3d")
    # the _norm copy: a heatmap on [0, 1] whose feature map is scaled the same way
    assert norm.metadata["medcam3d"] == "heatmap" and norm.name.endswith(" · normalized")
    assert norm.metadata["max"] == pytest.approx(1.0) and norm.metadata["feature_map"].max() == pytest.approx(1.0, abs=0.02)
    # a _feature file: the exact map on its own 8 mm grid, with its own affine
    file_map, grid = io.read(saved.feature)
    assert feature.metadata["medcam3d"] == "heatmap" and feature.data.shape == (16, 16, 16)
    np.testing.assert_allclose(feature.metadata["affine"], grid.affine, atol=1e-9)
    np.testing.assert_allclose(feature.affine.affine_matrix, grid.affine, atol=1e-9)
    np.testing.assert_array_equal(feature.data, file_map)
    np.testing.assert_array_equal(feature.metadata["feature_map"], file_map)
    # a _mask: uint8 labels on the scan's grid, where the scan is (corner voxels at the same mm)
    from napari.layers import Labels

    assert isinstance(mask, Labels) and mask.data.dtype == np.uint8 and mask.data.shape == scan.data.shape
    assert mask.name == f"{heatmap_name('case_02', 'hirescam', 'class_layers.relu', 'bright_round', 0.80)} · mask fraction 0.5"
    assert mask.metadata["medcam3d"] == "mask" and mask.metadata["threshold"]["method"] == "fraction"
    np.testing.assert_allclose(_world_corners(mask, mask.data.shape), _world_corners(scan, scan.data.shape), atol=1e-6)
    np.testing.assert_array_equal(mask.data, io.read(saved.mask, dtype=None)[0])
    assert mask.metadata["box"]["voxels"] == int(mask.data.sum())
    widget = ExplainWidget(viewer)
    widget.reset_choices()
    assert [layer for _, layer in widget._heatmap_choices()] == [norm, feature]
    # saved again with the medcam3d writer: on the scan's grid and affine
    [written] = write_mask(str(tmp_path / "again.nii.gz"), mask.data, {"metadata": mask.metadata})
    np.testing.assert_allclose(nib.load(written).affine, nib.load(saved.scan).affine, atol=1e-5)


def test_saved_mask_of_an_oblique_scan_is_on_the_scans_shown_grid(tmp_path):
    """A _mask on an oblique scan's grid opens on the grid the scan is shown on (nearest neighbour)."""
    ball = _tilted_ball(tmp_path)
    descrip = "medcam3d hirescam layer=class_layers.relu class=1:ball"
    inside = (ball.array >= 1000).astype(np.uint8)
    io.write(tmp_path / "tilted_hirescam_ball_mask.nii.gz", inside, ball.space, descrip=descrip)
    [(scan_data, scan_kwargs, _)] = read_image(str(ball.path))
    [(data, kwargs, kind)] = read_image(str(tmp_path / "tilted_hirescam_ball_mask.nii.gz"))
    assert kind == "labels" and data.dtype == np.uint8 and data.shape == shape_of(scan_data)  # the pyramid's level 0
    assert kwargs["metadata"]["resampled"] and kwargs["name"] == "tilted · hirescam · class_layers.relu · ball · mask saved"
    np.testing.assert_allclose(kwargs["metadata"]["affine"], scan_kwargs["metadata"]["affine"], atol=1e-9)
    np.testing.assert_allclose(kwargs["affine"], scan_kwargs["affine"], atol=1e-9)
    np.testing.assert_array_equal(data, resample_labels(inside, ball.space, Space(data.shape, kwargs["metadata"]["affine"])))
    assert set(np.unique(data)) == {0, 1}


def test_foreign_and_malformed_descrips_open_as_plain_images(tmp_path):
    from medcam3d.napari._outputs import parse_descrip

    space = grid_from_codes("LPS", (0.9, 0.9, 2.5), (12, 10, 6), centre=(5.0, -10.0, 20.0))
    array = np.random.default_rng(2).random(space.shape, dtype=np.float32)
    descrips = {
        "foreign": "ITK-SNAP heatmap class=0:tumour",
        "phantom": "medcam3d demo phantom seed=900002",  # the shipped scans' descrip
        "segmentation": "medcam3d segment random_walker: 0 bg, 1 bright_round",
        "widget_mask": "medcam3d mask fraction 0.5 of medcam3d hirescam layer=class_layers.relu class=0:a",
        "no_index": "medcam3d hirescam layer=class_layers.relu class=a:bright",
        "no_layer": "medcam3d hirescam layer= class=0:bright",
        "no_label": "medcam3d hirescam layer=class_layers.relu class=0:",
        "truncated": "medcam3d hirescam layer=class_lay",
        "huge_index": "medcam3d hirescam layer=x class=99999999999999999999:a",
    }
    for key, text in descrips.items():
        for suffix in ("", "_mask", "_feature"):
            name = f"{key}_hirescam_bright{suffix}"
            io.write(tmp_path / f"{name}.nii.gz", array, space, descrip=text)
            [(data, kwargs, kind)] = read_image(str(tmp_path / f"{name}.nii.gz"))
            assert kind == "image" and kwargs["metadata"]["medcam3d"] == "scan", text
            assert kwargs["name"] == name and kwargs["colormap"] == "gray"
            np.testing.assert_allclose(data, array)
    # not ASCII, control characters, NUL padding: no crash, plain
    image = nib.Nifti1Image(array, space.affine)
    image.header["descrip"] = b"medcam3d hirescam layer=x class=0:\xff\xfe"
    nib.save(image, tmp_path / "bytes_mask.nii.gz")
    [(_, kwargs, kind)] = read_image(str(tmp_path / "bytes_mask.nii.gz"))
    assert kind == "image" and kwargs["metadata"]["medcam3d"] == "scan"
    assert parse_descrip(None) is None and parse_descrip(b"medcam3d a layer=b class=0:c\x01") is None
    assert parse_descrip(b"medcam3d a layer=b class=2:c d\x00\x00").label == "c d"
    # a valid map beside a broken summary.json and a feature file of another class: a heatmap without them
    (tmp_path / "summary.json").write_text("{not json")
    io.write(tmp_path / "c_hirescam_bright.nii.gz", array, space, descrip="medcam3d hirescam layer=l class=0:bright")
    io.write(tmp_path / "c_hirescam_bright_feature.nii.gz", array[:4, :4, :4], Space((4, 4, 4), space.affine),
             descrip="medcam3d hirescam layer=l class=1:other")
    [(data, kwargs, kind)] = read_image(str(tmp_path / "c_hirescam_bright.nii.gz"))
    assert kind == "image" and kwargs["metadata"]["medcam3d"] == "heatmap" and kwargs["name"] == "c · hirescam · l · bright"
    assert "feature_map" not in kwargs["metadata"] and kwargs["metadata"]["probability"] is None


TWO_CHANNELS = ROOT / "configs" / "two_channels.yaml"


def test_explain_a_two_channel_case_from_two_open_layers(make_napari_viewer, qtbot, notifications, tmp_path):
    """A 2-channel model explained from two image layers: the maps are the CLI's for the same two files."""
    import warnings

    from medcam3d import Explainer
    from medcam3d.errors import ChannelGridWarning
    from medcam3d.heatmap import heatmaps_of

    first = SAMPLES / "case_01.nii.gz"
    array, space = io.read(first, dtype=None)
    second = tmp_path / "case_01_0001.nii.gz"  # another "sequence" on the same grid
    io.write(second, (np.asarray(array, dtype=np.float32) * -0.5 + 120.0).astype(np.float32), space)
    cropped = tmp_path / "case_01_crop_0001.nii.gz"  # the same sequence on another grid (cropped)
    crop = Space(tuple(n - 6 for n in space.shape), space.affine @ np.array(
        [[1, 0, 0, 3], [0, 1, 0, 3], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=float))
    io.write(cropped, (np.asarray(array, dtype=np.float32) * -0.5 + 120.0)[3:-3, 3:-3, 3:-3], crop)

    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    layers = {}
    for path in (first, second, cropped):
        [(data, kwargs, kind)] = read_image(str(path))
        layers[path] = viewer.add_layer(__import__("napari").layers.Layer.create(data, kwargs, kind))
    widget.reset_choices()
    assert widget.input_channels == 1 and widget.channels.native.isHidden()  # the demo model takes one channel
    widget.image_layer.value = layers[first]
    widget.config.value = TWO_CHANNELS
    assert widget.input_channels == 2 and not widget.channels.native.isHidden()
    assert [name for name, _ in widget._channel_choices()] == [layers[second].name, layers[cropped].name]

    # One layer for a two-channel model: refused before the model runs, saying how to fix it.
    count = len(notifications)
    _explain_with_widget(qtbot, widget)
    assert len(notifications) > count and "takes 2 input channel" in notifications[-1]
    assert "more channels" in notifications[-1] and "Traceback" not in notifications[-1]

    explainer = Explainer.from_config(TWO_CHANNELS)

    def cli_maps(paths) -> list[np.ndarray]:
        x, scanner_space = explainer.preprocess([str(p) for p in paths])
        assert scanner_space.shape == space.shape  # the first channel's grid
        return [np.asarray(h.data, dtype=np.float32) for h in heatmaps_of(explainer(x))]

    for other in (second, cropped):
        for layer in [lay for lay in viewer.layers if (lay.metadata or {}).get("medcam3d") == "heatmap"]:
            viewer.layers.remove(layer)
        widget.channels.value = [layers[other]]
        count = len(notifications)
        heats = _explain_with_widget(qtbot, widget)  # a warning in the worker is a napari notification
        qtbot.wait(200)
        grid_warnings = [m for m in notifications[count:] if "resampled onto channel 0's grid" in m]
        assert len(grid_warnings) == (other == cropped), (notifications[count:], widget.channels.value, widget.status.value)
        assert all(layers[cropped].name in m for m in grid_warnings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ChannelGridWarning)
            expected = cli_maps([first, other])
        assert [h.metadata["class"] for h in heats] == ["bright_round", "dark_elongated"]
        for layer, values in zip(heats, expected):
            meta = layer.metadata
            assert meta["input_shape"] == (2, 64, 64, 64) and meta["file_shape"] == space.shape  # maps on channel 0
            np.testing.assert_allclose(np.asarray(meta["feature_map"], dtype=np.float32), values, rtol=1e-4,
                                       atol=1e-5 * max(float(np.abs(values).max()), 1e-12))
        assert max(float(np.abs(v).max()) for v in expected) > 0  # a real map, not two empty ones
    # The second channel matters: the maps differ between the two second channels (cropped: zeros at the rim).
    assert not all(np.allclose(a, b) for a, b in zip(cli_maps([first, second]), expected))
