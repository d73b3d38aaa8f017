"""Grad-CAM vs HiResCAM, reproducibly: where the model put no weight, HiResCAM is zero; Grad-CAM is not.

A 3D CNN (Conv → ReLU → Conv(stride 2) → ReLU) whose output is read by ``flatten + one Linear``.
The Linear weights of class 0 ("reads R") are non-zero only on a known box R of the 16³ feature
grid; class 1 reads everything outside R. The input has a moderate blob inside R and a much
brighter blob outside R, so the feature maps are strongest where class 0 has no weight at all.

* HiResCAM (``Σ_k ∂y/∂A_k ⊙ A_k``): the gradient *is* the Linear weight reshaped onto the grid,
  so the map is exactly zero outside R and its signed sum equals the logit minus the bias.
* Grad-CAM (``Σ_k mean(∂y/∂A_k) · A_k``): averaging the gradient over space spreads class 0's
  weights over the whole grid, so the map follows the activations — it peaks on the bright blob,
  where the logit does not look.
* The same backbone with ``global average pooling + one Linear``: the gradient is constant over
  space, and the two methods agree to float precision.

    python benchmarks/experiment_gradcam_vs_hirescam.py [--out docs/gradcam_vs_hirescam.png] [--seed 0]

Prints the numbers and writes the figure (atomically).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import medcam3d
from medcam3d._files import atomic_write
from medcam3d.metrics import energy_pointing_game, pointing_game

INPUT = 32  # input edge, voxels
FEATURES = 16  # feature grid edge (stride 2)
CHANNELS = 8
LAYER = "3"  # the second ReLU: the target layer
REGION = (slice(2, 9), slice(2, 9), slice(5, 12))  # the box R of feature cells class 0 reads
BLOB_IN_R = ((11.0, 11.0, 17.0), 4.0, 1.0)  # input-voxel centre, radius, intensity
BLOB_OUTSIDE = ((23.0, 23.0, 17.0), 4.0, 3.0)


def region_mask() -> np.ndarray:
    """(16, 16, 16) bool: the feature cells whose Linear weights are non-zero for class 0."""
    mask = np.zeros((FEATURES,) * 3, dtype=bool)
    mask[REGION] = True
    return mask


def make_input(seed: int = 0) -> torch.Tensor:
    """(1, 1, 32, 32, 32): low noise, a moderate blob inside R and a bright blob outside it."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(1, 1, INPUT, INPUT, INPUT, generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(INPUT, dtype=torch.float32)] * 3, indexing="ij"))
    for centre, radius, value in (BLOB_IN_R, BLOB_OUTSIDE):
        inside = ((grid - torch.tensor(centre).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2
        x[0, 0][inside] += value
    return x


def _backbone(generator: torch.Generator) -> list[nn.Module]:
    first = nn.Conv3d(1, CHANNELS, 3, padding=1)
    second = nn.Conv3d(CHANNELS, CHANNELS, 3, stride=2, padding=1)
    with torch.no_grad():  # blob detectors: positive smoothing filters with random strengths
        first.weight.copy_(torch.rand(first.weight.shape, generator=generator) / 27)
        first.bias.fill_(0.0)
        second.weight.copy_((torch.rand(second.weight.shape, generator=generator) - 0.3) / (27 * CHANNELS))
        second.bias.fill_(0.01)
    return [first, nn.ReLU(), second, nn.ReLU()]


def flatten_model(seed: int = 0) -> nn.Sequential:
    """Conv → ReLU → Conv(stride 2) → ReLU → Flatten → Linear(8·16³, 2); class 0 reads only R."""
    generator = torch.Generator().manual_seed(seed)
    layers = _backbone(generator)
    head = nn.Linear(CHANNELS * FEATURES**3, 2)
    inside = torch.from_numpy(region_mask()).reshape(1, -1).expand(CHANNELS, -1).reshape(-1)
    with torch.no_grad():
        weights = torch.rand(2, head.in_features, generator=generator) + 0.5
        weights[0, ~inside] = 0.0  # class 0: no weight outside R
        weights[1, inside] = 0.0  # class 1: no weight inside R
        head.weight.copy_(0.05 * weights)
        head.bias.copy_(torch.tensor([-0.2, 0.1]))
    return nn.Sequential(*layers, nn.Flatten(), head).eval()


def gap_model(seed: int = 0) -> nn.Sequential:
    """The same backbone with global average pooling + Linear(8, 2)."""
    generator = torch.Generator().manual_seed(seed)
    layers = _backbone(generator)
    head = nn.Linear(CHANNELS, 2)
    with torch.no_grad():
        head.weight.copy_(torch.rand(2, CHANNELS, generator=generator) + 0.5)
        head.bias.copy_(torch.tensor([-0.2, 0.1]))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), head).eval()


def maps(model: nn.Module, x: torch.Tensor, method: str, relu: bool = True) -> np.ndarray:
    """Class 0's map on the 16³ feature grid."""
    result = medcam3d.Explainer(model, method=method, layer=LAYER)(x, target=0, relu=relu)
    return result.maps[0, 0].double().numpy()


