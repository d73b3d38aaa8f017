"""Train the demo classifier on synthetic phantoms and write the shipped sample data.

``python -m medcam3d.demo.train --out data_samples`` (CPU, 2 threads, a few minutes):

1. generates training cases directly on the model's input grid (:func:`synthetic.model_grid`,
   64^3 voxels of 2 mm), scaled with the demo window (-200..300 HU -> 0..1);
2. trains a small MONAI DenseNet (one dense block: a 16^3 feature map before the GAP + Linear
   head) for multi-label classification (two logits, ``BCEWithLogitsLoss``), seeded and with
   deterministic algorithms;
3. measures accuracy (per class, exact match) on held-out cases from another seed range;
4. measures how often the HiResCAM peak of each present lesion class falls inside that lesion's
   mask, on held-out cases sampled on realistic scanner grids and run through the demo
   preprocessing and :meth:`Explanation.to_scanner_space`;
5. writes ``demo_model.pt`` (a plain state_dict), sample cases with masks, ``cases.csv`` and
   ``metrics.json`` into ``--out``.

``--evaluate-only`` skips training and evaluates the weights in ``--out``.

``--hard-cases N`` only writes N cases of the harder held-out set
(:func:`synthetic.make_hard_phantom`) as scans, masks and ``cases.csv`` into ``--out``: what
``medcam3d evaluate`` reads. They are generated on demand, never committed.

``--weakly-supervised`` trains the same network on the same cases with the image labels only (no
mask-based localization term) into ``demo_model_weak.pt`` and ``metrics_weak.json`` beside the
shipped model, without touching the sample cases (``benchmarks/weak_segmentation.py`` compares
the two). It also turns on ``--zero-mean-stem`` (see :func:`zero_mean_stem`): without it, the
labels alone never taught this network ``dark_elongated``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..layers import receptive_field
from . import synthetic

__all__ = [
    "MODEL_ARGS",
    "NETWORK",
    "PLACEMENT",
    "SAMPLE_CASES",
    "build_model",
    "evaluate_accuracy",
    "generate_batch",
    "peak_in_lesion",
    "predict",
    "write_hard_cases",
    "write_samples",
    "zero_mean_stem",
]

NETWORK = "monai.networks.nets.DenseNet"
#: Where the shipped measurements (``metrics.json``, ``metrics_weak.json``, ``cases.csv``) place the
#: feature cells: the convention the shipped weights were trained for (``configs/demo.yaml`` says so).
PLACEMENT = "align_corners"
#: Arguments of the demo network (``configs/demo.yaml`` holds the same).
MODEL_ARGS: dict = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "init_features": 8,
    "growth_rate": 8,
    "block_config": [4],
}

# Seed ranges (disjoint): training, held-out accuracy, held-out peak-in-lesion, shipped samples.
TRAIN_SEED0 = 0
ACCURACY_SEED0 = 1_000_000
PEAK_SEED0 = 2_000_000

#: The shipped cases: (case id, scanner grid name from ``synthetic.sample_grids()``, seed,
#: (bright_round, dark_elongated) present).
SAMPLE_CASES: tuple[tuple[str, str, int, tuple[bool, bool]], ...] = (
    ("case_01", "lps_aniso", 900_001, (True, True)),
    ("case_02", "ras_aniso", 900_002, (True, False)),
    ("case_03", "lpi_iso", 900_003, (False, True)),
    ("case_04", "lps_oblique", 900_004, (True, True)),
    ("case_05", "lip_coronal", 900_005, (False, False)),
    ("case_06", "lps_aniso", 900_006, (False, True)),
)


def build_model() -> torch.nn.Module:
    """The demo network (untrained): MONAI ``DenseNet`` with :data:`MODEL_ARGS`."""
    from monai.networks.nets import DenseNet

    return DenseNet(**MODEL_ARGS)


def cell_weights(n_voxels: int, step: int, offset: float) -> np.ndarray:
    """Overlap of each feature cell's block with each input voxel, along one axis.

    Cell ``u``'s block is ``step`` voxels wide and centred on ``offset + step·u``: with ``offset``
    ``(step - 1) / 2`` the align_corners convention (plain average pooling), with
    ``receptive_field(...).offset`` (:func:`medcam3d.layers.receptive_field`) the centres of the
    cells' receptive fields. Voxel ``i`` covers ``[i - 0.5, i + 0.5]``; its weight is the length of the overlap
    divided by ``step``, so the weights of a cell sum to 1 where its block lies inside the volume.

    Returns
    -------
    (n_voxels // step, n_voxels) float32 ndarray
    """
    centres = offset + step * np.arange(n_voxels // step, dtype=np.float64)
    edges = np.arange(n_voxels, dtype=np.float64)
    low = np.maximum(centres[:, None] - step / 2, edges[None, :] - 0.5)
    high = np.minimum(centres[:, None] + step / 2, edges[None, :] + 0.5)
    return (np.clip(high - low, 0.0, None) / step).astype(np.float32)


def cell_fractions(labels: torch.Tensor, n_classes: int, step: int, offset: Sequence[float]) -> torch.Tensor:
    """Each class's lesion fraction in each feature cell's block (blocks centred as :func:`cell_weights` says).

    Parameters
    ----------
    labels : (B, D, V, U) integer Tensor
        0 background, ``c + 1`` class ``c``.
    step, offset
        The feature grid's step and cell 0's centre per axis, in input voxels.

    Returns
    -------
    (B, n_classes, D / step, V / step, U / step) float32 Tensor
    """
    onehot = torch.stack([labels == c + 1 for c in range(n_classes)], dim=1).float()
    wd, wv, wu = (torch.from_numpy(cell_weights(n, step, o)) for n, o in zip(labels.shape[1:], offset))
    out = onehot @ wu.T  # (B, C, D, V, u): one axis at a time
    out = (out.transpose(-1, -2) @ wv.T).transpose(-1, -2)  # (B, C, D, v, u)
    return (out.movedim(2, -1) @ wd.T).movedim(-1, 2)  # (B, C, d, v, u)


def generate_batch(
    seeds: Iterable[int], present: Sequence[bool] | None = None, *, cell: int | None = None,
    cell_offset: Sequence[float] = (1.5, 1.5, 1.5), labels: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Cases on the model grid, scaled for the model.

    Parameters
    ----------
    seeds : iterable of int
    present : (2,) bools, optional
        Force the classes present; default drawn per seed.
    cell : int, optional
        Also return each class's lesion fraction per ``cell^3`` block of voxels (the feature grid
        of a network with stride ``cell``), each block centred on ``cell_offset + cell·u``
        (:func:`cell_fractions`).
    cell_offset : (3,) floats
        Cell 0's centre in input voxels: ``(cell - 1) / 2`` (the default for ``cell`` 4) is the
        align_corners convention (plain ``cell^3`` average pooling); ``receptive_field(...).offset``
        centres the blocks on the receptive fields.
    labels : bool
        Also return the label maps ``(N, 64, 64, 64)`` uint8 (after the fractions, if any).

    Returns
    -------
    x : (N, 1, 64, 64, 64) float32 Tensor
        Intensities in [0, 1].
    y : (N, 2) float32 Tensor
        Multi-label targets ``(bright_round, dark_elongated)``.
    fractions : (N, 2, 64 / cell, 64 / cell, 64 / cell) float32 Tensor
        Only with ``cell``.
    """
    grid = synthetic.model_grid()
    images, targets, label_maps = [], [], []
    for seed in seeds:
        phantom = synthetic.make_phantom(seed, present)
        image, label_map = phantom.sample(grid)
        images.append(synthetic.scale_intensity(image))
        targets.append(np.asarray(phantom.present, dtype=np.float32))
        label_maps.append(label_map.astype(np.uint8))
    out: tuple[torch.Tensor, ...] = (torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets)))
    stacked = torch.from_numpy(np.stack(label_maps))
    if cell is not None and all(o == (cell - 1) / 2 for o in cell_offset):  # the convention: plain average pooling
        onehot = torch.stack([stacked == c + 1 for c in range(len(synthetic.CLASS_NAMES))], dim=1).float()
        out += (torch.nn.functional.avg_pool3d(onehot, cell),)
    elif cell is not None:
        out += (cell_fractions(stacked, len(synthetic.CLASS_NAMES), cell, cell_offset),)
    return out + (stacked,) if labels else out


