"""Benchmark: the napari plugin on a CT-sized oblique scan (issue 22).

A 512 x 512 x 300 int16 CT, tilted 25 degrees about R and 25 degrees about A, with voxels of
0.7 x 0.7 x 2.5 mm (``--make`` writes one with nibabel; ``--scan`` takes another file), is opened
in a real napari viewer (under Xvfb when there is no display) through the medcam3d reader, then
explained with the Explain widget (default: the shipped demo config), thresholded into a mask and
segmented, then shown in 3D. Printed for each step:

- **time** (wall clock, and the process's CPU time, all threads: on a shared machine the CPU time
  is the steadier number): open = until the first slice is drawn (the reader hands the file to a
  worker thread, which reads it and builds the lazy pyramid; the layer is added and one slice drawn);
  explain = from *Explain* until its layers are added; threshold = *Threshold to mask* (in a worker
  thread) until its layers are added;
  segment = *Segment* (in a worker thread) until its layers are added;
  3D = switching to the 3D display and drawing it;
- **stall**: the longest time the Qt event loop did not run during the step, measured with a
  ``QTimer`` heartbeat every 50 ms (what a user feels as a frozen window);
- **peak RSS**: the process's peak resident memory during the step (``VmHWM``, reset before
  each step through ``/proc/self/clear_refs``), and its growth over the resident memory before
  the scan was opened (torch, napari and Qt already imported), against the scan's float32 size;
- **layers**: the bytes held by each layer's data (what napari keeps per heatmap).

Usage::

    python benchmarks/bench_napari.py [--scan CT.nii.gz] [--config configs/demo.yaml] [--no-3d] [--json out.json]
                                      [--screenshots docs]     # also docs/napari_ct_2d.png, napari_ct_3d.png
    python benchmarks/bench_napari.py --make CT.nii.gz [--shape 256x256x150]   # only write the synthetic CT
    python benchmarks/bench_napari.py --scan CT.nii.gz --steps open             # time the opening alone

Runs itself under ``xvfb-run -a`` when ``DISPLAY`` is not set. Without ``--scan`` the CT is made
in a temporary folder first (about half a minute), in a subprocess so that its memory does not
count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("open", "explain", "threshold", "3D")  # threshold: Threshold to mask, then Segment
SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 2.5)
TILT = (25.0, 25.0)  # degrees about R, then about A


# ------------------------------------------------------------------ the synthetic CT
def ct_affine(shape=SHAPE, spacing=SPACING, tilt=TILT) -> np.ndarray:
    """Voxel -> RAS mm of the benchmark CT: stored L-P-S like a DICOM-derived NIfTI, tilted, centred on 0."""
    a, b = np.radians(tilt)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    linear = rx @ ry @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def make_ct(path: Path, shape=SHAPE, seed: int = 0) -> Path:
    """Write a CT-like int16 volume in HU: air, an elliptic body along S with lungs, spine and two lesions.

    Drawn slice by slice in world coordinates (the body follows the world S axis, so the tilt shows).
    The lesions (a bright sphere and a dark elongated ellipsoid) lie near the centre, where the
    demo model looks.
    """
    import nibabel as nib

    affine = ct_affine(shape)
    rng = np.random.default_rng(seed)
    volume = np.empty(shape, dtype=np.int16)
    i, j = np.meshgrid(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32), indexing="ij")
    for k in range(shape[2]):
        x, y, z = (affine[r, 0] * i + affine[r, 1] * j + affine[r, 2] * k + affine[r, 3] for r in range(3))
        hu = np.full(i.shape, -1000.0, dtype=np.float32)
        body = (x / 150.0) ** 2 + (y / 105.0) ** 2 < 1.0
        hu[body] = 40.0
        hu[body & ((x / 150.0) ** 2 + (y / 105.0) ** 2 > 0.88)] = -90.0  # fat rim
        for side in (-1.0, 1.0):
            lung = ((x - side * 65.0) / 50.0) ** 2 + ((y - 5.0) / 65.0) ** 2 + (z / 260.0) ** 2 < 1.0
            hu[lung & body] = -850.0
        hu[(x ** 2 + (y + 75.0) ** 2 < 16.0 ** 2) & body] = 650.0  # spine
        hu[(x - 10.0) ** 2 + (y - 35.0) ** 2 + (z - 10.0) ** 2 < 12.0 ** 2] = 180.0  # bright round lesion
        hu[((x + 25.0) / 8.0) ** 2 + ((y - 30.0) / 8.0) ** 2 + ((z + 15.0) / 26.0) ** 2 < 1.0] = -60.0  # dark, long
        hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
        volume[:, :, k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


# ------------------------------------------------------------------ measuring
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not Linux: the peak is the process's
        pass


class Heartbeat:
    """A 50 ms QTimer that records the longest gap between its ticks (a stalled event loop)."""

    def __init__(self, interval_ms: int = 50) -> None:
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000.0
        self.last = time.perf_counter()
        self.longest = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.longest = 0.0


def _pump(app, seconds: float = 0.2) -> None:
    """Run the Qt event loop for ``seconds`` (lets the heartbeat tick and napari draw)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def _wait(app, done, limit: float = 3600.0) -> None:
    end = time.perf_counter() + limit
    while not done() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)
    if not done():
        raise TimeoutError("step did not finish")


