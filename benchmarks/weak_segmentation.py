"""Weakly-supervised localization and segmentation: threshold vs seed-expand-constrain, two models.

    python benchmarks/weak_segmentation.py                 # writes docs/weak_segmentation.md/.png
    python benchmarks/weak_segmentation.py --quick         # a few cases, for a smoke run
    python benchmarks/weak_segmentation.py --parts seeds,learned --train-reference   # only the learned segmenter's sections

No peeking: every setting is chosen on the *demo set* (the demo generator's own held-out cases,
seeds 2 000 000+, on the five scanner grids in turn) and then reported, unchanged, on the *held-out
harder set* (:func:`medcam3d.demo.synthetic.make_hard_phantom`, seeds 3 000 000+: smaller lesions,
two lesions of one class, lesions against the organ, the fat shell or the bone), which is used for
nothing else. The per-case best threshold ("oracle") looks at the answer: it is an upper bound for
thresholding, labelled as such.

Models: the shipped localization-trained demo model (``data_samples/demo_model.pt``, trained with
a mask-based term) and the weakly-supervised one (``data_samples/demo_model_weak.pt``, image labels
only). Maps: HiResCAM on the last layer (the default explanation) and, as an option, LayerCAM on
the stem (``features.relu0``, 4 mm cells) gated by that HiResCAM (:func:`medcam3d.segment.gated_maps`).

Segmentation and localization are measured for the classes present in each case (the class is
given: "ground-truth-known" localization), on the scan's grid, with the library's metrics
(:func:`medcam3d.metrics.segmentation_scores`): Dice, IoU, Hausdorff 95 (mm, MONAI), box IoU per
lesion (best predicted box of that class; boxes in RAS mm), lesions found (a predicted component
overlaps it), and :func:`medcam3d.metrics.pointing_game` of the map. The scans, maps and tables are
generated on demand into a cache folder (default: a temporary folder); nothing large is committed.

Two more parts (``--parts``), for the learned segmenter of :mod:`medcam3d.weak` (``medcam3d weak-train``):

- *seeds*: the seed methods compared on the demo set (model grid, seeds 2 000 000+; the levels are
  calibrated on training scans 0+, image labels only): the precision of the seed voxels against the
  masks, the share of lesions seeded, the background seeds' precision; this is how
  :data:`medcam3d.weak.DEFAULT_SEED_METHOD` and its settings were chosen.
- *learned*: a segmenter trained on the demo generator with image labels only (``--segmenter``, default
  ``data_samples/weak_segmenter/weak_segmenter.yaml``, written by ``medcam3d weak-train --config
  configs/demo_weak.yaml --demo-cases 300 --epochs 3 --out data_samples/weak_segmenter``) and the fully
  supervised reference (the same network and cases, trained on the masks: ``--train-reference``) on the
  held-out harder set, one lesion and two lesions per class apart.
- *calibration*: the learned segmenter's ``--threshold`` (most probable label, or a foreground class
  wherever its probability reaches P), chosen on the demo set by mean Dice, and every value scored on
  the held-out set as a diagnostic (how much of the gap is the network's calibration on harder lesions).

A run with only some parts replaces those sections of the existing report and keeps the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import medcam3d
from medcam3d.demo import synthetic, train
from medcam3d.heatmap import heatmaps_of
from medcam3d.metrics import dice, dice_iou_curve, pointing_game, segmentation_scores
from medcam3d.preprocess import preprocess
from medcam3d.segment import gated_maps, segment
from medcam3d.segment_records import SegmentSettings
from medcam3d.space import Space, resample

MODELS = {"localization-trained": ROOT / "data_samples" / "demo_model.pt",
          "weakly supervised": ROOT / "data_samples" / "demo_model_weak.pt"}
MAPS = ("hirescam", "fused")
FINE_LAYER = "features.relu0"
DEMO_SEED0 = train.PEAK_SEED0
HARD_SEED0 = synthetic.HARD_SEED0
THRESHOLDS = np.round(np.linspace(0.05, 1.0, 20), 4)

#: The settings tried on the demo set for each expansion method (the rest stay at their defaults).
SWEEPS: dict[str, dict[str, list]] = {
    "random_walker": {"smooth_mm": [0.0, 16.0], "background": [0.3], "beta": [3.0], "contrast": [8.0],
                      "foreground": [0.7, 0.9]},
    "region_growing": {"smooth_mm": [0.0, 16.0], "background": [0.3], "multiplier": [1.5, 2.5], "iterations": [2],
                       "contrast": [8.0]},
}

# --------------------------------------------------------------------------------------------
# Cases and maps (cached)
# --------------------------------------------------------------------------------------------


def make_cases(kind: str, count: int) -> list[dict]:
    """Cases of the demo set (``kind="demo"``) or of the held-out harder set (``"hard"``), on the
    scanner grids in turn: image (HU), labels, grid, lesion placements."""
    grids = synthetic.sample_grids()
    names = list(grids)
    cases = []
    for i in range(count):
        grid_name = names[i % len(names)]
        space = grids[grid_name]
        if kind == "demo":
            seed = DEMO_SEED0 + i
            phantom = synthetic.make_phantom(seed)
            image, labels = phantom.sample(space)
            placements = ["demo"] * len(phantom.lesions)
            lesions = phantom.lesions
        else:
            seed = HARD_SEED0 + i
            phantom, placements = synthetic.make_hard_phantom(seed)
            image, labels = phantom.sample(space)
            lesions = phantom.lesions
        cases.append({"id": f"{kind}-{seed}", "seed": seed, "grid": grid_name, "space": space, "image": image,
                      "labels": labels, "lesions": [(l.class_index, l.extent, p) for l, p in zip(lesions, placements)]})
    return cases


def load_model(path: Path) -> torch.nn.Module:
    model = train.build_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def explain(models: dict, cases: list[dict]) -> None:
    """Adds ``case["maps"][model][map] = list of feature-grid Heatmaps`` and probabilities."""
    names = list(synthetic.CLASS_NAMES)
    for case in cases:
        x, _ = preprocess((case["image"], case["space"]), synthetic.PREPROCESSING)
        case["maps"], case["probability"] = {}, {}
        for model_name, model in models.items():
            last = medcam3d.Explainer(model, method="hirescam", layer="auto", class_names=names)(x[None], target="all")
            fine = medcam3d.Explainer(model, method="layercam", layer=FINE_LAYER, class_names=names)(x[None], target="all")
            coarse = heatmaps_of(last)
            case["maps"][model_name] = {"hirescam": coarse, "fused": gated_maps(heatmaps_of(fine), coarse)}
            case["probability"][model_name] = torch.sigmoid(last.logits[0]).tolist()


def present(case: dict) -> list[int]:
    return [c for c in range(len(synthetic.CLASS_NAMES)) if np.any(case["labels"] == c + 1)]


def scan_map(case: dict, model: str, kind: str, c: int) -> np.ndarray:
    """One class map on the scan's grid (cached in the case)."""
    key = ("scan", model, kind, c)
    if key not in case:
        heat = case["maps"][model][kind][c]
        case[key] = np.asarray(resample(heat.data, heat.space, case["space"]), dtype=np.float32)
    return case[key]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def score(prediction: np.ndarray, truth: np.ndarray, boxes: list, space: Space) -> dict:
    """Segmentation and per-lesion box scores of one class of one case (:func:`medcam3d.metrics.segmentation_scores`:
    Dice, IoU, HD95 in mm, box IoU in mm per true lesion, lesions found)."""
    return asdict(segmentation_scores(prediction, truth, space, boxes=boxes))


