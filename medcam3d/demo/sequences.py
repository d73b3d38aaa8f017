"""A second "sequence" of the shipped demo scans, for trying models of several input channels.

``python -m medcam3d.demo.sequences --out sequences`` writes, for the first ``--cases`` scans of
``data_samples/cases.csv``, nnU-Net-style files ``CASE_0000.nii.gz`` (the scan itself) and
``CASE_0001.nii.gz`` (a second sequence: the scan with inverted contrast, lightly blurred, on a
coarser grid of 1.5 times the voxel size, as a T2 or FLAIR series often is), its ground truth
``CASE_mask.nii.gz``, and ``cases.csv`` with the columns ``id``, ``image_0000``, ``image_0001``
and ``mask``. The second channel is
synthetic (derived from the first): it shows how channels flow through medcam3d, nothing about MR.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["second_sequence", "write_sequences", "main"]

SAMPLES = Path(__file__).resolve().parent.parent.parent / "data_samples"


def second_sequence(values: np.ndarray, space, *, coarsen: float = 1.5):
    """A second channel of a scan: inverted contrast (``100 - 0.5 (x - 100)``), blurred by one voxel
    (Gaussian, sigma 1), on a grid with ``coarsen`` times the voxel size covering the same field of view.

    Returns
    -------
    (numpy.ndarray, Space)
        float32 values ``(I', J', K')`` and their grid.
    """
    from scipy.ndimage import gaussian_filter

    from ..space import Space, resample

    shape = tuple(max(2, int(round(n / coarsen))) for n in space.shape)
    scale = np.array([(n - 1) / max(m - 1, 1) for n, m in zip(space.shape, shape)])  # same first and last centres
    affine = np.array(space.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] * scale
    coarse = Space(shape, affine)
    inverted = (100.0 - 0.5 * (np.asarray(values, dtype=np.float32) - 100.0)).astype(np.float32)
    blurred = gaussian_filter(inverted, sigma=1.0).astype(np.float32)
    return np.asarray(resample(blurred, space, coarse, mode="linear"), dtype=np.float32), coarse


def write_sequences(out: str | Path, *, cases: int = 2, samples: str | Path = SAMPLES) -> list[Path]:
    """Write the two-channel cases (see the module) into ``out``; returns ``[cases.csv]``."""
    from .. import io

    out, samples = Path(out), Path(samples)
    out.mkdir(parents=True, exist_ok=True)
    with (samples / "cases.csv").open(encoding="utf-8", newline="") as stream:
        shipped = list(csv.DictReader(stream))[:cases]  # columns case_id, file, mask (data_samples/README.md)
    rows = []
    for case in shipped:
        name, image = case["case_id"], samples / case["file"]
        first, second = out / f"{name}_0000.nii.gz", out / f"{name}_0001.nii.gz"
        shutil.copyfile(image, first)
        values, space = io.read(image)
        io.write(second, *second_sequence(values, space))
        mask = ""
        if case.get("mask"):  # named *_mask: a folder of these files still groups the two channels
            mask = f"{name}_mask.nii.gz"
            shutil.copyfile(samples / case["mask"], out / mask)
        rows.append({"id": name, "image_0000": first.name, "image_0001": second.name, "mask": mask})
    table = out / "cases.csv"
    with table.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["id", "image_0000", "image_0001", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return [table]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcam3d.demo.sequences", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (CASE_0000/0001.nii.gz files and cases.csv)")
    parser.add_argument("--cases", type=int, default=2, help="how many shipped scans (default 2, at most 6)")
    args = parser.parse_args(argv)
    if not 1 <= args.cases <= 6:
        print(f"{parser.prog}: error: --cases must be 1 to 6, not {args.cases}", file=sys.stderr)
        return 2
    table = write_sequences(args.out, cases=args.cases)[0]
    print(f"wrote {args.cases} two-channel case(s) and {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