def class_evidence(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and per-cell logits of the demo DenseNet (GAP + Linear head).

    Returns
    -------
    logits : (B, 2) Tensor
        Equal to ``model(x)``.
    cell_logits : (B, 2, d, v, u) Tensor
        ``W @ relu(features) + b`` per feature cell; its spatial mean is ``logits``, and without
        the bias it is the HiResCAM (= CAM / cells) map up to the constant factor ``d v u``.
    """
    # DenseNet's submodules (casts: nn.Module.__getattr__ is typed Tensor | Module)
    features = torch.relu(cast(torch.nn.Module, model.features)(x))
    head = cast(torch.nn.Linear, cast(torch.nn.Module, model.class_layers).out)
    cell_logits = torch.einsum("bkdvu,ck->bcdvu", features, head.weight) + head.bias[None, :, None, None, None]
    return cell_logits.mean(dim=(2, 3, 4)), cell_logits


def localization_loss(cell_logits: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between each present lesion's cell distribution and softmax(cell logits).

    Shift-invariant over cells, so it shapes *where* the evidence is without constraining the
    image logit (the spatial mean). Classes absent from a case do not contribute.

    Parameters
    ----------
    cell_logits : (B, C, d, v, u) Tensor
    fractions : (B, C, d, v, u) Tensor
        Lesion fraction of each cell.
    """
    mass = fractions.flatten(2).sum(-1)
    present = mass > 0
    if not present.any():
        return cell_logits.sum() * 0.0
    target = fractions.flatten(2)[present] / mass[present][:, None]
    log_p = torch.log_softmax(cell_logits.flatten(2)[present], dim=-1)
    return -(target * log_p).sum(-1).mean()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Sigmoid probabilities ``(N, 2)`` of ``x`` ``(N, 1, *spatial)`` in eval mode."""
    model.eval()
    return torch.cat([torch.sigmoid(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def evaluate_accuracy(model: torch.nn.Module, seeds: Sequence[int], chunk: int = 32) -> dict:
    """Accuracy on generated cases (threshold 0.5).

    Returns
    -------
    dict
        ``n``, ``per_class`` (accuracy of each class), ``exact_match`` (both labels right),
        ``counts`` (cases with each class present).
    """
    correct = np.zeros(2)
    exact = 0
    present = np.zeros(2)
    for start in range(0, len(seeds), chunk):
        x, y = generate_batch(seeds[start : start + chunk])
        hits = (predict(model, x) > 0.5).numpy() == (y.numpy() > 0.5)
        correct += hits.sum(axis=0)
        exact += int(hits.all(axis=1).sum())
        present += y.numpy().sum(axis=0)
    n = len(seeds)
    return {
        "n": n,
        "per_class": {name: float(correct[c] / n) for c, name in enumerate(synthetic.CLASS_NAMES)},
        "exact_match": exact / n,
        "counts": {name: int(present[c]) for c, name in enumerate(synthetic.CLASS_NAMES)},
    }


def peak_in_lesion(model: torch.nn.Module, seeds: Sequence[int], grids: dict | None = None) -> dict:
    """How often each present lesion's HiResCAM peak (in scanner space) lies in its mask.

    Each seed is sampled on one of the realistic scanner grids (in turn), preprocessed with
    :data:`synthetic.PREPROCESSING`, explained (HiResCAM, layer ``auto``, target ``"all"``,
    placement :data:`PLACEMENT`, as ``configs/demo.yaml`` explains the shipped model) and
    mapped back with ``to_scanner_space``.

    Returns
    -------
    dict
        ``rate`` over all present lesions, ``per_class`` rates, ``per_grid`` rates, ``n_lesions``,
        ``median_distance_mm`` (peak to lesion centre).
    """
    import medcam3d
    from medcam3d.preprocess import preprocess

    grids = synthetic.sample_grids() if grids is None else grids
    names = list(grids)
    explainer = medcam3d.Explainer(model.eval(), method="hirescam", layer="auto", class_names=list(synthetic.CLASS_NAMES),
                                   placement=PLACEMENT)
    hits: dict[str, list[bool]] = {name: [] for name in synthetic.CLASS_NAMES}
    per_grid: dict[str, list[bool]] = {name: [] for name in names}
    distances = []
    for index, seed in enumerate(seeds):
        grid_name = names[index % len(names)]
        space = grids[grid_name]
        phantom = synthetic.make_phantom(seed)
        image, labels = phantom.sample(space)
        x, scanner_space = preprocess((image, space), synthetic.PREPROCESSING)
        heatmaps = explainer(x[None], target="all").to_scanner_space(scanner_space)
        for lesion in phantom.lesions:
            found = heatmaps[lesion.class_index].peak()  # None for a flat map: no peak, a miss
            inside = found is not None and bool(labels[found[0]] == lesion.label)
            hits[lesion.name].append(inside)
            per_grid[grid_name].append(inside)
            if found is not None:
                distances.append(float(np.linalg.norm(found[1] - lesion.centre)))
    every = [h for values in hits.values() for h in values]
    return {
        "rate": float(np.mean(every)) if every else math.nan,
        "n_lesions": len(every),
        "n_cases": len(seeds),
        "per_class": {name: float(np.mean(v)) if v else math.nan for name, v in hits.items()},
        "per_grid": {name: float(np.mean(v)) if v else math.nan for name, v in per_grid.items()},
        "median_distance_mm": float(np.median(distances)) if distances else math.nan,
    }


@torch.no_grad()
def zero_mean_stem(model: torch.nn.Module) -> None:
    """Remove the mean of each kernel of the first convolution (``features.conv0``), in place.

    The input is mostly air (0 after the intensity window, ~83 % of the 64^3 voxels), so a stem
    kernel with a non-zero sum is a brightness detector whose batch-norm threshold falls between
    air and fat: a dark-polarity channel is then zero everywhere inside the body, the -40 HU
    ``dark_elongated`` lesion included, and the bright-polarity channels lose the 7-9 mm wide
    lesion in the 3^3 max pooling that follows (a 12 mm window). Zero-sum kernels respond to local
    contrast only, so dark blobs in soft tissue survive the stem. Training with this constraint
    (applied at initialisation and after every optimiser step) uses no mask: it only restricts
    the first layer's weights, and the result is an ordinary state_dict of the same network.
    """
    weight = cast(torch.nn.Conv3d, cast(torch.nn.Module, model.features).conv0).weight
    weight -= weight.mean(dim=tuple(range(1, weight.ndim)), keepdim=True)


def _set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def train(
    *,
    train_cases: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    localization_weight: float = 0.0,
    target_placement: str = "align_corners",
    zero_mean: bool = False,
    log_every: int = 25,
) -> tuple[torch.nn.Module, dict]:
    """Train the demo network; returns the model (eval mode) and a training summary.

    The loss is ``BCEWithLogits(logits, labels)`` plus ``localization_weight`` times
    :func:`localization_loss` (which uses the training masks) when it is positive; its per-cell
    targets are the lesion fractions of 4^3 blocks placed by ``target_placement`` (see
    :func:`cell_fractions`). With
    ``zero_mean``, the stem's kernels are kept zero-sum (:func:`zero_mean_stem`).
    """
    _set_determinism(seed, torch.get_num_threads())
    start = time.perf_counter()
    model = build_model()
    if zero_mean:
        zero_mean_stem(model)
    # Where each cell's localization target sits: its 4^3 block of the align_corners convention
    # (cell centres 4u + 1.5; the shipped weights), or a block centred on the cell's receptive field.
    centred = target_placement == "receptive_field"
    with torch.no_grad():  # in train mode: also one update of the batch-norm running statistics, which
        # the shipped weights had (kept so that they reproduce bit for bit)
        stride = synthetic.MODEL_SHAPE[0] // cast(torch.nn.Module, model.features)(torch.zeros(1, 1, *synthetic.MODEL_SHAPE)).shape[-1]
    offset: tuple[float, ...] = ((stride - 1) / 2,) * 3  # the convention
    if centred:
        offset = tuple(float(o) for o in receptive_field(model, "class_layers.relu", (1, *synthetic.MODEL_SHAPE)).offset)
    # The training pool, generated once; images kept as uint8 (steps of 2 HU; the noise is ~10 HU).
    print(f"generating {train_cases} training cases on the model grid ...", flush=True)
    pool = torch.empty((train_cases, 1, *synthetic.MODEL_SHAPE), dtype=torch.uint8)
    cells = tuple(n // stride for n in synthetic.MODEL_SHAPE)
    fractions = torch.empty((train_cases, 2, *cells), dtype=torch.float16)
    # Receptive-field centres are not symmetric under a flip (cell 0 at voxel 0, the last cell 3
    # voxels from the far edge): their targets are computed per batch, after its flips.
    label_pool = torch.empty((train_cases if centred else 0, *synthetic.MODEL_SHAPE), dtype=torch.uint8)
    targets = torch.empty((train_cases, 2))
    for begin in range(0, train_cases, 64):
        seeds = range(TRAIN_SEED0 + begin, TRAIN_SEED0 + min(begin + 64, train_cases))
        x, y, f, labels = generate_batch(seeds, cell=stride, labels=True)
        pool[begin : begin + len(x)] = (x * 255.0).round().to(torch.uint8)
        targets[begin : begin + len(x)] = y
        fractions[begin : begin + len(x)] = f.half()
        if centred:
            label_pool[begin : begin + len(x)] = labels
    generation_s = time.perf_counter() - start
    print(f"  {generation_s:.0f} s; class frequencies {targets.mean(0).tolist()}", flush=True)

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = train_cases // batch_size
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    bce = torch.nn.BCEWithLogitsLoss()
    model.train()
    step = 0
    running: list[tuple[float, float]] = []
    for epoch in range(epochs):
        order = torch.randperm(train_cases, generator=generator)
        for b in range(steps_per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size]
            x = pool[index].float() / 255.0
            f = fractions[index].float()
            # Random flips (labels do not depend on them), one draw per axis per batch.
            flips = [axis + 2 for axis in range(3) if torch.rand(1, generator=generator).item() < 0.5]
            if flips:
                x, f = torch.flip(x, flips), torch.flip(f, flips)
            if centred:
                labels = label_pool[index]
                labels = torch.flip(labels, [axis - 1 for axis in flips]) if flips else labels
                f = cell_fractions(labels, 2, stride, offset)
            optimizer.zero_grad(set_to_none=True)
            logits, cell_logits = class_evidence(model, x)
            classification = bce(logits, targets[index])
            localization = localization_loss(cell_logits, f) if localization_weight > 0 else torch.zeros(())
            (classification + localization_weight * localization).backward()
            optimizer.step()
            if zero_mean:
                zero_mean_stem(model)
            scheduler.step()
            step += 1
            running.append((classification.item(), localization.item()))
            if step % log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - start
                mean = np.mean(running, axis=0)
                print(
                    f"epoch {epoch + 1}/{epochs} step {step}/{total_steps} bce {mean[0]:.4f} "
                    f"localization {mean[1]:.3f} ({elapsed:.0f} s)",
                    flush=True,
                )
                running = []
    model.eval()
    summary = {
        "train_cases": train_cases,
        "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + train_cases - 1],
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
        "lr": lr,
        "localization_weight": localization_weight,
        "target_placement": target_placement,
        "zero_mean_stem": zero_mean,
        "seed": seed,
        "generation_s": round(generation_s, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return model, summary


def write_samples(out: Path, model: torch.nn.Module | None = None) -> list[dict]:
    """Write the shipped cases (int16 HU), masks (uint8) and ``cases.csv`` into ``out``.

    With a model, each row also gets its predicted probabilities and whether each present
    lesion's HiResCAM peak lies in its mask.
    """
    from medcam3d import io

    grids = synthetic.sample_grids()
    explainer = None
    if model is not None:
        import medcam3d

        explainer = medcam3d.Explainer(model.eval(), method="hirescam", layer="auto", class_names=list(synthetic.CLASS_NAMES),
                                       placement=PLACEMENT)
    rows = []
    for case_id, grid_name, seed, present in SAMPLE_CASES:
        space = grids[grid_name]
        phantom = synthetic.make_phantom(seed, present)
        image, labels = phantom.sample(space)
        hu = np.clip(np.round(image), -32768, 32767).astype(np.int16)
        image_file, mask_file = f"{case_id}.nii.gz", f"{case_id}_mask.nii.gz"
        io.write(out / image_file, hu, space, dtype=np.int16, descrip=f"medcam3d demo phantom seed={seed}")
        io.write(out / mask_file, labels, space, dtype=np.uint8, descrip="labels 0 bg 1 bright_round 2 dark_elongated")
        centres = {lesion.name: lesion.centre for lesion in phantom.lesions}
        row = {
            "case_id": case_id,
            "file": image_file,
            "mask": mask_file,
            "labels": ";".join(lesion.name for lesion in phantom.lesions),
            "bright_round": int(present[0]),
            "dark_elongated": int(present[1]),
            "bright_round_centre_mm": " ".join(f"{v:.2f}" for v in centres["bright_round"]) if present[0] else "",
            "dark_elongated_centre_mm": " ".join(f"{v:.2f}" for v in centres["dark_elongated"]) if present[1] else "",
            "grid": grid_name,
            "orientation": "".join(space.orientation),
            "spacing_mm": " ".join(f"{v:g}" for v in np.round(space.spacing, 4)),
            "shape": " ".join(str(n) for n in space.shape),
            "seed": seed,
        }
        if explainer is not None:
            from medcam3d.preprocess import preprocess

            # Read the written file back: exactly what a user of the sample gets.
            x, scanner_space = preprocess(out / image_file, synthetic.PREPROCESSING)
            result = explainer(x[None], target="all")
            probabilities = torch.sigmoid(result.logits[0]).tolist()
            heatmaps = result.to_scanner_space(scanner_space)
            for c, name in enumerate(synthetic.CLASS_NAMES):
                row[f"p_{name}"] = f"{probabilities[c]:.3f}"
                found = heatmaps[c].peak()  # None for a flat map: no peak, not in the lesion
                row[f"peak_in_{name}"] = int(found is not None and labels[found[0]] == c + 1) if present[c] else ""
        rows.append(row)
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_hard_cases(out: str | Path, count: int, *, seed0: int = synthetic.HARD_SEED0) -> list[dict]:
    """Write ``count`` harder held-out cases (seeds ``seed0 ...``) into ``out``.

    Parameters
    ----------
    out : path
        Created if needed; files named ``case_<seed>`` are replaced.
    count : int
    seed0 : int
        First seed (default :data:`synthetic.HARD_SEED0`).

    Returns
    -------
    list of dict
        The rows of ``cases.csv``.
    """
    from medcam3d import io

    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grids = synthetic.sample_grids()
    names = list(grids)
    rows = []
    for i in range(count):
        seed = seed0 + i
        grid_name = names[i % len(names)]
        space = grids[grid_name]
        image, labels, info = synthetic.make_hard_case(seed, space)
        case_id = f"case_{seed}"
        hu = np.clip(np.round(image), -32768, 32767).astype(np.int16)
        io.write(out / f"{case_id}.nii.gz", hu, space, dtype=np.int16, descrip=f"medcam3d hard phantom seed={seed}")
        io.write(out / f"{case_id}_mask.nii.gz", labels, space, dtype=np.uint8,
                 descrip="labels 0 bg 1 bright_round 2 dark_elongated")
        rows.append({
            "case_id": case_id,
            "file": f"{case_id}.nii.gz",
            "mask": f"{case_id}_mask.nii.gz",
            "labels": ";".join(info["labels_present"]),
            "grid": grid_name,
            "seed": seed,
            "lesions": ";".join(f"{entry['class']}@{entry['placement']}" for entry in info["lesions"]),
        })
    with open(out / "cases.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcam3d.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data_samples"), help="output folder (default: data_samples)")
    parser.add_argument("--train-cases", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--localization-weight", type=float, default=0.5, help="weight of the mask-based localization term (0: labels only)")
    parser.add_argument("--target-placement", choices=("align_corners", "receptive_field"), default="align_corners",
                        help="where each feature cell's localization target block sits: the align_corners convention "
                             "(the shipped weights) or centred on the cell's receptive field")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (initialisation, batch order, flips)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-cases", type=int, default=200, help="held-out cases for accuracy")
    parser.add_argument("--peak-cases", type=int, default=100, help="held-out scanner-grid cases for peak-in-lesion")
    parser.add_argument("--evaluate-only", action="store_true", help="load <out>/demo_model.pt instead of training")
    parser.add_argument("--no-samples", action="store_true", help="do not write the sample cases")
    parser.add_argument("--hard-cases", type=int, default=0, metavar="N",
                        help="only write N cases of the harder held-out set (scans, masks, cases.csv) into --out")
    parser.add_argument("--weakly-supervised", action="store_true",
                        help="image labels only (localization weight 0): writes demo_model_weak.pt and metrics_weak.json, "
                             "no sample cases; implies --zero-mean-stem")
    parser.add_argument("--zero-mean-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the first convolution's kernels zero-sum during training "
                             "(default: on with --weakly-supervised, off otherwise)")
    args = parser.parse_args(argv)
    suffix = ""
    if args.weakly_supervised:
        if args.localization_weight not in (0.0, parser.get_default("localization_weight")):
            parser.error("--weakly-supervised trains without the localization term; drop --localization-weight.")
        args.localization_weight, args.no_samples, suffix = 0.0, True, "_weak"
    if args.zero_mean_stem is None:
        args.zero_mean_stem = args.weakly_supervised

    torch.set_num_threads(args.threads)
    if args.hard_cases:
        rows = write_hard_cases(args.out, args.hard_cases)
        print(f"wrote {len(rows)} harder held-out cases and cases.csv into {args.out}", flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"demo_model{suffix}.pt"
    metrics_file = args.out / f"metrics{suffix}.json"
    if args.evaluate_only:
        model = build_model()
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        summary = json.loads(metrics_file.read_text())["training"] if metrics_file.exists() else {}
    else:
        model, summary = train(train_cases=args.train_cases, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, localization_weight=args.localization_weight, target_placement=args.target_placement, zero_mean=args.zero_mean_stem)
        torch.save(model.state_dict(), weights)
        print(f"trained in {summary['wall_time_s']:.0f} s; weights -> {weights} ({weights.stat().st_size / 1024:.0f} KiB)", flush=True)

    start = time.perf_counter()
    seeds = list(range(ACCURACY_SEED0, ACCURACY_SEED0 + args.accuracy_cases))
    accuracy = evaluate_accuracy(model, seeds)
    print(f"held-out accuracy ({accuracy['n']} cases): {accuracy['per_class']}, exact match {accuracy['exact_match']:.3f}", flush=True)
    seeds = list(range(PEAK_SEED0, PEAK_SEED0 + args.peak_cases))
    peaks = peak_in_lesion(model, seeds)
    print(
        f"HiResCAM peak in lesion ({peaks['n_lesions']} lesions, {peaks['n_cases']} scanner-grid cases): "
        f"{peaks['rate']:.3f}; per class {peaks['per_class']}; per grid {peaks['per_grid']}; "
        f"median peak-centre distance {peaks['median_distance_mm']:.1f} mm ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    metrics = {
        "training": summary,
        "accuracy": {**accuracy, "seeds": [ACCURACY_SEED0, ACCURACY_SEED0 + args.accuracy_cases - 1]},
        "peak_in_lesion": {**peaks, "seeds": [PEAK_SEED0, PEAK_SEED0 + args.peak_cases - 1]},
        "environment": {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version()},
    }
    if not args.no_samples:
        rows = write_samples(args.out, model)
        metrics["samples"] = rows
        for row in rows:
            print({key: row[key] for key in row if key.startswith(("case_id", "labels", "p_", "peak_in"))}, flush=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
