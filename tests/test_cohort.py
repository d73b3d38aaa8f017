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
import torch
from monai.networks.nets import DenseNet

from medcam3d import io
from medcam3d.cli import main
from medcam3d.space import Space
from _images import oblique_lpi_affine, planted_scan

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
    torch.manual_seed(0)
    model = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=4, block_config=(1, 1))
    torch.save(model.state_dict(), root / "weights.pt")
    (root / "config.yaml").write_text("""
model:
  network: monai.networks.nets.DenseNet
  args: {spatial_dims: 3, in_channels: 1, out_channels: 2, init_features: 4, growth_rate: 4, block_config: [1, 1]}
  weights: weights.pt
task: multilabel
class_names: [bright, dark]
preprocessing:
  - {name: Orientation, axcodes: RAS}
  - {name: Spacing, pixdim: [2.5, 2.5, 2.5]}
  - {name: ScaleIntensityRange, a_min: 0, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}
  - {name: ResizeWithPadOrCrop, spatial_size: [24, 24, 24]}
output: {pictures: false}
""")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "medcam3d", "batch", "--config", str(root / "config.yaml"),
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

    # Kill a run midway, then resume: finished cases are not rewritten, the rest are completed.
    interrupted = tmp_path / "interrupted"
    process = torchrun(cohort, interrupted)
    deadline = time.time() + 240
    while time.time() < deadline and (not interrupted.exists() or len(case_folders(interrupted)) < 2):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    finished = case_folders(interrupted)
    assert 2 <= len(finished) <= CASES
    stamps = {name: (interrupted / name / "summary.json").stat().st_mtime_ns for name in finished}
    process = torchrun(cohort, interrupted, "--resume")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert case_folders(interrupted) == [f"case{n}" for n in range(CASES)]
    assert all((interrupted / name / "summary.json").stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert f"{len(finished)} already done" in output
    assert len(list(csv.DictReader((interrupted / "summary.csv").open()))) == CASES