def run_method(case: dict, model: str, kind: str, settings: SegmentSettings) -> tuple[dict, float]:
    """Segment every present class of one case; per-class scores and the time taken."""
    scores, seconds = {}, 0.0
    for c in present(case):  # the class is given; each is segmented on its own
        start = time.perf_counter()
        result = segment(case["image"], case["space"], case["maps"][model][kind], classes=[c], settings=settings)
        seconds += time.perf_counter() - start
        boxes = [l.box for l in result.lesions if l.class_index == c]
        scores[c] = score(result.mask(c), case["labels"] == c + 1, boxes, case["space"])
    return scores, seconds


def mean_dice(cases: list[dict], model: str, kind: str, settings: SegmentSettings) -> float:
    values = [s["dice"] for case in cases for s in run_method(case, model, kind, settings)[0].values()]
    return float(np.mean(values)) if values else math.nan


# --------------------------------------------------------------------------------------------
# Tuning on the demo set
# --------------------------------------------------------------------------------------------


def tune_threshold(cases: list[dict], model: str, kind: str) -> tuple[float, float]:
    """The fraction of the maximum with the best mean Dice on the demo set (one for all cases)."""
    curves = [dice_iou_curve(scan_map(case, model, kind, c), case["labels"] == c + 1, THRESHOLDS).dice
              for case in cases for c in present(case)]
    mean = np.mean(curves, axis=0)
    best = int(np.argmax(mean))
    return float(THRESHOLDS[best]), float(mean[best])


def tune(cases: list[dict], model: str, kind: str, method: str, log) -> tuple[SegmentSettings, float, list]:
    """Coordinate search over :data:`SWEEPS` on the demo set (one pass, from the defaults); best mean Dice wins."""
    settings = SegmentSettings(method=method)
    best = mean_dice(cases, model, kind, settings)
    log(f"    {method} defaults: {best:.3f}")
    tried = [(settings, best)]
    for _ in range(1):
        changed = False
        for name, values in SWEEPS[method].items():
            for value in values:
                if getattr(settings, name) == value:
                    continue
                candidate = replace(settings, **{name: value})
                if any(candidate == t for t, _ in tried):
                    continue
                result = mean_dice(cases, model, kind, candidate)
                tried.append((candidate, result))
                log(f"    {method} {name}={value}: {result:.3f}")
                if result > best + 1e-4:
                    settings, best, changed = candidate, result, True
        if not changed:
            break
    return settings, best, tried


# --------------------------------------------------------------------------------------------
# Evaluation on the held-out set
# --------------------------------------------------------------------------------------------


def evaluate(cases: list[dict], model: str, kind: str, method: str, settings: SegmentSettings) -> dict:
    rows = {"dice": [], "iou": [], "hd95": [], "box_iou": [], "found": [], "seconds": [], "extra": [], "by": []}
    for case in cases:
        scores, seconds = run_method(case, model, kind, settings)
        rows["seconds"].append(seconds)
        for c, s in scores.items():
            rows["dice"].append(s["dice"])
            rows["iou"].append(s["iou"])
            rows["hd95"].append(s["hd95"])
            rows["box_iou"].extend(s["box_ious"])
            rows["found"].extend(s["found"])
            rows["extra"].append(max(s["predicted_lesions"] - sum(s["found"]), 0))
            lesions = [entry for entry in case["lesions"] if entry[0] == c]
            rows["by"].append((c, s, lesions, case["id"]))
    return rows


def oracle(cases: list[dict], model: str, kind: str) -> dict:
    values = {"dice": [], "iou": []}
    for case in cases:
        for c in present(case):
            curve = dice_iou_curve(scan_map(case, model, kind, c), case["labels"] == c + 1, THRESHOLDS)
            values["dice"].append(curve.best_dice)
            values["iou"].append(curve.best_iou)
    return values


def pointing(cases: list[dict], model: str, kind: str) -> float:
    hits = [pointing_game(scan_map(case, model, kind, c), case["labels"] == c + 1) for case in cases for c in present(case)]
    return float(np.mean(hits)) if hits else math.nan


def accuracy(cases: list[dict], model: str, classes=None) -> float:
    classes = range(len(synthetic.CLASS_NAMES)) if classes is None else classes
    right = [(case["probability"][model][c] >= 0.5) == (c in present(case)) for case in cases for c in classes]
    return float(np.mean(right))


def pointing_by_class(cases: list[dict], model: str, kind: str) -> list[float]:
    return [float(np.mean([pointing_game(scan_map(case, model, kind, c), case["labels"] == c + 1)
                           for case in cases if c in present(case)] or [math.nan]))
            for c in range(len(synthetic.CLASS_NAMES))]


def _fmt(values, digits: int = 2) -> str:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _median(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{np.median(values):.1f}" if values else "—"


# --------------------------------------------------------------------------------------------
# Scan-size timing and the figure
# --------------------------------------------------------------------------------------------


def scan_size_timing(settings: SegmentSettings) -> tuple[float, tuple[int, ...]]:
    """Seconds to segment a 512 x 512 x 300 CT-sized volume (0.7 x 0.7 x 1 mm) with a feature-grid map."""
    from medcam3d.heatmap import Heatmap

    shape = (512, 512, 300)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    space = Space(shape, affine)
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 12.0, shape).astype(np.float32)
    centre = np.array([180.0, 200.0, 150.0])  # mm
    box = tuple(slice(int((centre[a] - 12) / affine[a, a]), int((centre[a] + 12) / affine[a, a])) for a in range(3))
    grid = np.meshgrid(*[np.arange(s.start, s.stop) * affine[a, a] for a, s in enumerate(box)], indexing="ij")
    inside = sum((g - centre[a]) ** 2 for a, g in enumerate(grid)) <= 8.0 ** 2
    image[box][inside] += 150.0
    feature = Space((45, 45, 38), np.diag([8.0, 8.0, 8.0, 1.0]))
    cells = feature.voxel_to_world(np.indices(feature.shape).reshape(3, -1).T.astype(float)).reshape(*feature.shape, 3)
    heat = np.exp(-np.sum((cells - centre) ** 2, axis=-1) / (2 * 9.0 ** 2)).astype(np.float32)
    maps = [Heatmap(heat, feature, "hirescam", "synthetic", 0, "bright_round")]
    start = time.perf_counter()
    segment(image, space, maps, settings=settings)
    return time.perf_counter() - start, shape