def _layer_bytes(layer) -> int:
    from medcam3d.napari._lazy import source_of

    data = layer.data
    lazy = source_of(data)
    if lazy is not None:  # an oblique scan shown lazily: it holds the file's voxels only
        return int(lazy[0].nbytes)
    if isinstance(data, (list, tuple)):  # multiscale or shapes
        return int(sum(getattr(level, "nbytes", 0) for level in data))
    nbytes = getattr(data, "nbytes", None)
    held = getattr(data, "held_nbytes", None)  # a lazy view says what it holds
    return int(held if held is not None else (nbytes or 0))


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels)[..., :3]).save(path)
    print(f"screenshot {path}")


def run(scan: Path, config: Path, three_d: bool, screenshots: Path | None = None, steps: tuple[str, ...] = STEPS) -> dict:
    import torch  # noqa: F401  imported before the baseline: the explanation needs it anyway
    import monai  # noqa: F401
    import napari
    from qtpy.QtWidgets import QApplication

    from medcam3d.napari._widget import ExplainWidget

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    viewer.window._qt_window.grab()  # the first screenshot of a fresh window is black otherwise
    beat = Heartbeat()
    _pump(app, 0.5)
    baseline_kib = _status_kib("VmRSS")
    import nibabel as nib

    scan_shape = nib.load(str(scan)).shape
    scan_f32 = int(np.prod(scan_shape)) * 4
    results: dict = {"scan": str(scan), "scan_shape": list(scan_shape), "scan_float32_mb": scan_f32 / 2**20,
                     "baseline_rss_mb": baseline_kib / 1024, "steps": {}}

    def step(name: str, action, done=None, after=None) -> None:
        _reset_peak()
        beat.reset()
        start, cpu = time.perf_counter(), time.process_time()
        action()
        if done is not None:
            _wait(app, done)
        if after is not None:
            after()
        app.processEvents()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        _pump(app, 0.3)  # the heartbeat sees the end of a stall
        peak = _status_kib("VmHWM")
        results["steps"][name] = {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "stall_s": round(beat.longest, 2),
                                  "peak_rss_mb": round(peak / 1024, 1),
                                  "peak_growth_mb": round((peak - baseline_kib) / 1024, 1),
                                  "growth_vs_scan_f32": round((peak - baseline_kib) * 1024 / scan_f32, 2)}
        print(f"{name:>10}: {seconds:7.2f} s ({cpu:6.2f} s CPU), longest UI stall {beat.longest:6.2f} s, peak RSS {peak / 1024:7.0f} MB "
              f"(+{(peak - baseline_kib) / 1024:.0f} MB = {(peak - baseline_kib) * 1024 / scan_f32:.2f} x the scan's "
              f"float32 {scan_f32 / 2**20:.0f} MB)", flush=True)

    def first_slice() -> None:
        viewer.screenshot(canvas_only=True, flash=False)  # the first slice, drawn

    step("open", lambda: viewer.open(str(scan), plugin="medcam3d"), lambda: len(viewer.layers) > 0, first_slice)
    scan_layer = viewer.layers[-1]
    results["scan_layer"] = {"data_shape": list(np.shape(scan_layer.data[0] if scan_layer.multiscale else scan_layer.data)),
                             "multiscale": bool(scan_layer.multiscale), "mb": _layer_bytes(scan_layer) / 2**20,
                             "contrast_limits": [float(v) for v in scan_layer.contrast_limits]}
    if "explain" not in steps:  # only the opening (e.g. to compare two versions of the reader)
        print(f"scan layer: data {results['scan_layer']['data_shape']}, holds {results['scan_layer']['mb']:.0f} MB")
        viewer.close()
        return results
    widget.reset_choices()
    widget.image_layer.value = scan_layer
    shown = Path(os.path.relpath(config, Path.cwd())) if Path(config).is_absolute() else Path(config)
    widget.config.value = str(shown if not str(shown).startswith("..") else config)  # as a user types it
    _wait(app, lambda: not widget.busy)  # the target layers are listed
    finished: list = []

    def explain() -> None:
        worker = widget.run()
        worker.finished.connect(lambda: finished.append(True))

    step("explain", explain, lambda: bool(finished))
    heatmaps = [layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]
    results["heatmap_layers"] = [{"name": layer.name, "data_shape": list(np.shape(layer.data)),
                                  "mb": _layer_bytes(layer) / 2**20} for layer in heatmaps]
    if heatmaps and "threshold" in steps:
        widget.heatmap.value = heatmaps[0]
        thresholded: list = []

        def threshold() -> None:  # in a worker: its end is when the mask layer is added
            worker = widget.make_mask()
            worker.finished.connect(lambda: thresholded.append(True))

        step("threshold", threshold, lambda: bool(thresholded))
        segmented: list = []

        def segment() -> None:
            worker = widget.make_segmentation()
            worker.finished.connect(lambda: segmented.append(True))

        step("segment", segment, lambda: bool(segmented))
    results["layers"] = {layer.name: round(_layer_bytes(layer) / 2**20, 2) for layer in viewer.layers}
    if screenshots is not None and heatmaps:  # axial through the first map's peak, the masks hidden
        for layer in viewer.layers:
            if (layer.metadata or {}).get("medcam3d") == "mask":
                layer.visible = False
        viewer.window.resize(1500, 950)
        peak = heatmaps[0].metadata.get("peak_mm")
        if peak is not None:
            viewer.dims.set_point(2, peak[2])
        viewer.layers.selection.active = heatmaps[0]
        _pump(app, 0.5)
        viewer.reset_view()
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # they would cover the scale bar
            toast.close()
        _pump(app, 0.3)
        _save_png(screenshots / "napari_ct_2d.png", viewer.screenshot(canvas_only=False, flash=False))
    if three_d and "3D" in steps:
        def show_3d() -> None:
            viewer.dims.ndisplay = 3
            viewer.screenshot(canvas_only=True, flash=False)

        step("3D", show_3d)
        if screenshots is not None:
            viewer.scene.camera.angles = (-15, 30, 150)
            _pump(app, 0.5)
            _save_png(screenshots / "napari_ct_3d.png", viewer.screenshot(canvas_only=True, flash=False))
    for row in results["heatmap_layers"]:
        print(f"heatmap layer {row['name']!r}: data {row['data_shape']}, {row['mb']:.2f} MB")
    print(f"scan layer: data {results['scan_layer']['data_shape']}, holds {results['scan_layer']['mb']:.0f} MB, "
          f"multiscale {results['scan_layer']['multiscale']}, window {results['scan_layer']['contrast_limits']}")
    widget.close_workers(wait_ms=10_000)
    viewer.close()
    return results


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"--shape takes three sizes of at least 8 voxels like 512x512x300, not {text!r}")
    return shape[0], shape[1], shape[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, help="a CT to open (default: make the synthetic oblique CT)")
    parser.add_argument("--make", type=Path, help="only write the synthetic CT to this path")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--no-3d", dest="three_d", action="store_false", help="skip the 3D display step")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--screenshots", type=Path, help="save napari_ct_2d.png / napari_ct_3d.png in this folder")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, in this order: {','.join(STEPS)} (threshold runs Threshold "
                             "then Segment; e.g. --steps open to time the opening alone)")
    parser.add_argument("--shape", default="x".join(map(str, SHAPE)),
                        help="with --make: the synthetic CT's voxels, e.g. 256x256x150 to iterate faster")
    args = parser.parse_args(argv)
    if args.make is not None:
        started = time.perf_counter()
        try:
            shape = _shape(args.shape)
        except ValueError as error:
            parser.error(str(error))
        make_ct(args.make, shape=shape)
        print(f"wrote {args.make} in {time.perf_counter() - started:.1f} s")
        return 0
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1200x24", sys.executable, *sys.argv]
        return subprocess.call(command)
    with tempfile.TemporaryDirectory(prefix="bench_napari_") as folder:
        scan = args.scan
        if scan is None:
            scan = Path(folder) / "ct_oblique_512x512x300.nii.gz"
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make", str(scan)], check=True)
            print(f"(synthetic CT made in {time.perf_counter() - started:.1f} s)")
        steps = tuple(name.strip() for name in args.steps.split(",") if name.strip())
        unknown = sorted(set(steps) - set(STEPS))
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
        results = run(scan, args.config, args.three_d, args.screenshots, steps)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["steps"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
