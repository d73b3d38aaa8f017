"""The napari plugin at CT size (issue 22): oblique scans shown lazily, heatmaps on the feature grid, CT window.

Small grids stand in for the CT (timings are in ``benchmarks/bench_napari.py``): what is checked
here is what makes the CT fast, with numbers - the layers hold the scan's own voxels or
feature-grid-sized maps, never a scan-sized copy, and every layer puts a known world point on
the right voxel or cell.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.space import Space, resample
from medcam3d.napari._grid import axis_aligned_grid, layer_grid, refined
from medcam3d.napari._lazy import ResampledView, pyramid, source_of
from medcam3d.napari._reader import read_image
from medcam3d.napari._scan import CT_WINDOW, display_window
from medcam3d.napari._masking import mask_from_heatmap
from medcam3d.napari._service import explain_image
from medcam3d.napari._writer import write_heatmap, write_image, write_mask
from test_napari import CONFIG


def _tilted_affine(shape, spacing=(0.7, 0.7, 2.5), degrees=(25.0, 25.0)) -> np.ndarray:
    """The benchmark's placement: stored L-P-S, tilted about R then A, centred on the origin."""
    a, b = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    linear = rx @ ry @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


@pytest.fixture(scope="module")
def tilted_ct(tmp_path_factory):
    """A small CT tilted 25 x 25 degrees: air, a body of 40 HU, a 200 HU ball at a known RAS point."""
    shape = (110, 100, 40)
    space = Space(shape, _tilted_affine(shape))
    world = space.voxel_to_world(np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)
    centre = np.array([8.0, 12.0, 4.0])
    body = np.hypot(world[..., 0] / 34.0, world[..., 1] / 28.0) < 1.0
    array = np.where(body, 40, -1000).astype(np.int16)
    array[np.linalg.norm(world - centre, axis=-1) < 10.0] = 200
    array += (np.arange(array.size).reshape(shape) % 7).astype(np.int16)  # every voxel told apart a little
    path = tmp_path_factory.mktemp("ct") / "tilted_ct.nii.gz"
    io.write(path, array, space)
    return path, array, space, centre


def test_oblique_scan_is_a_lazy_pyramid_of_its_own_voxels(tilted_ct):
    path, array, space, _ = tilted_ct
    [(data, kwargs, kind)] = read_image(str(path))
    meta = kwargs["metadata"]
    assert kind == "image" and kwargs["multiscale"] and meta["resampled"] and meta["lazy"]
    assert all(isinstance(level, ResampledView) for level in data)
    assert [level.held_nbytes for level in data] == [array.nbytes] * len(data)  # no copy: the file's voxels
    found = source_of(data)
    assert found is not None and found[0] is not None and np.array_equal(found[0], array)
    display = axis_aligned_grid(Space(*[layer_grid(array, space)[0].shape], layer_grid(array, space)[1]))
    assert data[0].shape == display.shape and data[0].dtype == np.int16
    np.testing.assert_allclose(meta["affine"], display.affine)
    assert [level.shape for level in data] == sorted((level.shape for level in data), reverse=True)
    # A slice, a tile with a step and a single voxel are the full resampling's (to 1 HU of rounding;
    # a voxel centre on the scan's very edge may fall on either side of it).
    full = np.rint(resample(array, space, display, fill=float(array.min()))).astype(np.int16)
    for key in [(slice(None), slice(None), 17), (slice(5, 60, 3), 10, slice(None, None, 2)), (40, 50, 20)]:
        diff = np.abs(np.asarray(data[0][key]).astype(int) - full[key])
        assert np.mean(diff > 1) <= 1e-3 and np.median(diff) == 0, key
    # Each coarser level's voxel v sits at the centre of the full-resolution voxels it covers.
    factor = 2 ** (len(data) - 1)
    coarse = Space(data[-1].shape, data[-1].target.affine)
    np.testing.assert_allclose(coarse.voxel_to_world([0, 0, 0]), display.voxel_to_world([(factor - 1) / 2] * 3),
                               atol=1e-6)


