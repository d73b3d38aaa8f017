"""The evaluate job's report: what it measures (:data:`METRICS`, :data:`APPROACHES`), the summary
tables, ``summary.md``, the curves and randomization plots, ``segmentation.json`` and the failure
gallery's README (:func:`write_outputs`). The metrics themselves are computed by
:mod:`medcam3d.jobs.evaluate`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.integrate import trapezoid

from .._json import json_values
from .outputs import record_own_files
from .report import save_figure as _save_figure, write_csv as _write_csv, write_text as _write_text

__all__ = ["APPROACHES", "METRICS", "REPORT_FILES", "SCORES", "SEGMENTATION_METRICS", "EvaluationState", "approach_settings",
           "write_outputs"]

#: The report's files in ``out_dir`` (besides ``failures/<case>_<class>_<FP|FN>_<method>.png``): each
#: is replaced only when medcam3d wrote it there (see :func:`medcam3d.jobs.outputs.check_own_files`).
REPORT_FILES = ("metrics.csv", "cases.csv", "summary.csv", "summary.md", "curves.png", "randomization.csv",
                "randomization.png", "segmentation.json", "failures/README.md")

#: Summary metrics, in table order: (column, short description).
METRICS: tuple[tuple[str, str], ...] = (
    ("pointing_game", "peak inside the lesion"),
    ("pointing_game_tol", "peak within the tolerance of the lesion"),
    ("energy_pointing_game", "share of positive map mass inside the lesion"),
    ("best_dice", "best Dice over thresholds"),
    ("auc_dice", "mean Dice over thresholds (area under the curve)"),
    ("best_iou", "best IoU over thresholds"),
    ("auc_iou", "mean IoU over thresholds"),
    ("box_iou", "IoU of the boxes of the map's largest component (≥ 0.5 max) and of the lesion"),
    ("deletion_auc", "area under the deletion curve"),
    ("insertion_auc", "area under the insertion curve"),
    ("completeness_error", "|Σ map − (logit − bias)| (HiResCAM, suitable heads)"),
)
_LOWER_IS_BETTER = {"deletion_auc", "completeness_error"}

#: Weakly-supervised segmentation approaches: (name, description). ``fused`` needs ``fuse_layer``.
APPROACHES: tuple[tuple[str, str], ...] = (
    ("threshold", "the map at or above 0.5 x its maximum, the parts connected to its peaks (the baseline)"),
    ("segment", "seed-expand-constrain: medcam3d.segment.segment with its default settings"),
    ("fused", "seed-expand-constrain on the fused map: LayerCAM on the fuse layer gated by the method's map"),
)
#: What each approach is scored by: (name, description); the columns are ``<approach>_<name>``.
SCORES: tuple[tuple[str, str], ...] = (
    ("dice", "Dice"), ("iou", "IoU"), ("hd95_mm", "Hausdorff 95 (mm; undefined when nothing is segmented)"),
    ("box_iou", "box IoU in mm, per lesion (best predicted box)"), ("lesions_found", "share of the lesions hit"),
)
#: Segmentation columns of ``metrics.csv`` and ``summary.csv``: ``<approach>_<score>``, and the fused
#: map's own pointing game (the other approaches use the method's map: ``pointing_game``).
SEGMENTATION_METRICS: tuple[tuple[str, str], ...] = tuple(
    (f"{approach}_{score}", f"{approach}: {text}") for approach, _ in APPROACHES for score, text in SCORES
) + (("fused_pointing_game", "peak of the fused map inside the lesion"),)
_LOWER_IS_BETTER |= {f"{approach}_hd95_mm" for approach, _ in APPROACHES}


def approach_settings():
    """The fixed :class:`medcam3d.segment_records.SegmentSettings` of each approach."""
    from ..segment_records import SegmentSettings

    return {"threshold": SegmentSettings(method="threshold", smooth_mm=0.0), "segment": SegmentSettings(),
            "fused": SegmentSettings()}


@dataclass
class EvaluationState:
    """What the evaluate job gathers over a cohort, and the report is made of."""

    rows: list[dict] = field(default_factory=list)
    cases: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, list]] = field(default_factory=dict)  # method -> mode -> [(fractions, scores)]
    failures: list[dict] = field(default_factory=list)
    randomization: list = field(default_factory=list)  # (case, class, report)
    notes: list[str] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)  # random-ranking deletion/insertion rows
    segmentation: list[dict] = field(default_factory=list)  # one record per (case, class, method, approach)

    def add_curves(self, method: str, curves: dict) -> None:
        """Add one case's deletion/insertion curves (``{mode: curve}``) of ``method``."""
        for mode, curve in curves.items():
            self.curves.setdefault(method, {}).setdefault(mode, []).append((curve.fractions, curve.scores))


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    array = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan"), 0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0, int(array.size)


