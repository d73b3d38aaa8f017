"""The napari plugin's service and its work off the UI thread (issues 22 and 24).

- the Explain service (:mod:`medcam3d.napari._service`) needs no Qt, and preprocesses a scan as the
  CLI and :meth:`medcam3d.Explainer.preprocess` do (a MONAI bundle's own chain included);
- a large scan is read in a worker thread: the reader returns at once, the layer comes when read,
  *Cancel* leaves no layer, a reading error is a notification.

Timings are in ``benchmarks/bench_napari.py``, not here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from medcam3d import io  # noqa: E402
from medcam3d.errors import InputError  # noqa: E402
from medcam3d.napari import _reader, _workers  # noqa: E402
from medcam3d.napari._reader import read_image  # noqa: E402
from medcam3d.napari._models import candidate_layers  # noqa: E402
from medcam3d.napari._service import explain_image  # noqa: E402
from _images import oblique_lpi_affine, planted_scan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCAN = ROOT / "data_samples" / "case_01.nii.gz"
CONFIG = ROOT / "configs" / "demo.yaml"

NO_QT = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "napari._qt", "napari.qt")


class NoQt(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"Qt is blocked in this test: {name}")
        return None


sys.meta_path.insert(0, NoQt())
"""


def test_the_service_imports_and_explains_without_qt():
    """The Explain service (model cache, explain, mask and segment steps) runs where Qt cannot be imported."""
    code = NO_QT + textwrap.dedent(f"""
        import medcam3d.napari._masking as masking
        import medcam3d.napari._service as service
        from medcam3d.napari._reader import read_image

        [(data, kwargs, kind)] = read_image({str(SCAN)!r})
        meta = kwargs["metadata"]
        layers = service.explain_image(data, meta["affine"], {str(CONFIG)!r}, name="case_01", metadata=meta, target=0)
        [(heat, options, _)] = [layer for layer in layers if layer[2] == "image"]
        mask = masking.mask_from_heatmap(heat, options["metadata"]["affine"], metadata=options["metadata"])
        labels = masking.segment_from_heatmap(data, meta["affine"], heat, options["metadata"]["affine"],
                                              metadata=options["metadata"], scan_metadata=meta)
        blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("qtpy", "PyQt6", "PyQt5", "superqt", "magicgui"))
        print("ok", kind, mask[0][2], labels[0][2], blocked)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:4] == ["ok", "image", "labels", "labels"] and done.stdout.strip().endswith("[]")
    # the check itself fails when Qt is imported
    failing = subprocess.run([sys.executable, "-c", NO_QT + "import medcam3d.napari._widget"], capture_output=True,
                             text=True, timeout=300)
    assert failing.returncode != 0 and "Qt is blocked" in failing.stderr


# ----------------------------------------------------------------------------- a bundle's own preprocessing

@pytest.fixture
def bundle_case(tmp_path):
    from test_bundles import write_bundle

    write_bundle(tmp_path / "bundle")
    (tmp_path / "run.yaml").write_text("model: {bundle: bundle}\n")
    affine = oblique_lpi_affine()
    image, _ = planted_scan((30, 26, 12), affine, centre_mm=(50.0, -45.0, 30.0))
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), scan)
    return tmp_path / "run.yaml", scan


def test_napari_preprocesses_with_a_bundles_own_chain_as_the_cli_does(bundle_case):
    """A bundle config without a preprocessing list: the bundle's chain (16^3), not the default transforms (30x26x12)."""
    from medcam3d import Explainer

    config, scan = bundle_case
    expected, _ = Explainer.from_config(config, trust=True).preprocess(scan)
    assert tuple(expected.shape) == (1, 16, 16, 16)
    [(data, kwargs, _)] = read_image(str(scan))
    meta = kwargs["metadata"]
    layers = explain_image(data, meta["affine"], config, name="scan", metadata=meta, trust=True)
    heats = [options["metadata"] for _, options, kind in layers if kind == "image"]
    assert [m["class"] for m in heats] == ["bright", "dark"]  # the bundle's class names
    assert all(m["input_shape"] == tuple(expected.shape) for m in heats)
    assert candidate_layers(data, meta["affine"], config, trust=True, metadata=meta)  # listed on the bundle's input
    # the feature grid lies where the bundle's input does: its corners inside the input's box
    feature = heats[0]
    corner = feature["feature_affine"] @ [0, 0, 0, 1]
    inside = np.linalg.solve(np.asarray(expected.affine, dtype=np.float64), corner)[:3]
    assert np.all(inside > -1) and np.all(inside < 16)
    # a layer without its file cannot go through the bundle's chain: said in one line
    with pytest.raises(InputError, match="MONAI bundle whose own preprocessing reads the scan's file"):
        explain_image(np.asarray(data[0]), meta["affine"], config, name="scan", metadata={}, trust=True)


# ----------------------------------------------------------------------------- DICOM window tags

def test_a_dicom_series_opens_in_its_own_window(tmp_path):
    """WindowCenter/WindowWidth (a lung window here) are the initial contrast limits; without them, the CT window."""
    import SimpleITK as sitk

    from medcam3d.napari._scan import CT_WINDOW
    from _images import write_dicom_series

    rng = np.random.default_rng(0)
    voxels = np.where(rng.random((6, 20, 24)) < 0.5, -1000, 40).astype(np.int16)  # (k, j, i): air and tissue
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.8, 0.8, 2.5))
    write_dicom_series(image, tmp_path / "lung", tags={"0028|1050": "-600\\-500", "0028|1051": "1500\\1400"})
    write_dicom_series(image, tmp_path / "plain")
    [(_, kwargs, _)] = read_image(str(tmp_path / "lung"))
    assert tuple(kwargs["contrast_limits"]) == (-1350.0, 150.0)  # the first of the two windows
    [(_, kwargs, _)] = read_image(str(tmp_path / "plain"))
    assert tuple(kwargs["contrast_limits"]) == CT_WINDOW
    assert _reader.dicom_window(tmp_path / "plain") is None


