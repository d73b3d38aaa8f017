"""What the class maps add to MONAI inference: a SupervisedEvaluator with and without maps.

The same bundle evaluator (LoadImaged ... SupervisedEvaluator ... Activationsd) runs once with
MONAI's SimpleInferer ("plain") and once with medcam3d's HeatmapInferer ("maps", all classes) --
the two configurations that ``medcam3d.monai_example.write_bundle`` writes, which differ only in
the inferer and in one post-transform. Two kinds of "maps":

* ``maps``: the inferer only (the maps are computed and attached to the predictions);
* ``maps+save``: also SaveHeatmapsd, which resamples every class map onto the scan's grid and
  writes it next to the predictions (uint8 with scl_slope, its default; ``.nii.gz`` or ``.nii``);
* ``maps+save+bg``: the same with SaveHeatmapsd(background=True): the maps are written in a thread
  while the evaluator goes on (the time includes waiting for the last writes);
* ``maps+feat``: SaveHeatmapsd(grid="feature"): every class map on the target layer's grid with its
  exact affine (float32, a few kilobytes).

Models: the shipped demo model (configs/demo.yaml, data_samples/demo_model.pt, the six sample
scans) and MONAI DenseNet121 (14 classes, seeded random weights) on 96^3 inputs (synthetic 96^3
scans). Each configuration runs in a fresh subprocess (so that peak memory is its own): it builds
the evaluator, runs it once to warm up, then ``--runs`` times, timed; the time is the fastest run.
Processes alternate between configurations, ``--repeats`` times; the table shows the median.
Memory: peak RSS of the process (VmHWM; on a GPU: peak allocated CUDA memory) and the peak
growth during the timed runs over the RSS before them.

    python benchmarks/bench_monai_inference.py [--models demo densenet121] [--repeats 3] [--runs 2]
        [--threads 1] [--device cpu|cuda] [--save-ext .nii.gz|.nii]

Targets (issue 16): maps add <= 5 % wall time and <= 10 % peak memory to the evaluator.

Sliding windows on a segmentation network (issue 23), ``--scenario sliding``: MONAI's
``SlidingWindowInferer`` ("plain") against ``HeatmapInferer(roi_size=...)`` ("maps", every class)
on one ``--size``^3 volume through ``--roi``^3 windows (overlap 0.25, Gaussian blending) with a
small MONAI ``UNet`` (3 classes, channels 16-32-64-128, seeded random weights), in one process,
under ``torch.no_grad()`` as an evaluator runs them. After a warm-up of each, the two alternate
``--repeats`` times; the table gives each one's median and the ratio of the medians, and the
median of the per-repeat ratios. Target: <= 1.1x. ``--layer`` sets the target layer (``auto`` picks
``model.1``, the skip connection before the last up-sampling block): the backward runs from the output
back to that layer once per class, so its cost is what a layer closer to the output can cut.
Measured on 2 shared CPU cores, 1 thread, 128^3 volume, 64^3 windows: 2.6x CPU with ``auto``, 2.05x
with ``model.2.0`` (only the last 3->3 convolution left to differentiate): on this CPU build 3D
convolutions run PyTorch's ``slow_conv3d`` kernels and the input gradient of even that small
full-resolution convolution, for 3 classes, costs about half a forward pass of the whole network.

    python benchmarks/bench_monai_inference.py --scenario sliding [--size 256] [--roi 128] [--repeats 3]
        [--threads 2] [--device cpu|cuda] [--layer auto|model.2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("plain", "maps", "maps+save", "maps+save+bg", "maps+feat")


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


# ------------------------------------------------------------------------------------------ setup


def demo_bundle(folder: Path) -> Path:
    """The demo model as a bundle (network, weights, preprocessing and classes from configs/demo.yaml)."""
    import torch
    import yaml

    from medcam3d.monai_example import write_bundle

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    model = config["model"]
    network = {"_target_": model["network"], **model["args"]}
    weights = torch.load((ROOT / "configs" / model["weights"]).resolve(), map_location="cpu", weights_only=True)
    preprocessing = [{"_target_": f"{t['name']}d", "keys": "image", **{k: v for k, v in t.items() if k != "name"}}
                     for t in config["preprocessing"]]
    write_bundle(folder, network, weights, preprocessing, config["class_names"], input_shape=(64, 64, 64),
                 batch_size=1, inferer_args={"placement": config.get("placement", "receptive_field")})
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for scan in sorted((ROOT / "data_samples").glob("case_0?.nii.gz")):
        shutil.copy(scan, data / scan.name)
    return folder


def densenet121_bundle(folder: Path, scans: int = 4) -> Path:
    """MONAI DenseNet121 (14 classes, seeded weights) on 96^3 scans."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.networks.nets import DenseNet121

    from medcam3d.monai_example import write_bundle

    torch.manual_seed(0)
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 14}
    network = DenseNet121(**args)
    preprocessing = [
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [96, 96, 96]},
    ]
    classes = [f"finding{i}" for i in range(14)]
    write_bundle(folder, {"_target_": "DenseNet121", **args}, network.state_dict(), preprocessing, classes,
                 input_shape=(96, 96, 96), batch_size=1)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(scans):
        volume = rng.normal(0.0, 300.0, (96, 96, 96)).astype(np.float32)
        affine = np.diag([-1.5, -1.5, 2.0, 1.0])  # LPS-stored, anisotropic
        nib.save(nib.Nifti1Image(volume, affine), str(data / f"scan_{n}.nii.gz"))
    return folder


