"""``medcam3d demo``: the shipped samples explained, or a synthetic volume with a planted lesion."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import cast

from .tables import peak_text, print_table


def planted_lesion_case(size: int, seed: int):
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
        assert blur.bias is not None  # nn.Conv3d's default bias=True
        blur.bias[0] = -0.8
    model = nn.Sequential(
        blur, nn.ReLU(), nn.AvgPool3d(4), nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    with torch.no_grad():
        conv, head = cast(nn.Conv3d, model[3]), cast(nn.Linear, model[-1])
        assert conv.bias is not None and head.bias is not None  # both built with bias=True
        conv.weight.zero_()
        conv.weight[:, 0, 1, 1, 1] = torch.linspace(0.5, 1.5, 8)  # every channel copies the blob channel
        conv.bias.zero_()
        head.weight.copy_(torch.stack([-torch.ones(8), torch.ones(8)]))  # class 1 = "lesion"
        head.bias.zero_()
    return x, model.eval(), centre


def synthetic_demo(args: argparse.Namespace) -> int:
    import torch

    import medcam3d

    torch.manual_seed(args.seed)
    x, model, centre = planted_lesion_case(args.size, args.seed)
    print(f"Generated volume {tuple(x.shape[2:])} with a bright lesion centred at voxel {centre.tolist()}.")
    print("Model: a seeded 3D CNN built to respond to bright blobs (class 0 'background', 1 'lesion').\n")
    errors = {}
    print(f"{'method':<11}{'layer':<7}{'map grid':<12}{'peak voxel (input grid)':<26}{'error vox':>10}{'ms':>8}")
    layer_methods = [name for name, cls in medcam3d.METHODS.items() if cls.level == "layer"]  # the CAM family
    for method in layer_methods:
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


REPO_ROOT = Path(__file__).resolve().parents[2]


DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


DEMO_CASES = REPO_ROOT / "data_samples" / "cases.csv"


def cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        return synthetic_demo(args)
    if not DEMO_CONFIG.is_file() or not DEMO_CASES.is_file():
        print("The shipped samples are missing; running the synthetic demo instead.", file=sys.stderr)
        return synthetic_demo(args)
    from ..config import load_config
    from ..jobs.cases import collect_cases
    from ..jobs.outputs import check_output_location, check_own_files, record_own_files
    from ..jobs.report import write_csv
    from ..jobs.runner import Runner
    from ..models import load_model

    cases = collect_cases(DEMO_CASES)
    out = check_output_location(args.out, [p for case in cases for p in (case.image, case.mask)])
    check_own_files(out, ["summary.csv"])  # a summary.csv of the user's is never replaced
    config = load_config(DEMO_CONFIG)
    runner = Runner(config, load_model(config), methods=["hirescam", "gradcam"], target="all", device=args.device)
    rows, summary = [], []
    started = time.perf_counter()
    for case in cases:
        result = runner.run_case(case.image, out, case_id=case.id, mask=case.mask)
        summary.append(result.row())
        for finding in result.findings:
            rows.append({
                "case": result.case_id,
                "class": finding["class"],
                "p": f"{result.probabilities.get(finding['class'], float('nan')):.2f}",
                "present": {True: "yes", False: "no", None: "?"}[finding.get("lesion_present")],
                "method": finding["method"],
                "peak (RAS mm)": peak_text(finding["peak_mm"]),
                "peak in lesion": {True: "yes", False: "NO", None: "-"}[finding.get("peak_in_lesion")],
            })
    write_csv(out / "summary.csv", summary)
    record_own_files(out, ["summary.csv"], "demo")
    print_table(rows)
    hits = [r for r in rows if r["peak in lesion"] in ("yes", "NO")]
    for method in runner.methods:
        own = [r for r in hits if r["method"] == method]
        if own:
            rate = sum(r["peak in lesion"] == "yes" for r in own) / len(own)
            print(f"{method}: peak inside the true lesion for {rate:.0%} of present lesions ({len(own)})")
    print(f"\n{len(cases)} cases in {time.perf_counter() - started:.1f} s. Heatmaps (NIfTI, scanner space), masks, "
          f"boxes and pictures (PNG) in {out}/<case>/; summary table {out / 'summary.csv'}.")
    return 0
