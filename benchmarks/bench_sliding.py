"""Sliding-window explanation of a whole-body-sized volume on the CPU: time and peak memory.

Explains a 512×512×300 volume with the demo model (64³ input) through 64³ windows and reports wall
time and peak RSS growth (VmHWM − RSS before the run, after a warm-up), against the 4 GB target.

    python benchmarks/bench_sliding.py [--shape 512 512 300] [--sw-batch 4] [--overlap 0.25]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import medcam3d
from medcam3d.config import load_config
from medcam3d.models import load_model
from medcam3d.sliding import explain_sliding_window

ROOT = Path(__file__).resolve().parent.parent


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--sw-batch", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "configs" / "demo.yaml")
    explainer = medcam3d.Explainer(load_model(config), "hirescam", class_names=config.class_names)
    explain_sliding_window(explainer, torch.rand(1, 1, 128, 64, 64), "all", roi_size=64)  # warm-up
    x = torch.rand(1, 1, *args.shape)
    baseline = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    started = time.perf_counter()
    result = explain_sliding_window(explainer, x, "all", roi_size=64, overlap=args.overlap, sw_batch_size=args.sw_batch)
    seconds = time.perf_counter() - started
    peak = rss_mib("VmHWM") - baseline
    print(f"volume {tuple(args.shape)} (input {x.numel() * 4 / 2**20:.0f} MiB), windows 64^3, overlap {args.overlap}, "
          f"sw_batch {args.sw_batch}: {seconds:.1f} s, peak RSS growth {peak:.0f} MiB (target < 4096 MiB), "
          f"maps {tuple(result.maps.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
