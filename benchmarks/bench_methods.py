"""Cost of every method (all classes at once) relative to plain inference, on the CPU.

Each (network, workload) runs in a fresh subprocess, as in ``bench_explainers.py``: warm-up on a
smaller input, then one cold run for the peak resident memory (growth over the RSS before it), then
``--repeats`` timed runs (median). Ratios are against ``torch.no_grad()`` inference measured the
same way in the same run.

    python benchmarks/bench_methods.py [--networks demo,densenet121] [--threads 2] [--repeats 1]

Networks: ``demo`` (the shipped demo DenseNet, 64³, 2 classes, ``data_samples/demo_model_weak.pt``)
and ``densenet121`` (MONAI DenseNet121, 96³, 14 classes, random weights). On the larger network the
methods whose cost is a number of passes run reduced (occlusion: 27 patch positions; SmoothGrad and
Integrated Gradients: 2 samples/steps), and the time of their defaults (3375 positions, 16
samples/steps) is extrapolated from the measured time per pass (the note column). Their memory does
not depend on that number (passes run ``batch_size`` at a time).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NETWORKS = {
    # name: (constructor, input edge, classes)
    "demo": ("demo", 64, 2),
    "densenet121": ("DenseNet121(spatial_dims=3, in_channels=1, out_channels=14)", 96, 14),
}
WORKLOADS = ["inference", "hirescam", "fused", "gradxinput", "smoothgrad", "integrated_gradients", "scorecam", "occlusion"]
#: On the larger network: (reduced method, its passes, the default's passes); the occlusion grid is set below.
REDUCED = {
    "smoothgrad": ("smoothgrad(samples=2)", 2, 16),
    "integrated_gradients": ("integrated_gradients(steps=2, tolerance=1e9)", 2, 16),
    "occlusion": ("occlusion", 27, 3375),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _model(network: str):
    import torch

    constructor = NETWORKS[network][0]
    if constructor == "demo":
        sys.path.insert(0, str(ROOT))
        from medcam3d.demo import train

        model = train.build_model()
        model.load_state_dict(torch.load(ROOT / "data_samples" / "demo_model_weak.pt", weights_only=True))
        return model.eval()
    from monai.networks.nets import DenseNet121  # noqa: F401  (used by eval)

    torch.manual_seed(0)
    return eval(constructor).eval()  # noqa: S307  (constant expressions above)


def run_one(network: str, workload: str, repeats: int, threads: int, patches: int) -> dict:
    """Body of one subprocess: median seconds, peak RSS growth (MiB) and what the method reports."""
    import torch

    sys.path.insert(0, str(ROOT))
    import medcam3d
    from medcam3d.methods import Occlusion

    torch.set_num_threads(threads)
    model = _model(network)
    _, size, _ = NETWORKS[network]
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    info: dict = {}
    if workload == "inference":
        def job():
            with torch.no_grad():
                return model(x)
    else:
        method: object = workload
        if network != "demo" and workload in REDUCED:
            method, info["passes"], info["default_passes"] = REDUCED[workload]
            if workload == "occlusion":
                edge = round(patches ** (1 / 3))
                method = Occlusion(patch=size // edge, stride=size // edge)
                info["passes"] = edge**3
        explainer = medcam3d.Explainer(model, method=method)

        def job():
            result = explainer(x, target="all")
            info["forwards"] = result.diagnostics.get("forwards")
            return result.maps

    full = x
    x = torch.randn(1, 1, size * 2 // 3, size * 2 // 3, size * 2 // 3)
    if workload not in ("occlusion", "smoothgrad", "integrated_gradients"):  # warm-up; the slow ones warm up in their first chunk
        job()
    x = full
    gc.collect()
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    started = time.perf_counter()
    job()
    cold = time.perf_counter() - started
    peak = _rss_kib("VmHWM") - baseline
    times = [cold]
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        times.append(time.perf_counter() - started)
    warm = times[1:] or times
    return {"seconds": statistics.median(warm), "peak_mib": peak / 1024, **info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions after the cold run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--occlusion-patches", type=int, default=27,
                        help="patch positions of the reduced occlusion run on the larger network (a cube)")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_one(*args._child, args.repeats, args.threads, args.occlusion_patches)))
        return 0

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, repeats={args.repeats} (+1 cold run for memory)")
    for network in args.networks.split(","):
        _, size, classes = NETWORKS[network]
        results = {}
        for workload in ["inference", *[w for w in args.workloads.split(",") if w != "inference"]]:
            command = [sys.executable, __file__, "--_child", network, workload, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--occlusion-patches", str(args.occlusion_patches)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[workload] = json.loads(output.strip().splitlines()[-1])
            print(f"  {network} {workload}: {results[workload]}", flush=True)
        reference = results["inference"]
        print(f"\n{network} 3D, input 1x1x{size}^3, all {classes} classes")
        print(f"{'workload':<22}{'time s':>9}{'time / inf':>12}{'peak MiB':>10}{'mem / inf':>11}  note")
        for workload, measured in results.items():
            note = ""
            if "passes" in measured:  # extrapolate: the clean (and baseline) inferences, plus time per pass
                fixed = reference["seconds"] * (1 if workload == "occlusion" else 2 if workload != "smoothgrad" else 1)
                per = max(measured["seconds"] - fixed, 0.0) / measured["passes"]
                default = fixed + per * measured["default_passes"]
                note = (f"{measured['passes']} passes measured; default {measured['default_passes']} passes ~ "
                        f"{default:.0f} s = {default / reference['seconds']:.0f}x inference")
            print(f"{workload:<22}{measured['seconds']:>9.3f}{measured['seconds'] / reference['seconds']:>12.2f}"
                  f"{measured['peak_mib']:>10.0f}{measured['peak_mib'] / max(reference['peak_mib'], 1e-9):>11.2f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
