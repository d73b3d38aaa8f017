"""GPU benchmark: all-class explanation vs inference, cohort throughput, big resampling.

Prints, for MONAI DenseNet121 and ResNet50 (3D, 1 channel, 14 classes) at 128³, 192³ and 256³, in
fp32 and bf16: median time of plain inference (``torch.no_grad()``) and of all 14 HiResCAM maps
(one forward, one batched VJP), their ratio, and peak GPU memory of each and its ratio. Then the
throughput (volumes/s) of ``medcam3d batch`` against plain inference over the same NIfTI files,
and the time to resample a feature map onto a 512×512×400 oblique grid on the GPU.

    python benchmarks/bench_gpu.py                      # on a CUDA machine, < 10 minutes
    python benchmarks/bench_gpu.py --device cpu --sizes 64 --networks resnet50 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NETWORKS = {
    "densenet121": lambda: __import__("monai.networks.nets", fromlist=["DenseNet121"]).DenseNet121(
        spatial_dims=3, in_channels=1, out_channels=14),
    "resnet50": lambda: __import__("monai.networks.nets", fromlist=["resnet50"]).resnet50(
        spatial_dims=3, n_input_channels=1, num_classes=14),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(job, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds and peak memory (GiB; CUDA only, else nan) of ``job`` after one warm-up."""
    job()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        job()
        synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def bench_explainers(args, device: torch.device) -> None:
    import medcam3d

    print(f"\n{'network':<12}{'size':>5}{'dtype':>6}{'inf s':>8}{'all14 s':>9}{'time x':>8}{'inf GiB':>9}{'all14 GiB':>10}{'mem x':>7}")
    for name in args.networks.split(","):
        model = NETWORKS[name]().to(device).eval()
        for size in args.sizes:
            x = torch.randn(1, 1, size, size, size, device=device)
            for amp in (None, "bf16"):
                dtype = torch.bfloat16 if amp else None

                def inference():
                    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp is not None):
                        return model(x)

                explainer = medcam3d.Explainer(model, "hirescam", amp=amp)
                try:
                    t_inf, m_inf = measure(inference, device, args.repeats)
                    t_exp, m_exp = measure(lambda: explainer(x, "all").maps, device, args.repeats)
                except (torch.OutOfMemoryError, MemoryError) as error:
                    print(f"{name:<12}{size:>5}{amp or 'fp32':>6}  out of memory: {str(error)[:60]}")
                    continue
                print(f"{name:<12}{size:>5}{amp or 'fp32':>6}{t_inf:>8.3f}{t_exp:>9.3f}{t_exp / t_inf:>8.2f}"
                      f"{m_inf:>9.2f}{m_exp:>10.2f}{m_exp / m_inf if m_inf == m_inf else float('nan'):>7.2f}")
                print(f"{'':<12}batched VJP used: {explainer._batched_vjp}")
        model = None  # freed before the next network
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_cohort(args, device: torch.device) -> None:
    """Throughput of `medcam3d batch` vs plain inference over the same files."""
    from monai.networks.nets import DenseNet121

    from medcam3d import io
    from medcam3d.cli import main
    from medcam3d.preprocess import preprocess
    from medcam3d.space import Space

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "scans").mkdir()
        affine = np.diag([0.8, 0.8, 2.0, 1.0])
        for n in range(args.cohort):
            io.write(root / "scans" / f"c{n:03d}.nii.gz", np.random.default_rng(n).normal(size=(256, 256, 80)).astype(np.float32),
                     Space((256, 256, 80), affine))
        torch.manual_seed(0)
        torch.save(DenseNet121(spatial_dims=3, in_channels=1, out_channels=14).state_dict(), root / "w.pt")
        (root / "c.yaml").write_text("""
model: {network: monai.networks.nets.DenseNet121, args: {spatial_dims: 3, in_channels: 1, out_channels: 14}, weights: w.pt}
task: multilabel
preprocessing:
  - {name: Orientation, axcodes: RAS}
  - {name: Spacing, pixdim: [1.5, 1.5, 1.5]}
  - {name: ResizeWithPadOrCrop, spatial_size: [128, 128, 96]}
output: {pictures: false, masks: false, normalized: false}
""")
        from medcam3d.config import load_config
        from medcam3d.models import load_model

        config = load_config(root / "c.yaml")
        model = load_model(config, device=device)
        from medcam3d.preprocess import build_transforms

        transforms = build_transforms(config.preprocessing)
        files = sorted((root / "scans").iterdir())
        started = time.perf_counter()
        for path in files:
            x, _ = preprocess(path, transforms)
            with torch.no_grad():
                model(x[None].to(device))
        synchronize(device)
        plain = len(files) / (time.perf_counter() - started)
        started = time.perf_counter()
        main(["batch", "--config", str(root / "c.yaml"), "--inputs", str(root / "scans"), "--out", str(root / "out"),
              "--device", str(device), "--quiet", "--workers", str(args.workers)])
        explained = len(files) / (time.perf_counter() - started)
        print(f"\ncohort of {len(files)} NIfTI 256x256x80 -> DenseNet121 128x128x96, 14 classes: plain inference "
              f"{plain:.2f} vol/s, medcam3d batch {explained:.2f} vol/s ({explained / plain:.0%} of inference)")


def bench_resample(device: torch.device) -> None:
    from medcam3d.space import Space, feature_space, resample

    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    scan = Space((512, 512, 400), np.block([[rotation @ np.diag([0.7, 0.7, 1.0]), np.zeros((3, 1))], [np.zeros((1, 3)), 1]]))
    grid = feature_space(Space((128, 128, 96), np.diag([2.8, 2.8, 4.2, 1.0])), (4, 4, 3))
    maps = torch.rand(14, 4, 4, 3, device=device)
    seconds, peak = measure(lambda: resample(maps, grid, scan), device, 3)
    print(f"\nresample 14 maps 4x4x3 -> 512x512x400 oblique on {device}: {seconds:.2f} s, peak {peak:.2f} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--networks", default="densenet121,resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cohort", type=int, default=16, help="volumes in the throughput run (0: skip)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    bench_explainers(args, device)
    if args.cohort:
        bench_cohort(args, device)
    bench_resample(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