def figure(case: dict, c: int, model: str, kind: str, settings: SegmentSettings, path: Path) -> None:
    """Seeds, expansion and result for class ``c`` of one held-out case (matplotlib's object API, no pyplot)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from medcam3d.jobs.report import save_figure

    result = segment(case["image"], case["space"], case["maps"][model][kind], classes=[c], settings=settings)
    region = max((r for r in result.regions if r.class_index == c), key=lambda r: int((r.seeds == 1).sum()))
    spacing = np.asarray(case["space"].spacing)
    axis = int(np.argmax(spacing))  # show the plane of the two finest axes
    fg = np.argwhere(region.seeds == 1)
    index = int(np.round(fg[:, axis].mean())) if fg.size else region.seeds.shape[axis] // 2

    def plane(volume):
        return np.take(volume, index, axis=axis).T

    image = plane(np.asarray(case["image"][region.crop]))
    truth = plane(case["labels"][region.crop] == c + 1)
    heat = plane(region.class_map)
    seeds = plane(region.seeds)
    prob = plane(region.probability) if region.probability is not None else plane(region.mask.astype(np.float32))
    final = plane(result.labels[region.crop] == c + 1)
    other = [a for a in range(3) if a != axis]
    aspect = spacing[other[1]] / spacing[other[0]]
    window = {"cmap": "gray", "vmin": -160, "vmax": 240, "origin": "lower", "aspect": aspect}
    fig = Figure(figsize=(13, 4.0))
    axes = fig.subplots(1, 4)
    axes[0].imshow(image, **window)
    axes[0].imshow(np.ma.masked_less_equal(heat, 0), cmap="inferno", alpha=0.45, origin="lower", aspect=aspect)
    axes[0].contour(truth, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[0].set_title(f"{kind} map of {synthetic.CLASS_NAMES[c]}\n(cyan: true lesion)", fontsize=9)
    axes[1].imshow(image, **window)
    colours = ListedColormap([(0, 0, 0, 0), (1.0, 0.2, 0.2, 0.9), (0.25, 0.45, 1.0, 0.5), (1.0, 0.85, 0.1, 0.7)])
    axes[1].imshow(seeds, cmap=colours, vmin=-0.5, vmax=3.5, origin="lower", aspect=aspect, interpolation="nearest")
    axes[1].set_title("seeds: foreground (red), background (blue),\ncompeting class (yellow)", fontsize=9)
    axes[2].imshow(prob, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect=aspect)
    axes[2].set_title(f"expansion: {settings.method} foreground probability", fontsize=9)
    axes[3].imshow(image, **window)
    axes[3].contour(truth, levels=[0.5], colors="cyan", linewidths=1.0)
    axes[3].contour(final, levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
    d = dice(result.mask(c), case["labels"] == c + 1)
    axes[3].set_title(f"result (red dashed) vs truth (cyan)\nDice {d:.2f} for this class, this case", fontsize=9)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{case['id']} on grid {case['grid']} ({model} model), one slice through the crop", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    save_figure(path, fig, dpi=90)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune-cases", type=int, default=12, help="demo-set cases used to choose the settings")
    parser.add_argument("--cases", type=int, default=30, help="held-out harder cases reported")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--quick", action="store_true", help="4 tuning and 5 held-out cases, no sweep (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="maps,seeds,learned",
                        help="comma list of maps (the map-based methods), seeds (seed methods), learned (the learned segmenter), "
                             "calibration (the learned segmenter's --threshold)")
    parser.add_argument("--segmenter", type=Path, default=SEGMENTER, help="the weakly-supervised segmenter's config")
    parser.add_argument("--reference", type=Path, help="the fully supervised reference's config (default: --cache/reference)")
    parser.add_argument("--train-reference", action="store_true",
                        help="train the fully supervised reference into --cache (the segmenter's network, cases and epochs)")
    parser.add_argument("--cache", type=Path, default=None, help="folder for seed maps and the reference (kept)")
    parser.add_argument("--seed-cases", type=int, nargs=2, default=(40, 30), metavar=("CALIBRATION", "DEMO"),
                        help="seed methods: training scans for the levels, demo-set scans measured (default 40 30)")
    parser.add_argument("--seed-methods", default=",".join(SEED_METHODS), help="comma list of seed methods compared")
    args = parser.parse_args(argv)
    if args.quick:
        args.tune_cases, args.cases = 4, 5
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"maps", "seeds", "learned", "calibration"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; use maps, seeds, learned, calibration")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The probability range is outside")
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    if "maps" not in parts:
        return _update_sections(args, parts, log)
    models = {name: load_model(path) for name, path in MODELS.items() if path.exists()}
    missing = [str(path) for name, path in MODELS.items() if not path.exists()]
    if missing:
        log(f"missing model(s), skipped: {missing}")
    demo = make_cases("demo", args.tune_cases)
    hard = make_cases("hard", args.cases)
    log(f"{len(demo)} demo-set and {len(hard)} held-out cases generated")
    explain(models, demo + hard)
    log("maps computed")

    chosen: dict = {}
    tuning_log: list[str] = []
    for model in models:
        for kind in MAPS:
            t, value = tune_threshold(demo, model, kind)
            chosen[(model, kind, "threshold")] = (SegmentSettings(method="threshold", candidate=t, background=min(0.3, t / 2),
                                                                  smooth_mm=0.0), value)
            log(f"{model} {kind}: threshold {t} (demo Dice {value:.3f})")
            for method in SWEEPS:
                if args.quick:
                    settings = SegmentSettings(method=method)
                    chosen[(model, kind, method)] = (settings, mean_dice(demo, model, kind, settings))
                else:
                    settings, value, _ = tune(demo, model, kind, method, log)
                    chosen[(model, kind, method)] = (settings, value)
                log(f"{model} {kind} {method}: {settings} (demo Dice {chosen[(model, kind, method)][1]:.3f})")
                tuning_log.append(f"| {model} | {kind} | {method} | {_settings_text(settings)} | {chosen[(model, kind, method)][1]:.3f} |")

    table, results = [], {}
    for model in models:
        for kind in MAPS:
            point = pointing(hard, model, kind)
            upper = oracle(hard, model, kind)
            table.append(f"| {model} | {kind} | oracle threshold per case (**upper bound, looks at the answer**) | "
                         f"{_fmt(upper['dice'])} | — | — | {_fmt(upper['iou'])} | — | — | — | {point:.2f} | — |")
            for method in ("threshold", *SWEEPS):
                settings, _ = chosen[(model, kind, method)]
                rows = evaluate(hard, model, kind, method, settings)
                results[(model, kind, method)] = rows
                by_class = [[s["dice"] for cc, s, _, _ in rows["by"] if cc == c] for c in range(len(synthetic.CLASS_NAMES))]
                table.append(
                    f"| {model} | {kind} | {method} ({_settings_text(settings, short=True)}) | {_fmt(rows['dice'])} | "
                    f"{_fmt(by_class[0])} | {_fmt(by_class[1])} | "
                    f"{_fmt(rows['iou'])} | {_median(rows['hd95'])} | {_fmt(rows['box_iou'])} | "
                    f"{np.mean(rows['found']):.2f} | {point:.2f} | {np.median(rows['seconds']):.2f} |")
                log(f"held-out {model} {kind} {method}: Dice {_fmt(rows['dice'])}, box IoU {_fmt(rows['box_iou'])}")

    best_key = max((k for k in results if k[0] == "weakly supervised"), key=lambda k: np.mean(results[k]["dice"]), default=None)
    breakdown = _breakdown(results[best_key]) if best_key else []
    timing, shape = scan_size_timing(chosen.get(best_key, (SegmentSettings(), 0))[0] if best_key else SegmentSettings())
    log(f"scan-size timing {shape}: {timing:.1f} s")
    if best_key:
        case, c = _figure_case(hard, results[best_key])
        figure(case, c, best_key[0], best_key[1], chosen[best_key][0], args.out / "weak_segmentation.png")
    accuracies = {model: (accuracy(demo, model), accuracy(hard, model), [accuracy(hard, model, [c]) for c in range(2)])
                  for model in models}
    pointings = {(model, kind): pointing_by_class(hard, model, kind) for model in models for kind in MAPS}
    text = _report(args, table, tuning_log, breakdown, accuracies, pointings, best_key, results, timing, shape, len(demo),
                   len(hard), time.perf_counter() - started)
    from medcam3d._files import atomic_write_text

    sections = _new_sections(args, parts, log, hard=hard)
    atomic_write_text(args.out / "weak_segmentation.md", _with_sections(text, sections))
    log(f"wrote {args.out / 'weak_segmentation.md'}")
    return 0


def _settings_text(settings: SegmentSettings, short: bool = False) -> str:
    default = SegmentSettings(method=settings.method)
    fields = ["candidate"] if settings.method == "threshold" else [
        name for name in ("candidate", "foreground", "background", "contrast", "beta", "multiplier", "smooth_mm", "margin_mm")
        if not (settings.method == "random_walker" and name == "multiplier")
        and not (settings.method == "region_growing" and name == "beta")]
    if short:
        fields = [f for f in fields if getattr(settings, f) != getattr(default, f)] or fields[:1]
    return ", ".join(f"{f} {getattr(settings, f):g}" for f in fields)


def _breakdown(rows: dict) -> list[str]:
    """Dice and box IoU of the weakly-supervised model's best row, by class, placement and size."""
    groups: dict[str, list] = {}
    for c, s, lesions, _ in rows["by"]:
        name = synthetic.CLASS_NAMES[c]
        groups.setdefault(f"class {name}", []).append((s["dice"], s["box_ious"]))
        for placement in sorted({p for _, _, p in lesions}):
            groups.setdefault(f"{name}, a lesion placed '{placement}'", []).append((s["dice"], s["box_ious"]))
        groups.setdefault(f"{name}, {'two lesions' if len(lesions) > 1 else 'one lesion'}", []).append((s["dice"], s["box_ious"]))
    out = []
    for name in sorted(groups):
        values = groups[name]
        boxes = [b for _, bs in values for b in bs]
        out.append(f"| {name} | {len(values)} | {np.mean([d for d, _ in values]):.2f} | {np.mean(boxes):.2f} |")
    return out