# ------------------------------------------------------------------------------------------ child


def child(bundle: Path, config: str, runs: int, threads: int, device: str, save_ext: str) -> dict:
    """Build the bundle's evaluator for ``config``; time ``runs`` runs after a warm-up; measure memory."""
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(threads)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / ("inference_plain.json" if config == "plain" else "inference.json")))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(bundle / f"eval-{config}")
    parser["device"] = f"$torch.device({device!r})"
    if config == "maps":  # the inferer without SaveHeatmapsd
        parser["postprocessing"]["transforms"] = parser["postprocessing"]["transforms"][1:]
    elif config in ("maps+save", "maps+save+bg"):
        parser["postprocessing"]["transforms"][0]["output_ext"] = save_ext
        parser["postprocessing"]["transforms"][0]["background"] = config.endswith("+bg")
    elif config == "maps+feat":
        parser["postprocessing"]["transforms"][0]["grid"] = "feature"
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.logger.setLevel("WARNING")
    from medcam3d.monai import SaveHeatmapsd

    postprocessing = parser.get_parsed_content("postprocessing")  # the evaluator's own (parsed once, cached)
    savers = [t for t in getattr(postprocessing, "transforms", ()) if isinstance(t, SaveHeatmapsd)]

    def run() -> None:
        evaluator.run()
        for saver in savers:  # background writes count until their files are on disk
            saver.wait()
    loaded = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := current RSS: what follows is the evaluator's own peak
    run()  # warm-up: kernels, file cache, the auto layer choice
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    result = {"seconds": min(wall), "cpu_seconds": min(cpu), "peak_rss_mib": rss_mib("VmHWM"),
              "growth_mib": rss_mib("VmHWM") - loaded, "cases": len(parser.get_parsed_content("datalist"))}
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ------------------------------------------------------------------------------------------ sliding


