"""The evaluate job end to end: a generated cohort (3 scans, masks, a tiny seeded DenseNet)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medcam3d import io
from medcam3d.cli import build_parser, main
from medcam3d.errors import CohortError
from medcam3d.jobs.cases import collect_cases
from medcam3d.jobs.evaluate import evaluate
from medcam3d.space import Space
from _images import oblique_lpi_affine, planted_scan
from conftest import write_tiny_config, write_tiny_model

SHAPE = (45, 41, 19)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    affine = oblique_lpi_affine()
    space = Space(SHAPE, affine)
    scans = root / "scans"
    masks = root / "masks"
    scans.mkdir()
    masks.mkdir()
    for number, (voxel, label) in enumerate([((22, 20, 9), 1), ((12, 28, 8), 1), ((30, 12, 10), 0)]):
        centre = (affine @ [*voxel, 1])[:3]
        image, inside = planted_scan(SHAPE, affine, centre, radius_mm=8, seed=number)
        io.write(scans / f"case{number}.nii.gz", image, space)
        io.write(masks / f"case{number}_mask.nii.gz", (inside * label).astype(np.uint8), space)
    write_tiny_model(root)
    config = write_tiny_config(root / "config.yaml", output=None)
    table = root / "cases.csv"
    table.write_text("case,file,mask,labels_present\n" + "".join(
        f"c{n},scans/case{n}.nii.gz,masks/case{n}_mask.nii.gz,{'bright' if n < 2 else ''}\n" for n in range(3)))
    return root, config


def _parse(argv):
    return build_parser().parse_args(argv)


def test_run_end_to_end_from_a_folder_with_masks(cohort, tmp_path, capsys):
    root, config = cohort
    out = tmp_path / "report"
    args = _parse(["evaluate", "--config", str(config), "--inputs", str(root / "scans"), "--masks", str(root / "masks"),
                   "--methods", "hirescam,gradcam", "--out", str(out), "--steps", "4", "--quiet"])
    assert args.run(args) == 0
    assert "3/3 cases evaluated" in capsys.readouterr().err
    every = list(csv.DictReader((out / "metrics.csv").open()))
    rows = [r for r in every if r["method"] != "random"]
    assert len(rows) == 3 * 2 * 2  # cases x classes x methods
    # the chance level: one random-ranking row per (case, class) with curves, faithfulness columns only
    reference = [r for r in every if r["method"] == "random"]
    with_curves = {(r["case"], r["class"]) for r in rows if r["deletion_auc"] != ""}
    assert {(r["case"], r["class"]) for r in reference} == with_curves and len(reference) == len(with_curves)
    assert all(r["best_dice"] == "" and r["deletion_auc"] != "" for r in reference)
    present = [r for r in rows if r["present"] == "1"]
    assert {r["case"] for r in present} == {"case0", "case1"} and all(r["class"] == "bright" for r in present)
    for row in present:
        assert row["pointing_game"] in ("0", "1") and 0 <= float(row["energy_pointing_game"]) <= 1
        assert 0 <= float(row["auc_dice"]) <= float(row["best_dice"]) <= 1 and 0 <= float(row["box_iou"]) <= 1
        assert float(row["deletion_auc"]) >= 0 and float(row["insertion_auc"]) >= 0
    # GAP + Linear head (DenseNet): HiResCAM's map sums to logit − bias
    completeness = [float(r["completeness_error"]) for r in rows if r["method"] == "hirescam"]
    assert len(completeness) == 6 and max(completeness) < 1e-4
    assert all(r["completeness_error"] == "" for r in rows if r["method"] == "gradcam")
    # with a GAP head Grad-CAM equals HiResCAM: the same localization numbers
    by_key = {(r["case"], r["class"], r["method"]): r for r in present}
    for case in ("case0", "case1"):
        assert by_key[(case, "bright", "hirescam")]["best_dice"] == by_key[(case, "bright", "gradcam")]["best_dice"]

    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["method"] for r in summary} == {"hirescam", "gradcam", "random"}
    assert {r["metric"] for r in summary if r["method"] == "random"} == {"deletion_auc", "insertion_auc"}
    dice = {r["method"]: r for r in summary if r["metric"] == "best_dice"}
    assert dice["hirescam"]["n"] == "2" and float(dice["hirescam"]["std"]) >= 0
    markdown = (out / "summary.md").read_text()
    assert "| hirescam |" in markdown and " ± " in markdown and "randomization" in markdown.lower()
    assert "guided_backprop" in markdown
    for picture in ("curves.png", "randomization.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    randomization = list(csv.DictReader((out / "randomization.csv").open()))
    assert {r["method"] for r in randomization} == {"hirescam", "gradcam", "guided_backprop"}

    # the failure gallery: one picture per misclassified (case, class, method), none for the others
    wrong = {(r["case"], r["class"], r["outcome"], r["method"]) for r in rows if r["outcome"] in ("FP", "FN")}
    pictures = sorted(p.name for p in (out / "failures").glob("*.png")) if (out / "failures").exists() else []
    assert len(pictures) == len(wrong)
    for case, label, outcome, method in wrong:
        assert f"{case}_{label}_{outcome}_{method}.png" in pictures
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    _check_segmentation(out, rows, approaches=("threshold", "segment"))  # on by default, for both methods


def test_evaluate_from_a_csv_with_labels_column(cohort, tmp_path):
    root, config = cohort
    out = evaluate(config, root / "cases.csv", tmp_path / "o", methods=("hirescam",), progress=False, steps=2,
                   randomization_cases=0)
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["method"] != "random"]
    assert [r["case"] for r in rows[::2]] == ["c0", "c1", "c2"]
    assert {r["method"] for r in rows} == {"hirescam"}
    assert not (out / "randomization.csv").exists()
    cases = list(csv.DictReader((out / "cases.csv").open()))
    assert [c["true_bright"] for c in cases] == ["1", "1", "0"]


def test_collect_cases_reads_csv_columns_and_masks_folder(cohort, tmp_path):
    root, _ = cohort
    cases = collect_cases(root / "cases.csv")
    assert [c.id for c in cases] == ["c0", "c1", "c2"]
    assert cases[0].image == root / "scans" / "case0.nii.gz" and cases[0].labels == ["bright"] and cases[2].labels == []
    from_folder = collect_cases(root / "scans", masks=root / "masks")
    assert [c.mask.name for c in from_folder] == ["case0_mask.nii.gz", "case1_mask.nii.gz", "case2_mask.nii.gz"]
    bad = tmp_path / "bad.csv"
    bad.write_text("scanpath\nx.nii.gz\n")
    with pytest.raises(CohortError, match="'image'"):
        collect_cases(bad)
    with pytest.raises(CohortError, match="does not exist"):
        collect_cases(tmp_path / "missing")


def test_run_reports_bad_inputs_with_exit_code_2(cohort, tmp_path, capsys):
    _, config = cohort
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--config", str(config), "--inputs", str(empty), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "holds no scans" in capsys.readouterr().err


def test_evaluate_on_the_shipped_demo_samples(tmp_path):
    out = evaluate(REPO / "configs" / "demo.yaml", REPO / "data_samples" / "cases.csv", tmp_path / "demo",
                   methods=("hirescam",), progress=False, steps=2, randomization_cases=0)
    cases = list(csv.DictReader((out / "cases.csv").open()))
    assert cases and all(c["status"] == "ok" for c in cases)
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["method"] == "hirescam"]
    hits = [int(r["pointing_game"]) for r in rows if r["present"] == "1"]
    assert len(hits) == 7 and sum(hits) >= 6  # the trained demo model finds its lesions (7/7 when measured)
    assert max(float(r["completeness_error"]) for r in rows) < 1e-4  # GAP + Linear head: exact decomposition
    assert (out / "summary.md").is_file() and (out / "curves.png").is_file()
    _check_segmentation(out, rows, approaches=("threshold", "segment"))
    present = [r for r in rows if r["present"] == "1"]
    threshold = [float(r["threshold_dice"]) for r in present]
    seeded = [float(r["segment_dice"]) for r in present]
    # measured: threshold 0.04 ± 0.02, seed-expand-constrain 0.67 ± 0.46 (Dice >= 0.92 on 5 of the 7 lesions)
    assert np.mean(seeded) > np.mean(threshold) + 0.3 and sum(d >= 0.85 for d in seeded) >= 4
    assert all(r["fused_dice"] == "" for r in rows if "fused_dice" in r)
    markdown = (out / "summary.md").read_text()
    assert "## Weakly-supervised segmentation" in markdown and "| hirescam | segment |" in markdown
    assert "| hirescam | threshold |" in markdown and "| hirescam | fused |" not in markdown


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path.name} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _check_segmentation(out: Path, rows: list[dict], approaches: tuple[str, ...]) -> None:
    """metrics.csv's segmentation columns against segmentation.json, and what must hold between them."""
    document = _strict_json(out / "segmentation.json")
    assert [a["name"] for a in document["approaches"]] == list(approaches)
    records = {(r["case"], r["class"], r["method"], r["approach"]): r for r in document["records"]}
    present = [r for r in rows if r["present"] == "1"]
    assert present and len(records) == len(present) * len(approaches)
    for row in present:
        for approach in approaches:
            record = records[(row["case"], row["class"], row["method"], approach)]
            dice, iou = float(row[f"{approach}_dice"]), float(row[f"{approach}_iou"])
            assert 0 <= dice <= 1 and iou == pytest.approx(dice / (2 - dice), abs=1e-5)  # one pair of masks
            assert dice == pytest.approx(record["dice"], abs=1e-5)
            nothing = not record["lesions"]
            # HD95 is undefined exactly when nothing was segmented: blank in CSV, null in JSON
            assert (row[f"{approach}_hd95_mm"] == "") == nothing == (record["hd95_mm"] is None)
            if not nothing:
                assert float(row[f"{approach}_hd95_mm"]) == pytest.approx(record["hd95_mm"], rel=1e-4)
                assert record["hd95_mm"] >= 0
            assert record["true_lesions"] == len(record["box_ious"]) >= 1
            assert float(row[f"{approach}_box_iou"]) == pytest.approx(np.mean(record["box_ious"]), abs=1e-5)
            assert 0 <= record["box_iou"] <= 1 and record["predicted_lesions"] == len(record["lesions"])
            for lesion in record["lesions"]:
                assert lesion["class_index"] == int(row["class_index"])
                assert all(a <= b for a, b in zip(lesion["box"]["world_min"], lesion["box"]["world_max"]))
            expected = row["fused_pointing_game"] if approach == "fused" else row["pointing_game"]
            assert record["pointing_game"] == int(expected)
    summary = {(s["method"], s["metric"]): s for s in csv.DictReader((out / "summary.csv").open())}
    for approach in approaches:
        values = [float(r[f"{approach}_dice"]) for r in present if r["method"] == "hirescam"]
        assert float(summary[("hirescam", f"{approach}_dice")]["mean"]) == pytest.approx(np.mean(values), abs=1e-3)
    assert {s["metric"] for s in document["summary"]} >= {f"{a}_dice" for a in approaches}


