"""Data safety of the jobs layer: case ids, output folders, duplicates, resume state, exit codes.

Each test was written against an input that misbehaved before (a folder outside --out deleted,
results overwritten, resume skipping work, tracebacks and wrong exit codes).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat

import numpy as np
import pytest

from medcam3d import io
from medcam3d.cli import main
from medcam3d.errors import CaseIdError, OutputConflictError
from medcam3d.jobs.case_ids import check_case_id, derive_case_ids
from medcam3d.jobs.cases import collect_cases
from medcam3d.jobs.outputs import check_output_location, fingerprint, is_own_case_folder, remove_stale_staging
from medcam3d.space import Space
from _images import oblique_lpi_affine, planted_scan
from conftest import write_tiny_config, write_tiny_model

SHAPE = (29, 27, 13)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    affine = oblique_lpi_affine()
    image, inside = planted_scan(SHAPE, affine, (affine @ [14, 13, 6, 1])[:3], radius_mm=6)
    io.write(root / "scan.nii.gz", image, Space(SHAPE, affine))
    io.write(root / "scan_mask.nii.gz", inside.astype(np.uint8), Space(SHAPE, affine))
    write_tiny_model(root)
    config = write_tiny_config(root / "config.yaml", root / "weights.pt", size=16, spacing=None)
    return root, config


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _batch(config, inputs, out, *extra):
    return main(["batch", "--config", str(config), "--inputs", str(inputs), "--out", str(out), "--quiet", *extra])


# ------------------------------------------------------------------------------------ case ids
@pytest.mark.parametrize("bad", ["../victim", "/abs/dir", "a/b", "a\\b", "..", ".", ".hidden", "", "x" * 101,
                                 "tab\there", "nul\x00", "trailing."])
def test_unsafe_case_ids_are_refused(bad):
    with pytest.raises(CaseIdError):
        check_case_id(bad)


@pytest.mark.parametrize("good", ["patient_001", "P-1.2", "肺结节 01", "case+x"])
def test_plain_case_ids_pass(good):
    assert check_case_id(good) == good


@pytest.mark.parametrize("bad_id", ["../victim", "{victim}", "sub/dir"])
def test_a_traversal_id_in_a_csv_touches_nothing(setup, tmp_path, bad_id, capsys):
    root, config = setup
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    before = _tree(tmp_path)
    out = tmp_path / "out"
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image\nok,{root / 'scan.nii.gz'}\n{bad_id.format(victim=victim)},{root / 'scan.nii.gz'}\n")
    before = _tree(tmp_path)
    assert _batch(config, table, out) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "case id" in err
    assert _tree(tmp_path) == before  # nothing written anywhere, not even --out
    assert (victim / "precious.txt").read_text() == "keep me"


def test_duplicate_ids_in_a_csv_are_refused_before_any_work(setup, tmp_path, capsys):
    root, config = setup
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image\np1,{root / 'scan.nii.gz'}\nP1,{root / 'scan.nii.gz'}\n")
    assert _batch(config, table, tmp_path / "out") == 2
    assert "repeat" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_derived_ids_are_unique_by_construction(tmp_path):
    assert derive_case_ids([tmp_path / "p1.nii.gz", tmp_path / "p1.nrrd"]) == ["p1", "p1_nrrd"]
    assert derive_case_ids([tmp_path / "p1" / "scan.nii.gz", tmp_path / "p2" / "scan.nii.gz"]) == ["scan", "p2_scan"]
    ids = derive_case_ids([tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.nii.gz", tmp_path / "c" / "x.nrrd"])
    assert len({i.casefold() for i in ids}) == 3
    assert derive_case_ids([tmp_path / "../weird:name.nii.gz"]) == ["weird_name"]


def test_same_stem_files_in_a_folder_become_two_cases(setup, tmp_path):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "p1.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    array, space = io.read(root / "scan.nii.gz")
    io.write(scans / "p1.nrrd", array, space)
    out = tmp_path / "out"
    assert _batch(config, scans, out) == 0
    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert sorted(r["case"] for r in rows) == ["p1", "p1_nrrd"]
    for row in rows:
        summary = json.loads((out / row["case"] / "summary.json").read_text(encoding="utf-8"))
        assert summary["image"].endswith(".nii.gz" if row["case"] == "p1" else ".nrrd")
        assert all(os.path.isfile(f) for f in summary["files"])  # the summary lists only files that exist


def test_csv_without_ids_over_same_named_files_in_subfolders(setup, tmp_path):
    root, _ = setup
    for sub in ("p1", "p2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "scan.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    table = tmp_path / "cases.csv"
    table.write_text("\ufeffimage\np1/scan.nii.gz\np2/scan.nii.gz\n", encoding="utf-8")  # with a byte-order mark
    ids = [c.id for c in collect_cases(table)]
    assert len(set(ids)) == 2 and all("/" not in i for i in ids)


def test_class_names_that_clash_as_file_labels_are_refused(setup, tmp_path, capsys):
    root, config = setup
    clash = tmp_path / "clash.yaml"
    clash.write_text(config.read_text().replace("class_names: [bright, dark]", "class_names: [a b, a-b]"))
    assert main(["explain", "--config", str(clash), "--image", str(root / "scan.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "overwrite each other" in capsys.readouterr().err
    cjk = tmp_path / "cjk.yaml"
    # (encoding given: GDCM's writer, used by other test files, leaves the C library's locale at "C")
    cjk.write_text(config.read_text().replace("class_names: [bright, dark]", "class_names: [肺结节, 肿块]"), encoding="utf-8")
    assert main(["explain", "--config", str(cjk), "--image", str(root / "scan.nii.gz"), "--out", str(tmp_path / "c")]) == 0
    names = {p.name for p in (tmp_path / "c" / "scan").iterdir()}
    assert "scan_hirescam_肺结节.nii.gz" in names and "scan_hirescam_肿块.nii.gz" in names


# ----------------------------------------------------------------------------- output folders
def test_output_over_the_input_folder_is_refused(setup, tmp_path, capsys):
    root, config = setup
    scans = tmp_path / "data" / "scans"
    scans.mkdir(parents=True)
    (scans / "patient1.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    before = _tree(tmp_path)
    assert main(["explain", "--config", str(config), "--image", str(scans / "patient1.nii.gz"), "--out", str(scans)]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert _batch(config, scans, scans) == 2
    assert _batch(config, scans, tmp_path / "data") == 2
    assert _batch(config, scans, scans / "inside") == 2
    assert _tree(tmp_path) == before


def test_output_inside_a_dicom_folder_is_refused(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"\0" * 132)
    with pytest.raises(OutputConflictError, match="inside the input folder"):
        check_output_location(series / "out", [series])


def test_an_out_that_is_a_file_exits_2(setup, tmp_path, capsys):
    root, config = setup
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "x"


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_an_out_through_a_link_to_nothing_exits_2_naming_the_link(setup, tmp_path, capsys, link):
    """A dangling --out link made mkdir raise FileExistsError: exit 1, 'internal error'."""
    root, config = setup
    out = tmp_path / "results"
    out.symlink_to(tmp_path / "gone" if link == "dangling" else out)
    for given in (out, out / "sub"):
        assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(given)]) == 2
        err = capsys.readouterr().err
        assert f"'{out}' is a symbolic link to" in err and "which does not exist" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_an_inputs_path_that_is_a_fifo_is_refused_unopened(tmp_path):
    from medcam3d.errors import CohortError

    fifo = tmp_path / "cases.csv"
    os.mkfifo(fifo)
    with pytest.raises(CohortError, match="is not a regular file or folder"):
        collect_cases(fifo)


def test_a_region_mask_that_is_a_fifo_is_not_opened_for_the_run_settings(setup, tmp_path):
    from medcam3d.config import load_config
    from medcam3d.jobs.runner import Runner
    from medcam3d.models import load_model
    from test_security_io import never_opened_for_reading, unblock_fifo_later

    root, config = setup
    fifo = tmp_path / "region.nii.gz"
    os.mkfifo(fifo)
    unblock_fifo_later(fifo)
    runner = Runner(load_config(config), load_model(load_config(config)), device="cpu")
    with never_opened_for_reading(fifo) as opened:
        settings = runner._case_settings({}, fifo)  # the digest of a region mask: read before the case
    assert opened == [] and settings["region_mask"]["file"] == "region.nii.gz"


@pytest.mark.parametrize("where", ["result file", "case summary.json", "top manifest", "lock file"])
def test_fifos_in_out_are_never_opened(setup, tmp_path, capsys, where):
    """A FIFO in place of a file medcam3d reads in --out (a result it listed, a case's summary.json, the top manifest,
    the lock file) made the job wait for a writer forever."""
    from test_security_io import never_opened_for_reading, unblock_fifo_later

    root, config = setup
    out = tmp_path / "out"
    if where == "result file":
        assert _explain(config, root / "scan.nii.gz", out) == 0
        fifo = out / "scan" / "scan_hirescam_bright_box.json"
        fifo.unlink()
    else:
        fifo = out / {"case summary.json": "scan/summary.json", "top manifest": "medcam3d-manifest.json",
                      "lock file": ".medcam3d.lock"}[where]
        fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    unblock_fifo_later(fifo)
    capsys.readouterr()
    with never_opened_for_reading(fifo) as opened:  # (in the DataLoader workers and the writer too: forked after)
        code = _batch(config, root / "scan.nii.gz", out)
    err = capsys.readouterr().err
    assert opened == [], err  # refused from its type: never opened
    assert code == {"result file": 1, "case summary.json": 1, "top manifest": 2, "lock file": 0}[where], err
    if where != "lock file":  # (the lock file is medcam3d's own name: removed when the job ends)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left as it is
    if code == 1:
        rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
        assert "not written by medcam3d" in rows[0]["error"] or "changed since" in rows[0]["error"]


def test_a_folder_medcam3d_did_not_write_is_never_replaced(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    (out / "scan").mkdir(parents=True)
    (out / "scan" / "notes.txt").write_text("my notes")
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out)]) == 2
    assert "was not written by medcam3d" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "scan").iterdir()) == ["notes.txt"]
    assert [p.name for p in out.iterdir()] == ["scan"]  # no staging folder left


def test_a_symlinked_case_folder_is_not_followed(setup, tmp_path):
    root, config = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan").symlink_to(elsewhere, target_is_directory=True)
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out)]) == 2
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_own_case_folders_are_replaced_and_get_usual_permissions(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    args = ["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out)]
    assert main(args) == 0
    assert is_own_case_folder(out / "scan")
    first = json.loads((out / "scan" / "summary.json").read_text(encoding="utf-8"))
    assert first["medcam3d"]["kind"] == "case"
    umask = os.umask(0o022)
    os.umask(umask)
    mode = stat.S_IMODE((out / "scan").stat().st_mode)
    assert mode == 0o777 & ~umask
    assert main(args) == 0  # a second run replaces its own folder
    assert [p.name for p in out.iterdir()] == ["scan"]


# ------------------------------------------------------------------------------ resume and state
def test_resume_with_another_method_does_the_work(setup, tmp_path):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert _batch(config, scans, out, "--method", "hirescam") == 0
    stamp = (out / "a" / "summary.json").stat().st_mtime_ns
    assert _batch(config, scans, out, "--method", "hirescam", "--resume") == 0
    assert (out / "a" / "summary.json").stat().st_mtime_ns == stamp  # same settings: skipped
    assert _batch(config, scans, out, "--method", "gradcam", "--resume") == 0
    assert (out / "a" / "a_gradcam_bright.nii.gz").is_file()
    assert _batch(config, scans, out, "--method", "gradcam", "--target", "dark", "--resume") == 0
    findings = json.loads((out / "a" / "summary.json").read_text(encoding="utf-8"))["findings"]
    assert {f["class"] for f in findings} == {"dark"}


def test_damaged_or_foreign_summaries_do_not_crash_the_cohort(setup, tmp_path):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b", "c"):
        (scans / f"{name}.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert _batch(config, scans, out) == 0
    (out / "a" / "summary.json").write_text("{}")  # not medcam3d's any more: left alone, case fails
    summary_b = json.loads((out / "b" / "summary.json").read_text(encoding="utf-8"))
    summary_b["field_from_the_future"] = 1  # an unknown field: still medcam3d's, still done
    (out / "b" / "summary.json").write_text(json.dumps(summary_b))
    (out / "c" / "summary.json").write_text("not json")
    stamp_b = (out / "b" / "summary.json").stat().st_mtime_ns
    assert _batch(config, scans, out, "--resume") == 1
    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open(encoding="utf-8"))}
    assert rows["a"]["status"] == "error" and "not written by medcam3d" in rows["a"]["error"]
    assert rows["b"]["status"] == "ok" and (out / "b" / "summary.json").stat().st_mtime_ns == stamp_b
    assert rows["c"]["status"] == "error"
    assert (out / "a" / "summary.json").read_text() == "{}"


def test_stale_staging_folders_of_dead_runs_are_removed(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    stale = out / ".scan.partial-999999-0000dead"  # the name and mark that medcam3d makes (pid-token)
    stale.mkdir(parents=True)
    (stale / ".medcam3d-staging").write_text("999999-0000dead")
    foreign = out / ".scan.partial-999999-notours"
    foreign.mkdir()
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out)]) == 0
    assert not stale.exists() and foreign.exists()


def test_strict_json_summaries(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(out)]) == 0
    text = (out / "scan" / "summary.json").read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("extra, message", [
    (["--method", "hirescm"], "hirescam"),
    (["--layer", "no.such.layer"], "no.such.layer"),
    (["--target", "7"], "7"),
    (["--target", "nodule"], "nodule"),
    (["--device", "tpu:9"], "device"),
])
def test_user_errors_exit_2_with_one_line(setup, tmp_path, capsys, extra, message):
    root, config = setup
    code = main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(tmp_path / "o"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "scan").exists()


@pytest.mark.parametrize("extra", [["--sw-batch", "-2"], ["--sw-batch", "0"], ["--roi", "0", "8", "8"],
                                   ["--overlap", "1.5"], ["--overlap", "x"], ["--workers", "-1"]])
def test_bad_numeric_options_exit_2(setup, tmp_path, extra):
    root, config = setup
    command = "batch" if extra[0] == "--workers" else "explain"
    source = ["--inputs", str(root)] if command == "batch" else ["--image", str(root / "scan.nii.gz")]
    with pytest.raises(SystemExit) as info:
        main([command, "--config", str(config), *source, "--out", str(tmp_path / "o"), *extra])
    assert info.value.code == 2


def test_ctrl_c_prints_one_line_and_exits_130(setup, tmp_path, capsys, monkeypatch):
    from medcam3d.jobs.runner import Runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "run_case", interrupted)
    root, config = setup
    assert main(["explain", "--config", str(config), "--image", str(root / "scan.nii.gz"), "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_a_corrupt_scan_is_a_usage_error_for_explain(setup, tmp_path, capsys):
    root, config = setup
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes((root / "scan.nii.gz").read_bytes()[:200])
    assert main(["explain", "--config", str(config), "--image", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.nii.gz" in capsys.readouterr().err


# issue 25 item 2
# Data loss: outputs over the inputs' CSV, a user's summary.csv, files added to a case folder, forged or linked
# ownership markers, look-alike staging folders, DICOM export into its series, two jobs into one --out.
def _evaluate(config, inputs, out, *extra):
    return main(["evaluate", "--config", str(config), "--inputs", str(inputs), "--out", str(out), "--quiet",
                 "--methods", "hirescam", "--steps", "2", "--randomization-cases", "0", "--no-segmentation", *extra])


def _explain(config, image, out):
    return main(["explain", "--config", str(config), "--image", str(image), "--out", str(out)])


def test_evaluate_refuses_an_out_that_holds_its_inputs_csv_or_scans(setup, tmp_path, capsys):
    root, config = setup
    data = tmp_path / "data"
    data.mkdir()
    (data / "p1.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    (data / "cases.csv").write_text("id,image\np1,p1.nii.gz\n")
    lists = tmp_path / "lists"  # a CSV alone in its folder, naming scans elsewhere
    lists.mkdir()
    (lists / "cases.csv").write_text(f"id,image\np1,{root / 'scan.nii.gz'}\n")
    before = _tree(tmp_path)
    assert _evaluate(config, data / "cases.csv", data) == 2
    assert "contains the input" in capsys.readouterr().err
    assert _evaluate(config, lists / "cases.csv", lists) == 2
    assert "contains the input" in capsys.readouterr().err
    assert _evaluate(config, data, data / "report") == 2  # inside the folder of scans
    assert _tree(tmp_path) == before


def test_evaluate_never_replaces_a_report_file_it_did_not_write(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "results"
    (out / "failures").mkdir(parents=True)
    (out / "summary.md").write_text("# my own write-up")
    (out / "failures" / "README.md").write_text("my list")
    before = _tree(tmp_path)
    assert _evaluate(config, root / "scan.nii.gz", out) == 2
    err = capsys.readouterr().err
    assert "summary.md (not written by medcam3d)" in err and "failures/README.md (not written by medcam3d)" in err
    assert _tree(tmp_path) == before


def test_batch_refuses_an_out_that_holds_its_inputs_csv(setup, tmp_path, capsys):
    root, config = setup
    lists = tmp_path / "lists"
    lists.mkdir()
    table = lists / "summary.csv"
    table.write_text(f"id,image\np1,{root / 'scan.nii.gz'}\n")
    before = _tree(tmp_path)
    assert _batch(config, table, lists) == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and "summary.csv" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_a_users_summary_csv_in_out_is_neither_merged_nor_replaced(setup, tmp_path, capsys, encoding):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    mine = "case,grade\nold_patient,3\n".encode(encoding)
    (out / "summary.csv").write_bytes(mine)
    assert _batch(config, scans, out) == 2
    err = capsys.readouterr().err
    assert "summary.csv (not written by medcam3d)" in err and "Traceback" not in err
    assert (out / "summary.csv").read_bytes() == mine
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # no case written, no lock left


def test_a_users_file_named_like_medcam3d_s_manifest_is_not_replaced(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "medcam3d-manifest.json").write_text("my own notes")
    assert _batch(config, root / "scan.nii.gz", out) == 2
    assert "medcam3d-manifest.json (not written by medcam3d)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["medcam3d-manifest.json"]
    assert (out / "medcam3d-manifest.json").read_text() == "my own notes"


def test_batch_replaces_and_merges_only_its_own_unchanged_summary_csv(setup, tmp_path, capsys):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert _batch(config, scans, out) == 0
    (scans / "b.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    assert _batch(config, scans, out, "--resume") == 0  # its own summary.csv: merged and replaced
    assert [r["case"] for r in csv.DictReader((out / "summary.csv").open(encoding="utf-8"))] == ["a", "b"]
    with (out / "summary.csv").open("a", encoding="utf-8") as stream:
        stream.write("b,my note\n")  # the user edits it: no longer medcam3d's to replace
    edited = (out / "summary.csv").read_bytes()
    assert _batch(config, scans, out, "--resume") == 2
    assert "summary.csv (changed since medcam3d wrote it)" in capsys.readouterr().err
    assert (out / "summary.csv").read_bytes() == edited


def test_a_file_the_user_added_to_a_case_folder_is_kept_and_named(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    assert _explain(config, root / "scan.nii.gz", out) == 0
    (out / "scan" / "thesis.docx").write_bytes(b"PK\x03\x04 four years of work")
    before = _tree(tmp_path)
    assert _explain(config, root / "scan.nii.gz", out) == 2
    err = capsys.readouterr().err
    assert "thesis.docx (not written by medcam3d)" in err and "nothing was deleted" in err
    assert _tree(tmp_path) == before  # nothing deleted, no staging folder left


def test_a_changed_result_file_is_not_replaced(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    assert _explain(config, root / "scan.nii.gz", out) == 0
    edited = out / "scan" / "scan_hirescam_bright_box.json"
    edited.write_text(edited.read_text(encoding="utf-8").replace("{", "{\"reviewed\": true, ", 1), encoding="utf-8")
    before = _tree(tmp_path)
    assert _explain(config, root / "scan.nii.gz", out) == 2
    assert "scan_hirescam_bright_box.json (changed since medcam3d wrote it)" in capsys.readouterr().err
    assert _tree(tmp_path) == before and "reviewed" in edited.read_text(encoding="utf-8")
    edited.unlink()  # a listed file the user deleted is no obstacle
    assert _explain(config, root / "scan.nii.gz", out) == 0 and edited.is_file()


def test_a_forged_marker_does_not_make_a_folder_medcam3d_s(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    (out / "scan").mkdir(parents=True)
    (out / "scan" / "summary.json").write_text(json.dumps({"medcam3d": {"kind": "case"}}))
    (out / "scan" / "thesis.docx").write_bytes(b"years of work")
    assert not is_own_case_folder(out / "scan")
    assert _explain(config, root / "scan.nii.gz", out) == 2
    assert "was not written by medcam3d" in capsys.readouterr().err
    assert (out / "scan" / "thesis.docx").read_bytes() == b"years of work"


def test_a_symlinked_summary_json_does_not_count(setup, tmp_path, capsys):
    root, config = setup
    real = tmp_path / "real"
    assert _explain(config, root / "scan.nii.gz", real) == 0  # a genuine summary.json, manifest and all
    out = tmp_path / "out"
    (out / "scan").mkdir(parents=True)
    (out / "scan" / "summary.json").symlink_to(real / "scan" / "summary.json")
    (out / "scan" / "notes.txt").write_text("keep")
    assert not is_own_case_folder(out / "scan")
    before = _tree(tmp_path)
    assert _explain(config, root / "scan.nii.gz", out) == 2
    assert "was not written by medcam3d" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_only_staging_folders_with_medcam3d_s_own_name_and_mark_are_removed(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    assert _explain(config, root / "scan.nii.gz", out) == 0
    forged = {".scan.old-999999-x": json.dumps({"medcam3d": {"kind": "case"}}),  # the folder
              ".scan.old-999999-0badcafe": json.dumps({"medcam3d": {"kind": "case"}}),  # right name, no manifest
              ".scan.partial-999999-0badcafe": None}  # right name, no staging mark
    for name, summary in forged.items():
        (out / name).mkdir()
        (out / name / "thesis.docx").write_text("keep")
        if summary is not None:
            (out / name / "summary.json").write_text(summary)
    wrong_mark = out / ".scan.partial-999999-feedf00d"
    wrong_mark.mkdir()
    (wrong_mark / ".medcam3d-staging").write_text("999999-0badcafe")  # the mark of another folder
    genuine_old = out / ".scan.old-999999-0000beef"  # a replaced folder of a killed run: medcam3d's own
    genuine_old.mkdir()
    for path in (out / "scan").iterdir():
        (genuine_old / path.name).write_bytes(path.read_bytes())
    (genuine_old / "summary.json").touch()
    own_but_added = out / ".scan.old-999999-1111beef"  # medcam3d's, but the user put a file in it
    shutil.copytree(genuine_old, own_but_added)
    (own_but_added / "thesis.docx").write_text("keep")
    before = {name: _tree(out / name) for name in [*forged, wrong_mark.name, own_but_added.name]}
    assert remove_stale_staging(out, "scan") == [genuine_old]
    assert {name: _tree(out / name) for name in before} == before


def test_fingerprints_hash_small_files_and_the_edges_and_time_of_big_ones(tmp_path, monkeypatch):
    import medcam3d.jobs.outputs as outputs

    small = tmp_path / "small.bin"
    small.write_bytes(b"a" * 1000)
    recorded = fingerprint(small)
    small.write_bytes(b"a" * 499 + b"b" + b"a" * 500)  # same size, one byte in the middle
    assert recorded is not None and "sha256" in recorded and fingerprint(small) != recorded
    monkeypatch.setattr(outputs, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(outputs, "EDGE_BYTES", 100)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(5000))
    recorded = outputs.fingerprint(big)
    assert recorded is not None and set(recorded) == {"size", "mtime_ns", "sha256_edges"}
    os.utime(big, ns=(recorded["mtime_ns"] + 10**9, recorded["mtime_ns"] + 10**9))  # saved again, same bytes
    assert outputs.fingerprint(big) != recorded
    big.write_bytes(bytes(4999) + b"x")  # a changed tail
    os.utime(big, ns=(recorded["mtime_ns"], recorded["mtime_ns"]))
    assert outputs.fingerprint(big) != recorded
    (tmp_path / "link").symlink_to(small)
    assert outputs.fingerprint(tmp_path / "link") is None  # a link is never taken for the file it points to


def test_export_dicom_refuses_the_source_series_folder(tmp_path):
    from test_dicom_export import SHAPE as DICOM_SHAPE, write_ct_series

    from medcam3d.dicom_export import export_dicom, write_parametric_map
    from medcam3d.heatmap import Heatmap

    folder = tmp_path / "ct"
    write_ct_series(folder, np.zeros(DICOM_SHAPE, np.float32))
    space = io.read_space(folder)
    heatmap = Heatmap(np.linspace(0, 1, int(np.prod(DICOM_SHAPE)), dtype=np.float32).reshape(DICOM_SHAPE), space,
                      "hirescam", "l", 0)
    before = _tree(tmp_path)
    for out_dir in (folder, folder / "maps", tmp_path):  # the series folder, inside it, around it
        with pytest.raises(OutputConflictError, match="source series folder"):
            export_dicom([heatmap], folder, out_dir)
    with pytest.raises(OutputConflictError, match="source series folder"):
        write_parametric_map(heatmap, folder, folder / "map.dcm")
    assert _tree(tmp_path) == before
    assert len(export_dicom([heatmap], folder, tmp_path / "export")) == 2  # beside the series: fine


_HOLDER = """
import sys
from medcam3d.jobs.lock import OutputLock
lock = OutputLock(sys.argv[1], "batch").acquire()
print("held", flush=True)
sys.stdin.read()  # until the test lets go
lock.release()
"""


@pytest.fixture()
def held_out(tmp_path):
    """An output folder whose lock another process holds (as a running batch does)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    yield out, holder.pid
    holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (out / ".medcam3d.lock").exists()


