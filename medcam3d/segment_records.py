"""What :func:`medcam3d.segment.segment` takes and gives: its settings and its result records.

One concept: the records of test-time weakly-supervised segmentation, :class:`SegmentSettings`
(checked on creation), :class:`Region` (one crop of one class with its seeds), :class:`Lesion`
(one connected component) and :class:`Segmentation` (the label map on the scan's grid and the
lesions, written by :meth:`Segmentation.save`). How they are made: :mod:`medcam3d.segment`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_write_text
from .errors import UsageError
from .masks import BoundingBox
from .space import Space
from .settings import Settings, check_numbers, check_range, check_whole

__all__ = ["BACKGROUND", "COMPETING", "FOREGROUND", "METHODS", "UNLABELED", "Lesion", "Region", "SegmentSettings",
           "Segmentation"]

#: Expansion methods of :func:`medcam3d.segment.segment`, the default first.
METHODS: tuple[str, ...] = ("random_walker", "region_growing", "threshold")

# Seed codes of Region.seeds.
UNLABELED, FOREGROUND, BACKGROUND, COMPETING = 0, 1, 2, 3


@dataclass(frozen=True)
class SegmentSettings(Settings):
    """The settings of :func:`medcam3d.segment.segment` (fractions are of a class map's maximum).

    Attributes
    ----------
    method : {"random_walker", "region_growing", "threshold"}
        How seeds are expanded (see :mod:`medcam3d.segment`).
    candidate : float in (0, 1]
        Candidate regions: map >= ``candidate`` x max. ``"threshold"`` returns these regions.
    foreground : float in (0, 1]
        Foreground seeds: map >= ``foreground`` x the candidate's own peak.
    background : float in [0, 1)
        Background seeds: map < ``background`` x max. Must be below ``candidate``.
    margin_mm : float
        Added to each candidate's box on every side to form its crop.
    smooth_mm : float
        Standard deviation (mm) of a Gaussian applied to each map on its own grid first (0: none).
    beta : float
        Random walker: edge weights are ``exp(-beta * (difference / noise)^2)``, the noise being
        estimated in each crop (robust, from neighbour differences), so ``beta`` is unitless.
    seeding : {"contrast", "peak"}
        How foreground seeds are chosen inside the confident regions: ``"contrast"``, the voxels
        whose intensity sets the region apart from its surroundings (see ``contrast``);
        ``"peak"``, the voxels within ``seed_mm`` of each peak whose intensity is that of most of
        them (within 2 noise levels of their median).
    contrast : float
        ``seeding="contrast"``: foreground seeds are the confident voxels whose intensity is at least this many times
        likelier inside the confident region than in the background region (see
        :mod:`medcam3d.segment_crops`); 0 keeps every confident voxel.
    seed_mm : float
        ``seeding="peak"``: radius of the seed ball around each peak.
    multiplier : float
        Region growing: the accepted intensity range is mean ± ``multiplier`` x std of the seeds.
    iterations : int
        Region growing: re-estimations of the mean and std from the grown region.
    min_volume_mm3 : float
        Components smaller than this are dropped.
    fill_holes : bool
        Fill enclosed holes of each class's result.
    """

    method: str = "random_walker"
    candidate: float = 0.5
    foreground: float = 0.8
    background: float = 0.05
    margin_mm: float = 10.0
    smooth_mm: float = 8.0
    beta: float = 1.0
    seeding: str = "contrast"
    contrast: float = 4.0
    seed_mm: float = 3.0
    multiplier: float = 2.0
    iterations: int = 1
    min_volume_mm3: float = 20.0
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = [m for m in METHODS if m.split("_")[0] in str(self.method).lower()]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"method must be one of {METHODS}, not {self.method!r}.{hint}")
        for name in ("candidate", "foreground"):
            check_range(getattr(self, name), name, 0, 1, low_open=True, note=" (a fraction of the map's maximum)")
        check_range(self.background, "background", 0, self.candidate, high_open=True,
                    note=" (below candidate: background seeds are voxels below the candidate threshold)")
        check_numbers(self, ("margin_mm", "smooth_mm", "beta", "contrast", "seed_mm", "multiplier", "min_volume_mm3"))
        if self.method == "random_walker" and self.beta <= 0:
            raise UsageError("beta must be > 0 for the random walker (it weighs the image's edges).")
        if self.seeding not in ("contrast", "peak"):
            raise UsageError(f"seeding must be 'contrast' or 'peak', not {self.seeding!r}.")
        check_whole(self.iterations, "iterations", minimum=0)


@dataclass(frozen=True)
class Region:
    """One crop of the scan where one class was segmented, with its seeds (for pictures and checks).

    Attributes
    ----------
    class_index : int
    crop : tuple of slice
        The crop's voxel ranges on the scan grid, ``image[crop]``.
    seeds : (*crop shape) uint8 ndarray
        0 unlabeled, 1 foreground, 2 background, 3 competing (another class's confident voxels).
    class_map : (*crop shape) float32 ndarray
        The class's map on the crop (smoothed as the settings say).
    probability : (*crop shape) float32 ndarray or None
        Random walker: the probability of the foreground label; None for the other methods.
    mask : (*crop shape) bool ndarray
        The class's result on the crop before classes are merged.
    """

    class_index: int
    crop: tuple[slice, ...]
    seeds: np.ndarray
    class_map: np.ndarray
    probability: np.ndarray | None
    mask: np.ndarray

    def to_dict(self) -> dict:
        """Crop bounds (inclusive voxel indices) and seed and result counts, JSON-ready."""
        counts = np.bincount(self.seeds.ravel(), minlength=4)
        return {
            "class_index": self.class_index,
            "voxel_min": [s.start for s in self.crop],
            "voxel_max": [s.stop - 1 for s in self.crop],
            "seeds": {"foreground": int(counts[FOREGROUND]), "background": int(counts[BACKGROUND]),
                      "competing": int(counts[COMPETING])},
            "voxels": int(self.mask.sum()),
        }


@dataclass(frozen=True)
class Lesion:
    """One connected component of one class's label.

    Attributes
    ----------
    class_index : int
    class_name : str or None
    label : int
        Its value in :attr:`Segmentation.labels` (``class_index + 1``).
    box : BoundingBox
        On the scan grid: voxel bounds, world extent and corners (RAS mm), centre, size.
    volume_mm3 : float
    peak_value : float
        The class map's largest value inside the lesion.
    peak_mm : tuple of float
        Where it lies (RAS mm).
    """

    class_index: int
    class_name: str | None
    label: int
    box: BoundingBox
    volume_mm3: float
    peak_value: float
    peak_mm: tuple[float, ...]

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"class_index": self.class_index, "class_name": self.class_name, "label": self.label,
                "volume_mm3": self.volume_mm3, "peak_value": self.peak_value, "peak_mm": list(self.peak_mm),
                "box": self.box.to_dict()}


@dataclass(frozen=True)
class Segmentation:
    """The result of :func:`medcam3d.segment.segment`.

    Attributes
    ----------
    labels : (I, J, K) uint8 ndarray (uint16 beyond 255 classes)
        On the scan grid: 0 background, ``c + 1`` class ``c``.
    space : Space
        The scan's grid.
    lesions : tuple of Lesion
        Every component of every class, ordered by class, then by first voxel.
    class_names : tuple of (str or None)
        Per class index of the maps.
    settings : SegmentSettings
    regions : tuple of Region
        The crops that were segmented.
    """

    labels: np.ndarray
    space: Space
    lesions: tuple[Lesion, ...]
    class_names: tuple[str | None, ...]
    settings: SegmentSettings
    regions: tuple[Region, ...] = field(default_factory=tuple)

    def mask(self, class_index: int) -> np.ndarray:
        """Boolean ``(I, J, K)`` mask of one class."""
        return self.labels == class_index + 1

    def to_dict(self) -> dict:
        """Settings, grid, classes, lesions (with boxes in mm) and crops, JSON-ready (no arrays)."""
        return {
            "settings": self.settings.to_dict(),
            "space": {"shape": list(self.space.shape), "affine": np.asarray(self.space.affine).tolist()},
            "classes": [{"index": c, "name": name, "label": c + 1} for c, name in enumerate(self.class_names)],
            "lesions": [lesion.to_dict() for lesion in self.lesions],
            "regions": [region.to_dict() for region in self.regions],
        }

    def save(self, labels_path: str | Path, boxes_path: str | Path | None = None, *, like: Any = None) -> tuple[Path, Path | None]:
        """Write the label map (NIfTI, uint8/uint16) and optionally :meth:`to_dict` as JSON, atomically.

        Parameters
        ----------
        labels_path : path
            ``.nii.gz`` (or any format :func:`medcam3d.io.write` knows).
        boxes_path : path, optional
            JSON with the lesions and their boxes.
        like : optional
            A reference image whose header codes are copied (see :func:`medcam3d.io.write`).
        """
        from . import io

        names = ", ".join(f"{c + 1} {name or f'class{c}'}" for c, name in enumerate(self.class_names))
        descrip = f"medcam3d segment {self.settings.method}: 0 bg, {names}"[:80]
        io.write(labels_path, self.labels, self.space, dtype=self.labels.dtype, like=like, descrip=descrip)
        if boxes_path is not None:
            atomic_write_text(boxes_path, json.dumps(self.to_dict(), indent=2))
        return Path(labels_path), None if boxes_path is None else Path(boxes_path)