def sliding(args: argparse.Namespace) -> int:
    """Plain SlidingWindowInferer vs HeatmapInferer(roi_size) on one volume, interleaved in one process."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet

    from medcam3d.monai import HeatmapInferer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                   num_res_units=2).to(device).eval()
    size, roi = args.size, args.roi
    volume = torch.randn((1, 1, size, size, size), generator=torch.Generator().manual_seed(1))
    inputs = MetaTensor(volume.to(device), affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64)))
    inferers = {
        "plain": SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.25, mode="gaussian"),
        "maps": HeatmapInferer(layer=args.layer, target="all", roi_size=roi, sw_batch_size=1, overlap=0.25,
                               mode="gaussian"),
    }

    def timed(name: str) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, started_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = inferers[name](inputs, network)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        del out
        return seconds, cpu

    print(f"sliding windows: UNet 16-32-64-128 (3 classes), {size}^3 volume, {roi}^3 windows, overlap 0.25, gaussian, "
          f"layer {args.layer}; "
          f"device {args.device}, torch {torch.__version__}, {args.threads} threads, {args.repeats} interleaved repeats")
    for name in inferers:
        timed(name)  # warm-up: kernels, the auto layer choice, the receptive field
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in inferers}
    for _ in range(args.repeats):
        for name in inferers:
            samples[name].append(timed(name))
    print(f"  {'inferer':<8} {'wall s':>8} {'CPU s':>8}  all runs (wall/CPU s)")
    median = {}
    for name, values in samples.items():
        median[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        print(f"  {name:<8} {median[name][0]:8.2f} {median[name][1]:8.2f}  {', '.join(f'{w:.2f}/{c:.2f}' for w, c in values)}")
    for index, what in ((0, "wall"), (1, "CPU")):
        ratio = median["maps"][index] / median["plain"][index]
        each = statistics.median(m[index] / p[index] for m, p in zip(samples["maps"], samples["plain"]))
        print(f"  ratio maps/plain, {what} time: {ratio:.3f} (median of per-repeat ratios {each:.3f}; "
              f"{'within' if ratio <= 1.1 else 'OVER'} the 1.1x target)")
    print("  (on a machine shared with other work, the CPU-time ratio is the steadier one with --threads 1)")
    return 0


# ------------------------------------------------------------------------------------------ parent


def run_child(bundle: Path, config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(bundle), config, "--runs", str(args.runs),
               "--threads", str(args.threads), "--device", args.device, "--save-ext", args.save_ext]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} on {bundle.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "densenet121"], choices=["demo", "densenet121"])
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration (median)")
    parser.add_argument("--runs", type=int, default=2, help="timed evaluator runs per process (fastest)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-ext", default=".nii.gz", choices=[".nii.gz", ".nii"],
                        help="SaveHeatmapsd output (uint8 maps; .nii skips gzip)")
    parser.add_argument("--child", nargs=2, metavar=("BUNDLE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="evaluator", choices=["evaluator", "sliding"],
                        help="evaluator: the bundle evaluators; sliding: SlidingWindowInferer vs HeatmapInferer(roi_size)")
    parser.add_argument("--size", type=int, default=256, help="sliding: the volume's edge (voxels)")
    parser.add_argument("--roi", type=int, default=128, help="sliding: the window's edge (voxels)")
    parser.add_argument("--layer", default="auto", help="sliding: the target layer (auto: model.1, the skip connection "
                        "before the last up-sampling block; model.2.0: that block's up-convolution)")
    args = parser.parse_args()
    if args.scenario == "sliding":
        return sliding(args)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.runs, args.threads, args.device,
                               args.save_ext)))
        return 0

    import torch

    gpu = torch.cuda.is_available()
    print(f"device: {args.device} ({'a GPU is available' if gpu else 'no GPU available on this machine'}), "
          f"torch {torch.__version__}, {args.threads} threads, {args.repeats} processes per configuration, "
          f"fastest of {args.runs} timed runs each; SaveHeatmapsd writes uint8 {args.save_ext}")
    builders = {"demo": demo_bundle, "densenet121": densenet121_bundle}
    with tempfile.TemporaryDirectory(prefix="bench_monai_") as tmp:
        for model in args.models:
            bundle = builders[model](Path(tmp) / model)
            samples: dict[str, list[dict]] = {c: [] for c in CONFIGS}
            for _ in range(args.repeats):
                for config in CONFIGS:  # alternate, so that drifts in machine load hit all alike
                    samples[config].append(run_child(bundle, config, args))
            median = {c: {k: statistics.median(s[k] for s in samples[c]) for k in samples[c][0]} for c in CONFIGS}
            base = median["plain"]
            memory = "cuda_peak_mib" if "cuda_peak_mib" in base else "peak_rss_mib"
            print(f"\n{model}: {int(base['cases'])} scans per evaluator run (load, preprocess, infer, postprocess)")
            print(f"  {'config':<10} {'wall s':>7} {'ratio':>6} {'CPU s':>7} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} "
                  f"{'growth MiB':>11} {'ratio':>6}")
            for config in CONFIGS:
                m = median[config]
                print(f"  {config:<10} {m['seconds']:7.3f} {m['seconds'] / base['seconds']:6.3f} "
                      f"{m['cpu_seconds']:7.3f} {m['cpu_seconds'] / base['cpu_seconds']:6.3f} "
                      f"{m[memory]:9.0f} {m[memory] / base[memory]:6.3f} "
                      f"{m['growth_mib']:11.1f} {m['growth_mib'] / max(base['growth_mib'], 1e-9):6.3f}")
            for config in CONFIGS[1:]:
                m = median[config]
                time_ok = m["seconds"] / base["seconds"] <= 1.05
                memory_ok = m[memory] / base[memory] <= 1.10
                print(f"  {config}: wall time {m['seconds'] / base['seconds'] - 1:+.1%} "
                      f"({'within' if time_ok else 'OVER'} the 5 % target), peak memory "
                      f"{m[memory] / base[memory] - 1:+.1%} ({'within' if memory_ok else 'OVER'} the 10 % target)")
    print("\npeak: the process's peak RSS"
          f"{' (GPU: peak allocated CUDA memory)' if args.device.startswith('cuda') else ''}; growth: that peak "
          "minus the RSS with the evaluator built (what the runs add); ratios against 'plain'.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
