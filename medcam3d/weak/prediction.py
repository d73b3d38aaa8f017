"""Segmenting a scan with a trained segmenter (:func:`segment_scan`): probabilities on the model's grid, labels and lesions on the scan's."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError
from ..settings import Settings, check_number, check_range, check_whole
from ..space import Resampler, Space

__all__ = ["SegmenterSettings", "label_voxels", "predict", "segment_scan"]

_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


@dataclass(frozen=True)
class SegmenterSettings(Settings):
    """What :func:`segment_scan` did (recorded in the lesions JSON).

    Attributes
    ----------
    method : str
        ``"learned"``.
    network : str
    min_volume_mm3 : float
        Components smaller than this are dropped.
    margin : int
        Input voxels added around the candidate region before resampling to the scan.
    threshold : float or None
        ``None`` (default): each voxel takes its most probable label, background included. A
        probability in (0, 1): a voxel takes its most probable foreground class where that class's
        probability is at least ``threshold``, otherwise background (below 0.5 this finds lesions
        the segmenter is unsure of, at the cost of larger and more false components).
    """

    method: str = "learned"
    network: str = ""
    min_volume_mm3: float = 20.0
    margin: int = 2
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_number(self.min_volume_mm3, "min_volume_mm3")
        check_whole(self.margin, "margin", minimum=0)
        if self.threshold is not None:
            check_range(self.threshold, "threshold", 0.0, 1.0, low_open=True, high_open=True,
                        note=" (a probability; leave it unset for the most probable label)")


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``(B, K, *S)`` of a segmenter (eval mode, no gradients)."""
    was = model.training
    model.eval()
    try:
        return torch.softmax(model(x).float(), dim=1)
    finally:
        model.train(was)


def label_voxels(probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Labels ``(*S)`` from probabilities ``(K, *S)`` (channel 0 background; excluded classes set below 0).

    Without ``threshold`` the most probable channel; with it, the most probable foreground channel
    where its probability is at least ``threshold`` and 0 elsewhere.
    """
    if threshold is None:
        return probabilities.argmax(0)
    foreground = probabilities[1:]
    best = foreground.argmax(0)
    confident = np.take_along_axis(foreground, best[None], 0)[0] >= threshold
    return np.where(confident, best + 1, 0)


def segment_scan(model: torch.nn.Module, x: torch.Tensor, scanner_space: Any, class_names: Sequence[str | None], *,
                 input_space: Any = None, settings: SegmenterSettings = SegmenterSettings(), classes: Iterable[int] | None = None):
    """Segment one preprocessed scan with a trained segmenter, on the scan's grid.

    The probabilities are computed on the model's input grid and resampled (trilinear, the
    preprocessing's affine inverted exactly) onto the scan's voxels only inside the box where a
    class may win (any class probability above 0.1, or above ``settings.threshold`` if lower, plus
    ``margin`` voxels); each voxel takes the most probable label there (or, with
    ``settings.threshold``, its most probable foreground class where that reaches the threshold),
    and each class's connected components (26-connectivity, at least
    ``min_volume_mm3``) are its lesions, with boxes in voxels and in RAS mm.

    Parameters
    ----------
    model : nn.Module
        Output ``(1, K, *S)`` logits, channel 0 background.
    x : (C_in, *S) Tensor or MetaTensor
        The preprocessed scan (its affine is the input grid's unless ``input_space`` is given).
    scanner_space : Space
        The scan's grid.
    class_names : sequence
        ``K - 1`` names of the foreground classes (the config's names without ``background``).
    classes : iterable of int, optional
        Foreground class indices to segment (default: all).

    Returns
    -------
    medcam3d.segment_records.Segmentation
        ``labels`` (0 background, ``c + 1`` class ``c``) on the scan's grid and the lesions;
        :meth:`~medcam3d.segment_records.Segmentation.save` writes the label map and the lesions JSON.
    """
    from ..masks import bounding_box
    from ..segment_records import Lesion, Segmentation

    scan = Space.of(scanner_space)
    grid = Space.of(input_space) if input_space is not None else Space.of(x)
    device = next(iter(model.parameters()), torch.zeros(())).device
    probabilities = predict(model, torch.as_tensor(x).float()[None].to(device))[0].cpu()
    if tuple(probabilities.shape[1:]) != grid.shape:
        raise InputError(f"the segmenter's output grid {tuple(probabilities.shape[1:])} is not its input grid {grid.shape}.")
    names = list(class_names)
    if probabilities.shape[0] != len(names) + 1:
        raise InputError(f"the segmenter has {probabilities.shape[0]} outputs but {len(names)} foreground class names; "
                         "its config needs class_names [background, <one per output class>].")
    wanted = set(range(len(names))) if classes is None else {int(c) for c in classes}
    labels = np.zeros(scan.shape, dtype=np.uint8 if len(names) < 255 else np.uint16)
    foreground = probabilities[1:].clone()
    for c in range(len(names)):
        if c not in wanted:
            foreground[c] = 0.0
    floor = 0.1 if settings.threshold is None else min(0.1, settings.threshold)
    candidate = (foreground >= floor).any(0).numpy()
    lesions: list = []
    if candidate.any():
        where = np.argwhere(candidate)
        low = np.maximum(where.min(0) - settings.margin, 0)
        high = np.minimum(where.max(0) + settings.margin, np.asarray(grid.shape) - 1)
        corners = np.array(np.meshgrid(*[(a, b) for a, b in zip(low, high)], indexing="ij")).reshape(3, -1).T
        world = grid.voxel_to_world(corners.astype(float))
        scan_voxels = scan.world_to_voxel(world)
        lo = np.clip(np.floor(scan_voxels.min(0)).astype(int) - 1, 0, np.asarray(scan.shape) - 1)
        hi = np.clip(np.ceil(scan_voxels.max(0)).astype(int) + 1, 0, np.asarray(scan.shape) - 1)
        indices = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
        resampler = Resampler(grid, scan)
        crop = np.asarray(resampler(probabilities.numpy(), indices=indices, fill=0.0), dtype=np.float32)
        crop[0] = np.where(crop.sum(0) > 0, crop[0], 1.0)  # outside the model's view: background
        for c in range(len(names)):
            if c not in wanted:
                crop[c + 1] = -1.0
        winner = label_voxels(crop, settings.threshold).astype(labels.dtype)
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
        labels[box] = winner
        voxel_mm3 = float(abs(np.linalg.det(scan.affine[:3, :3])))
        found = []
        for c in sorted(wanted):
            mine = winner == c + 1
            parts, count = ndimage.label(mine, structure=_FULL)
            for number, part_box in enumerate(ndimage.find_objects(parts), start=1):
                if part_box is None:
                    continue
                part = parts == number
                volume = float(part.sum()) * voxel_mm3
                if volume < settings.min_volume_mm3:
                    labels[box][part] = 0
                    continue
                full = np.zeros(scan.shape, dtype=bool)
                full[box] = part
                lesion_box = bounding_box(full, scan)
                assert lesion_box is not None
                scores = np.where(part, crop[c + 1], -np.inf)
                peak = np.unravel_index(int(np.argmax(scores)), scores.shape)
                peak_voxel = np.asarray(peak, dtype=float) + lo
                found.append(((c, lesion_box.voxel_min), Lesion(
                    c, names[c], c + 1, lesion_box, round(volume, 3), float(crop[c + 1][peak]),
                    tuple(float(v) for v in scan.voxel_to_world(peak_voxel)))))
        found.sort(key=lambda item: item[0])
        lesions = [lesion for _, lesion in found]
    return Segmentation(labels, scan, tuple(lesions), tuple(names), cast(Any, settings), ())