def _figure_case(cases: list[dict], rows: dict) -> tuple[dict, int]:
    """A typical (case, class) for the figure: a found lesion whose Dice is closest to the median."""
    entries = [entry for entry in rows["by"] if any(entry[1]["found"])] or rows["by"]
    target = float(np.median([s["dice"] for _, s, _, _ in entries]))
    c, _, _, case_id = min(entries, key=lambda entry: abs(entry[1]["dice"] - target))
    return next(case for case in cases if case["id"] == case_id), c


def _weak_training_accuracy() -> dict:
    """Per-class held-out accuracy of the weakly-supervised model on the demo generator
    (``data_samples/metrics_weak.json``, written by ``medcam3d.demo.train --weakly-supervised``)."""
    path = ROOT / "data_samples" / "metrics_weak.json"
    if not path.exists():
        return {}
    accuracy = json.loads(path.read_text())["accuracy"]
    return {"n": accuracy["n"], **accuracy["per_class"]}


def _limits(names, weak_acc, pointings, best_key, dice_c, box_c, found_c) -> list[str]:
    """The report's "what limits it" bullets, one per class, from the numbers of the best row."""
    trained = _weak_training_accuracy()
    lines = []
    for c, name in enumerate(names):
        demo = trained.get(name)
        hires, fused = pointings[(best_key[0], "hirescam")][c], pointings[(best_key[0], "fused")][c]
        numbers = (f"accuracy {demo:.2f} on {trained['n']} cases of the demo generator "
                   f"(`data_samples/metrics_weak.json`), " if demo is not None else "accuracy ")
        numbers += (f"{weak_acc[c]:.2f} on this held-out set; pointing game {hires:.2f} HiResCAM, {fused:.2f} fused; "
                    f"Dice {dice_c.get(c, math.nan):.2f}, box IoU {box_c.get(c, math.nan):.2f}, lesions found "
                    f"{found_c.get(c, math.nan):.2f}")
        if demo is not None and demo < 0.9:
            verdict = ("Without the mask term the network did not learn this class, so its maps carry little "
                       "evidence of the lesion and no segmentation method recovers a lesion the model does not see")
        elif weak_acc[c] < 0.9:
            verdict = ("The class is learned on the demo generator but detected less reliably on the smaller, "
                       "harder lesions of this set; a missed lesion leaves no seed")
        else:
            verdict = "The class is learned; what remains is the maps and the expansion"
        lines.append(f"- **`{name}`.** {verdict}: {numbers}.")
    lines.append(
        "- **Second lesions.** Only peaks at or above `candidate` x the class's maximum (chosen on the demo set, "
        "which never has two lesions of a class) start a lesion, so a weaker second peak is dropped: compare "
        "'one lesion' with 'two lesions' in the table below.")
    return lines