def _summary(rows: list[dict], methods: list[str]) -> list[dict]:
    table = []
    for method in methods:
        own = [r for r in rows if r["method"] == method]
        for metric, _ in METRICS + SEGMENTATION_METRICS:
            mean, std, n = _mean_std([r[metric] for r in own if metric in r and r[metric] != ""])
            if n:
                table.append({"method": method, "metric": metric, "mean": round(mean, 4), "std": round(std, 4), "n": n})
    return table


def _classification(rows: list[dict], method: str) -> dict:
    own = [r for r in rows if r["method"] == method and r["outcome"]]
    counts = {k: sum(r["outcome"] == k for r in own) for k in ("TP", "TN", "FP", "FN")}
    return counts


def _markdown(state: EvaluationState, summary: list[dict], methods: list[str], *, tolerance_mm: float, seconds: float,
              baseline: object, steps: int, max_fraction: float) -> str:
    ok = [c for c in state.cases if c["status"] == "ok"]
    failed = [c for c in state.cases if c["status"] != "ok"]
    lines = ["# medcam3d evaluate", "",
             f"{len(ok)} case(s) evaluated, {len(failed)} failed, in {seconds:.1f} s. "
             f"Localization on the scan's grid for present lesions; deletion/insertion on the model's input grid "
             f"(the first {100 * max_fraction:g} % of the voxels in {steps} steps, baseline {baseline!r}) for "
             f"classes present or predicted (p ≥ 0.5); `random` is the same perturbation in a random order "
             f"(chance level).", ""]
    metrics = [m for m, _ in METRICS if any(s["metric"] == m for s in summary)]
    if metrics:
        lines += ["## Mean ± std per method", "",
                  "| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for method in [*methods, "random"]:
            if not any(row["method"] == method for row in summary):
                continue
            cells = []
            for metric in metrics:
                found = [s for s in summary if s["method"] == method and s["metric"] == metric]
                cells.append(f"{found[0]['mean']:.3f} ± {found[0]['std']:.3f} (n={found[0]['n']})" if found else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Metrics: " + "; ".join(
            f"`{m}` {d}" + (" (↓)" if m in _LOWER_IS_BETTER else "") for m, d in METRICS if m in metrics)
            + f". Tolerance of `pointing_game_tol`: {tolerance_mm:g} mm.", ""]
    lines += _segmentation_markdown(summary, methods, state)
    counts = _classification(state.rows, methods[0]) if methods else {}
    if any(counts.values()):
        lines += ["## Classification (threshold 0.5)", "",
                  "| TP | TN | FP | FN |", "|---|---|---|---|",
                  f"| {counts['TP']} | {counts['TN']} | {counts['FP']} | {counts['FN']} |", ""]
    for case_id, label, report in state.randomization:
        lines += [f"## Model-parameter randomization test (case {case_id}, class {label})", "",
                  f"Layers re-initialized from the output down in {len(report.steps)} cascading steps; similarity of each "
                  f"map to the trained model's. A method passes when its mean |Spearman| over the cascade is < {report.threshold}. CAM maps are "
                  "compared signed, Guided Backprop (the known failing reference) as magnitude pooled onto the CAM "
                  "feature grid.", "",
                  report.to_markdown(), "![randomization](randomization.png)", ""]
    if state.curves:
        lines += ["## Deletion and insertion curves", "", "![curves](curves.png)", ""]
    lines += ["## Failure gallery", ""]
    if state.failures:
        lines += ["Misclassified (case, class) pairs with what each method looked at: [failures/README.md]"
                  "(failures/README.md).", ""]
        lines += [f"- {f['case']} · {f['class']} · {f['outcome']} (p = {f['probability']:.2f}) · {f['method']}: "
                  f"![{f['case']}]({f['picture']})" for f in state.failures]
    else:
        lines.append("No misclassified case with known ground truth.")
    if failed:
        lines += ["", "## Cases that failed", ""] + [f"- {c['case']}: {c['error']}" for c in failed]
    if state.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in state.notes]
    return "\n".join(lines) + "\n"


