"""The evaluate job: localization, faithfulness and sanity metrics over a cohort, with a report.

For every case, class and method it computes, on the scan's grid where a ground-truth mask
exists, the pointing game (exact and with a tolerance in mm), the energy-based pointing game,
Dice/IoU over thresholds (best and area under the curve) and box IoU; on the model's input grid
the deletion and insertion curves (their areas); and HiResCAM's completeness error where the
head allows it. On the first case(s) it runs the cascading model-parameter randomization test,
with Guided Backprop as the known failing reference. For each present lesion class with a mask it
also scores weakly-supervised segmentation (:mod:`medcam3d.segment`, the class given and segmented
on its own): the *threshold* baseline (the map at or above 0.5 x its maximum, the parts connected
to its peaks), *seed-expand-constrain* (:func:`medcam3d.segment.segment` with its default
settings) and, with ``fuse_layer``, seed-expand-constrain on the *fused* map (LayerCAM on that
finer layer gated by the method's map, :func:`medcam3d.segment.gated_maps`): Dice, IoU, Hausdorff
95 in mm (MONAI), box IoU in mm per lesion, lesions found and the pointing game
(:func:`medcam3d.metrics.segmentation_scores`). It writes into ``out_dir``:

==========================  =========================================================================
``metrics.csv``             one row per (case, class, method)
``cases.csv``               one row per case: status, probabilities, truth
``summary.csv``/``.md``     mean ± std (and n) per method and metric; classification counts; the
                            randomization table
``curves.png``              mean deletion and insertion curves per method (± 1 std)
``randomization.png``       Spearman and SSIM to the original map per cascade step and method
``randomization.csv``       the same numbers
``failures/``               the failure gallery: a 3-plane picture per misclassified (case, class,
                            method), false positives and false negatives at p = 0.5, and
                            ``failures/README.md`` listing them
``segmentation.json``       the segmentation scores per (case, class, method, approach) with the
                            lesions' boxes in mm, the settings and the summary (strict JSON:
                            ``null`` where a value is undefined, e.g. HD95 when nothing was found)
==========================  =========================================================================

Ground truth: a mask is a label map on the scan's grid, label ``c + 1`` = class ``c``; without a
mask, a ``labels`` column of the CSV (class names or indices separated by ``;`` ``,`` ``|`` or
spaces) gives presence only. Every output file is written atomically. This module computes; what is
measured and how the report shows it (tables, ``summary.md``, plots, ``segmentation.json``) is
:mod:`medcam3d.jobs.evaluate_report`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch

from ..heatmap import heatmaps_of
from ..errors import CohortError
from .cases import Case, collect_cases
from .lock import output_lock
from .outputs import check_output_location, check_own_files
from .evaluate_report import (APPROACHES, METRICS, REPORT_FILES, SCORES, SEGMENTATION_METRICS, EvaluationState,
                              approach_settings, write_outputs)
from .report import unescape_row as _unescape_row

__all__ = ["evaluate", "run"]

logger = logging.getLogger(__name__)


def evaluate(
    config_path: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = ("hirescam", "gradcam"),
    masks: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    steps: int = 10,
    batch_size: int = 8,
    baseline: object = "blur",
    max_fraction: float = 0.05,
    tolerance_mm: float = 10.0,
    randomization_cases: int = 1,
    randomization_steps: int = 5,
    trust: bool = False,
    seed: int = 0,
    segmentation: bool = True,
    fuse_layer: str | None = None,
) -> Path:
    """Evaluate explanation methods on a cohort and write the report into ``out_dir``.

    Parameters
    ----------
    config_path : path
        YAML config (model, classes, preprocessing; see :mod:`medcam3d.config`).
    inputs : path
        Folder of scans or CSV (see :func:`collect_cases`).
    out_dir : path
        Created if needed; nothing is written outside it. It may not contain or lie inside an
        input (the scans, masks, the CSV or folder ``inputs``, ``masks``), another medcam3d job
        may not be writing into it (:mod:`medcam3d.jobs.lock`), and the report's files
        (:data:`REPORT_FILES`) in it must be absent or medcam3d's own from an earlier run.
    methods : sequence of str
        Explanation methods to compare.
    masks : path, optional
        Folder of ``<case>_mask.nii.gz`` label maps (label ``c + 1`` = class ``c``).
    device : str
        ``cpu``, ``cuda``, ``auto`` ...
    progress : bool
        A tqdm progress bar on stderr.
    steps, batch_size, baseline, max_fraction
        Deletion/insertion curves: steps per curve, volumes per forward pass, what removed voxels
        become, and the share of the ranked voxels the curves cover (default the first 5 %: a
        lesion is a small part of a 3D volume); see
        :func:`medcam3d.metrics.faithfulness.perturbation_curves`. A seeded random ranking gives
        the ``random`` reference rows.
    tolerance_mm : float
        Tolerance of ``pointing_game_tol``.
    randomization_cases : int
        How many cases (the first with a lesion, else the first) get the randomization test; 0: none.
    randomization_steps : int
        Cascade steps of the randomization test (the layers are grouped from the output down).
    trust : bool
        Allow model files that execute code (see :func:`medcam3d.models.load_model`).
    seed : int
    segmentation : bool
        Score weakly-supervised segmentation (:data:`APPROACHES`) for present lesions with a mask
        (about 1 s per lesion and method on the demo samples).
    fuse_layer : str, optional
        A finer layer (e.g. ``features.relu0`` of the demo model): adds the ``fused`` approach,
        LayerCAM on it gated by each method's map (one more explanation per case with a lesion).

    Returns
    -------
    Path
        ``out_dir``, holding ``summary.md`` and the files listed in the module docstring.

    Raises
    ------
    OutputConflictError
        ``out_dir`` over an input, in use by another medcam3d job, or holding a report file that
        medcam3d did not write (named in the message); nothing is written then.
    """
    from tqdm import tqdm

    from ..config import Config, load_config
    from ..models import load_model
    from .runner import Runner

    started = time.perf_counter()
    config = config_path if isinstance(config_path, Config) else load_config(config_path)
    if config.task == "segmentation":
        raise CohortError("evaluate needs a classifier (task multilabel, multiclass or binary); this config's task is "
                          "'segmentation'.")
    methods = [m.strip() for m in methods if m.strip()]
    if not methods:
        raise CohortError("Give at least one method, e.g. methods=('hirescam', 'gradcam').")
    cases = collect_cases(inputs, masks)
    out = Path(out_dir)
    listed = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)  # the CSV or folder is an input too
    check_output_location(out, [*listed, masks, *(p for case in cases for p in (*case.inputs, case.mask, case.region_mask))])
    model = load_model(config, trust=trust)
    runner = Runner(config, model, methods=methods, target="all", device=device, trust=trust)
    runner.check_cases_channels(cases)  # scans per case against the model's input channels, before any is read
    fine = None
    if segmentation and fuse_layer:
        from ..explainer import Explainer

        first = runner.explainers[0]
        fine = Explainer(runner.model, "layercam", layer=fuse_layer, class_names=config.class_names, amp=runner.amp,
                         output_activation=first.output_activation)  # an unknown layer is refused here
    # created only once the model, the cases and the layers are known to be good; one job at a time in it, and
    # none of the report's files may be a user's own (checked before any work)
    with output_lock(out, "evaluate", check=lambda: check_own_files(out, REPORT_FILES)):
        state = EvaluationState()
        chosen = _randomization_choice(cases, randomization_cases)
        bar = tqdm(cases, desc="evaluating", unit="case", file=sys.stderr, disable=not progress)
        for case in bar:
            bar.set_postfix_str(case.id)
            try:
                _evaluate_case(case, runner, out, state, steps=steps, batch_size=batch_size, baseline=baseline,
                               max_fraction=max_fraction, tolerance_mm=tolerance_mm, seed=seed,
                               randomize=case.id in chosen, randomization_steps=randomization_steps,
                               segmentation=segmentation, fine=fine)
            except Exception as error:  # recorded; the cohort goes on
                logger.warning("case %s failed: %s: %s", case.id, type(error).__name__, error)
                state.cases.append({"case": case.id, "image": str(case.image), "status": "error",
                                    "error": f"{type(error).__name__}: {error}"})
        bar.close()
        write_outputs(out, state, runner, tolerance_mm=tolerance_mm, seconds=time.perf_counter() - started,
                       baseline=baseline, steps=steps, max_fraction=max_fraction,
                       segmentation={"fuse_layer": fuse_layer} if segmentation else None)
    return out


def _randomization_choice(cases: list[Case], count: int) -> set[str]:
    if count <= 0:
        return set()
    with_truth = [c.id for c in cases if c.mask is not None or c.labels]
    ordered = with_truth + [c.id for c in cases if c.id not in with_truth]
    return set(ordered[:count])


def _truth(case: Case, labels: np.ndarray | None, names: list[str]) -> list[bool | None]:
    """Per class: lesion present (True/False) or unknown (None)."""
    if labels is not None:
        return [bool(np.any(labels == c + 1)) for c in range(len(names))]
    if case.labels is not None:
        given = {t.strip().lower() for t in case.labels}
        return [(name.lower() in given) or (str(c) in given) for c, name in enumerate(names)]
    return [None] * len(names)


def _evaluate_case(case: Case, runner, out: Path, state: EvaluationState, *, steps: int, batch_size: int, baseline: object,
                   max_fraction: float, tolerance_mm: float, seed: int, randomize: bool,
                   randomization_steps: int, segmentation: bool = False, fine=None) -> None:
    from ..masks import threshold_mask
    from ..metrics import (
        Completeness,
        box_iou,
        completeness,
        dice_iou_curve,
        energy_pointing_game,
        perturbation_curves,
        pointing_game,
        randomization_test,
    )
    from ..segment import gated_maps
    from ..targets import probabilities
    from .case_loading import load_case

    config = runner.config
    loaded = load_case(case.scan, runner.transforms, case.mask, trust=runner.trust, volume=case.volume,
                       series=case.series, reader=runner.reader, model=runner.model,
                       input_check=runner.input_check)  # scan read once; mask checked against its grid
    scanner_space, scan = loaded.scanner_space, loaded.scan
    batch = loaded.x[None].to(runner.device)
    labels = None if loaded.labels is None else np.rint(np.asarray(loaded.labels)).astype(np.int64)

    complete: Completeness | Literal[False] | None = None
    layer_name = "auto"
    referenced: set[int] = set()  # classes whose random-ranking reference curves exist for this case
    options = dict(steps=steps, baseline=baseline, batch_size=batch_size, task=config.task, seed=seed,
                   max_fraction=max_fraction)
    record: dict = {"case": case.id, "image": str(case.image), "status": "ok", "error": ""}
    segment_here = segmentation and labels is not None and scan.ndim == 3 and bool(np.any(labels > 0))
    fine_maps: list | None = None  # LayerCAM on the fuse layer, on its feature grid: once per case
    for index, explainer in enumerate(runner.explainers):
        # target "all"; sliding windows when configured; a fold ensemble's mean over its folds, as explain writes it
        explanation = runner.explain_method(index, batch)
        if explanation.logits.ndim != 2:
            raise CohortError(f"The model returned {tuple(explanation.logits.shape)}; evaluate needs (B, C) class logits.")
        probs = probabilities(explanation.logits.float(), config.task)[0].cpu().numpy()
        heatmaps = heatmaps_of(explanation, scanner_space)  # in target order
        names = [h.label for h in heatmaps]
        truth = _truth(case, labels, names)
        if "p_" + names[0] not in record:
            for name, p, present in zip(names, probs, truth):
                record[f"p_{name}"] = round(float(p), 4)
                record[f"true_{name}"] = "" if present is None else int(present)
        method = explainer.method.name
        if explainer.method.level == "layer":  # the randomization test's CAM layer (input-level maps have none)
            layer_name = explanation.layer
        if method == "hirescam" and complete is None:  # a fold ensemble's mean map has no one head to check it on
            complete = (completeness(runner.model, batch, target="all", layer=explanation.layer) or False
                        if runner.fold_explainers is None else False)
        native = heatmaps_of(explanation) if segment_here else []  # the feature grid, exact
        fused: list | None = None
        for t, heat in enumerate(heatmaps):
            c = heat.class_index
            p = float(probs[c]) if c < len(probs) else float("nan")
            present = truth[t]
            predicted = p >= 0.5
            row: dict = {"case": case.id, "class": heat.label, "class_index": c, "method": method,
                         "probability": round(p, 4), "predicted": int(predicted),
                         "present": "" if present is None else int(present),
                         "outcome": _outcome(present, predicted)}
            if present and labels is not None:
                lesion = labels == c + 1
                curve = dice_iou_curve(heat.data, lesion)
                region = threshold_mask(heat.data, "fraction", 0.5, keep_largest=True)
                row.update(
                    pointing_game=int(pointing_game(heat.data, lesion)),
                    pointing_game_tol=int(pointing_game(heat.data, lesion, heat.space, tolerance_mm=tolerance_mm)),
                    energy_pointing_game=energy_pointing_game(heat.data, lesion),
                    best_dice=curve.best_dice, auc_dice=curve.auc_dice,
                    best_iou=curve.best_iou, auc_iou=curve.auc_iou,
                    box_iou=box_iou(region, lesion),
                )
                if segment_here:
                    if fine is not None and fused is None:
                        if fine_maps is None:
                            fine_maps = heatmaps_of(runner.explain(fine, batch))
                        fused = gated_maps(fine_maps, native)
                    maps = {"threshold": native, "segment": native, **({"fused": fused} if fused is not None else {})}
                    for approach, found in _segmentations(scan, scanner_space, maps, c, lesion, row["pointing_game"]):
                        row.update(found.pop("columns"))
                        state.segmentation.append({"case": case.id, "class": heat.label, "class_index": c,
                                                   "method": method, "approach": approach, **found})
            if present or predicted:
                curves = perturbation_curves(runner.model, batch, explanation.maps[0, t], c, **options)
                row.update(deletion_auc=curves["deletion"].auc, insertion_auc=curves["insertion"].auc)
                state.add_curves(method, curves)
                if c not in referenced:  # the same perturbations in a random order: the chance level
                    referenced.add(c)
                    noise = torch.rand(explanation.maps.shape[2:], generator=torch.Generator().manual_seed(seed + c))
                    reference = perturbation_curves(runner.model, batch, noise, c, **options)
                    state.add_curves("random", reference)
                    state.references.append({
                        "case": case.id, "class": heat.label, "class_index": c, "method": "random",
                        "probability": row["probability"], "predicted": row["predicted"], "present": row["present"],
                        "outcome": row["outcome"], "deletion_auc": float(f"{reference['deletion'].auc:.6g}"),
                        "insertion_auc": float(f"{reference['insertion'].auc:.6g}")})
            if method == "hirescam" and complete:
                position = list(complete.class_indices).index(c) if c in list(complete.class_indices) else None
                if position is not None:
                    row["completeness_error"] = abs(float(complete.errors[0, position]))
            state.rows.append({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()})
            if row["outcome"] in ("FP", "FN") and scan.ndim == 3:
                lesion = None if labels is None else labels == c + 1
                state.failures.append(_failure_picture(out, case, heat, scan, row, lesion))
    state.cases.append(record)
    if randomize:
        target, label = _randomization_target(state.rows, case.id)
        try:
            with warnings.catch_warnings():  # the report itself shows Guided Backprop failing
                warnings.filterwarnings("ignore", message=".*model-parameter randomization test")
                report = randomization_test(runner.model, batch, target, methods=[*runner.methods, "guided_backprop"],
                                            layer=layer_name, max_steps=randomization_steps, seed=seed)
        except Exception as error:  # the sanity check is optional; the case's metrics stand
            logger.warning("randomization test on case %s failed: %s: %s", case.id, type(error).__name__, error)
            state.notes.append(f"The randomization test on case {case.id} failed: {type(error).__name__}: {error}")
        else:
            state.randomization.append((case.id, label, report))


def _segmentations(scan: np.ndarray, space, maps: dict, c: int, lesion: np.ndarray, pointing: int):
    """Segment class ``c`` on its own with each approach's maps; yields ``(approach, record)``, the
    record holding the scores (strict-JSON ready), the lesions found and ``columns`` for metrics.csv."""
    from ..metrics import pointing_game, segmentation_scores
    from ..segment import segment
    from ..space import resample

    settings = approach_settings()
    for approach, maps_c in maps.items():
        start = time.perf_counter()
        result = segment(scan, space, maps_c, classes=[c], settings=settings[approach])
        seconds = time.perf_counter() - start
        lesions = [found for found in result.lesions if found.class_index == c]
        scores = segmentation_scores(result.mask(c), lesion, space, boxes=[found.box for found in lesions])
        hit = pointing  # the method's map: the same for the threshold and seed-expand-constrain
        if approach == "fused":
            own = next(h for h in maps_c if h.class_index == c)
            hit = int(pointing_game(resample(np.asarray(own.data, dtype=np.float32), own.space, space), lesion))
        values = scores.to_dict()
        columns = {f"{approach}_{score}": values[score] for score, _ in SCORES}
        if approach == "fused":
            columns["fused_pointing_game"] = hit
        yield approach, {**values, "pointing_game": hit, "seconds": round(seconds, 3),
                         "lesions": [found.to_dict() for found in lesions],
                         "columns": {k: ("" if v is None else v) for k, v in columns.items()}}


def _outcome(present: bool | None, predicted: bool) -> str:
    if present is None:
        return ""
    return {(True, True): "TP", (False, False): "TN", (False, True): "FP", (True, False): "FN"}[(present, predicted)]


def _randomization_target(rows: list[dict], case_id: str) -> tuple[int, str]:
    """The class to explain in the randomization test: a present lesion, else the most probable class."""
    own = [r for r in rows if r["case"] == case_id]
    present = [r for r in own if r.get("present") == 1]
    chosen = present[0] if present else max(own, key=lambda r: r["probability"])
    return int(chosen["class_index"]), str(chosen["class"])


def _failure_picture(out: Path, case: Case, heat, scan: np.ndarray, row: dict, lesion: np.ndarray | None) -> dict:
    from .report import save_slices

    folder = out / "failures"
    kind = {"FP": "false positive", "FN": "false negative"}[row["outcome"]]
    name = f"{case.id}_{heat.file_label}_{row['outcome']}_{heat.method}.png"
    check_own_files(out, [f"failures/{name}"])  # a user's file of that name is not replaced
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{case.id} · {heat.label}: {kind} (p = {row['probability']:.2f}) · {heat.method}"
    data = heat.data
    found = heat.peak() if float(data.max()) > 0 else None
    if found is not None:
        _, peak_mm = found
    else:
        # Nothing to show: the model gave this class no positive evidence anywhere (or the same
        # everywhere: a flat map has no peak). save_slices cuts through the map's maximum, so mark
        # one voxel (the lesion's centre, else the volume's) to get slices through it; the title says so.
        flat = float(data.max()) > 0
        centre = np.argwhere(lesion).mean(0) if lesion is not None and lesion.any() else (np.asarray(data.shape) - 1) / 2
        voxel = tuple(int(round(v)) for v in centre)
        data = np.zeros_like(data)
        data[voxel] = 1.0
        peak_mm = heat.space.voxel_to_world(np.asarray(voxel, dtype=float))
        where = "the lesion's centre" if lesion is not None and lesion.any() else "the volume's centre"
        title += f" — map {'flat' if flat else 'zero everywhere'}; slices through {where} (marked)"
    save_slices(folder / name, scan, data, heat.space, title=title, peak_mm=cast("tuple[float, float, float]", tuple(float(v) for v in peak_mm)))  # a 3D scan
    return {"case": case.id, "class": heat.label, "outcome": row["outcome"], "probability": row["probability"],
            "method": heat.method, "picture": f"failures/{name}"}


# ----------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    """Run ``medcam3d evaluate``; 0 when every case was evaluated, 1 when some failed, 2 for bad inputs."""
    from ..methods import split_methods

    methods = split_methods(str(args.methods))
    out = evaluate(args.config, args.inputs, args.out, methods=methods, masks=args.masks, device=args.device,
                   progress=not getattr(args, "quiet", False), steps=getattr(args, "steps", 10),
                   batch_size=getattr(args, "batch_size", 8), max_fraction=getattr(args, "max_fraction", 0.05),
                   randomization_cases=getattr(args, "randomization_cases", 1), trust=getattr(args, "trust", False),
                   segmentation=getattr(args, "segmentation", True), fuse_layer=getattr(args, "fuse_layer", None))
    with (out / "cases.csv").open(newline="", encoding="utf-8") as stream:
        cases = [_unescape_row(row) for row in csv.DictReader(stream)]
    failed = [c for c in cases if c.get("status") != "ok"]
    print(f"{len(cases) - len(failed)}/{len(cases)} cases evaluated. Report: {out / 'summary.md'}", file=sys.stderr)
    for case in failed:
        print(f"  {case['case']}: {case.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0