def _report(args, table, tuning_log, breakdown, accuracies, pointings, best_key, results, timing, shape, n_demo, n_hard,
            seconds) -> str:
    names = synthetic.CLASS_NAMES
    head = ("| model | map | method (fixed setting, chosen on the demo set) | Dice | Dice bright_round | Dice dark_elongated "
            "| IoU | HD95 (mm, median) | box IoU | lesions found | pointing game (map) | s / case |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [
        "# Weakly-supervised localization and segmentation",
        "",
        ("Generated by `python benchmarks/weak_segmentation.py` (do not edit by hand). "
         f"Demo set (tuning only): {n_demo} cases of the demo generator (seeds {DEMO_SEED0}+). Held-out harder set "
         f"(reported): {n_hard} cases of `medcam3d.demo.synthetic.make_hard_phantom` (seeds {HARD_SEED0}+: smaller "
         "lesions, two lesions of a class, lesions against the organ, the fat shell or the bone), used for nothing "
         "else. Both sets are sampled on the five scanner grids in turn and generated in memory. Every number below "
         "is on the held-out set, with one setting per (model, map, method) chosen on the demo set. Scores are per "
         "(case, present class), the class being given (ground-truth-known localization) and segmented on its own; "
         "box IoU (the best predicted box of that class) and 'lesions found' (a predicted component overlaps it) are "
         "per lesion. Mean ± std."),
        "",
        "## Held-out harder set",
        "",
        head,
        *table,
        "",
        ("- *oracle threshold*: the best fraction of the map's maximum per case and class, chosen by looking at the "
         "truth: an upper bound for thresholding, not a method."),
        ("- *threshold*: one fraction of the maximum for every case (the best mean Dice on the demo set), connected "
         "components as lesions: what medcam3d did before `medcam3d.segment`."),
        ("- *random_walker* / *region_growing*: `medcam3d.segment.segment` (seed → expand → constrain) with the "
         "setting listed (what differs from `SegmentSettings()`; the full settings are below)."),
        ("- *hirescam*: HiResCAM on the last layer (8 mm cells), the default explanation; *fused*: LayerCAM on "
         "`features.relu0` (4 mm cells) gated by it (`medcam3d.segment.gated_maps`)."),
        "- pointing game: the map's maximum lies in the class's mask (one value per map, whatever the method).",
        ("- MONAI's `CRF` block could not be compared: it needs MONAI's compiled extension (`monai._C`), which the "
         "pip wheels do not ship."),
        "",
        "Classification (threshold 0.5) and pointing game per class on the held-out set:",
        "",
        "| model | accuracy, demo set | accuracy, held-out | held-out accuracy "
        + " / ".join(names) + " | pointing game hirescam " + " / ".join(names) + " | pointing game fused "
        + " / ".join(names) + " |",
        "|---|---|---|---|---|---|",
    ]
    for model, (demo_acc, hard_acc, per_class) in accuracies.items():
        lines.append(f"| {model} | {demo_acc:.2f} | {hard_acc:.2f} | " + " / ".join(f"{v:.2f}" for v in per_class) + " | "
                     + " / ".join(f"{v:.2f}" for v in pointings[(model, 'hirescam')]) + " | "
                     + " / ".join(f"{v:.2f}" for v in pointings[(model, 'fused')]) + " |")
    lines.append("")
    if best_key:
        rows = results[best_key]
        goal_dice, goal_box = float(np.mean(rows["dice"])), float(np.mean(rows["box_iou"]))
        per_class = {c: [s for cc, s, _, _ in rows["by"] if cc == c] for c in range(len(names))}
        dice_c = {c: float(np.mean([s["dice"] for s in v])) for c, v in per_class.items() if v}
        box_c = {c: float(np.mean([b for s in v for b in s["box_ious"]])) for c, v in per_class.items() if v}
        found_c = {c: float(np.mean([f for s in v for f in s["found"]])) for c, v in per_class.items() if v}
        weak_acc = accuracies[best_key[0]][2]
        met = goal_dice >= 0.8 and goal_box >= 0.6
        lines += [
            "## Goal: weakly-supervised model, one fixed setting",
            "",
            (f"Best row (`{best_key[1]}` map, `{best_key[2]}`): Dice **{goal_dice:.2f}** (goal ≥ 0.8), box IoU "
             f"**{goal_box:.2f}** (goal ≥ 0.6) over the present lesions of both classes. "
             + ("Both goals are met." if met else "The goal is not met.")),
            "",
        ]
        if not met:
            lines += [
                "What limits it, with the numbers of that row:",
                "",
                *_limits(names, weak_acc, pointings, best_key, dice_c, box_c, found_c),
                "",
            ]
        lines += [
            "By class, placement and number of lesions (that row; a case with two placements counts in both):",
            "",
            "| group | class instances | Dice | box IoU |",
            "|---|---|---|---|",
            *breakdown,
            "",
        ]
    lines += [
        "## Settings chosen on the demo set",
        "",
        ("One pass of coordinate search from `SegmentSettings()` over `SWEEPS` (a change is kept when it raises the "
         "mean Dice on the demo set). The library default (`SegmentSettings()`: random walker, smooth_mm 8, "
         "background 0.05, beta 1) is where every row's search starts; it was chosen on the demo set with an "
         "earlier weakly-supervised model, and the rows below say where each search ended."),
        "",
        "| model | map | method | setting | demo-set Dice |",
        "|---|---|---|---|---|",
        *tuning_log,
        "",
        "## Speed",
        "",
        (f"Segmenting a {' x '.join(map(str, shape))} CT-sized volume (one lesion, a feature-grid map, the best "
         f"row's setting) took {timing:.1f} s: the scan is touched only on crops around the candidates. Seconds per "
         "held-out case are in the table (all present classes)."),
        "",
        "![seeds, expansion and result](weak_segmentation.png)",
        "",
        ("The figure: one held-out case (the lesion whose Dice is nearest the median of the found ones), best "
         "weakly-supervised row: the map, the seeds, the random walker's foreground probability on the crop, and "
         "the result against the truth, on one slice."),
        "",
        f"Total run time: {seconds / 60:.0f} min ({torch.get_num_threads()} threads).",
        "",
    ]
    return "\n".join(lines)



# ============================================================================================
# The learned segmenter (medcam3d.weak): seed methods and held-out scores
# ============================================================================================

SECTION_MARK = "<!-- {name}:{edge} -->"


def _with_sections(text: str, sections: dict[str, list[str]]) -> str:
    """``text`` with each named section (between its marks) replaced, or appended before the speed section."""
    for name, lines in sections.items():
        start, end = SECTION_MARK.format(name=name, edge="start"), SECTION_MARK.format(name=name, edge="end")
        block = "\n".join([start, *lines, end])
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        elif "\n## Settings chosen on the demo set" in text:
            at = text.index("\n## Settings chosen on the demo set")
            text = text[:at] + "\n" + block + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    return text


def _update_sections(args, parts: set[str], log) -> int:
    """Recompute only ``parts`` (seeds, learned) and replace their sections of the existing report."""
    from medcam3d._files import atomic_write_text

    path = args.out / "weak_segmentation.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Weakly-supervised localization and segmentation\n"
    hard = make_cases("hard", args.cases) if parts & {"learned", "calibration"} and args.segmenter.exists() else []
    sections = _new_sections(args, parts, log, hard=hard)
    atomic_write_text(path, _with_sections(text, sections))
    log(f"updated {sorted(sections)} in {path}")
    return 0


def _new_sections(args, parts: set[str], log, *, hard) -> dict[str, list[str]]:
    import tempfile

    cache = args.cache or Path(tempfile.mkdtemp(prefix="medcam3d-weak-"))
    cache.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[str]] = {}
    if "seeds" in parts:
        sections["seeds"] = seed_section(args, cache, log)
    if "learned" in parts:
        sections["learned"] = learned_section(args, cache, hard, log)
    if "calibration" in parts and args.segmenter.exists():
        sections["calibration"] = calibration_section(args, hard, log)
    return sections