def _segmentation_markdown(summary: list[dict], methods: list[str], state: EvaluationState) -> list[str]:
    """The weakly-supervised segmentation table (mean ± std (n) per method and approach)."""
    if not state.segmentation:
        return []
    cell = {(s["method"], s["metric"]): s for s in summary}

    def show(method: str, metric: str) -> str:
        found = cell.get((method, metric))
        return f"{found['mean']:.3f} ± {found['std']:.3f} (n={found['n']})" if found else "–"

    used = [name for name, _ in APPROACHES if any(r["approach"] == name for r in state.segmentation)]
    lines = ["## Weakly-supervised segmentation", "",
             "Each present class with a mask, the class given and segmented on its own from the method's map and the "
             "scan (`medcam3d.segment`), scored on the scan's grid: Dice, IoU, Hausdorff 95 in mm (MONAI; undefined, "
             "and left out of n, when nothing was segmented), box IoU in mm per lesion (the best predicted box), the "
             "share of lesions hit, and the pointing game of the map. Details and each lesion's box: "
             "[segmentation.json](segmentation.json).", "",
             "| method | approach | Dice | IoU | HD95 (mm, ↓) | box IoU | lesions found | pointing game | s / class |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for approach in used:
            own = [r["seconds"] for r in state.segmentation if r["method"] == method and r["approach"] == approach]
            if not own:
                continue
            pointing = "fused_pointing_game" if approach == "fused" else "pointing_game"
            lines.append(f"| {method} | {approach} | " + " | ".join(
                show(method, f"{approach}_{score}") for score, _ in SCORES) + f" | {show(method, pointing)} | "
                f"{float(np.median(own)):.2f} |")
    lines += ["", "Approaches: " + "; ".join(f"`{name}` {text}" for name, text in APPROACHES if name in used) + ".", ""]
    return lines


def _plot_curves(path: Path, curves: dict[str, dict[str, list]]) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, mode in zip(axes, ("deletion", "insertion")):
        for number, (method, by_mode) in enumerate(curves.items()):
            pairs = by_mode.get(mode, [])
            if not pairs:
                continue
            fractions = pairs[0][0]
            stack = np.asarray([scores for _, scores in pairs])
            mean, std = stack.mean(0), stack.std(0)
            area = float(trapezoid(mean, fractions) / fractions[-1])
            style = dict(color="grey", ls="--") if method == "random" else dict(ls=("-", ":", "-.")[number % 3],
                                                                                   lw=2.6 - 0.7 * (number % 3))
            axis.plot(100 * fractions, mean, label=f"{method} (AUC {area:.3f}, n={len(stack)})", **style)
            axis.fill_between(100 * fractions, mean - std, mean + std, alpha=0.12, color=style.get("color"))
        verb = "removed" if mode == "deletion" else "revealed"
        axis.set(title=f"{mode} (mean ± std)", xlabel=f"% of the input voxels {verb}, most important first",
                 ylabel="class probability", ylim=(-0.02, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(path, figure)


def _plot_randomization(path: Path, reports: list) -> Path:
    from matplotlib.figure import Figure

    case_id, label, report = reports[0]
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    steps = np.arange(1, len(report.steps) + 1)
    for axis, (name, values) in zip(axes, (("Spearman rank correlation", report.spearman), ("SSIM", report.ssim))):
        for number, (method, series) in enumerate(values.items()):
            # distinct styles: on a GAP head HiResCAM and Grad-CAM coincide and must both stay visible
            style = dict(ls="--", marker="^", lw=1.5, ms=6) if "guided" in method else \
                dict(ls=("-", ":", "-.")[number % 3], marker="osDv"[number % 4], lw=3.0 - 0.8 * (number % 3), ms=8 - 2 * (number % 3))
            axis.plot(np.r_[0, steps], np.r_[1.0, series], label=method, **style)
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_xticks(np.r_[0, steps])
        labels = [name if len(name) <= 26 else "…" + name[-25:] for name in report.steps]
        axis.set_xticklabels(["trained"] + [f"down to {s}" for s in labels], rotation=30, ha="right", fontsize=7)
        axis.set(title=f"{name} to the trained model's map", ylabel=name, ylim=(-1.05, 1.05))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Cascading randomization, output layer first (case {case_id}, class {label})", fontsize=10)
    figure.tight_layout()
    return _save_figure(path, figure)


def write_outputs(out: Path, state: EvaluationState, runner, *, tolerance_mm: float, seconds: float, baseline: object,
                   steps: int, max_fraction: float, segmentation: dict | None = None) -> None:
    methods = [e.method.name for e in runner.explainers]
    rows = state.rows + state.references
    summary = _summary(rows, [*methods, "random"])
    _write_csv(out / "metrics.csv", rows)
    _write_csv(out / "cases.csv", state.cases)
    _write_csv(out / "summary.csv", summary)
    written = ["metrics.csv", "cases.csv", "summary.csv", "summary.md"] + [f["picture"] for f in state.failures]
    if state.curves:
        _plot_curves(out / "curves.png", state.curves)
        written.append("curves.png")
    if state.randomization:
        rows = [{"case": case_id, "class": label, **row} for case_id, label, report in state.randomization
                for row in report.rows()]
        _write_csv(out / "randomization.csv", rows)
        _plot_randomization(out / "randomization.png", state.randomization)
        written += ["randomization.csv", "randomization.png"]
    gallery = ["# Failure gallery", "", "False positives (FP) and false negatives (FN) at p = 0.5, with the map of "
               "each method: what the model looked at when it was wrong.", ""]
    gallery += [f"## {f['case']} · {f['class']} · {f['outcome']} (p = {f['probability']:.2f}) · {f['method']}\n\n"
                f"![{f['case']} {f['method']}]({Path(f['picture']).name})\n" for f in state.failures]
    if state.failures:
        _write_text(out / "failures" / "README.md", "\n".join(gallery))
        written.append("failures/README.md")
    if segmentation is not None:
        _write_text(out / "segmentation.json", _segmentation_json(state, summary, segmentation["fuse_layer"]))
        written.append("segmentation.json")
    _write_text(out / "summary.md", _markdown(state, summary, methods, tolerance_mm=tolerance_mm, seconds=seconds,
                                              baseline=baseline, steps=steps, max_fraction=max_fraction))
    record_own_files(out, written, "evaluate")  # a later run may replace these, and only these


def _segmentation_json(state: EvaluationState, summary: list[dict], fuse_layer: str | None) -> str:
    """segmentation.json: settings, one record per (case, class, method, approach), the summary (strict JSON)."""
    settings = approach_settings()
    used = [name for name, _ in APPROACHES if name != "fused" or fuse_layer]
    names = {m for m, _ in SEGMENTATION_METRICS}
    document = {
        "approaches": [{"name": name, "description": text, "settings": settings[name].to_dict()}
                       for name, text in APPROACHES if name in used],
        "fuse_layer": fuse_layer,
        "scope": "present classes with a mask; each class given and segmented on its own, on the scan's grid",
        "records": [json_values(r, 6) for r in state.segmentation],
        "summary": [json_values(r, 6) for r in summary if r["metric"] in names],
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