def test_fused_maps_and_no_segmentation_on_two_shipped_samples(tmp_path, capsys):
    table = tmp_path / "cases.csv"
    samples = REPO / "data_samples"
    table.write_text("id,image,mask\n" + "".join(f"{n},{samples / n}.nii.gz,{samples / n}_mask.nii.gz\n"
                                                  for n in ("case_02", "case_06")))
    out = tmp_path / "fused"
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--inputs", str(table), "--methods",
                 "hirescam", "--out", str(out), "--steps", "2", "--randomization-cases", "0", "--fuse-layer",
                 "features.relu0", "--quiet"]) == 0
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["method"] == "hirescam"]
    _check_segmentation(out, rows, approaches=("threshold", "segment", "fused"))
    assert _strict_json(out / "segmentation.json")["fuse_layer"] == "features.relu0"
    present = [r for r in rows if r["present"] == "1"]
    assert len(present) == 2 and all(float(r["fused_dice"]) > 0.8 for r in present)  # measured 0.94, 0.93
    assert "| hirescam | fused |" in (out / "summary.md").read_text()
    # an unknown fuse layer is a usage error
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--inputs", str(table), "--out",
                 str(tmp_path / "bad"), "--fuse-layer", "nope", "--quiet"]) == 2
    assert "'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_no_segmentation_leaves_it_out(cohort, tmp_path):
    root, config = cohort
    plain = tmp_path / "plain"
    args = _parse(["evaluate", "--config", str(config), "--inputs", str(root / "scans"), "--masks", str(root / "masks"),
                   "--methods", "hirescam", "--out", str(plain), "--steps", "2", "--randomization-cases", "0",
                   "--no-segmentation", "--quiet"])
    assert args.segmentation is False and args.run(args) == 0
    assert not (plain / "segmentation.json").exists()
    header = (plain / "metrics.csv").read_text().splitlines()[0]
    assert "best_dice" in header and "segment_dice" not in header and "threshold_dice" not in header
    assert "Weakly-supervised segmentation" not in (plain / "summary.md").read_text()
    assert _parse(["evaluate", "--config", "c", "--inputs", "i", "--out", "o"]).segmentation is True  # on by default