# ---------------------------------------------------------------------------------- seed methods

#: Seed methods compared (the Explainer's ``method=``; ``a*b`` multiplies their maps, medcam3d.weak.seed_maps).
SEED_METHODS = ("hirescam", "layercam", "fused", "scorecam", "gradxinput", "smoothgrad", "integrated_gradients",
                "gradxinput*fused")
#: Seed settings tried per method on the demo set (the rest: SeedSettings() defaults).
SEED_SWEEP = {"smooth": [1.0, 2.5], "quantile": [0.8, 0.95], "max_peaks": [1, 2], "region_radius": [1.0]}
WEAK_MODEL = ROOT / "data_samples" / "demo_model_weak.pt"
SEGMENTER = ROOT / "data_samples" / "weak_segmenter" / "weak_segmenter.yaml"


def seed_maps_cached(method: str, calibration: int, demo: int, cache: Path, log) -> dict:
    """Class maps of ``method`` (label-only model) on the model grid: ``calibration`` training scans (seeds 0+,
    image labels) and ``demo`` demo-set scans (seeds 2 000 000+, with masks); cached as ``seedmaps_<method>.npz``."""
    from medcam3d.weak import seed_maps as combine, seed_methods

    path = cache / f"seedmaps_{method.replace('*', '_x_')}_{calibration}_{demo}.npz"
    if path.exists():
        return dict(np.load(path))
    model = load_model(WEAK_MODEL)
    grid = synthetic.model_grid()
    explainers = [medcam3d.Explainer(model, method=m, layer="auto", class_names=list(synthetic.CLASS_NAMES))
                  for m in seed_methods(method)]
    out = {}
    for name, seeds in (("cal", range(0, calibration)), ("demo", range(DEMO_SEED0, DEMO_SEED0 + demo))):
        images, labels, masks = [], [], []
        for seed in seeds:
            phantom = synthetic.make_phantom(seed)
            image, truth = phantom.sample(grid)
            images.append(synthetic.scale_intensity(image))
            labels.append(phantom.present)
            masks.append(truth)
        x = torch.from_numpy(np.stack(images)[:, None])
        started = time.perf_counter()
        maps = np.concatenate([combine(explainers, x[i:i + 4], grid) for i in range(0, len(x), 4)])
        out[f"{name}_maps"], out[f"{name}_labels"], out[f"{name}_masks"] = maps, np.asarray(labels), np.stack(masks)
        out[f"{name}_seconds"] = np.asarray(time.perf_counter() - started)
    np.savez_compressed(path, **out)
    log(f"seed maps of {method}: {float(out['cal_seconds']) + float(out['demo_seconds']):.0f} s")
    return out


def seed_scores(maps: dict, settings) -> dict:
    """Seed precision on the demo set: levels calibrated on the calibration scans without each class."""
    from medcam3d.weak import calibrate_levels, find_seeds, smooth_map

    classes = len(synthetic.CLASS_NAMES)
    cal, cal_labels = maps["cal_maps"], maps["cal_labels"]
    maxima = [[float(smooth_map(cal[i, c], settings.smooth).max()) for i in range(len(cal)) if not cal_labels[i, c]]
              for c in range(classes)]
    levels = calibrate_levels(maxima, settings.quantile)
    inside, total, seeded, lesions = np.zeros(classes), np.zeros(classes), np.zeros(classes), np.zeros(classes)
    background_in, background = 0, 0
    for i in range(len(maps["demo_maps"])):
        present, truth = maps["demo_labels"][i], maps["demo_masks"][i]
        found = find_seeds(maps["demo_maps"][i], present, levels.tolist(), settings)
        for c in range(classes):
            if present[c]:
                mine = found.labels == c + 1
                total[c] += mine.sum()
                inside[c] += (mine & (truth == c + 1)).sum()
                lesions[c] += 1
                seeded[c] += bool((mine & (truth == c + 1)).any())
        bg = found.labels == 0
        background += int(bg.sum())
        background_in += int((bg & (truth == 0)).sum())
    precision = np.where(total > 0, inside / np.maximum(total, 1), 0.0)
    found_share = seeded / np.maximum(lesions, 1)
    return {"precision": precision.tolist(), "seeded": found_share.tolist(), "voxels": (total / np.maximum(lesions, 1)).tolist(),
            "background": background_in / max(background, 1), "score": float(np.mean(precision * found_share))}