def test_lazy_view_interpolates_as_resample_does_slab_by_slab(monkeypatch, tilted_ct):
    _, array, space, _ = tilted_ct
    from medcam3d.napari import _lazy

    target = axis_aligned_grid(Space(*[layer_grid(array, space)[0].shape], layer_grid(array, space)[1]))
    smooth = np.random.default_rng(2).normal(0, 1, array.shape).astype(np.float32)
    view = ResampledView(smooth, space, target, fill=-3.0)
    close = np.isclose(np.asarray(view), resample(smooth, space, target, fill=-3.0), atol=2e-4)
    assert close.mean() > 0.999  # all but voxel centres on the scan's very edge
    nearest = ResampledView(array, space, target, fill=-1000, mode="nearest")
    same = np.asarray(nearest) == resample(array, space, target, fill=-1000, mode="nearest")
    assert same.mean() > 0.999
    calls: list[tuple] = []
    real = ResampledView._resample
    monkeypatch.setattr(ResampledView, "_resample", lambda self, sub: calls.append(sub.shape) or real(self, sub))
    view[:, :, target.shape[2] // 2]
    assert calls == [(target.shape[0], target.shape[1], 1)]  # one axial slice: one plane of points
    monkeypatch.setattr(_lazy, "SLAB_VOXELS", target.shape[1] * target.shape[2] * 8)
    calls.clear()
    assert np.asarray(view).shape == target.shape and len(calls) == math.ceil(target.shape[0] / 8)
    with pytest.raises(IndexError):
        view[np.array([1, 2])]


def test_heatmaps_hold_the_feature_grid_and_a_world_point_maps_to_its_cell(tilted_ct, tmp_path):
    path, array, space, _ = tilted_ct
    [(data, kwargs, _)] = read_image(str(path))
    meta = kwargs["metadata"]
    result = explain_image(data, meta["affine"], CONFIG, name="tilted", metadata=meta)
    heats = [(d, k) for d, k, kind in result if kind == "image"]
    assert len(heats) == 2
    for values, options in heats:
        m = options["metadata"]
        feature = m["feature_map"]
        # The demo config resamples onto an axis-aligned RAS grid: the map is the feature grid itself.
        assert values.shape == np.shape(feature) == (16, 16, 16) and values.dtype == np.float32
        assert values.nbytes == 16 ** 3 * 4 and values.nbytes < data[0].size * 4 / 50  # vs. the shown grid
        np.testing.assert_allclose(m["affine"], m["feature_affine"], atol=1e-9)
        np.testing.assert_allclose(options["affine"], m["feature_affine"], atol=1e-9)
        np.testing.assert_array_equal(values, feature)
        feature_space = Space(values.shape, m["affine"])
        for cell in [(3, 4, 5), (8, 8, 8), (15, 0, 11)]:  # a cell's centre in RAS mm is read back as that cell
            point = feature_space.voxel_to_world(np.array(cell, dtype=float))
            voxel = np.linalg.solve(m["affine"], [*point, 1.0])[:3]
            assert tuple(np.round(voxel).astype(int)) == cell
        assert m["scan_shape"] == tuple(data[0].shape) and m["resampled"] and m["file_shape"] == space.shape
    fov = [k for _, k, kind in result if kind == "labels"]
    assert all(np.prod(d.shape) <= 64 ** 3 for d, _, kind in result if kind == "labels") and len(fov) == 1

    # Saved on the scan's own grid, exactly as an explanation there gives it; the mask too.
    values, options = heats[0]
    written = write_heatmap(str(tmp_path / "heat.nii.gz"), values, {"metadata": options["metadata"], "name": "h"})
    saved, saved_space = io.read(written[0])
    assert saved.shape == space.shape and saved_space.isclose(space, atol=1e-3)
    expected = resample(options["metadata"]["feature_map"], Space((16, 16, 16), options["metadata"]["feature_affine"]),
                        space, fill=0.0)
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    [(mask, mask_kwargs, _), *_] = mask_from_heatmap(values, options["metadata"]["affine"], "fraction", 0.5,
                                                     name="h", metadata=options["metadata"])
    assert mask.shape == (64, 64, 64) and mask.any()  # 8 mm cells split into 2 mm voxels
    written = write_mask(str(tmp_path / "mask.nii.gz"), mask, {"metadata": mask_kwargs["metadata"], "name": "m"})
    saved_mask = nib.load(written[0])
    assert saved_mask.shape == space.shape and saved_mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved_mask.affine, space.affine, atol=1e-5)
    on_scan = np.asanyarray(saved_mask.dataobj).astype(bool)
    from_scan_map = expected >= 0.5 * expected.max()
    assert 2 * (on_scan & from_scan_map).sum() / (on_scan.sum() + from_scan_map.sum()) > 0.8
    # The lazy scan is saved from its own voxels, exactly.
    written = write_image(str(tmp_path / "scan.nii.gz"), data, {"metadata": meta, "name": "tilted"})
    scan_back, scan_space = io.read(written[0], dtype=None)
    assert np.array_equal(scan_back, array) and scan_space.isclose(space, atol=1e-3)


