"""Weakly-supervised localization and segmentation: masks, boxes and peaks from a heatmap.

Everything works on one map on one grid (usually the scan's, after
:func:`medcam3d.heatmap.to_scanner_space`), in 3D (2D as a special case), and reports positions
both as voxel indices and in world millimetres (RAS).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._files import atomic_write_text
from .space import Space

__all__ = ["threshold_mask", "largest_component", "BoundingBox", "bounding_box", "peak", "otsu_threshold", "save_box"]

_METHODS = ("fraction", "percentile", "otsu")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: maximizes the between-class variance of a 256-bin histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def threshold_mask(
    heat: np.ndarray,
    method: str = "fraction",
    value: float = 0.5,
    *,
    keep_largest: bool = False,
) -> np.ndarray:
    """Binary mask from a heatmap.

    Parameters
    ----------
    heat : (*shape) ndarray
        One map (raw or normalized).
    method : {"fraction", "percentile", "otsu"}
        ``fraction``: voxels ≥ ``value`` × max (value in (0, 1]); ``percentile``: voxels ≥ the
        ``value``-th percentile (0–100); ``otsu``: Otsu's threshold (``value`` unused).
    value : float
    keep_largest : bool
        Keep only the largest connected component (26-connectivity in 3D).

    Returns
    -------
    (*shape) bool ndarray
        All False for a map whose maximum is ≤ 0 (nothing to localize).
    """
    heat = np.asarray(heat, dtype=np.float32)
    if not np.all(np.isfinite(heat)):
        raise ValueError("The heatmap contains NaN/Inf values; cannot threshold it.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, not {method!r}.")
    top = float(heat.max()) if heat.size else 0.0
    if top <= 0:
        return np.zeros(heat.shape, dtype=bool)
    if method == "fraction":
        if not 0 < value <= 1:
            raise ValueError(f"A fraction threshold must be in (0, 1], not {value}.")
        mask = heat >= value * top
    elif method == "percentile":
        if not 0 <= value <= 100:
            raise ValueError(f"A percentile threshold must be in [0, 100], not {value}.")
        mask = heat >= np.percentile(heat, value)
        mask &= heat > 0
    else:
        mask = heat > otsu_threshold(heat)
    return largest_component(mask) if keep_largest else mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity) of a binary mask."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


@dataclass(frozen=True)
class BoundingBox:
    """An axis-aligned box on the voxel grid, and where it lies in the world.

    Attributes
    ----------
    voxel_min, voxel_max : tuple of int
        Inclusive voxel index bounds (i, j, k).
    world_min, world_max : tuple of float
        RAS mm extent of the box's outer voxel edges (an oblique grid's box is the
        axis-aligned world extent of its eight corners).
    world_corners : list of list of float
        The eight outer corners in RAS mm.
    centre_mm : tuple of float
    size_mm : tuple of float
        Edge lengths along the voxel axes, in mm.
    voxels : int
        Number of mask voxels inside.
    """

    voxel_min: tuple[int, ...]
    voxel_max: tuple[int, ...]
    world_min: tuple[float, ...]
    world_max: tuple[float, ...]
    world_corners: list[list[float]]
    centre_mm: tuple[float, ...]
    size_mm: tuple[float, ...]
    voxels: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def bounding_box(mask: np.ndarray, space: Space) -> BoundingBox | None:
    """Bounding box of a binary mask in voxel indices and world mm; None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if tuple(mask.shape) != tuple(space.shape):
        raise ValueError(f"The mask has shape {mask.shape} but the space has shape {space.shape}.")
    where = np.argwhere(mask)
    if where.size == 0:
        return None
    low, high = where.min(0), where.max(0)
    edges = [(lo - 0.5, hi + 0.5) for lo, hi in zip(low, high)]
    corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(len(edges), -1).T
    world = space.voxel_to_world(corners)
    centre = space.voxel_to_world((low + high) / 2.0)
    size = (high - low + 1) * np.asarray(space.spacing)
    return BoundingBox(
        voxel_min=tuple(int(v) for v in low),
        voxel_max=tuple(int(v) for v in high),
        world_min=tuple(float(v) for v in world.min(0)),
        world_max=tuple(float(v) for v in world.max(0)),
        world_corners=world.tolist(),
        centre_mm=tuple(float(v) for v in centre),
        size_mm=tuple(float(v) for v in size),
        voxels=int(mask.sum()),
    )


def peak(heat: np.ndarray, space: Space) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Voxel index of the heatmap's maximum and its world position (RAS mm)."""
    heat = np.asarray(heat)
    voxel = np.unravel_index(int(np.argmax(heat)), heat.shape)
    world = space.voxel_to_world(np.asarray(voxel, dtype=float))
    return tuple(int(v) for v in voxel), tuple(float(v) for v in world)


def save_box(path: str | Path, box: BoundingBox | None, **extra: object) -> Path:
    """Write a box (and any extra fields, e.g. the peak) as JSON, atomically."""
    payload = {"box": None if box is None else box.to_dict(), **extra}
    return atomic_write_text(path, json.dumps(payload, indent=2))
