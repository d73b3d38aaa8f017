"""The main job against its floor: ``medcam3d explain`` and ``batch`` vs a process that only reads,
preprocesses and infers (DESIGN.md §5, point 6; issue 11).

The *floor* is what any job must do anyway: the same imports, ``load_model``, reading and
preprocessing the scan (:func:`medcam3d.jobs.case_loading.load_case`) and one ``torch.no_grad()``
inference. The job is ``medcam3d explain --target all`` with the default outputs (scan-grid maps
of every class, their ``_norm`` copies, ``_feature`` maps, masks, boxes, pictures). For a cohort,
the floor is one process looping over the scans; the job is ``medcam3d batch`` (a DataLoader
worker reads the next scan while the current one is explained, and a writer process writes the
case before it; its stage times are shown in their own column).

Scenarios, generated in a temporary folder (the demo uses the shipped samples):

* ``ct``   — 512×512×300 int16 CT, 0.7×0.7×1.0 mm, stored LPS, 5° oblique, ``.nii.gz``; MONAI
  DenseNet121 with 14 classes (``configs/densenet121.yaml``, random weights as a state_dict).
* ``mr``   — 256³ int16 MR-like scan, 1 mm, ``.nii.gz``; MONAI DenseNet121 with 2 classes.
* ``demo`` — ``configs/demo.yaml`` on ``data_samples/`` (explain: case_01; batch: the 6 cases).

Every run is a subprocess: wall time is measured by this script from start to exit, peak RSS by
``wait4`` (the process itself; DataLoader workers not included). Inside, each stage is timed
exclusively (a stage's time excludes the stages it calls), so the rows add up to the run. With
``--repeats N`` floor and job alternate N times and the medians are printed.

    python benchmarks/bench_job.py                       # all scenarios, about 30 minutes on 2 cores
    python benchmarks/bench_job.py --scenarios ct --repeats 3
    python benchmarks/bench_job.py --quick               # small scans, 3 cases: a smoke run
    python benchmarks/bench_job.py --scenarios ct --no-batch --method 'occlusion(patch=16)' --keep /tmp/ct

``--method`` is the job's method (``medcam3d explain``/``batch --method``; any method spec the CLI
takes, parameters included); without it the config's method is used. The floor does not change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Runs inside each measured process: times stages exclusively and prints them as one JSON line.
DRIVER = textwrap.dedent(
    r'''
    import functools, json, os, sys, time
    STARTED = time.time()
    LAUNCHED = float(os.environ["BENCH_LAUNCHED"])
    totals, stack = {}, []

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            now = time.perf_counter()
            if stack:
                totals[stack[-1][0]] = totals.get(stack[-1][0], 0.0) + now - stack[-1][1]
            stack.append([name, now])
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                done, start = stack.pop()
                totals[done] = totals.get(done, 0.0) + end - start
                if stack:
                    stack[-1][1] = end
        return wrapper

    def patch(owner, attribute, name):
        setattr(owner, attribute, timed(name, getattr(owner, attribute)))

    EVENTS = os.environ.get("BENCH_EVENTS")

    def logged(kind, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                with open(EVENTS, "a") as stream:
                    stream.write(f"{kind} {start} {time.time()} {os.getpid()}\n")
        return wrapper

    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    begin = time.perf_counter()
    import torch, monai  # noqa: E401  the imports both processes need
    import medcam3d.config, medcam3d.models, medcam3d.preprocess, medcam3d.jobs.runner as runner  # noqa: E401
    imports = time.perf_counter() - begin
    patch(medcam3d.models, "load_model", "load model")
    patch(medcam3d.models, "load_configured", "load model")  # what the CLI calls
    patch(runner, "load_case", "read + preprocess")
    if mode == "floor":
        config = medcam3d.config.load_config(spec["config"])
        model = medcam3d.models.load_model(config).eval()
        transforms = timed("read + preprocess", medcam3d.preprocess.build_transforms)(config.preprocessing)
        infer = timed("inference / explain (engine)", lambda x: model(x[None]))
        for image, mask in zip(spec["images"], spec["masks"]):
            case = runner.load_case(image, transforms, mask)
            with torch.no_grad():
                infer(case.x)
    else:
        import medcam3d.cli, medcam3d.heatmap as heatmap, medcam3d.jobs.report as report, medcam3d.scan_maps as scan_maps  # noqa: E401
        patch(runner.Runner, "explain", "inference / explain (engine)")
        patch(heatmap.Heatmap, "save", "_feature maps (float32, feature grid)")
        patch(scan_maps.ScanGridMap, "sample", "resampling (slabs, planes, candidates)")
        patch(scan_maps, "save_scan_maps", "scan-grid maps: quantise + gzip + write")
        patch(scan_maps.ScanGridMap, "_summarise", "peaks and value ranges")
        patch(runner, "largest_component_runs", "boxes + masks (runs, largest region)")
        patch(runner, "save_runs", "boxes + masks (runs, largest region)")
        patch(report.SlicePainter, "__init__", "pictures")
        patch(report.SlicePainter, "save", "pictures")
        if EVENTS:
            runner.load_case = logged("read", runner.load_case)
            runner.Runner.explain_case = logged("explain", runner.Runner.explain_case)
        import medcam3d.jobs.cohort as cohort
        write_loop = cohort._write_loop

        def timed_write_loop(*args, **kwargs):  # the batch's writer process: its own stage times
            totals.clear()
            stack.clear()
            try:
                return write_loop(*args, **kwargs)
            finally:
                print("BENCH-WRITER " + json.dumps(totals), flush=True)
        cohort._write_loop = timed_write_loop
        code = medcam3d.cli.main(spec["argv"])
        if code:
            sys.exit(code)
    finished = time.time()
    totals["python + imports"] = STARTED - LAUNCHED + imports
    totals["other"] = max(0.0, (finished - STARTED) - imports - sum(v for k, v in totals.items() if k != "python + imports"))
    print("BENCH " + json.dumps(totals), flush=True)
    '''
)

STAGES = [
    "python + imports",
    "load model",
    "read + preprocess",
    "inference / explain (engine)",
    "_feature maps (float32, feature grid)",
    "resampling (slabs, planes, candidates)",
    "scan-grid maps: quantise + gzip + write",
    "peaks and value ranges",
    "boxes + masks (runs, largest region)",
    "pictures",
    "other",
]


# ----------------------------------------------------------------------------- scans and models
def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))


def make_ct(path: Path, shape: tuple[int, int, int]) -> None:
    """An int16 CT phantom: air, an elliptic body of soft tissue with noise, two denser blobs; LPS, 5° oblique."""
    rng = np.random.default_rng(0)
    spacing = np.array([0.7, 0.7, 1.0]) * (512 / shape[0])
    angle = np.deg2rad(5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)  # stored L-P-S
    affine[:3, 3] = [shape[0] * spacing[0] / 2, shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2]
    i = np.arange(shape[0])[:, None] / shape[0] - 0.5
    j = np.arange(shape[1])[None, :] / shape[1] - 0.5
    body = (i / 0.45) ** 2 + (j / 0.33) ** 2 <= 1
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[body] = 40
    k = np.arange(shape[2])[None, None, :] / shape[2] - 0.5
    for centre, radius in (((0.1, -0.05, 0.1), 0.06), ((-0.15, 0.1, -0.2), 0.04)):
        blob = (i[..., None] - centre[0]) ** 2 + (j[..., None] - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius**2
        volume[blob] = 300
    volume += rng.normal(0, 20, size=shape).astype(np.int16)
    _write_nifti(path, volume, affine)


def make_mr(path: Path, shape: tuple[int, int, int]) -> None:
    """An int16 MR-like head: a bright ellipsoid with smooth inhomogeneity and noise, 1 mm, RAS."""
    rng = np.random.default_rng(1)
    spacing = 256 / shape[0]
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    radius = (grid[0] / 0.8) ** 2 + (grid[1] / 0.9) ** 2 + (grid[2] / 0.85) ** 2
    volume = np.where(radius <= 1, 600 + 200 * grid[0] + 150 * np.cos(3 * grid[1]), 0).astype(np.float32)
    volume += rng.normal(0, 15, size=shape).astype(np.float32)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -np.asarray(shape) * spacing / 2
    _write_nifti(path, np.clip(volume, 0, None).astype(np.int16), affine)


def make_config(folder: Path, name: str, classes: int, preprocessing: list[dict], task: str) -> Path:
    import torch
    import yaml
    from monai.networks.nets import DenseNet121

    template = yaml.safe_load((ROOT / "configs" / "densenet121.yaml").read_text())
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    template["model"]["args"]["out_channels"] = classes
    template["model"]["weights"] = str(folder / f"{name}.pt")
    template["task"] = task
    template["class_names"] = template["class_names"][:classes] if classes == 14 else ["lesion", "other"][:classes]
    template["preprocessing"] = preprocessing
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(template, sort_keys=False))
    return path


def scenarios(work: Path, quick: bool, cases: int) -> dict:
    """Generate the scans and configs; returns name -> (description, config, images, masks)."""
    out = {}
    ct_shape = (128, 128, 75) if quick else (512, 512, 300)
    mr_shape = (64, 64, 64) if quick else (256, 256, 256)
    template = __import__("yaml").safe_load((ROOT / "configs" / "densenet121.yaml").read_text())

    def copies(source: Path, stem: str) -> list[str]:
        folder = work / stem
        folder.mkdir(exist_ok=True)
        paths = []
        for n in range(cases):
            target = folder / f"{stem}{n:02d}.nii.gz"
            if not target.is_file():
                shutil.copyfile(source, target)
            paths.append(str(target))
        return paths

    ct = work / f"ct-{'x'.join(map(str, ct_shape))}.nii.gz"
    if not ct.is_file():  # kept from an earlier run (--keep)
        make_ct(ct, ct_shape)
    out["ct"] = (f"{'x'.join(map(str, ct_shape))} int16 CT, stored LPS, 5° oblique; DenseNet121, 14 classes, 96³ input",
                 make_config(work, "ct", 14, template["preprocessing"], "multilabel"), [str(ct)], [None],
                 copies(ct, f"ct-{'x'.join(map(str, ct_shape))}"), [None] * cases)
    mr = work / f"mr-{'x'.join(map(str, mr_shape))}.nii.gz"
    if not mr.is_file():
        make_mr(mr, mr_shape)
    mr_steps = [{"name": "Orientation", "axcodes": "RAS"},
                {"name": "Spacing", "pixdim": [2.5, 2.5, 2.5] if not quick else [1.0, 1.0, 1.0], "mode": "bilinear"},
                {"name": "ScaleIntensityRange", "a_min": 0.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                {"name": "ResizeWithPadOrCrop", "spatial_size": [96, 96, 96] if not quick else [64, 64, 64]}]
    out["mr"] = (f"{'x'.join(map(str, mr_shape))} int16 MR-like, RAS; DenseNet121, 2 classes",
                 make_config(work, "mr", 2, mr_steps, "multiclass"), [str(mr)], [None],
                 copies(mr, f"mr-{'x'.join(map(str, mr_shape))}"), [None] * cases)
    samples = ROOT / "data_samples"
    rows = [line.split(",") for line in (samples / "cases.csv").read_text().splitlines()[1:] if line.strip()]
    images = [str(samples / row[1]) for row in rows]
    masks = [str(samples / row[2]) for row in rows]
    out["demo"] = ("the shipped demo (configs/demo.yaml, data_samples/: 6 cases)", ROOT / "configs" / "demo.yaml",
                   images[:1], masks[:1], images, masks)
    return out


# ----------------------------------------------------------------------------- measuring
def run(driver: Path, mode: str, spec: dict, events: Path | None = None) -> dict:
    """One measured subprocess: its stage times, wall time and peak RSS (MiB)."""
    environment = {**os.environ, "BENCH_LAUNCHED": repr(time.time()), "PYTHONPATH": str(ROOT)}
    if events is not None:
        events.unlink(missing_ok=True)
        environment["BENCH_EVENTS"] = str(events)
    log = driver.parent / f"{mode}-{time.time_ns()}.log"
    with open(log, "w") as output:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(driver), mode, json.dumps(spec)], stdout=output,
                                   stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({process.returncode}):\n{text[-3000:]}")
    line = next(line for line in text.splitlines() if line.startswith("BENCH "))
    result = {"stages": json.loads(line[6:]), "wall": wall, "rss": usage.ru_maxrss / 1024}
    writer = [json.loads(line[13:]) for line in text.splitlines() if line.startswith("BENCH-WRITER ")]
    if writer:  # batch: the writer process's stages (they ran while the main process explained)
        result["writer"] = writer[0]
    return result


def overlap(events: Path) -> tuple[float, float]:
    """Share of reading time that ran while a case was being explained, and total reading seconds."""
    reads, explains = [], []
    for line in events.read_text().splitlines():
        kind, start, end, _ = line.split()
        (reads if kind == "read" else explains).append((float(start), float(end)))
    total = sum(end - start for start, end in reads)
    shared = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in reads for s2, e2 in explains)
    return (shared / total if total else 0.0), total


def median_run(results: list[dict]) -> dict:
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in results) for k in STAGES}
    return {"stages": stages, "wall": statistics.median(r["wall"] for r in results),
            "rss": statistics.median(r["rss"] for r in results)}


def print_table(title: str, columns: dict[str, dict]) -> None:
    names = list(columns)
    width = max(len(s) for s in STAGES) + 2
    print(f"\n{title}")
    print(f"{'stage (seconds)':<{width}}" + "".join(f"{n:>14}" for n in names))
    for stage in STAGES:
        values = [columns[n]["stages"].get(stage, 0.0) for n in names]
        if any(v >= 0.005 for v in values):
            print(f"{stage:<{width}}" + "".join(f"{v:>14.2f}" for v in values))
    print(f"{'process wall time':<{width}}" + "".join(f"{columns[n]['wall']:>14.2f}" for n in names))
    print(f"{'peak RSS (MiB)':<{width}}" + "".join(f"{columns[n]['rss']:>14.0f}" for n in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="ct,mr,demo", help="comma list of ct, mr, demo")
    parser.add_argument("--cases", type=int, default=10, help="scans in the batch comparison (ct, mr)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating floor/job runs; medians are shown")
    parser.add_argument("--quick", action="store_true", help="small scans and 3 cases: a smoke run")
    parser.add_argument("--no-batch", action="store_true", help="explain only")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the job's --device; the floor uses the CPU model)")
    parser.add_argument("--layer", help="the job's --layer (default: the config's, auto)")
    parser.add_argument("--method", help="the job's --method, e.g. smoothgrad or 'occlusion(patch=16)' (default: the "
                        "config's method)")
    parser.add_argument("--keep", help="keep the generated scans and outputs in this folder (and reuse its scans)")
    args = parser.parse_args()
    cases = min(args.cases, 3) if args.quick else args.cases
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_job_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        driver = work / "driver.py"
        driver.write_text(DRIVER)
        print(f"generating scans in {work} ...", flush=True)
        all_scenarios = scenarios(work, args.quick, cases)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; device {args.device}; "
              f"repeats {args.repeats}{'; quick' if args.quick else ''}", flush=True)
        summary = []
        tag = "-" + "".join(c if c.isalnum() else "_" for c in args.method).strip("_") if args.method else ""
        for name in chosen:
            description, config, images, masks, cohort, cohort_masks = all_scenarios[name]
            floors, jobs = [], []
            for repeat in range(args.repeats):
                out = work / f"out-{name}{tag}-{repeat}"  # one folder per method: nothing is reused
                floors.append(run(driver, "floor", {"config": str(config), "images": images, "masks": masks}))
                argv = ["explain", "--config", str(config), "--image", images[0], "--target", "all", "--out", str(out),
                        "--device", args.device]
                if masks[0]:
                    argv += ["--mask", masks[0]]
                if args.layer:
                    argv += ["--layer", args.layer]
                if args.method:
                    argv += ["--method", args.method]
                jobs.append(run(driver, "job", {"argv": argv}))
            floor, job = median_run(floors), median_run(jobs)
            method = f"--method {args.method}" if args.method else "the config's method"
            print_table(f"== {name}: {description}\n   explain --target all, {method}, default outputs",
                        {"floor": floor, "explain": job})
            ratios = {"explain wall": job["wall"] / floor["wall"], "explain RSS": job["rss"] / floor["rss"]}
            print(f"explain / floor: wall {ratios['explain wall']:.2f}x, peak RSS {ratios['explain RSS']:.2f}x")
            if not args.no_batch:
                loops, batches, shares = [], [], []
                for repeat in range(args.repeats):
                    out = work / f"batch-{name}{tag}-{repeat}"
                    events = work / f"events-{name}-{repeat}.txt"
                    table = work / f"{name}-cases.csv"
                    table.write_text("id,image,mask\n" + "".join(
                        f"{Path(i).name.split('.')[0]}{repeat},{i},{m or ''}\n" for i, m in zip(cohort, cohort_masks)))
                    loops.append(run(driver, "floor", {"config": str(config), "images": cohort, "masks": cohort_masks}))
                    argv = ["batch", "--config", str(config), "--inputs", str(table), "--out", str(out), "--device",
                            args.device, "--quiet"] + (["--layer", args.layer] if args.layer else []) + (
                               ["--method", args.method] if args.method else [])
                    batches.append(run(driver, "job", {"argv": argv}, events=events))
                    shares.append(overlap(events))
                loop, batch = median_run(loops), median_run(batches)
                columns = {"floor loop": loop, "batch": batch}
                writers = [r["writer"] for r in batches if "writer" in r]
                if writers:
                    stages = {k: statistics.median(w.get(k, 0.0) for w in writers) for k in STAGES if k != "other"}
                    columns["batch writer"] = {"stages": stages, "wall": sum(stages.values()),
                                               "rss": statistics.median(r["rss"] for r in batches)}
                print_table(f"   batch over {len(cohort)} scans (DataLoader, 1 worker; a writer process writes each "
                            "case while the next is explained) vs a floor loop in one process\n"
                            "   (batch writer: the writer process's busy time by stage, overlapped with the batch's; "
                            "its peak RSS is not measured)", columns)
                share, reading = statistics.median(s[0] for s in shares), statistics.median(s[1] for s in shares)
                ratios["batch wall"] = batch["wall"] / loop["wall"]
                print(f"batch / floor loop: wall {ratios['batch wall']:.2f}x ({batch['wall'] / len(cohort):.1f} s vs "
                      f"{loop['wall'] / len(cohort):.1f} s per case); the worker read for {reading:.1f} s, "
                      f"{share:.0%} of it while a case was being explained")
            summary.append((name, ratios))
        print("\nratios (goal: <= 1.5)")
        for name, ratios in summary:
            print(f"  {name:<5} " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