def test_oblique_feature_grid_goes_onto_a_small_axis_aligned_grid(tilted_ct, tmp_path):
    """A config that keeps the scan's tilt (no ``diagonal``): the map on an axis-aligned grid of its cell size."""
    path, array, space, _ = tilted_ct
    config = tmp_path / "tilted.yaml"
    config.write_text(CONFIG.read_text().replace("diagonal: true", "diagonal: false")
                      .replace("../data_samples", str(CONFIG.parent.parent / "data_samples")))
    [(data, kwargs, _)] = read_image(str(path))
    [(values, options, _)] = [r for r in explain_image(data, kwargs["metadata"]["affine"], config, name="t",
                                                       metadata=kwargs["metadata"], target=0) if r[2] == "image"]
    m = options["metadata"]
    feature = Space(np.shape(m["feature_map"]), m["feature_affine"])
    linear = m["affine"][:3, :3]
    np.testing.assert_allclose(linear, np.diag(np.diag(linear)), atol=1e-9)  # napari draws it exactly
    np.testing.assert_allclose(np.diag(linear), feature.spacing, rtol=1e-6)
    assert values.size < 4 * feature.shape[0] * feature.shape[1] * feature.shape[2]
    # Any world point inside the feature grid reads the map's value there.
    shown = Space(values.shape, m["affine"])
    rng = np.random.default_rng(0)
    for cell in rng.uniform(1, np.array(feature.shape) - 2, size=(20, 3)):
        point = feature.voxel_to_world(cell)
        expected = resample(m["feature_map"], feature, Space((1, 1, 1), _at(point)), fill=0.0).item()
        nearest = tuple(np.round(shown.world_to_voxel(point)).astype(int))
        assert abs(values[nearest] - expected) <= 0.35 * float(np.ptp(m["feature_map"])) + 1e-6


def _at(point) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = point
    return affine


def test_refined_grid_covers_the_same_box():
    space = Space((4, 5, 6), np.diag([8.0, 8.0, 8.0, 1.0]) + np.array([[0, 0, 0, 3.0], [0, 0, 0, -2], [0, 0, 0, 1],
                                                                        [0, 0, 0, 0]]))
    fine, factor = refined(space, 2.0)
    assert factor == 4 and fine.shape == (16, 20, 24) and fine.spacing == pytest.approx((2.0, 2.0, 2.0))
    low = space.voxel_to_world([-0.5, -0.5, -0.5])
    np.testing.assert_allclose(fine.voxel_to_world([-0.5, -0.5, -0.5]), low)
    np.testing.assert_allclose(fine.voxel_to_world([15.5, 19.5, 23.5]), space.voxel_to_world([3.5, 4.5, 5.5]))
    assert refined(space, 10.0) == (space, 1)


def test_ct_window_does_not_depend_on_how_much_is_tissue(tmp_path):
    rng = np.random.default_rng(1)
    air = (-1000 + rng.normal(0, 15, (80, 80, 40))).astype(np.int16)
    air[40:43, 40:42, 20] = 60  # 6 voxels of tissue in 256 000: 0.002 %
    assert display_window(air) == CT_WINDOW
    assert display_window(air.astype(np.float32)) == CT_WINDOW
    mri = rng.uniform(0, 900, (40, 40, 20)).astype(np.float32)
    low, high = display_window(mri)
    assert 0 <= low < 20 and 880 < high <= 900  # percentiles, not a CT window
    only_air = (-1000 + rng.normal(0, 15, (40, 40, 20))).clip(-1024, -900).astype(np.int16)
    assert display_window(only_air) != CT_WINDOW
    # The file's own window (NIfTI cal_min/cal_max) comes first.
    image = nib.Nifti1Image(air, np.eye(4))
    image.header["cal_min"], image.header["cal_max"] = -1350.0, 150.0  # a lung window
    nib.save(image, str(tmp_path / "lung.nii.gz"))
    [(_, kwargs, _)] = read_image(str(tmp_path / "lung.nii.gz"))
    assert tuple(kwargs["contrast_limits"]) == (-1350.0, 150.0)
    nib.save(nib.Nifti1Image(air, np.eye(4)), str(tmp_path / "plain.nii.gz"))
    [(_, kwargs, _)] = read_image(str(tmp_path / "plain.nii.gz"))
    assert tuple(kwargs["contrast_limits"]) == CT_WINDOW


