"""The segmenter's training data: scans on the model's input grid with their image labels (:class:`TrainingSet`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..space import Space

__all__ = ["TrainingSet", "cohort_training_set", "demo_training_set"]


@dataclass
class TrainingSet:
    """Scans on the model's input grid with their image labels, and (once seeded) their seeds.

    Attributes
    ----------
    images : (N, C_in, *S) Tensor
        Model inputs (float32, or uint8 holding ``round(255 x)`` for inputs in [0, 1]).
    labels : (N, C) float32 Tensor
        1 present, 0 absent.
    space : Space
        The model's input grid.
    class_names : list of str
    masks : (N, *S) uint8 Tensor or None
        Ground truth (0 background, ``c + 1`` class ``c``): only for the fully supervised
        reference of the benchmark; never used by weakly-supervised training.
    seeds : (N, *S) uint8 Tensor or None
        Filled by :func:`train_segmenter` (0, ``c + 1`` or :data:`IGNORE`).
    seed_record : dict or None
        What :func:`compute_seeds` returned when it filled ``seeds`` (levels, statistics, the
        map extent that calibrates the size prior).
    """

    images: torch.Tensor
    labels: torch.Tensor
    space: Space
    class_names: list[str]
    masks: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    seed_record: dict | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 model inputs of the scans ``index``."""
        images = self.images[index]
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def demo_training_set(count: int, *, seed0: int = 0, with_masks: bool = False) -> TrainingSet:
    """Scans of the demo generator on the model grid (:func:`medcam3d.demo.train.generate_batch`),
    seeds ``seed0 ..``, with their image labels (and, for the supervised reference, masks)."""
    from ..demo import synthetic

    if count < 1:
        raise UsageError(f"the number of training cases must be >= 1, not {count}.")
    grid = synthetic.model_grid()
    images = torch.empty((count, 1, *grid.shape), dtype=torch.uint8)
    labels = torch.empty((count, len(synthetic.CLASS_NAMES)), dtype=torch.float32)
    masks = torch.empty((count, *grid.shape), dtype=torch.uint8) if with_masks else None
    for i in range(count):
        phantom = synthetic.make_phantom(seed0 + i)
        image, truth = phantom.sample(grid)
        images[i, 0] = torch.from_numpy(np.round(synthetic.scale_intensity(image) * 255.0).astype(np.uint8))
        labels[i] = torch.tensor(phantom.present, dtype=torch.float32)
        if masks is not None:
            masks[i] = torch.from_numpy(truth)
    return TrainingSet(images, labels, grid, list(synthetic.CLASS_NAMES), masks)


def _class_index(label: str, class_names: Sequence[str], where: str) -> int:
    text = label.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(class_names):
            return index
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise InputError(f"{where}: the label {text!r} is not a class of the classifier; expected one of {list(class_names)} "
                     "(or an index), separated by ';'.")


def cohort_training_set(cases: Sequence[Any], config: Any, *, trust: bool = False) -> TrainingSet:
    """Scans of a cohort (:func:`medcam3d.jobs.cases.collect_cases`) preprocessed with the
    classifier's config, with their image labels (the CSV's ``labels`` column).

    Raises
    ------
    InputError
        A case without image labels (no ``labels`` column), a label that is not a class, scans
        that preprocess to different grids, or a config without class names.
    """
    from ..preprocess import preprocess

    names = list(config.class_names or [])
    if not names:
        raise InputError("the classifier's config has no class_names; weak-train needs them to read the image labels.")
    images, labels = [], []
    space: Space | None = None
    for case in cases:
        if case.labels is None:
            raise InputError(f"{case.source or case.id}: no image labels; give a CSV with a 'labels' column (class "
                             "names present in each scan, separated by ';'; an empty cell: none).")
        row = np.zeros(len(names), dtype=np.float32)
        for label in case.labels:
            row[_class_index(label, names, case.source or case.id)] = 1.0
        x, _ = preprocess(case.image, config.preprocessing, trust=trust, source=config.source)
        grid = Space.of(x)
        if space is None:
            space = grid
        elif not grid.isclose(space, atol=1e-3):
            raise InputError(f"{case.source or case.id}: preprocesses to the grid {grid}, the first scan to {space}; "
                             "the classifier's preprocessing must give every scan one grid (e.g. end with "
                             "ResizeWithPadOrCrop and resample to one spacing).")
        images.append(torch.as_tensor(np.asarray(x), dtype=torch.float32))
        labels.append(torch.from_numpy(row))
    if not images or space is None:
        raise InputError("no training scans were given.")
    return TrainingSet(torch.stack(images), torch.stack(labels), space, names)
