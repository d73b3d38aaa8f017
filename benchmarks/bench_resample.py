"""Benchmark: a feature map onto a large oblique scan grid, one step vs. the usual pipelines.

Configurations (each timed in a fresh subprocess, so that peak memory is its own):

- ``medcam3d``   : ``resample(feature, feature_space, scan_space)``, one trilinear step from the
                   feature grid straight onto the scan grid (chunked, float32).
- ``interp+res`` : ``F.interpolate(trilinear, align_corners=False)`` to the model input size
                   (256x256x200), then ``resample`` of that onto the scan grid ("upsample, then
                   invert the preprocessing").
- ``zoom3``      : ``scipy.ndimage.zoom(order=3)`` to the scan shape (pytorch-grad-cam's 3D path);
                   it ignores the affines, so its map is misplaced on an oblique scan.

Peak memory is the growth of the resident set during the call: the peak counter is reset
through ``/proc/self/clear_refs`` (Linux) just before, and ``VmHWM`` is read after.

Usage::

    python benchmarks/bench_resample.py [--scan 512 512 400] [--repeat 3] [--features 4 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import warnings

import numpy as np

# 12^3 features from a 256x256x200 input: stride 200/12 is fractional (expected here)
warnings.filterwarnings("ignore", message="input shape .* is not an integer multiple")

METHODS = ("medcam3d", "interp+res", "zoom3")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [deg_x, deg_y, deg_z], degrees=True).as_matrix()


def _spaces(scan_shape, fsize):
    """Oblique scan grid; RAS-aligned model input grid of half the size over the same field."""
    from medcam3d.space import Space, feature_space

    scan_spacing = np.array([0.8, 0.8, 1.0])
    a = np.eye(4)
    a[:3, :3] = _rotation(12.0, -8.0, 20.0) @ np.diag(scan_spacing)
    a[:3, 3] = -a[:3, :3] @ (np.array(scan_shape) / 2 - 0.5)  # centred on the world origin
    scan = Space(tuple(scan_shape), a)
    in_shape = tuple(int(n) // 2 for n in scan_shape)
    in_spacing = scan_spacing * np.array(scan_shape) / np.array(in_shape)
    b = np.diag([*in_spacing, 1.0])
    b[:3, 3] = -in_spacing * (np.array(in_shape) / 2 - 0.5)
    inp = Space(in_shape, b)
    return scan, inp, feature_space(inp, (fsize,) * 3)


def _run(method: str, feat: np.ndarray, scan, inp, fs) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from medcam3d.space import resample

    if method == "medcam3d":
        return resample(feat, fs, scan)
    if method == "interp+res":
        up = F.interpolate(
            torch.from_numpy(feat)[None, None], size=inp.shape, mode="trilinear", align_corners=False
        )[0, 0]
        return resample(up, inp, scan).numpy()
    if method == "zoom3":
        from scipy.ndimage import zoom

        return zoom(feat, np.array(scan.shape) / np.array(feat.shape), order=3)
    raise ValueError(method)


def worker(method: str, fsize: int, scan_shape, repeat: int) -> dict:
    import torch

    from medcam3d.space import Space, resample

    scan, inp, fs = _spaces(scan_shape, fsize)
    feat = np.random.default_rng(0).random((fsize,) * 3).astype(np.float32)
    # warm up kernels and allocator on a small grid
    resample(feat, fs, Space((8, 8, 8), scan.affine))
    times = []
    peak_mb = float("nan")
    for r in range(repeat):
        ok = _reset_peak()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = _run(method, feat, scan, inp, fs)
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak_mb = (_status_kb("VmHWM") - rss0) / 1024 if ok else float("nan")
        del out
    return {
        "method": method,
        "fsize": fsize,
        "time_s": min(times),
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def agreement(fsize: int, scan_shape) -> dict:
    """Mean |difference| of each pipeline from the one-step map (values in [0, 1]), and the
    fraction of voxels that differ by more than 0.01. ``interp+res`` interpolates twice, which
    rounds off the kinks of the piecewise-linear map (and its fill test rounds differently on
    the field-of-view edge); ``zoom3`` ignores the affines and so misplaces the map."""
    scan, inp, fs = _spaces(scan_shape, fsize)
    feat = np.random.default_rng(0).random((fsize,) * 3).astype(np.float32)
    ours = _run("medcam3d", feat, scan, inp, fs)
    res = {}
    for m in ("interp+res", "zoom3"):
        d = np.abs(_run(m, feat, scan, inp, fs) - ours)
        res[m] = (float(d.mean()), float((d > 0.01).mean()))
        del d
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, nargs=3, default=(512, 512, 400))
    ap.add_argument("--features", type=int, nargs="+", default=(4, 12))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--fsize", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "agreement":
        print(json.dumps(agreement(args.fsize, args.scan)))
        return
    if args.worker:
        repeat = 1 if args.worker == "zoom3" else args.repeat
        print(json.dumps(worker(args.worker, args.fsize, args.scan, repeat)))
        return

    def sub(name: str, fsize: int) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--fsize", str(fsize),
               "--scan", *map(str, args.scan), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    scan = "x".join(map(str, args.scan))
    print(f"feature map -> {scan} oblique scan grid, CPU, output float32 "
          f"({np.prod(args.scan) * 4 / 2**20:.0f} MB); best of {args.repeat} (zoom3: 1 run)")
    header = f"{'feature':>8} {'method':>11} {'time s':>8} {'x ours':>7} {'peak MB':>9} {'x ours':>7}"
    print(header)
    print("-" * len(header))
    for fsize in args.features:
        rows = [sub(m, fsize) for m in METHODS]
        base = rows[0]
        for r in rows:
            print(f"{str(fsize) + '^3':>8} {r['method']:>11} {r['time_s']:8.2f} "
                  f"{r['time_s'] / base['time_s']:7.2f} {r['peak_mb']:9.0f} "
                  f"{r['peak_mb'] / base['peak_mb']:7.2f}")
        if not args.no_agreement:
            agr = sub("agreement", fsize)
            for m, (mean, frac) in agr.items():
                print(f"{'':>8} |{m} - medcam3d|: mean {mean:.4f}, "
                      f"{100 * frac:.3f}% of voxels differ by > 0.01")
    print(f"torch threads: {rows[0]['threads']}")


if __name__ == "__main__":
    main()
