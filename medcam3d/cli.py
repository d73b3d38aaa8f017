"""Command-line interface: ``medcam3d demo | explain | batch | layers | evaluate | info``.

Heavy imports happen inside the commands so that ``medcam3d --help`` is fast. Exit codes: 0
success, 1 a failure while running (e.g. a case that could not be read), 2 a usage error (bad
arguments, invalid config). Messages go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError


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


def _synthetic_demo(args: argparse.Namespace) -> int:
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



REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_CASES = REPO_ROOT / "data_samples" / "cases.csv"


def _parse_target(text: str | None):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    parsed = [int(t) if t.lstrip("-").isdigit() else t for t in items]
    return parsed[0] if len(parsed) == 1 else parsed


def _runner(args: argparse.Namespace, methods=None):
    from .config import load_config
    from .models import load_model
    from .pipeline import Runner

    config = load_config(args.config)
    model = load_model(config, trust=getattr(args, "trust", False))
    methods = methods or ([m.strip() for m in args.method.split(",")] if getattr(args, "method", None) else None)
    window = None
    if getattr(args, "roi", None):
        from .config import SlidingWindowConfig

        window = SlidingWindowConfig(tuple(args.roi), args.overlap, args.sw_batch)
    return Runner(config, model, methods=methods, target=_parse_target(getattr(args, "target", None)),
                  layer=getattr(args, "layer", None), device=getattr(args, "device", "auto"),
                  sliding_window=window, amp=getattr(args, "amp", None))


def _print_table(rows: list[dict], columns: list[str] | None = None, stream=None) -> None:
    stream = stream or sys.stdout
    if not rows:
        return
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=stream)
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns), file=stream)


def _cmd_explain(args: argparse.Namespace) -> int:
    runner = _runner(args)
    result = runner.run_case(args.image, args.out, mask=args.mask)
    print(f"{result.case_id}: wrote {len(result.files)} files to {Path(args.out) / result.case_id}")
    if result.probabilities:
        print("probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in result.probabilities.items()))
    rows = [{"method": f["method"], "class": f["class"], "score": f"{f['score']:.3f}",
             "peak (RAS mm)": "({:.1f}, {:.1f}, {:.1f})".format(*f["peak_mm"]),
             **({"peak in lesion": f["peak_in_lesion"]} if "peak_in_lesion" in f else {})} for f in result.findings]
    _print_table(rows)
    return 0


def _collect_inputs(inputs: Path):
    """Cases from a folder (image files and DICOM folders) or a CSV with columns image[, id, mask]."""
    import csv

    from .cohort import Case
    from .pipeline import case_id_of

    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        with inputs.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        if not rows or "image" not in rows[0]:
            raise UsageError(f"{inputs}: a cohort CSV needs a header with an 'image' column (and optionally 'id', 'mask').")
        cases = []
        for row in rows:
            image = Path(row["image"]) if Path(row["image"]).is_absolute() else inputs.parent / row["image"]
            mask = row.get("mask") or None
            if mask and not Path(mask).is_absolute():
                mask = inputs.parent / mask
            cases.append(Case(row.get("id") or case_id_of(image), image, Path(mask) if mask else None))
        return cases
    if inputs.is_dir():
        suffixes = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
        cases = []
        for path in sorted(inputs.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_file() and path.name.lower().endswith(suffixes) and "_mask" not in path.name:
                cases.append(Case(case_id_of(path), path))
            elif path.is_dir() and any(p.suffix.lower() == ".dcm" or p.suffix == "" for p in path.iterdir() if p.is_file()):
                cases.append(Case(path.name, path))
        if not cases:
            raise UsageError(f"{inputs} holds no images (.nii, .nii.gz, .nrrd, .mha, .mhd or DICOM folders).")
        return cases
    raise UsageError(f"--inputs {str(inputs)!r} is neither a folder nor a .csv file.")


def _cmd_batch(args: argparse.Namespace) -> int:
    import torch

    from .cohort import distributed_context, run_cohort

    cases = _collect_inputs(Path(args.inputs))
    context = distributed_context(args.device)
    if context.distributed and args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{context.local_rank}"
    runner = _runner(args)
    out = Path(args.out)
    rows, failures, skipped = run_cohort(runner, cases, out, resume=args.resume, workers=args.workers,
                                         progress=not args.quiet, context=context)
    if context.rank == 0:
        print(f"{len(cases)} cases: {len(cases) - failures - skipped} explained, {skipped} already done, "
              f"{failures} failed. Summary: {out / 'summary.csv'}", file=sys.stderr)
    if context.distributed:
        torch.distributed.destroy_process_group()
    return 1 if failures else 0


def _input_shape(args: argparse.Namespace, config) -> tuple[int, ...]:
    if args.image:
        from .preprocess import preprocess

        x, _ = preprocess(args.image, config.preprocessing)
        return tuple(x.shape)
    if args.shape:
        return tuple(args.shape)
    for step in reversed(config.preprocessing or []):
        size = step.get("spatial_size") or step.get("roi_size")
        if size is not None:
            return (int(config.model.args.get("in_channels", 1)), *[int(s) for s in size])
    raise UsageError("Cannot tell the model's input size: pass --image PATH or --shape C D H W.")


def _cmd_layers(args: argparse.Namespace) -> int:
    from .config import load_config
    from .layers import list_layers
    from .models import load_model

    config = load_config(args.config)
    model = load_model(config, trust=args.trust)
    shape = _input_shape(args, config)
    layers = list_layers(model, shape)
    print(f"Candidate target layers of {type(model).__name__} for input {shape} (execution order):")
    for info in layers:
        print(f"  {info}")
    if layers:
        print(f"layer='auto' selects: {layers[-1].name}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        return _synthetic_demo(args)
    if not DEMO_CONFIG.is_file() or not DEMO_CASES.is_file():
        print("The shipped samples are missing; running the synthetic demo instead.", file=sys.stderr)
        return _synthetic_demo(args)
    import csv

    from .cohort import write_csv
    from .config import load_config
    from .models import load_model
    from .pipeline import Runner

    config = load_config(DEMO_CONFIG)
    runner = Runner(config, load_model(config), methods=["hirescam", "gradcam"], target="all", device=args.device)
    with DEMO_CASES.open(newline="", encoding="utf-8") as stream:
        cases = list(csv.DictReader(stream))
    out = Path(args.out)
    rows, summary = [], []
    started = time.perf_counter()
    for case in cases:
        image = DEMO_CASES.parent / case["file"]
        mask = DEMO_CASES.parent / case["mask"] if case.get("mask") else None
        result = runner.run_case(image, out, case_id=case.get("case_id") or case.get("case") or case.get("id"), mask=mask)
        summary.append(result.row())
        for finding in result.findings:
            rows.append({
                "case": result.case_id,
                "class": finding["class"],
                "p": f"{result.probabilities.get(finding['class'], float('nan')):.2f}",
                "present": {True: "yes", False: "no", None: "?"}[finding.get("lesion_present")],
                "method": finding["method"],
                "peak (RAS mm)": "({:.1f}, {:.1f}, {:.1f})".format(*finding["peak_mm"]),
                "peak in lesion": {True: "yes", False: "NO", None: "-"}[finding.get("peak_in_lesion")],
            })
    write_csv(out / "summary.csv", summary)
    _print_table(rows)
    hits = [r for r in rows if r["peak in lesion"] in ("yes", "NO")]
    for method in runner.methods:
        own = [r for r in hits if r["method"] == method]
        if own:
            rate = sum(r["peak in lesion"] == "yes" for r in own) / len(own)
            print(f"{method}: peak inside the true lesion for {rate:.0%} of present lesions ({len(own)})")
    print(f"\n{len(cases)} cases in {time.perf_counter() - started:.1f} s. Heatmaps (NIfTI, scanner space), masks, "
          f"boxes and pictures (PNG) in {out}/<case>/; summary table {out / 'summary.csv'}.")
    return 0


EXAMPLES = """examples:
  medcam3d demo --out out/demo
  medcam3d explain --config configs/demo.yaml --image data_samples/case_01.nii.gz --target all --out out
  medcam3d explain --config configs/demo.yaml --image scan.nii.gz --method hirescam,gradcam --target bright_round --out out
  medcam3d batch --config configs/demo.yaml --inputs data_samples/cases.csv --out out/cohort --resume
  medcam3d layers --config configs/demo.yaml
  medcam3d evaluate --config configs/demo.yaml --inputs data_samples/cases.csv --methods hirescam,gradcam --out out/evaluate
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcam3d", description="Class activation maps for 3D medical CNNs, in scanner space.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", required=True, help="YAML config (see configs/demo.yaml)")
        sub.add_argument("--trust", action="store_true", help="allow model files that run code (bundles, TorchScript)")

    def compute_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
        sub.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (GPU memory / speed)")
        sub.add_argument("--roi", type=int, nargs="+", help="explain through sliding windows of this patch size")
        sub.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
        sub.add_argument("--sw-batch", type=int, default=1, help="patches explained together (memory knob)")

    demo = add("demo", "run the main job on the shipped samples with the demo model", _cmd_demo)
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    demo.add_argument("--synthetic", action="store_true", help="instead: a generated volume with a planted lesion")
    demo.add_argument("--size", type=int, default=64, help="--synthetic: edge of the generated cube, voxels")
    demo.add_argument("--seed", type=int, default=0, help="--synthetic: seed")

    explain = add("explain", "explain one scan", _cmd_explain)
    model_options(explain)
    explain.add_argument("--image", required=True, help="NIfTI, NRRD, MHA/MHD file or DICOM folder")
    explain.add_argument("--method", help="method or comma list (default: the config's); e.g. hirescam,gradcam")
    explain.add_argument("--target", help="all | predicted | class index | class name | comma list")
    explain.add_argument("--layer", help="target layer name or 'auto' (default: the config's)")
    explain.add_argument("--mask", help="optional ground-truth label map (label c+1 = class c) to check peaks")
    compute_options(explain)
    explain.add_argument("--out", required=True, help="output folder; results go to OUT/<case>/")

    batch = add("batch", "explain a cohort (folder or CSV), resumable", _cmd_batch)
    model_options(batch)
    batch.add_argument("--inputs", required=True, help="folder of scans, or CSV with columns image[, id, mask]")
    batch.add_argument("--out", required=True)
    batch.add_argument("--method", help="method or comma list")
    batch.add_argument("--target", help="all | predicted | index | name | comma list")
    batch.add_argument("--layer")
    batch.add_argument("--resume", action="store_true", help="skip cases whose output folder is complete")
    compute_options(batch)
    batch.add_argument("--workers", type=int, default=1, help="DataLoader worker processes reading scans (0: none)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")

    layers = add("layers", "list candidate target layers and their output shapes", _cmd_layers)
    model_options(layers)
    layers.add_argument("--image", help="preprocess this scan to get the input size")
    layers.add_argument("--shape", type=int, nargs="+", help="input shape C D H W")

    from .evaluate import add_parser as add_evaluate

    add_evaluate(commands)
    add("info", "print versions for bug reports", _cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcam3d`` console script."""
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ConfigError) as error:
        print(f"medcam3d {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        print(f"medcam3d {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
