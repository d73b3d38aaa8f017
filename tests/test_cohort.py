"""Cohorts across processes: torchrun (gloo, CPU) shards cases, writes each once, merges, resumes."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam3d import io
from medcam3d.cli import main
from medcam3d.space import Space
from _images import oblique_lpi_affine, planted_scan
from conftest import write_tiny_config, write_tiny_model

CASES = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    affine = oblique_lpi_affine()
    shape = (45, 41, 19)
    (root / "scans").mkdir()
    for n in range(CASES):
        centre = (affine @ [10 + 4 * n, 20, 9, 1])[:3]
        image, _ = planted_scan(shape, affine, centre, radius_mm=7, seed=n)
        io.write(root / "scans" / f"case{n}.nii.gz", image, Space(shape, affine))
    write_tiny_model(root)
    write_tiny_config(root / "config.yaml")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GATED_LAUNCHER = """
import os, pathlib, sys, time
import medcam3d.jobs.cohort as cohort
gate, names = pathlib.Path(sys.argv[1]), set(sys.argv[2].split(","))
original = cohort.load_case
(gate.parent / f"rank-{os.getpid()}.pid").write_text(str(os.getpid()))  # the test kills ranks that outlive torchrun

def gated(image, *args, **kwargs):  # these cases wait until the test opens the gate
    parent = os.getppid()  # in a DataLoader worker: the rank
    while pathlib.Path(image).name in names and not gate.exists():
        if os.getppid() != parent:  # the rank was killed: do not outlive it (and hold its output pipe)
            os._exit(1)
        time.sleep(0.05)
    return original(image, *args, **kwargs)