def seed_section(args, cache: Path, log) -> list[str]:
    import itertools

    from medcam3d.weak import DEFAULT_SEED_METHOD, SeedSettings

    calibration, demo = args.seed_cases
    rows, best_overall = [], None
    known_file = cache / f"seedscores_{calibration}_{demo}.json"  # scores of (method, setting), reused
    known = json.loads(known_file.read_text()) if known_file.exists() else {}
    for method in [m.strip() for m in args.seed_methods.split(",") if m.strip()]:
        maps = seed_maps_cached(method, calibration, demo, cache, log)
        seconds = (float(maps["cal_seconds"]) + float(maps["demo_seconds"])) / (calibration + demo)
        best = None
        for values in itertools.product(*SEED_SWEEP.values()):
            settings = SeedSettings(**dict(zip(SEED_SWEEP, values)))
            key = f"{method} {json.dumps(settings.to_dict(), sort_keys=True)}"
            if key not in known:
                known[key] = seed_scores(maps, settings)
                known_file.write_text(json.dumps(known))
            scores = known[key]
            if best is None or scores["score"] > best[1]["score"] + 1e-9:
                best = (settings, scores)
        assert best is not None
        settings, scores = best
        log(f"seeds {method}: {scores}")
        rows.append((method, settings, scores, seconds))
        if best_overall is None or scores["score"] > best_overall[2]["score"]:
            best_overall = (method, settings, scores)
    names = synthetic.CLASS_NAMES
    lines = [
        "## Seed methods (learned segmenter, chosen on the demo set)",
        "",
        (f"Generated by `python benchmarks/weak_segmentation.py --parts seeds`. The label-only model's maps of each "
         f"method on the model grid; the absolute seed level of each class is the chosen quantile of its smoothed map's "
         f"maximum over {calibration} training scans (seeds 0+) labelled without it (image labels only); the seeds of "
         f"{demo} demo-set scans (seeds {DEMO_SEED0}+, one lesion per present class) are then compared with the masks. "
         "*Precision*: seed voxels of a class inside that class's lesion; *seeded*: lesions with at least one seed voxel "
         "inside; *background*: background seeds outside every lesion. Each method with its best setting of "
         f"`{SEED_SWEEP}` (score: mean over classes of precision x seeded). *s / scan*: wall-clock seconds per "
         "scan of the maps when they were computed, on 2 CPU cores shared with other jobs: relative costs only."),
        "",
        "| seed method | setting (smooth, quantile, peaks, radius) | precision " + " / ".join(names) + " | seeded "
        + " / ".join(names) + " | seed voxels per lesion | background precision | score | s / scan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, settings, scores, seconds in rows:
        mark = " **(default)**" if method == DEFAULT_SEED_METHOD else ""
        lines.append(f"| `{method}`{mark} | {settings.smooth:g}, {settings.quantile:g}, {settings.max_peaks}, "
                     f"{settings.region_radius:g} | " + " / ".join(f"{v:.2f}" for v in scores["precision"]) + " | "
                     + " / ".join(f"{v:.2f}" for v in scores["seeded"]) + " | "
                     + " / ".join(f"{v:.1f}" for v in scores["voxels"]) + f" | {scores['background']:.4f} | "
                     f"{scores['score']:.2f} | {seconds:.1f} |")
    if best_overall is not None:
        method, settings, scores = best_overall
        lines += ["", (f"Best: `{method}` (smooth {settings.smooth:g}, quantile {settings.quantile:g}, max_peaks "
                       f"{settings.max_peaks}, region_radius {settings.region_radius:g}); the library default "
                       f"(`medcam3d.weak.DEFAULT_SEED_METHOD`) is `{DEFAULT_SEED_METHOD}`.")]
    measured = {m.strip() for m in args.seed_methods.split(",")}
    missing = [m for m in ("occlusion", *SEED_METHODS) if m not in measured]
    if missing:
        lines += ["", (f"Not measured in this run: {', '.join(f'`{m}`' for m in missing)} (cost: occlusion at its default "
                       "lesion-scale patch needs about 3,400 forward passes per scan, SmoothGrad 16 gradient passes; "
                       "hours for the 70 scans of this comparison on 2 shared CPU cores).")]
    return lines


# ---------------------------------------------------------------------------------- learned segmenter


def train_reference(segmenter_config: Path, cache: Path, log) -> Path:
    """The fully supervised reference: the segmenter's network, cases and epochs, trained on the masks."""
    from medcam3d import weak

    record = json.loads(segmenter_config.with_suffix(".json").read_text())
    path = cache / "reference" / "reference.yaml"
    if path.exists():
        return path
    count = int(record["demo_generator"]["cases"])
    data = weak.demo_training_set(count, with_masks=True)
    settings = weak.TrainSettings(**{k: v for k, v in record["settings"].items() if k in ("epochs", "batch_size", "lr",
                                                                                           "weight_decay", "seed")})
    options = {k: v for k, v in record["args"].items() if k not in ("out_channels",)}
    segmenter = weak.train_segmenter(data, supervised=True, settings=settings, network=record["network"],
                                     network_options=options, log=log, log_every=50)
    path.parent.mkdir(parents=True, exist_ok=True)
    weak.save_segmenter(segmenter, path, preprocessing=synthetic.PREPROCESSING)
    return path


def score_segmenter(config_path: Path, cases: list[dict], threshold: float | None = None) -> dict:
    """Per (case, present class) scores of a segmenter on scanner-grid cases (``medcam3d segment --threshold``)."""
    from medcam3d.weak import SegmenterSettings, load_segmenter, segment_scan

    config, model = load_segmenter(config_path)
    settings = SegmenterSettings(threshold=threshold)
    names = list(config.class_names)[1:]
    rows = []
    for case in cases:
        x, _ = preprocess((case["image"], case["space"]), config.preprocessing)
        started = time.perf_counter()
        result = segment_scan(model, x, case["space"], names, settings=settings)
        seconds = time.perf_counter() - started
        for c in present(case):
            boxes = [l.box for l in result.lesions if l.class_index == c]
            s = score(result.mask(c), case["labels"] == c + 1, boxes, case["space"])
            lesions = [entry for entry in case["lesions"] if entry[0] == c]
            rows.append({"case": case["id"], "class": c, "lesions": len(lesions), "seconds": seconds, **s})
    return {"rows": rows}


def _summary(rows: list[dict]) -> dict:
    boxes = [b for r in rows for b in r["box_ious"]]
    found = [f for r in rows for f in r["found"]]
    return {"n": len(rows), "dice": _fmt([r["dice"] for r in rows]), "iou": _fmt([r["iou"] for r in rows]),
            "hd95": _median([r["hd95"] for r in rows]), "box": _fmt(boxes), "found": float(np.mean(found)) if found else math.nan,
            "extra": float(np.mean([max(r["predicted_lesions"] - sum(r["found"]), 0) for r in rows])) if rows else math.nan,
            "dice_mean": float(np.mean([r["dice"] for r in rows])) if rows else math.nan,
            "box_mean": float(np.mean(boxes)) if boxes else math.nan}


def learned_section(args, cache: Path, hard: list[dict], log) -> list[str]:
    segmenters = {}
    if args.segmenter.exists():
        segmenters["learned, weakly supervised (image labels only)"] = args.segmenter
    else:
        log(f"no segmenter at {args.segmenter}: train one with medcam3d weak-train (see docs/weak_segmentation.md)")
    reference = args.reference
    if reference is None and args.train_reference and args.segmenter.exists():
        reference = train_reference(args.segmenter, cache, log)
    elif reference is None and (cache / "reference" / "reference.yaml").exists():
        reference = cache / "reference" / "reference.yaml"
    if reference is not None:
        segmenters["same network, fully supervised (masks; **upper bound**)"] = reference
    names = synthetic.CLASS_NAMES
    lines = [
        "## Learned segmenter (`medcam3d weak-train`): held-out harder set",
        "",
        (f"Generated by `python benchmarks/weak_segmentation.py --parts learned`. The same {args.cases} held-out cases "
         "on their scanner grids; each scan is preprocessed as the classifier's config says, the segmenter's "
         "probabilities are resampled onto the scan (`medcam3d.weak.segment_scan`, the `medcam3d segment` command) "
         "and every lesion of the label map is scored, the class given as above. No setting of the learned segmenter "
         "was chosen on this set."),
        "",
        ("How it is trained (`medcam3d.weak`): a MONAI network with one output per class plus background, from image "
         "labels only, with SEC's three losses in 3D. *Seed*: cross-entropy on the seed voxels only (each seeded class "
         "weighing the same), seeds being the local maxima of the classifier's smoothed maps at or above a level "
         "calibrated on the training scans without the class (a quantile of the map's maximum there, not a fraction "
         "of each scan's own maximum), grown to a few voxels; background seeds where every present class's map is "
         "low, far from the seeds, and everywhere in a scan labelled with no class. *Expand*: global weighted rank "
         "pooling of each class's probability (decay 0.98, about the 50 highest voxels) against the image labels, "
         "absent classes max-pooled towards 0. *Size prior* (when the record has `size_bounds`): a present class's mean "
         "probability over the scan may not exceed its bound, the median extent of its seeded peaks in the classifier's "
         "smoothed map (the connected region at half the peak), measured on the training scans; above it the loss is "
         "the log of the excess ratio. *Constrain*: KL divergence from a local mean-field CRF refinement of "
         "the output on the scan (Gaussian appearance and smoothness kernels over the 26 neighbours, 3 iterations, on "
         "the box where a class may be present). A 3D dense CRF from the package registry did not install here "
         "(SimpleCRF 0.2.1.1 is source-only and does not build against NumPy 2; pydensecrf is 2D), and the random "
         "walker costs about a second per volume and step, so the refinement is computed in torch."),
        "",
    ]
    if segmenters:
        lines += ["| segmenter | lesions per class | class instances | Dice | Dice " + " / ".join(names) + " | IoU | "
                  "HD95 (mm, median) | box IoU | lesions found | extra components | s / case |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    goal = None
    for label, path in segmenters.items():
        rows = score_segmenter(path, hard)["rows"]
        for group, chosen in (("all", rows), ("one", [r for r in rows if r["lesions"] == 1]),
                              ("two", [r for r in rows if r["lesions"] == 2])):
            if not chosen:
                continue
            summary = _summary(chosen)
            per_class = [_fmt([r["dice"] for r in chosen if r["class"] == c]) for c in range(len(names))]
            seconds = np.median([r["seconds"] for r in chosen])
            lines.append(f"| {label} | {group} | {summary['n']} | {summary['dice']} | {' / '.join(per_class)} | "
                         f"{summary['iou']} | {summary['hd95']} | {summary['box']} | {summary['found']:.2f} | "
                         f"{summary['extra']:.2f} | {seconds:.2f} |")
            if group == "all" and "weakly" in label:
                goal = summary
            log(f"learned {label} {group}: Dice {summary['dice']}, box IoU {summary['box']}, found {summary['found']:.2f}")
    if goal is not None:
        record = json.loads(args.segmenter.with_suffix(".json").read_text())
        met = goal["dice_mean"] >= 0.8 and goal["box_mean"] >= 0.6 and goal["found"] >= 0.9
        seeds = record.get("seeds", {})
        lines += [
            "",
            (f"Goal (Dice ≥ 0.8, box IoU ≥ 0.6, lesions found ≥ 0.9): Dice **{goal['dice_mean']:.2f}**, box IoU "
             f"**{goal['box_mean']:.2f}**, lesions found **{goal['found']:.2f}**: "
             + ("met." if met else f"not met (short by {max(0.8 - goal['dice_mean'], 0):.2f} Dice, "
                                   f"{max(0.6 - goal['box_mean'], 0):.2f} box IoU, {max(0.9 - goal['found'], 0):.2f} "
                                   "lesions found).")),
            "",
            (f"The segmenter: `{record.get('network')}` {record.get('args')}, trained by `medcam3d weak-train` on "
             f"{record.get('train_cases')} scans of the demo generator (image labels only) for {record.get('steps')} "
             f"steps in {record.get('wall_time_s', record.get('seconds'))} s wall time ({record.get('threads')} threads); "
             f"seeds from `{seeds.get('method')}` (levels {[round(v, 6) for v in seeds.get('levels', [])]}; training scans "
             f"with seeds per class {[None if v is None else round(v, 2) for v in seeds.get('scans_with_seeds', [])]}"
             + (f"; background reach {seeds.get('settings', {}).get('background_reach')}; size prior weight "
                f"{record.get('settings', {}).get('size_weight')}, bounds {[round(v, 5) for v in record['size_bounds']]} "
                f"of the scan, from map extents {seeds.get('map_extent_voxels')} voxels" if record.get("size_bounds") else "")
             + "). "
             f"The record of the run is `{args.segmenter.with_suffix('.json').name}` beside its config."),
        ]
    if not segmenters:
        shown = args.segmenter.relative_to(ROOT) if args.segmenter.is_relative_to(ROOT) else args.segmenter
        lines += [(f"**Not yet reported**: no segmenter was found at `{shown}`. Train one with `medcam3d weak-train --config "
                       "configs/demo_weak.yaml --demo-cases 300 --epochs 3 --out data_samples/weak_segmenter` and run "
                       "`python benchmarks/weak_segmentation.py --parts learned --train-reference`.")]
    return lines


# ---------------------------------------------------------------------------------- calibration

#: Values of ``medcam3d segment --threshold`` compared (None: the most probable label).
SEGMENTER_THRESHOLDS = (None, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def calibration_section(args, hard: list[dict], log) -> list[str]:
    """The segmenter's threshold chosen on the demo set (mean Dice); every value on the held-out set, as a diagnostic."""
    demo = make_cases("demo", args.tune_cases)
    rows = []
    for threshold in SEGMENTER_THRESHOLDS:
        on_demo = _summary(score_segmenter(args.segmenter, demo, threshold)["rows"])
        on_hard = _summary(score_segmenter(args.segmenter, hard, threshold)["rows"])
        rows.append((threshold, on_demo, on_hard))
        log(f"threshold {threshold}: demo Dice {on_demo['dice_mean']:.3f}, held-out Dice {on_hard['dice_mean']:.3f} "
            f"found {on_hard['found']:.2f}")
    chosen = max(rows, key=lambda row: row[1]["dice_mean"])
    best = max(rows, key=lambda row: row[2]["dice_mean"])

    def name(threshold: float | None) -> str:
        return "most probable label" if threshold is None else f"{threshold:g}"

    lines = [
        "## Learned segmenter: its threshold (`medcam3d segment --threshold`)",
        "",
        (f"Generated by `python benchmarks/weak_segmentation.py --parts calibration`. The shipped segmenter with each "
         f"threshold: scored on the {len(demo)} demo-set cases (the choice) and on the {len(hard)} held-out cases "
         "(reported for every value as a diagnostic: a value picked on this column would look at the answer)."),
        "",
        "| threshold | demo-set Dice | demo-set lesions found | held-out Dice | held-out box IoU | held-out lesions found | held-out extra components |",
        "|---|---|---|---|---|---|---|",
    ]
    for threshold, on_demo, on_hard in rows:
        mark = " **(chosen on the demo set)**" if threshold == chosen[0] else ""
        lines.append(f"| {name(threshold)}{mark} | {on_demo['dice_mean']:.2f} | {on_demo['found']:.2f} | {on_hard['dice_mean']:.2f} | "
                     f"{on_hard['box_mean']:.2f} | {on_hard['found']:.2f} | {on_hard['extra']:.2f} |")
    text = (f"The demo set chooses **{name(chosen[0])}** (held-out Dice {chosen[2]['dice_mean']:.2f}, lesions found "
            f"{chosen[2]['found']:.2f}).")
    if best[0] != chosen[0]:
        text += (f" The best held-out value would be {name(best[0])} (Dice {best[2]['dice_mean']:.2f}, found "
                 f"{best[2]['found']:.2f}): the segmenter gives many of the held-out lesions it misses a probability "
                 "above the background's level elsewhere but below the most probable label's, so part of the gap to the "
                 "goal is its calibration on lesions less typical than those it was trained on. The demo set, whose "
                 "lesions are like the training ones, cannot see this; `--threshold` is there for a reader who prefers "
                 "sensitivity.")
    lines += ["", text]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