def test_a_second_job_into_a_locked_out_fails_at_once_and_names_the_holder(setup, held_out, capsys):
    root, config = setup
    out, pid = held_out
    scans = out.parent / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes((root / "scan.nii.gz").read_bytes())
    before = _tree(out.parent)
    for job in (lambda: _batch(config, scans, out), lambda: _explain(config, root / "scan.nii.gz", out),
                lambda: _evaluate(config, scans, out)):
        code = job()
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"is being written by medcam3d batch (pid {pid}, started " in err and "choose another --out" in err
    assert _tree(out.parent) == before


def test_a_lock_file_left_by_a_dead_run_does_not_block(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / ".medcam3d.lock").write_text(json.dumps({"pid": 999999, "command": "batch", "started": "yesterday"}))
    assert _explain(config, root / "scan.nii.gz", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scan"]  # the lock file is gone with the lock


def test_locks_nest_within_a_process_and_exclude_other_descriptors(tmp_path):
    from medcam3d.jobs.lock import OutputLock

    outer = OutputLock(tmp_path, "batch").acquire()
    inner = OutputLock(tmp_path, "evaluate").acquire()  # evaluate() called inside a locked job: no self-deadlock
    inner.release()
    assert (tmp_path / ".medcam3d.lock").exists()
    outer.release()
    assert not (tmp_path / ".medcam3d.lock").exists()
    (tmp_path / ".medcam3d.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputConflictError, match="not a file"):
        OutputLock(tmp_path, "batch").acquire()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_torchrun_ranks_all_refuse_a_locked_out_without_hanging(setup, held_out):
    import socket
    import subprocess
    import sys

    root, config = setup
    out, pid = held_out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "medcam3d", "batch", "--config", str(config), "--inputs", str(root),
               "--out", str(out), "--device", "cpu", "--quiet", "--workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert done.stdout.count(f"is being written by medcam3d batch (pid {pid}") + \
        done.stderr.count(f"is being written by medcam3d batch (pid {pid}") == 2  # both ranks say why
    assert sorted(p.name for p in out.iterdir()) == [".medcam3d.lock"]


# issue 25 items 3 and 8
# Resume compares each input's identity (a scan replaced at its path, a CSV row pointing its id at another scan, a
# mask added), and ids and CSVs: reserved names, byte limits, Unicode normalisation, invisible characters, formula
# injection into summary.csv, quoted line breaks, very long lists, class names that do not fit the model.
def _stamp(out, case):
    return (out / case / "summary.json").stat().st_mtime_ns


def _other_scan(root, path):
    """A scan on the same grid as root/scan.nii.gz with the lesion elsewhere, written at ``path``."""
    space = io.read_space(root / "scan.nii.gz")
    image, _ = planted_scan(SHAPE, space.affine, (space.affine @ [6, 6, 4, 1])[:3], radius_mm=4)
    io.write(path, image, space)


def test_resume_redoes_a_case_whose_scan_was_replaced_at_its_path(setup, tmp_path):
    root, config = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(root / "scan.nii.gz", scans / "a.nii.gz")
    out = tmp_path / "out"
    assert _batch(config, scans, out) == 0
    stamp = _stamp(out, "a")
    assert _batch(config, scans, out, "--resume") == 0
    assert _stamp(out, "a") == stamp  # unchanged: skipped
    _other_scan(root, tmp_path / "new.nii.gz")
    os.replace(tmp_path / "new.nii.gz", scans / "a.nii.gz")  # another scan at the same path
    assert _batch(config, scans, out, "--resume") == 0
    assert _stamp(out, "a") != stamp
    recorded = json.loads((out / "a" / "summary.json").read_text(encoding="utf-8"))["run"]["inputs"]["image"]
    assert recorded["size"] == (scans / "a.nii.gz").stat().st_size
    assert recorded["mtime_ns"] == (scans / "a.nii.gz").stat().st_mtime_ns
    stamp = _stamp(out, "a")
    assert _batch(config, scans, out, "--resume") == 0
    assert _stamp(out, "a") == stamp


def test_resume_redoes_a_case_whose_csv_row_points_at_another_scan(setup, tmp_path):
    root, config = setup
    shutil.copy(root / "scan.nii.gz", tmp_path / "one.nii.gz")
    shutil.copy(root / "scan.nii.gz", tmp_path / "two.nii.gz")  # the same bytes: still another input
    table = tmp_path / "cases.csv"
    table.write_text("id,image\nA,one.nii.gz\n")
    out = tmp_path / "out"
    assert _batch(config, table, out) == 0
    stamp = _stamp(out, "A")
    assert _batch(config, table, out, "--resume") == 0
    assert _stamp(out, "A") == stamp
    table.write_text("id,image\nA,two.nii.gz\n")
    assert _batch(config, table, out, "--resume") == 0
    assert _stamp(out, "A") != stamp
    summary = json.loads((out / "A" / "summary.json").read_text(encoding="utf-8"))
    assert summary["image"].endswith("two.nii.gz")
    assert summary["run"]["inputs"]["image"]["path"] == os.path.realpath(tmp_path / "two.nii.gz")


def test_resume_redoes_a_case_when_a_mask_is_added(setup, tmp_path):
    root, config = setup
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image\nA,{root / 'scan.nii.gz'}\n")
    out = tmp_path / "out"
    assert _batch(config, table, out) == 0
    stamp = _stamp(out, "A")
    assert all("lesion_present" not in f for f in json.loads((out / "A" / "summary.json").read_text())["findings"])
    table.write_text(f"id,image,mask\nA,{root / 'scan.nii.gz'},{root / 'scan_mask.nii.gz'}\n")
    assert _batch(config, table, out, "--resume") == 0
    assert _stamp(out, "A") != stamp
    findings = json.loads((out / "A" / "summary.json").read_text(encoding="utf-8"))["findings"]
    assert findings and all("lesion_present" in f for f in findings)
    stamp = _stamp(out, "A")
    assert _batch(config, table, out, "--resume") == 0
    assert _stamp(out, "A") == stamp


def test_input_identity_follows_files_and_dicom_folder_listings(tmp_path):
    from medcam3d.jobs.case_identity import case_identity, input_identity

    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x" * 10)
    before = input_identity(series)
    assert input_identity(series) == before
    (series / "2.dcm").write_bytes(b"y" * 10)  # a slice added
    after = input_identity(series)
    assert after != before and after["files"] == 2
    os.utime(series / "1.dcm", ns=(1, 1))  # a slice touched
    assert input_identity(series) != after
    header = tmp_path / "scan.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: scan.raw\n\n")
    (tmp_path / "scan.raw").write_bytes(b"\0" * 16)
    identity = input_identity(header)
    (tmp_path / "scan.raw").write_bytes(b"\1" * 17)  # the detached data replaced, the header not
    assert input_identity(header) != identity
    assert input_identity(tmp_path / "gone.nii.gz")["missing"] is True
    plain = case_identity(tmp_path / "scan.raw")
    assert case_identity(tmp_path / "scan.raw", volume=1) != plain
    assert case_identity(tmp_path / "scan.raw", series="1.2.3") != plain
    assert case_identity(tmp_path / "scan.raw", region_mask=tmp_path / "scan.raw") != plain


@pytest.mark.parametrize("reserved", ["summary.csv", "Summary.CSV", "summary.json", "metrics.csv", "cases.csv"])
def test_an_id_named_like_a_file_medcam3d_writes_in_out_is_refused_up_front(setup, tmp_path, capsys, reserved):
    root, config = setup
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image\nok,{root / 'scan.nii.gz'}\n{reserved},{root / 'scan.nii.gz'}\n")
    out = tmp_path / "out"
    assert _batch(config, table, out) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and reserved in err and "reserved" in err and "Traceback" not in err
    assert not out.exists()
    assert derive_case_ids([tmp_path / f"{reserved}.nii.gz"])[0].casefold() != reserved.casefold()


def test_every_name_medcam3d_writes_at_the_top_of_out_is_a_reserved_id():
    from medcam3d.jobs.case_ids import RESERVED_IDS
    from medcam3d.jobs.outputs import MANIFEST

    assert {MANIFEST, "summary.csv", "summary.json", "summary.md", "metrics.csv", "cases.csv",
            "randomization.csv", "segmentation.json", "failures"} <= RESERVED_IDS
    with pytest.raises(CaseIdError, match="reserved"):
        check_case_id(MANIFEST.upper())


def test_case_ids_are_limited_in_utf8_bytes(tmp_path):
    assert check_case_id("x" * 100) == "x" * 100
    assert check_case_id("肺" * 33) == "肺" * 33  # 99 bytes
    with pytest.raises(CaseIdError, match="102 bytes"):
        check_case_id("肺" * 34)
    with pytest.raises(CaseIdError, match="300 bytes"):
        check_case_id("肺" * 100)
    derived = derive_case_ids([tmp_path / ("肺" * 100 + ".nii.gz"), tmp_path / "sub" / ("肺" * 100 + ".nii.gz")])
    assert all(len(i.encode()) <= 100 for i in derived) and derived[0] != derived[1]
    for text in derived:
        assert check_case_id(text) == text


def test_nfc_and_nfd_forms_of_one_name_are_one_id(setup, tmp_path, capsys):
    root, config = setup
    nfc, nfd = "\u00c9mile", "E\u0301mile"
    assert check_case_id(nfd) == nfc
    table = tmp_path / "cases.csv"
    table.write_text(f"id,image\n{nfc},{root / 'scan.nii.gz'}\n{nfd.lower()},{root / 'scan.nii.gz'}\n", encoding="utf-8")
    with pytest.raises(CaseIdError, match="repeat"):
        collect_cases(table)
    table.write_text(f"id,image\n{nfd},{root / 'scan.nii.gz'}\n", encoding="utf-8")
    assert [c.id for c in collect_cases(table)] == [nfc]
    assert derive_case_ids([tmp_path / f"{nfc}.nii.gz", tmp_path / "b" / f"{nfd}.nii.gz"])[1] != nfc


@pytest.mark.parametrize("char", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u202a", "\u202e", "\u2066",
                                  "\u2069", "\u00ad", "\u061c", "\u2028", "\u2029", "\x85"])
def test_invisible_and_bidi_characters_in_ids_are_refused_naming_the_code_point(char):
    with pytest.raises(CaseIdError, match=f"U\\+{ord(char):04X}") as info:
        check_case_id(f"case{char}001")
    assert "\n" not in str(info.value)
    assert char not in derive_case_ids([f"case{char}001.nii.gz"])[0]


def test_formula_like_cells_are_escaped_in_summary_csv_and_read_back(setup, tmp_path):
    from medcam3d.jobs.report import unescape_row

    root, config = setup
    ids = ["=1+1", "@SUM(A1)", "+cmd", "-2", "'=x"]
    table = tmp_path / "cases.csv"
    table.write_text("id,image\n" + "".join(f'"{i}",{root / "scan.nii.gz"}\n' for i in ids), encoding="utf-8")
    out = tmp_path / "out"
    assert _batch(config, table, out) == 0
    for _ in range(2):  # the second run merges the first run's rows into its own: no double escaping
        with (out / "summary.csv").open(newline="", encoding="utf-8") as stream:
            raw = list(csv.reader(stream))
        assert sorted(row[0] for row in raw[1:]) == sorted(["'=1+1", "'@SUM(A1)", "'+cmd", "-2", "''=x"])
        with (out / "summary.csv").open(newline="", encoding="utf-8") as stream:
            rows = [unescape_row(row) for row in csv.DictReader(stream)]
        assert sorted(row["case"] for row in rows) == sorted(ids)
        table.write_text(f'id,image\n"=1+1",{root / "scan.nii.gz"}\n', encoding="utf-8")
        assert _batch(config, table, out) == 0  # one case again, the others' rows merged from summary.csv


def test_write_csv_escapes_every_formula_start_and_keeps_numbers(tmp_path):
    from medcam3d.jobs.report import unescape_row, write_csv

    cells = ["=HYPERLINK(\"http://x\")", "@SUM(A1)", "+", "-", "\t=1", "\r=1", "\n=1", "\uff1d1+1", "'=1", "''@x",
             "plain", "'quoted", "-3.5", "-12.0 4.5 7.25", "1e-5"]
    rows = [{"value": cell, "=header": 1} for cell in cells] + [{"value": -2.5, "=header": -1}]
    write_csv(tmp_path / "t.csv", rows)
    with (tmp_path / "t.csv").open(newline="", encoding="utf-8") as stream:
        raw = list(csv.reader(stream))
    assert raw[0] == ["'=header", "value"] or raw[0] == ["value", "'=header"]
    column = raw[0].index("value")
    written = [row[column] for row in raw[1:]]
    for cell, text in zip(cells[:10], written):
        assert text == "'" + cell
    assert written[10:] == ["plain", "'quoted", "-3.5", "-12.0 4.5 7.25", "1e-5", "-2.5"]
    with (tmp_path / "t.csv").open(newline="", encoding="utf-8") as stream:
        back = [unescape_row(row) for row in csv.DictReader(stream)]
    assert [row["value"] for row in back] == cells + ["-2.5"]
    assert all(set(row) == {"value", "=header"} for row in back)


def test_csv_quoted_fields_keep_line_breaks_and_unicode_separators(setup, tmp_path):
    root, config = setup
    name = "scan\u2028two\x85.nii.gz"
    shutil.copy(root / "scan.nii.gz", tmp_path / name)
    table = tmp_path / "cases.csv"
    table.write_bytes(("\ufeffid,image,labels\n"
                       f'A,"{name}","bright\ndark"\n'
                       f'B,scan.nii.gz,bright\n').encode("utf-8"))
    shutil.copy(root / "scan.nii.gz", tmp_path / "scan.nii.gz")
    cases = collect_cases(table)
    assert [c.id for c in cases] == ["A", "B"]
    assert cases[0].image.name == name
    assert cases[0].labels == ["bright", "dark"]
    assert cases[1].source.endswith("line 4")  # row B starts on line 4: row A spans lines 2 and 3
    table.write_text('id,image\n"A\nB",scan.nii.gz\n"ok\u2028",scan.nii.gz\n', encoding="utf-8")
    with pytest.raises(CaseIdError, match="line 2") as info:
        collect_cases(table)
    assert "\n" not in str(info.value)
    table.write_text('id,image\nC,scan.nii.gz\n"D\u2028x",scan.nii.gz\n', encoding="utf-8")
    with pytest.raises(CaseIdError, match="line 3.*U\\+2028"):
        collect_cases(table)


def test_a_long_case_list_is_refused_at_the_limit_naming_the_flag(setup, tmp_path, capsys):
    from medcam3d.errors import CohortError

    root, config = setup
    table = tmp_path / "cases.csv"
    table.write_text("id,image\n" + "".join(f"c{n},missing{n}.nii.gz\n" for n in range(6)))
    with pytest.raises(CohortError, match="line 7: .*more than 5 cases.*--max-cases"):
        collect_cases(table, max_cases=5)
    scans = tmp_path / "scans"
    scans.mkdir()
    for n in range(3):
        shutil.copy(root / "scan.nii.gz", scans / f"s{n}.nii.gz")
    with pytest.raises(CohortError, match="more than 2 scans"):
        collect_cases(scans, max_cases=2)
    assert _batch(config, table, tmp_path / "out", "--max-cases", "5") == 2
    err = capsys.readouterr().err
    assert "--max-cases" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert _batch(config, scans, tmp_path / "out", "--max-cases", "3") == 0


def test_a_csv_of_300k_rows_is_refused_at_the_limit_before_any_file_is_looked_at(tmp_path, monkeypatch):
    from medcam3d.errors import CohortError
    from medcam3d.jobs.cases import MAX_CASES

    table = tmp_path / "cases.csv"
    table.write_text("id,image\n" + "".join(f"c{n},sub{n}/scan.nii.gz\n" for n in range(300_000)))  # 6.5 MB
    asked = []
    monkeypatch.setattr(os.path, "exists", lambda path: asked.append(path) or True)
    with pytest.raises(CohortError, match=f"line {MAX_CASES + 2}: .*more than {MAX_CASES} cases.*--max-cases"):
        collect_cases(table)
    assert not asked  # the list is refused before the file system is asked about its paths


def test_check_output_location_resolves_each_folder_once(tmp_path, monkeypatch):
    inputs = [tmp_path / "data" / f"s{n}.nii.gz" for n in range(2000)]
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda path, **kw: calls.append(path) or real(path, **kw))
    check_output_location(tmp_path / "out", inputs + inputs)
    assert len(calls) < 10
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.nii.gz").symlink_to(tmp_path / "out" / "x.nii.gz")
    with pytest.raises(OutputConflictError, match="contains the input"):
        check_output_location(tmp_path / "out", inputs + [tmp_path / "data" / "link.nii.gz"])
    with pytest.raises(OutputConflictError, match="contains the input"):
        check_output_location(tmp_path / "out", [tmp_path / "data" / ".." / "out" / "x.nii.gz"])


@pytest.mark.parametrize("names", [["bright"], ["bright", "dark", "extra"]])
def test_class_names_that_do_not_fit_the_model_are_refused(setup, tmp_path, capsys, names):
    import torch

    from medcam3d import Explainer
    from medcam3d.errors import ConfigError

    root, config = setup
    wrong = tmp_path / "config.yaml"
    wrong.write_text(config.read_text().replace("class_names: [bright, dark]", f"class_names: [{', '.join(names)}]"))
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copy(root / "scan.nii.gz", scans / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert _batch(wrong, scans, out) == 2
    err = capsys.readouterr().err
    assert f"class_names has {len(names)} names" in err and "2 output channels" in err and "Traceback" not in err
    assert not (out / "a").exists() and not (out / "b").exists()
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                                torch.nn.Linear(2, 1))  # a single logit: two classes
    with pytest.raises(ConfigError, match="1 names but the model gives a single logit"):
        Explainer(model, layer="0", class_names=["lesion"])(torch.randn(1, 1, 8, 8, 8), "all")
    assert Explainer(model, layer="0", class_names=["no", "yes"])(torch.randn(1, 1, 8, 8, 8), "all").maps.shape[1] == 2