# ----------------------------------------------------------------------------- reading off the UI thread

def _opening():
    """The worker of the one background reading under way."""
    workers = [worker for worker in _workers.RUNNING if hasattr(worker, "panel")]
    assert len(workers) == 1, "one background reading"
    return workers[0]


def test_a_large_scan_is_read_in_the_background_with_progress(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    monkeypatch.setattr(_reader, "BACKGROUND_VOXELS", 1)  # case_01 counts as large
    added = viewer.open(str(SCAN), plugin="medcam3d")
    assert added == [] and len(viewer.layers) == 0  # the reader returned at once, nothing read yet
    worker = _opening()
    panel = "medcam3d: opening case_01.nii.gz"
    assert panel in viewer.window.dock_widgets  # progress and Cancel while it reads
    qtbot.waitUntil(lambda: len(viewer.layers) == 1 and worker not in _workers.RUNNING, timeout=60000)
    [layer] = viewer.layers
    monkeypatch.setattr(_reader, "BACKGROUND_VOXELS", 2**62)
    [(data, kwargs, _)] = read_image(str(SCAN))  # small: read at once, as before
    assert layer.name == kwargs["name"] == "case_01" and layer.data.shape == data.shape
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    np.testing.assert_allclose(layer.metadata["affine"], kwargs["metadata"]["affine"])
    assert tuple(layer.contrast_limits) == tuple(kwargs["contrast_limits"])
    assert worker.panel[1].max == _reader.STEPS_PER_FILE  # reading (in slabs), then placing: nine tenths read
    assert worker.panel[1].value == _reader.STEPS_PER_FILE * 9 // 10
    assert panel not in viewer.window.dock_widgets  # the panel went away


def test_cancel_leaves_no_layer_and_errors_are_notifications(make_napari_viewer, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    messages: list[str] = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    viewer = make_napari_viewer()
    monkeypatch.setattr(_reader, "BACKGROUND_VOXELS", 1)
    monkeypatch.setattr(_reader, "READ_SLAB_VOXELS", 1)  # one k slice per slab
    slabs: list[tuple[int, int]] = []
    cancelled = threading.Event()
    real_read = io.read_in_slabs

    def watched(*args, **kwargs):  # the real slab reader; the test presses Cancel after its first slab
        reading = real_read(*args, **kwargs)
        while True:
            try:
                slab = next(reading)
            except StopIteration as end:
                return end.value
            slabs.append(slab)
            if len(slabs) == 1:
                cancelled.wait(30)
            yield slab

    monkeypatch.setattr(io, "read_in_slabs", watched)
    viewer.open(str(SCAN), plugin="medcam3d")
    worker = _opening()
    qtbot.waitUntil(lambda: len(slabs) == 1, timeout=60000)
    worker.panel[2].native.click()  # Cancel, while the file is being read
    cancelled.set()
    qtbot.waitUntil(lambda: worker not in _workers.RUNNING, timeout=60000)
    qtbot.wait(50)
    depth = nib.load(SCAN).shape[2]
    assert depth > 2 and slabs == [(1, depth)]  # the reading stopped after its first slice, not at the last
    assert len(viewer.layers) == 0
    assert any("cancelled, case_01.nii.gz was not opened" in m for m in messages)

    def broken(*args, **kwargs):
        raise io.ImageReadError("case_01.nii.gz: broken on purpose")

    monkeypatch.setattr(io, "read_in_slabs", broken)
    assert viewer.open(str(SCAN), plugin="medcam3d") == []
    qtbot.waitUntil(lambda: not [worker for worker in _workers.RUNNING if hasattr(worker, "panel")], timeout=60000)
    qtbot.waitUntil(lambda: any("could not open" in m for m in messages), timeout=10000)
    assert len(viewer.layers) == 0
    assert any("could not open case_01.nii.gz" in m and "broken on purpose" in m and "Traceback" not in m
               for m in messages)


def test_a_nifti_file_is_read_slab_by_slab_as_read_reads_it(tmp_path):
    """io.read_in_slabs: read's array and grid, slab by slab (progress between slabs); closed early, it reads no more."""
    expected, space = io.read(SCAN, dtype=None)
    reading = io.read_in_slabs(SCAN, dtype=None, slab_voxels=3 * expected.shape[0] * expected.shape[1])
    progress = []
    while True:
        try:
            progress.append(next(reading))
        except StopIteration as end:
            array, read_space = end.value
            break
    depth = expected.shape[2]
    assert progress == [(min(depth, k), depth) for k in range(3, depth + 3, 3)]  # three slices a slab
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_allclose(read_space.affine, space.affine)
    scaled = tmp_path / "scaled.nii.gz"  # stored int16 with a slope: float, as read gives it
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    image.header.set_slope_inter(0.5, -3.0)
    nib.save(image, scaled)
    whole = io.read(scaled, dtype=None)[0]
    slabbed = _run(io.read_in_slabs(scaled, dtype=None, slab_voxels=1))[0]
    assert slabbed.dtype == whole.dtype and whole.dtype.kind == "f"
    np.testing.assert_array_equal(slabbed, whole)
    stopped = io.read_in_slabs(SCAN, dtype=None, slab_voxels=1)
    assert next(stopped) == (1, depth)
    stopped.close()  # what a cancelled worker does: no more slabs are read
    with pytest.raises(StopIteration):
        next(stopped)


def _run(steps):
    """A generator's return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value