def test_viewer_opens_the_oblique_ct_with_reading_aids(make_napari_viewer, tilted_ct):
    path, array, space, centre = tilted_ct
    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open(str(path), plugin="medcam3d")
    assert layer.multiscale and source_of(layer.data) is not None
    overlays = viewer.canvas.overlays
    assert overlays.scale_bar.visible and overlays.axes.visible and overlays.axes.labels
    assert viewer.dims.axis_labels == ("R", "A", "S") and tuple(layer.contrast_limits) == CT_WINDOW
    # The voxel napari shows at a world point holds that point's value (the ball at its centre).
    viewer.dims.set_point(2, centre[2])
    level, value = layer.get_value(centre, world=True)  # multiscale: (level, value)
    assert value >= 200
    viewer.window._qt_window.grab()
    two_d = viewer.screenshot(canvas_only=True, flash=False)
    assert two_d[..., :3].max() > 200  # the ball is drawn (white in the soft-tissue window)
    viewer.dims.ndisplay = 3  # napari draws the coarsest level
    three_d = viewer.screenshot(canvas_only=True, flash=False)
    assert three_d[..., :3].max() > 100
    pyramid_shapes = [level.shape for level in pyramid(array, space, axis_aligned_grid(
        Space(*[layer_grid(array, space)[0].shape], layer_grid(array, space)[1])), fill=-1000)]
    assert [tuple(level.shape) for level in layer.data] == pyramid_shapes


def test_reading_aids_jump_to_peak_isolines_and_colour_bars(make_napari_viewer, qtbot, tilted_ct):
    """Jump to peak (button and key) puts the slices on the map's peak; isolines toggle; one colour bar per class."""
    from medcam3d.napari._aids import ISOLINE_LEVELS, ISOLINES_3D, ISOLINES_KEY, PEAK_KEY, TICKS
    from medcam3d.napari._service import colour_limits
    from medcam3d.napari._shared import probability_text
    from medcam3d.napari._widget import ExplainWidget

    path, _, _, _ = tilted_ct
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(path), plugin="medcam3d")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    for data, kwargs, kind in explain_image(scan.data, scan.metadata["affine"], CONFIG, name=scan.name,
                                            metadata=scan.metadata):
        if kind == "image":
            viewer.add_image(data, **kwargs)
    heats = [layer for layer in viewer.layers if layer.metadata.get("medcam3d") == "heatmap"]
    assert len(heats) == 2
    for layer, limits in zip(heats, colour_limits([layer.metadata for layer in heats])):
        layer.contrast_limits = limits
    widget.reset_choices()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60000)
    keys = {str(key): action for key, action in viewer.keymap.items()}

    def near_peak(layer) -> None:
        """The dims point is the peak's world position (through napari's own transform) within half a slider step."""
        values = np.asarray(layer.data)
        voxel = np.unravel_index(int(np.argmax(values)), values.shape)
        peak = np.asarray(layer.data_to_world(np.array(voxel, dtype=float)))
        steps = np.array([viewer.dims.range[axis].step for axis in range(3)])
        assert np.all(np.abs(np.asarray(viewer.dims.point) - peak) <= steps / 2 + 1e-6), (viewer.dims.point, peak)
        assert (layer.metadata["peak_mm"] is None or
                np.linalg.norm(np.asarray(layer.metadata["peak_mm"]) - peak) < 1e-3)  # the status bar's peak

    for layer in heats:
        viewer.dims.set_point([0, 1, 2], [0.0, 0.0, 0.0])
        widget.heatmap.value = layer
        widget.peak_button.native.click()
        near_peak(layer)
    viewer.layers.selection.active = heats[0]
    viewer.dims.set_point([0, 1, 2], [0.0, 0.0, 0.0])
    keys[PEAK_KEY.replace("-", "+")](viewer)
    near_peak(heats[0])

    # One colour bar per class: titled class, method, p; ticks in fractions of the shared maximum (the bars follow
    # the layers' colour limits, set here after the layers were added).
    qtbot.waitUntil(lambda: [row["top"] for row in widget.colour_bars.rows] == [l.contrast_limits[1] for l in heats],
                    timeout=10000)
    rows = widget.colour_bars.rows
    assert [row["layer"] for row in rows] == [layer.name for layer in heats]
    shared = max(layer.metadata["max"] for layer in heats if layer.metadata["probability"] >= 0.5)
    for row, layer in zip(rows, heats):
        meta = layer.metadata
        assert row["title"] == f"{meta['class']} · {meta['method']} (p={probability_text(meta['probability'])})"
        assert row["ticks"] == TICKS and row["top"] == pytest.approx(shared)
        assert row["own"] == pytest.approx(meta["max"] / shared) and 0 < row["own"] <= 1 + 1e-6
        np.testing.assert_allclose(row["colours"][-1], layer.colormap.map(np.array([1.0]))[0])
        # What 1 on the bar stands for, in words (not a bare "x 0.00793").
        if row["own"] == pytest.approx(1.0, abs=1e-6):
            assert row["scale"] == f"1 = {shared:.3g} (this map's maximum)"
        else:
            assert row["scale"] == (f"1 = {shared:.3g} (shared maximum of the maps; this map reaches "
                                    f"{meta['max'] / shared:.2f})")
    assert sorted(row["own"] < 1 - 1e-6 for row in rows) == [False, True]  # one map sets the shared scale
    assert widget.colour_bars.native.layout().count() == 4 * len(heats)  # title, ramp, ticks, scale
    texts = [widget.colour_bars.native.layout().itemAt(n).widget().text()
             for n in range(widget.colour_bars.native.layout().count())]
    assert [row["scale"] for row in rows] == texts[3::4]

    # Isolines on one key: the maps hidden, their level outlines shown; the same key brings the maps back.
    keys[ISOLINES_KEY.replace("-", "+")](viewer)
    lines = [layer for layer in viewer.layers if layer.metadata.get("medcam3d") == "isolines"]
    assert len(lines) == 2 and all(line.visible and line.contour == 1 for line in lines)
    assert all(line.rendering == ISOLINES_3D == "iso_categorical" for line in lines)  # 3D: surfaces, not filled blocks
    assert not any(layer.visible for layer in heats)
    for line, layer in zip(lines, heats):
        assert line.name == f"{layer.name} · isolines" and max(line.data.shape) <= 64
        values = np.asarray(layer.data)
        peak = np.asarray(layer.data_to_world(np.array(np.unravel_index(int(np.argmax(values)), values.shape), float)))
        at_peak = line.data[tuple(np.round(np.asarray(line.world_to_data(peak))).astype(int))]
        expected = sum(layer.metadata["max"] >= f * shared for f in ISOLINE_LEVELS)
        assert at_peak == expected  # the peak lies inside as many level lines as its value reaches
        assert line.data[0, 0, 0] == 0 and set(np.unique(line.data)) <= set(range(len(ISOLINE_LEVELS) + 1))
    widget.isolines_button.native.click()
    assert all(layer.visible for layer in heats) and not any(line.visible for line in lines)