def test_evaluate_runs_the_sanity_check_on_input_level_and_perturbation_methods(cohort, tmp_path):
    """Methods with parameters (a comma inside parentheses) and input-level methods, whose maps have no layer:
    the randomization test still runs on the CAM layer and reports every method."""
    root, config = cohort
    out = tmp_path / "report"
    methods = "hirescam,gradxinput,occlusion(patch=8, stride=8),fused"
    args = _parse(["evaluate", "--config", str(config), "--inputs", str(root / "cases.csv"), "--methods", methods,
                   "--out", str(out), "--steps", "2", "--no-segmentation", "--quiet"])
    assert args.run(args) == 0
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["method"] != "random"]
    assert {r["method"] for r in rows} == {"hirescam", "gradxinput", "occlusion", "fused"}
    randomized = list(csv.DictReader((out / "randomization.csv").open()))
    assert {r["method"] for r in randomized} == {"hirescam", "gradxinput", "occlusion(patch=8, stride=8)", "fused",
                                                 "guided_backprop"}
    summary = (out / "summary.md").read_text()
    assert "randomization test on case" not in summary  # no failure note
    assert "| gradxinput |" in summary


def test_evaluate_explains_a_fold_ensemble_with_every_fold(cohort, tmp_path, monkeypatch):
    """A fold ensemble (nnU-Net's folds) is evaluated with the folds' mean, as explain writes it, not fold 0 alone:
    fold 1 is fold 0 with class 0's bias raised by 2, so the ensemble's logit of class 0 is fold 0's plus 1."""
    import copy

    import torch

    import medcam3d.models
    from medcam3d.config import load_config
    from medcam3d.models import FoldEnsemble, load_model

    root, config = cohort
    (root / "one.csv").write_text("case,file,mask,labels_present\nc0,scans/case0.nii.gz,masks/case0_mask.nii.gz,bright\n")
    fold0 = load_model(load_config(config))
    fold1 = copy.deepcopy(fold0)
    with torch.no_grad():
        fold1.class_layers.out.bias[0] += 2.0
    found = {}
    for name, model in (("fold0", fold0), ("ensemble", FoldEnsemble([fold0, fold1], ["0", "1"]))):
        monkeypatch.setattr(medcam3d.models, "load_model", lambda *args, model=model, **kwargs: model)
        out = evaluate(config, root / "one.csv", tmp_path / name, methods=("hirescam",), progress=False, steps=2,
                       randomization_cases=0, segmentation=False)
        found[name] = float(next(csv.DictReader((out / "cases.csv").open()))["p_bright"])
    logit = {name: np.log(p / (1 - p)) for name, p in found.items()}
    assert abs(logit["ensemble"] - logit["fold0"] - 1.0) < 0.02, found