def run_experiment(seed: int = 0) -> dict:
    """All the numbers of the experiment (see the module docstring)."""
    x = make_input(seed)
    region = region_mask()
    numbers: dict = {}
    flat = flatten_model(seed)
    with torch.no_grad():
        logits = flat(x)[0]
    bias = float(flat[-1].bias.detach()[0])
    found: dict = {"flatten": {}, "gap": {}}
    for method in ("hirescam", "gradcam"):
        heat = maps(flat, x, method)
        signed = maps(flat, x, method, relu=False)
        found["flatten"][method] = heat
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        numbers[f"flatten/{method}"] = {
            "max_outside_R": float(np.abs(signed[~region]).max()),
            "max_inside_R": float(np.abs(signed[region]).max()),
            "mass_outside_R": 1.0 - energy_pointing_game(heat, region),
            "peak_in_R": pointing_game(heat, region),
            "peak_cell": tuple(int(v) for v in peak),
            "sum_minus_logit_minus_bias": float(signed.sum() - (float(logits[0]) - bias)),
        }
    gap = gap_model(seed)
    with torch.no_grad():
        gap_logits = gap(x)[0]
    gap_bias = float(gap[-1].bias.detach()[0])
    for method in ("hirescam", "gradcam"):
        heat = maps(gap, x, method)
        signed = maps(gap, x, method, relu=False)
        found["gap"][method] = heat
        numbers[f"gap/{method}"] = {
            "peak_cell": tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape)),
            "sum_minus_logit_minus_bias": float(signed.sum() - (float(gap_logits[0]) - gap_bias)),
        }
    numbers["gap/max_abs_difference"] = float(np.abs(found["gap"]["hirescam"] - found["gap"]["gradcam"]).max())
    numbers["gap/max_value"] = float(found["gap"]["hirescam"].max())
    numbers["flatten/logit0"] = float(logits[0])
    numbers["_maps"] = found
    numbers["_input"] = x[0, 0].numpy()
    return numbers


def _outline(axis, region_slice, color="cyan") -> None:
    from matplotlib.patches import Rectangle

    rows, cols = region_slice  # feature cells (i rows, j columns) of R in the shown slice
    axis.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start, rows.stop - rows.start,
                             fill=False, edgecolor=color, linewidth=1.8, linestyle="--"))


def save_figure(path: Path, numbers: dict) -> Path:
    """Two rows (flatten + Linear head, GAP + Linear head): input, HiResCAM, Grad-CAM at slice k = 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = FEATURES // 2  # the slice through both blobs (input k = 17 -> feature k = 8)
    x = numbers["_input"]
    pooled = x.reshape(FEATURES, 2, FEATURES, 2, FEATURES, 2).mean(axis=(1, 3, 5))[:, :, k]
    figure, axes = plt.subplots(2, 3, figsize=(11.5, 7.6))
    heads = (("flatten", "flatten + one Linear: class 0 reads only R"), ("gap", "global average pooling + one Linear"))
    for row, (head, title) in enumerate(heads):
        axes[row, 0].imshow(pooled, cmap="gray", origin="lower")
        axes[row, 0].set_title(f"input (2×2×2 mean), slice k={k}\n{title}", fontsize=9)
        for column, method in enumerate(("hirescam", "gradcam"), start=1):
            heat = numbers["_maps"][head][method][:, :, k]
            image = axes[row, column].imshow(heat, cmap="inferno", origin="lower", vmin=0)
            figure.colorbar(image, ax=axes[row, column], fraction=0.046)
            name = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}[method]
            if head == "flatten":
                info = numbers[f"flatten/{method}"]
                detail = (f"max |map| outside R = {info['max_outside_R']:.2g}\n"
                          f"map mass outside R = {100 * info['mass_outside_R']:.0f} %, peak in R: "
                          f"{'yes' if info['peak_in_R'] else 'NO'}")
            else:
                detail = f"max |HiResCAM − Grad-CAM| = {numbers['gap/max_abs_difference']:.1g}\n(map max {numbers['gap/max_value']:.2g})"
            axes[row, column].set_title(f"{name}, class 0\n{detail}", fontsize=9)
        for column in range(3):
            if head == "flatten":
                _outline(axes[row, column], REGION[:2])
            axes[row, column].set_xlabel("j (feature cells)", fontsize=8)
            axes[row, column].set_ylabel("i", fontsize=8)
    figure.suptitle("Grad-CAM highlights where the model put no weight; HiResCAM does not (R: dashed box). "
                    "On a GAP head they agree.", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda name: figure.savefig(name, dpi=100))
    finally:
        plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "gradcam_vs_hirescam.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    numbers = run_experiment(args.seed)
    print(f"Feature grid {FEATURES}³ × {CHANNELS} channels; R = {int(region_mask().sum())} of {FEATURES**3} cells; "
          f"class-0 logit {numbers['flatten/logit0']:.4f}.")
    print("\nflatten + one Linear head (class 0 has zero weight outside R):")
    print(f"  {'method':<9}{'max|map| outside R':>20}{'max|map| inside R':>19}{'mass outside R':>16}{'peak in R':>11}"
          f"{'peak cell':>14}{'Σmap − (y − b)':>17}")
    for method in ("hirescam", "gradcam"):
        info = numbers[f"flatten/{method}"]
        print(f"  {method:<9}{info['max_outside_R']:>20.3g}{info['max_inside_R']:>19.3g}{100 * info['mass_outside_R']:>15.1f}%"
              f"{'yes' if info['peak_in_R'] else 'no':>11}{str(info['peak_cell']):>14}{info['sum_minus_logit_minus_bias']:>17.3g}")
    print("\nglobal average pooling + one Linear head:")
    for method in ("hirescam", "gradcam"):
        info = numbers[f"gap/{method}"]
        print(f"  {method:<9}peak cell {str(info['peak_cell']):<14}Σmap − (y − b) = {info['sum_minus_logit_minus_bias']:.3g}")
    print(f"  max |HiResCAM − Grad-CAM| = {numbers['gap/max_abs_difference']:.3g} (map maximum {numbers['gap/max_value']:.3g})")
    path = save_figure(Path(args.out), numbers)
    print(f"\nFigure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