def test_lazy_view_keeps_the_last_slices_napari_asks_for_again(monkeypatch, tilted_ct):
    """napari slices the same plane several times while it adds a layer: it is resampled once."""
    import scipy.ndimage

    _, array, space, _ = tilted_ct
    levels = pyramid(array, space, axis_aligned_grid(Space(*[layer_grid(array, space)[0].shape],
                                                          layer_grid(array, space)[1])), fill=-1000.0,
                     coarsest_voxels=20_000)
    assert len(levels) > 1
    calls: list[tuple] = []
    real = scipy.ndimage.affine_transform
    monkeypatch.setattr(scipy.ndimage, "affine_transform",
                        lambda *args, **kwargs: calls.append(kwargs["output_shape"]) or real(*args, **kwargs))
    full = np.rint(resample(array, space, levels[0].target, fill=-1000.0)).astype(np.int16)
    first = levels[0][:, :, 11]
    again = np.asarray(levels[0][:, :][:, :, 11])  # through a sub-view, as napari crops to a tile first
    assert len(calls) == 1 and np.array_equal(first, again)
    assert np.mean(np.abs(first.astype(int) - full[:, :, 11]) > 1) <= 1e-3
    first[:] = 0  # callers get copies: the kept slice is not changed
    assert np.array_equal(levels[0][:, :, 11], again) and len(calls) == 1
    levels[-1][:, :, 2], levels[-1][:, :, 2]  # the coarse level shares the record (its own grid)
    assert len(calls) == 2
    for k in range(3, 3 + _lazy_recent()):  # older slices are let go
        levels[0][:, :, k]
    levels[0][:, :, 11]
    assert len(calls) == 3 + _lazy_recent()


def _lazy_recent() -> int:
    from medcam3d.napari._lazy import RECENT_REQUESTS

    return RECENT_REQUESTS
