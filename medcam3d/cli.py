"""Command-line interface: ``medcam3d demo | info``.

Heavy imports happen inside the commands so that ``medcam3d --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import monai
    import nibabel
    import numpy
    import scipy
    import SimpleITK
    import torch

    import medcam3d

    rows = {
        "medcam3d": medcam3d.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "methods": ", ".join(medcam3d.EXPLAINERS),
    }
    for key, value in rows.items():
        print(f"{key:<16} {value}")
    return 0


def _planted_lesion_case(size: int, seed: int):
    """A noisy volume with one bright sphere, and a seeded CNN built to detect bright blobs.

    Returns (x, model, centre) with x of shape (1, 1, size, size, size).
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(1, 1, size, size, size, generator=generator)
    centre = torch.randint(size // 5, size - size // 5, (3,), generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"))
    inside = ((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) <= (size // 10) ** 2
    x[0, 0][inside] += 2.0

    torch.manual_seed(seed)
    blur = nn.Conv3d(1, 4, 5, padding=2)
    with torch.no_grad():  # channel 0 averages intensity (a blob detector); the rest are random
        blur.weight[0] = 1.0 / blur.weight[0].numel()
        blur.bias[0] = -0.8
    model = nn.Sequential(
        blur, nn.ReLU(), nn.AvgPool3d(4), nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    with torch.no_grad():
        conv = model[3]
        conv.weight.zero_()
        conv.weight[:, 0, 1, 1, 1] = torch.linspace(0.5, 1.5, 8)  # every channel copies the blob channel
        conv.bias.zero_()
        model[-1].weight.copy_(torch.stack([-torch.ones(8), torch.ones(8)]))  # class 1 = "lesion"
        model[-1].bias.zero_()
    return x, model.eval(), centre


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import medcam3d

    torch.manual_seed(args.seed)
    x, model, centre = _planted_lesion_case(args.size, args.seed)
    print(f"Generated volume {tuple(x.shape[2:])} with a bright lesion centred at voxel {centre.tolist()}.")
    print("Model: a seeded 3D CNN built to respond to bright blobs (class 0 'background', 1 'lesion').\n")
    errors = {}
    print(f"{'method':<11}{'layer':<7}{'map grid':<12}{'peak voxel (input grid)':<26}{'error vox':>10}{'ms':>8}")
    for method in medcam3d.EXPLAINERS:
        explainer = medcam3d.Explainer(model, method=method, class_names=["background", "lesion"])
        started = time.perf_counter()
        result = explainer(x, target="lesion")
        elapsed = 1000 * (time.perf_counter() - started)
        feature = result.maps[0, 0]
        peak = torch.tensor(torch.unravel_index(feature.argmax(), feature.shape))
        stride = torch.tensor(result.input_shape) / torch.tensor(result.feature_shape)
        peak_input = (peak + 0.5) * stride - 0.5  # cell centre on the input grid
        error = float((peak_input - centre).norm())
        errors[method] = error
        print(
            f"{method:<11}{result.layer:<7}{'x'.join(map(str, result.feature_shape)):<12}"
            f"{str([round(v, 1) for v in peak_input.tolist()]):<26}{error:>10.1f}{elapsed:>8.1f}"
        )
    logits = model(x).detach()[0]
    print(f"\nlogits: background {logits[0]:.3f}, lesion {logits[1]:.3f}.")
    cell = float(stride.norm())
    found = [m for m, e in errors.items() if e <= cell]
    print(f"Maps are on the feature grid (stride {stride.tolist()}); {len(found)}/{len(errors)} methods put the "
          f"lesion's peak within one feature cell ({cell:.1f} voxels) of the true centre.")
    return 0 if len(found) == len(errors) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcam3d", description="Class activation maps for 3D medical CNNs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="explain a generated volume with a planted lesion")
    demo.add_argument("--size", type=int, default=64, help="edge of the generated cube, voxels")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)
    info = commands.add_parser("info", help="print versions for bug reports")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcam3d`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"medcam3d {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
