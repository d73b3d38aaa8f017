"""Slice pictures: three planes only, an opaque colour bar in its own column, the peak marked."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from medcam3d.heatmap import Heatmap
from medcam3d.scan_maps import ScanGridMap
from medcam3d.jobs.report import default_window, save_slices, slices_figure
from medcam3d.space import Space, feature_space


def _panels(figure: Figure) -> dict:
    return {axis.get_label(): axis for axis in figure.axes}


def _overlap(a, b) -> bool:
    pa, pb = a.get_position(), b.get_position()
    return pa.x0 < pb.x1 - 1e-9 and pb.x0 < pa.x1 - 1e-9 and pa.y0 < pb.y1 - 1e-9 and pb.y0 < pa.y1 - 1e-9


@pytest.mark.parametrize("shape, spacing", [((40, 300, 60), (1.0, 1.0, 1.0)), ((64, 64, 200), (0.5, 0.5, 2.0)),
                                            ((90, 80, 70), (1.0, 1.0, 1.0))])
def test_colour_bar_is_opaque_and_never_under_a_panel(shape, spacing):
    space = Space(shape, np.diag([*spacing, 1.0]))
    scan = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    heat = np.zeros(shape, np.float32)
    heat[shape[0] // 3, shape[1] // 2, shape[2] // 4] = 2.0
    figure = slices_figure(scan, heat, space, title="tall")
    axes = _panels(figure)
    assert set(axes) == {"axial", "coronal", "sagittal", "colour bar"}
    bar = axes["colour bar"]
    for name in ("axial", "coronal", "sagittal"):
        assert not _overlap(axes[name], bar), name
        assert axes[name].get_position().x1 < bar.get_position().x0
    colours = bar.collections[0].cmap(np.linspace(0, 1, 11)) if bar.collections else bar.images[0].cmap(np.linspace(0, 1, 11))
    assert np.all(colours[:, 3] == 1.0)  # not the overlay's see-through ramp
    overlay = axes["axial"].images[1].cmap(np.linspace(0, 1, 3))
    assert overlay[0, 3] == 0.0 and overlay[-1, 3] > 0.5


def test_peak_is_marked_in_every_panel_in_radiological_view():
    # a grid stored L-P-I: the pictures still show R on the left, A and S up
    shape = (30, 20, 10)
    affine = np.diag([-2.0, -2.0, -3.0, 1.0])
    space = Space(shape, affine)
    scan = np.zeros(shape, np.float32)
    heat = np.zeros(shape, np.float32)
    peak = (7, 5, 2)
    heat[peak] = 1.0
    figure = slices_figure(scan, heat, space, title="x")
    axes = _panels(figure)
    # canonical position of the peak: voxel axes flipped, so RAS index = n - 1 - voxel index
    ras = [shape[a] - 1 - peak[a] for a in range(3)]
    expected = {  # (x on the picture: columns reversed, y: rows up), mm from the panel's corner
        "axial": ((shape[0] - 1 - ras[0] + 0.5) * 2.0, (ras[1] + 0.5) * 2.0),
        "coronal": ((shape[0] - 1 - ras[0] + 0.5) * 2.0, (ras[2] + 0.5) * 3.0),
        "sagittal": ((shape[1] - 1 - ras[1] + 0.5) * 2.0, (ras[2] + 0.5) * 3.0),
    }
    for name, (x, y) in expected.items():
        (marker,) = axes[name].lines
        np.testing.assert_allclose(np.ravel(marker.get_data()), [x, y])
        texts = {t.get_text(): t.get_position() for t in axes[name].texts}
        left = min(texts, key=lambda k: texts[k][0])
        assert left == {"axial": "R", "coronal": "R", "sagittal": "A"}[name]
    # the slice shown is where the map is highest: the heat is 1 at the marked pixel
    image = axes["axial"].images[1].get_array()
    assert image.max() == 1.0


def test_one_slice_volume_shows_one_panel_and_flat_map_says_no_peak(tmp_path):
    shape = (64, 48, 1)
    space = Space(shape, np.diag([1.0, 1.0, 3.0, 1.0]))
    scan = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    heat = np.zeros(shape, np.float32)
    heat[40, 10, 0] = 2.0
    axes = _panels(slices_figure(scan, heat, space))
    assert set(axes) == {"axial", "colour bar"}  # coronal and sagittal cuts would be lines
    height = axes["axial"].get_position().height
    assert height > 0.5
    flat = slices_figure(scan, np.zeros(shape, np.float32), space, title="flat")
    assert any("no peak" in t.get_text() for t in flat.texts)
    assert not any("no peak" in t.get_text() for t in slices_figure(scan, heat, space).texts)
    assert not any(line.get_visible() for line in _panels(flat)["axial"].lines)  # nothing to mark
    path = save_slices(tmp_path / "flat.png", scan, np.zeros(shape, np.float32), space, title="flat")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_map_gives_the_same_picture_as_the_whole_map():
    scan_space = Space((50, 44, 36), np.diag([-1.2, 1.1, 1.5, 1.0]) @ np.eye(4))
    input_space = Space((24, 24, 24), np.diag([2.0, 2.0, 2.0, 1.0]) @ np.eye(4))
    grid = feature_space(input_space, (3, 3, 3))
    heat = Heatmap(np.random.default_rng(2).random((3, 3, 3)).astype(np.float32), grid, "hirescam", "layer", 0)
    view = ScanGridMap(heat, scan_space)
    assert not view.dense
    scan = np.random.default_rng(3).normal(size=scan_space.shape).astype(np.float32)
    whole = view.to_heatmap().data
    sampled, full = _panels(slices_figure(scan, view, scan_space)), _panels(slices_figure(scan, whole, scan_space))
    for name in ("axial", "coronal", "sagittal"):
        np.testing.assert_allclose(sampled[name].images[1].get_array(), full[name].images[1].get_array(), atol=1e-6)
        np.testing.assert_array_equal(sampled[name].lines[0].get_data(), full[name].lines[0].get_data())


def test_default_window_is_read_from_a_subsample():
    ct = np.full((80, 80, 80), -1000.0, np.float32)
    ct[20:60, 20:60, 20:60] = 40
    assert default_window(ct) == (-160.0, 240.0)
    mr = np.zeros((80, 80, 80), np.float32)
    mr[10:70, 10:70, 10:70] = np.random.default_rng(4).uniform(100, 200, (60, 60, 60))
    low, high = default_window(mr, max_voxels=10_000)
    assert 100 <= low < 110 and 190 < high <= 200


def test_one_painter_repaints_many_maps_as_single_pictures_would():
    from medcam3d.jobs.report import SlicePainter

    shape = (30, 26, 20)
    space = Space(shape, np.diag([-1.5, 1.0, 2.0, 1.0]))
    scan = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    maps = [np.zeros(shape, np.float32) for _ in range(3)]
    maps[0][4, 5, 6] = 1.0
    maps[2][20, 10, 3] = 3.0  # maps[1] is flat
    painter = SlicePainter(scan, space)
    for heat in maps:
        again = _panels(painter.paint(heat, title="t"))
        alone = _panels(slices_figure(scan, heat, space, title="t"))
        for name in ("axial", "coronal", "sagittal"):
            for a, b in zip(again[name].images, alone[name].images):
                np.testing.assert_array_equal(a.get_array(), b.get_array())
            assert again[name].lines[0].get_visible() == alone[name].lines[0].get_visible()
            if alone[name].lines[0].get_visible():
                np.testing.assert_array_equal(again[name].lines[0].get_data(), alone[name].lines[0].get_data())