cohort.load_case = gated
from medcam3d.cli import main
sys.exit(main(sys.argv[3:]))
"""


def torchrun(root: Path, out: Path, *extra: str, gate: tuple[Path, list[str]] | None = None) -> subprocess.Popen:
    if gate is None:
        entry = ["-m", "medcam3d"]
    else:
        launcher = out.parent / "gated_launcher.py"
        launcher.write_text(GATED_LAUNCHER)
        entry = [str(launcher), str(gate[0]), ",".join(gate[1])]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *entry, "batch", "--config", str(root / "config.yaml"),
               "--inputs", str(root / "scans"), "--out", str(out), "--device", "cpu", "--quiet", "--workers", "1", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                            start_new_session=True)


def case_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_two_process_batch_matches_single_process_and_resumes(cohort, tmp_path):
    single = tmp_path / "single"
    assert main(["batch", "--config", str(cohort / "config.yaml"), "--inputs", str(cohort / "scans"),
                 "--out", str(single), "--device", "cpu", "--quiet"]) == 0

    parallel = tmp_path / "parallel"
    process = torchrun(cohort, parallel)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert case_folders(parallel) == [f"case{n}" for n in range(CASES)]
    rows = list(csv.DictReader((parallel / "summary.csv").open()))
    assert [r["case"] for r in rows] == [f"case{n}" for n in range(CASES)] and all(r["status"] == "ok" for r in rows)
    assert not list(parallel.glob("summary.rank*")) and not list(parallel.glob(".*partial*"))
    for n in range(CASES):
        name = f"case{n}/case{n}_hirescam_bright.nii.gz"
        np.testing.assert_allclose(nib.load(parallel / name).get_fdata(), nib.load(single / name).get_fdata(), rtol=1e-5, atol=1e-6)

    # Kill a run midway, then resume: finished cases are not rewritten, the rest are completed. Rank 0 takes
    # cases 0, 2, 4 and rank 1 takes 1, 3, 5; cases 2 and 3 wait at a gate that stays shut, so exactly cases 0
    # and 1 are finished when the run is killed.
    interrupted = tmp_path / "interrupted"
    process = torchrun(cohort, interrupted, gate=(tmp_path / "never-opened", ["case2.nii.gz", "case3.nii.gz"]))
    deadline = time.time() + 240
    while time.time() < deadline and (not interrupted.exists() or len(case_folders(interrupted)) < 2):
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    time.sleep(1.0)  # nothing else may finish while the gate is shut
    os.killpg(process.pid, signal.SIGKILL)
    for pid_file in tmp_path.glob("rank-*.pid"):  # torchrun starts its ranks in their own sessions
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()
    finished = case_folders(interrupted)
    assert finished == ["case0", "case1"]
    stamps = {name: (interrupted / name / "summary.json").stat().st_mtime_ns for name in finished}
    process = torchrun(cohort, interrupted, "--resume")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert case_folders(interrupted) == [f"case{n}" for n in range(CASES)]
    assert all((interrupted / name / "summary.json").stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert f"{len(finished)} already done" in output
    assert len(list(csv.DictReader((interrupted / "summary.csv").open()))) == CASES


def _cohort_runner(root: Path):
    from medcam3d.config import load_config
    from medcam3d.jobs.cases import collect_cases
    from medcam3d.jobs.runner import Runner
    from medcam3d.models import load_model

    config = load_config(root / "config.yaml")
    return Runner(config, load_model(config), device="cpu"), collect_cases(root / "scans")


def test_background_writer_writes_what_the_main_process_writes(cohort, tmp_path):
    from medcam3d.jobs.cohort import run_cohort

    runner, cases = _cohort_runner(cohort)
    rows = {}
    for background in (True, False):
        out = tmp_path / f"background_{background}"
        rows[background], failures, _ = run_cohort(runner, cases, out, workers=1, progress=False,
                                                   background_writer=background)
        assert failures == 0
    assert rows[True] == rows[False]
    first, second = tmp_path / "background_True", tmp_path / "background_False"
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert sum(name.endswith("/summary.json") for name in names) == CASES
    assert sum(name.endswith(".nii.gz") for name in names) >= 2 * CASES
    for name in names:
        if name.endswith((".nii", ".nii.gz")):
            one, two = nib.load(first / name), nib.load(second / name)
            np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
            np.testing.assert_array_equal(one.affine, two.affine)
        elif name.endswith(".json") and not name.endswith("summary.json"):
            assert (first / name).read_bytes() == (second / name).read_bytes()


def test_a_writer_process_that_dies_fails_its_cases_and_the_rest_are_written(cohort, tmp_path, monkeypatch):
    from medcam3d.jobs import cohort as cohort_module
    from medcam3d.jobs.runner import Runner

    main_pid = os.getpid()
    original = Runner.write_case

    def dies_on_case1(self, explained):
        if explained.result.case_id == "case1" and os.getpid() != main_pid:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return original(self, explained)

    monkeypatch.setattr(Runner, "write_case", dies_on_case1)
    runner, cases = _cohort_runner(cohort)
    out = tmp_path / "out"
    rows, failures, _ = cohort_module.run_cohort(runner, cases, out, workers=1, progress=False)
    by_case = {row["case"]: row for row in rows}
    assert [row["case"] for row in rows] == [f"case{n}" for n in range(CASES)]
    assert by_case["case0"]["status"] == "ok" and by_case[f"case{CASES - 1}"]["status"] == "ok"
    assert by_case["case1"]["status"] == "error" and "writer process ended (killed by signal 9" in by_case["case1"]["error"]
    lost = [row for row in rows if row["status"] == "error"]
    assert failures == len(lost) and all("--resume" in row["error"] for row in lost)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(r["case"] for r in rows if r["status"] == "ok")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging folder is left behind


def test_scans_go_to_the_writer_in_the_shared_memory_the_reader_filled():
    import torch

    from medcam3d.jobs.cohort import _as_arrays, _as_tensors
    from medcam3d.jobs.case_loading import LoadedCase

    scan = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6).share_memory_()
    handed = LoadedCase(torch.zeros(1, 2, 2, 2), Space((4, 5, 6), np.eye(4)), scan, None, None)
    arrays = _as_arrays(handed)
    assert isinstance(arrays.scan, np.ndarray) and np.shares_memory(arrays.scan, scan.numpy())
    assert _as_tensors(arrays, handed).scan is scan  # no copy into fresh shared memory
    other = _as_tensors(arrays)  # without the original: a tensor over the same memory, not yet shared
    assert other.scan is not scan and torch.equal(other.scan, scan)
    edited = np.array(arrays.scan) + 1  # an array the explain step replaced is sent as itself
    sent = _as_tensors(LoadedCase(handed.x, handed.scanner_space, edited, None, None), handed).scan
    assert sent is not scan and torch.equal(sent, scan + 1)
