"""Explainer cost relative to plain inference, and against MONAI's GradCAM.

Each configuration runs in a fresh subprocess (so that peak memory is its own):
the model and input are built, the workload runs once on a smaller input (warm-up:
first-use costs), the resident memory is recorded and the peak counter reset,
the workload runs once (peak RSS growth over that baseline = memory), then
``--repeats`` more times (median wall time = time). Ratios are against plain
``torch.no_grad()`` inference measured the same way in the same run.

    python benchmarks/bench_explainers.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

NETWORKS = {
    # name: (constructor expression, input size, layer for MONAI's GradCAM)
    "densenet121": ("DenseNet121(spatial_dims=3, in_channels=1, out_channels=14)", 96, "class_layers.relu"),
    "resnet18": ("resnet18(spatial_dims=3, n_input_channels=1, num_classes=14)", 128, "layer4"),
}
WORKLOADS = ["inference"] + [f"{lib}-{m}-{n}" for lib in ("medcam3d", "monai") for m in ("gradcam", "hirescam") for n in (1, 14)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_one(network: str, workload: str, repeats: int, threads: int) -> dict:
    """Body of one subprocess: returns median seconds and peak RSS growth (MiB)."""
    import torch
    from monai.networks.nets import DenseNet121, resnet18  # noqa: F401  (used by eval)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    expression, size, monai_layer = NETWORKS[network]
    model = eval(expression).eval()  # noqa: S307  (constant expressions above)
    x = torch.randn(1, 1, size, size, size)

    if workload == "inference":
        def job():
            with torch.no_grad():
                return model(x)
    else:
        library, method, classes = workload.split("-")
        classes = int(classes)
        if library == "medcam3d":
            import medcam3d

            explainer = medcam3d.Explainer(model, method=method)
            target = "all" if classes == 14 else 3

            def job():
                return explainer(x, target=target).maps
        else:
            if method != "gradcam":
                return {"skipped": "MONAI has no HiResCAM"}
            from monai.visualize import GradCAM

            cam = GradCAM(nn_module=model, target_layers=monai_layer)

            def job():
                return [cam(x, class_idx=c) for c in range(classes)]

    # Warm-up on a smaller input, so that first-use costs (code pages, thread
    # pools, autograd/vmap set-up) are not counted as the workload's memory.
    full = x
    x = torch.randn(1, 1, size * 2 // 3, size * 2 // 3, size * 2 // 3)
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
    return {"seconds": statistics.median(warm), "peak_mib": peak / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after the cold run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip MONAI's 14-class loop (slow)")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_one(*args._child, args.repeats, args.threads)))
        return 0

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, repeats={args.repeats} (+1 cold run for memory)")
    for network in args.networks.split(","):
        size = NETWORKS[network][1]
        results = {}
        for workload in WORKLOADS:
            if args.quick and workload == "monai-gradcam-14":
                continue
            repeats = 1 if workload == "monai-gradcam-14" else args.repeats
            command = [sys.executable, __file__, "--_child", network, workload, "--repeats", str(repeats), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[workload] = json.loads(output.strip().splitlines()[-1])
        reference = results["inference"]
        print(f"\n{network} 3D, input 1x1x{size}^3, 14 classes")
        print(f"{'workload':<22}{'time s':>9}{'time / inf':>12}{'peak MiB':>10}{'mem / inf':>11}")
        for workload, measured in results.items():
            if "skipped" in measured:
                continue
            print(
                f"{workload:<22}{measured['seconds']:>9.3f}{measured['seconds'] / reference['seconds']:>12.2f}"
                f"{measured['peak_mib']:>10.0f}{measured['peak_mib'] / reference['peak_mib']:>11.2f}"
            )
        for method in ("gradcam", "hirescam"):
            ours = results[f"medcam3d-{method}-14"]["seconds"] / results[f"medcam3d-{method}-1"]["seconds"]
            print(f"medcam3d {method}: all 14 classes / one class = {ours:.2f}x time")
        for classes in (1, 14):
            monai = results.get(f"monai-gradcam-{classes}")
            if monai and "seconds" in monai:
                ours = results[f"medcam3d-gradcam-{classes}"]
                print(
                    f"gradcam, {classes:>2} class(es): MONAI / medcam3d = {monai['seconds'] / ours['seconds']:.1f}x time, "
                    f"{monai['peak_mib'] / ours['peak_mib']:.1f}x memory"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
