"""Grids as napari draws them: axis order, axis-aligned display grids for oblique scans, labels.

napari places a layer with an affine, but when it draws a 2D slice it keeps only the part of the
affine that maps the two displayed data axes onto the two displayed world axes: a rotation out of
the displayed plane is dropped, so a tilted scan is drawn in the wrong place (about
``extent x sin(tilt)``, 10-35 mm on real oblique scans). A grid whose voxel axes point along the
world axes is drawn exactly. Hence:

- :func:`layer_grid` reorders a file's voxel axes into R-A-S order (a view, no resampling), which
  is enough for scans stored as coronal or sagittal slices, flipped or not;
- :func:`drawing_error_mm` says how far napari would draw a grid from its true place;
- :func:`axis_aligned_grid` is the display grid of an oblique scan: world-aligned axes, the scan's
  own voxel size along each axis, covering the scan's whole extent;
- :func:`resample_labels` moves a label map onto another grid by nearest neighbour (images and
  heatmaps use :func:`medcam3d.space.resample`, trilinear);
- :func:`drawable` places a small map (a heatmap on the model's feature grid, the model's field of
  view) so that napari draws it where it is, on its own grid whenever possible: napari draws it
  through the layer's affine, with no scan-sized copy;
- :func:`field_of_view` marks the voxels of a grid that another grid (the model's input) covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..space import Space, resample

__all__ = [
    "layer_grid",
    "file_grid",
    "napari_affine",
    "drawing_error_mm",
    "axis_aligned_grid",
    "tilt_degrees",
    "resample_labels",
    "needs_display_grid",
    "field_of_view",
    "drawable",
    "covers",
    "refined",
]

# World axis (0 = R/L, 1 = A/P, 2 = S/I) of each axis code.
WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}

#: A grid is drawn as is when napari would draw every voxel within this fraction of the
#: smallest voxel size of its true place; otherwise it is shown resampled.
DRAWING_TOLERANCE = 0.1


def layer_grid(array: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """A file's array and grid with the voxel axes in R-A-S order.

    Parameters
    ----------
    array : (*space.shape) ndarray
    space : Space

    Returns
    -------
    data : ndarray
        ``array.transpose(axes)`` (a view).
    affine : (4, 4) float64 ndarray
        Voxel -> RAS mm of ``data``: ``space.affine`` with its columns reordered the same way.
    axes : tuple of int
        The identity for R/L-A/P-S/I storage (flips and obliquity are kept).
    """
    axes = tuple(range(space.ndim))
    if space.ndim == 3:
        world = [WORLD_AXIS[c] for c in space.orientation]
        if sorted(world) == [0, 1, 2]:
            axes = tuple(world.index(n) for n in range(3))
    affine = np.array(space.affine, dtype=np.float64)
    if space.ndim == 3:
        affine = affine[:, [*axes, 3]]
    return np.transpose(array, axes), affine, axes


def file_grid(data: np.ndarray, affine: np.ndarray, axes: Sequence[int] | None = None) -> tuple[np.ndarray, Space]:
    """Undo :func:`layer_grid`: the array and grid in the file's own voxel order."""
    data = np.asarray(data)
    affine = np.array(affine, dtype=np.float64)
    if axes is not None and tuple(axes) != tuple(range(data.ndim)):
        inverse = [int(i) for i in np.argsort(axes)]
        data = np.transpose(data, inverse)
        affine = affine[:, [*inverse, 3]]
    return data, Space(data.shape, affine)


def napari_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``affine=`` of a napari layer with ``ndim`` axes from a 4x4 voxel -> RAS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if ndim == 3:
        return affine.copy()
    keep = [*range(ndim), 3]  # 2D: drop the unused third voxel axis and world z
    return affine[np.ix_(keep, keep)]


def _corners(shape: Sequence[int]) -> np.ndarray:
    """The 2**n corner voxel centres of a grid, (2**n, 3)."""
    ext = [max(int(n) - 1, 0) for n in shape] + [0] * (3 - len(shape))
    return np.array([[i, j, k] for i in (0, ext[0]) for j in (0, ext[1]) for k in (0, ext[2])], dtype=np.float64)


def drawing_error_mm(space: Space) -> float:
    """How far (mm) napari's 2D drawing puts a voxel of ``space`` from its true place, at most.

    napari draws with the affine's diagonal (one world axis per data axis) and translation; the
    off-diagonal part is what it loses. The error is that part's largest effect over the grid's
    corners (it is linear, so the corners bound it).
    """
    if space.ndim != 3:
        return 0.0
    linear = np.array(space.affine[:3, :3])
    lost = linear - np.diag(np.diag(linear))
    return float(np.max(np.linalg.norm(_corners(space.shape) @ lost.T, axis=1)))


def needs_display_grid(space: Space) -> bool:
    """True when napari would draw ``space`` (in R-A-S axis order) more than a tenth of a voxel off."""
    return drawing_error_mm(space) > DRAWING_TOLERANCE * min(space.spacing)


def tilt_degrees(space: Space) -> float:
    """The largest angle between a voxel axis and the world axis it runs along (degrees)."""
    linear = np.array(space.affine[:3, : space.ndim])
    cosines = np.abs(np.diag(linear[: space.ndim])) / np.linalg.norm(linear, axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def axis_aligned_grid(space: Space) -> Space:
    """The axis-aligned grid that shows an oblique ``space`` without loss.

    Parameters
    ----------
    space : Space
        A 3D grid whose voxel axes are in R-A-S order (see :func:`layer_grid`).

    Returns
    -------
    Space
        Voxel axes along +R, +A, +S; voxel size along each world axis that of the voxel axis
        running along it (the scan's own resolution); its cells cover the world bounding box of
        the scan's outer cell edges (no loss of extent), centred on it.
    """
    spacing = np.asarray(space.spacing, dtype=np.float64)
    edges = np.array([[i, j, k] for i in (-0.5, space.shape[0] - 0.5) for j in (-0.5, space.shape[1] - 0.5)
                      for k in (-0.5, space.shape[2] - 0.5)])
    world = space.voxel_to_world(edges)
    low, high = world.min(axis=0), world.max(axis=0)
    shape = [max(1, math.ceil((hi - lo) / step - 1e-6)) for lo, hi, step in zip(low, high, spacing)]
    centre = (low + high) / 2.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2.0
    return Space(tuple(shape), affine)


def resample_labels(labels: np.ndarray, source: Space, target: Space, *, slab_voxels: int = 2**21) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from ``source`` onto ``target``.

    Each target voxel takes the label of the source voxel whose cell holds its centre; target
    voxels outside the source grid get 0. Labels are never blended (no new values appear). This is
    :func:`medcam3d.space.resample` with ``mode="nearest"``.

    Parameters
    ----------
    labels : (*source.shape) integer ndarray
    source, target : Space
    slab_voxels : int
        Target voxels mapped per step on oblique grids (bounds the memory of the coordinates).

    Returns
    -------
    (*target.shape) ndarray
        Same dtype as ``labels``.
    """
    if source.ndim != 3 or target.ndim != 3:
        raise ValueError(f"resample_labels takes 3D grids, not {source.ndim}D -> {target.ndim}D.")
    return resample(np.asarray(labels), source, target, fill=0, chunk_voxels=slab_voxels, mode="nearest")


def field_of_view(source: Space, target: Space, *, slab_voxels: int = 2**22) -> np.ndarray:
    """Which voxels of ``target`` lie inside the grid ``source`` (e.g. the model's input grid).

    Computed with :func:`medcam3d.space.resample` of a constant, slab by slab, so that no
    target-sized float array is made.

    Parameters
    ----------
    source, target : Space
    slab_voxels : int
        Target voxels per step.

    Returns
    -------
    (*target.shape) bool ndarray
    """
    inside = np.empty(target.shape, dtype=bool)
    ones = np.ones(source.shape, dtype=np.float32)
    rows = max(1, slab_voxels // max(math.prod(target.shape[1:]), 1))
    for start in range(0, target.shape[0], rows):
        stop = min(start + rows, target.shape[0])
        shift = np.eye(4)
        shift[0, 3] = start  # the slab's first voxel is target voxel (start, 0, 0)
        slab = Space((stop - start, *target.shape[1:]), target.affine @ shift)
        inside[start:stop] = resample(ones, source, slab, fill=0.0) > 0.5
    return inside


def drawable(data: np.ndarray, space: Space, *, labels: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """A map on the grid napari draws it on: its own grid (axes in R-A-S order) when napari draws
    that exactly, else resampled onto :func:`axis_aligned_grid` of it (the same voxel size).

    Meant for maps much smaller than the scan (a heatmap on the model's feature grid, the model's
    input grid): the layer holds the map at its own resolution and napari draws it with the
    layer's affine (``interpolation2d="linear"`` smooths it on screen), instead of a scan-sized
    float32 copy.

    Parameters
    ----------
    data : (*space.shape) ndarray
    space : Space
        A 3D grid.
    labels : bool
        Resample by nearest neighbour (labels keep their values), else trilinearly (outside: 0).

    Returns
    -------
    data : ndarray
        ``data`` reordered (a view), or resampled (float32 or, for labels, ``data``'s dtype).
    affine : (4, 4) float64 ndarray
        Voxel -> RAS mm of the returned data.
    resampled : bool
        True when the map was resampled (an oblique grid).
    """
    shown, affine, _ = layer_grid(np.asarray(data), space)
    if not needs_display_grid(Space(shown.shape, affine)):
        return shown, affine, False
    display = axis_aligned_grid(Space(shown.shape, affine))
    if labels:
        return resample_labels(np.asarray(data), space, display), np.array(display.affine, dtype=np.float64), True
    values = resample(np.asarray(data, dtype=np.float32), space, display, fill=0.0)
    return values, np.array(display.affine, dtype=np.float64), True


def covers(source: Space, target: Space, *, tolerance: float = 1e-3) -> bool:
    """True when every voxel centre of ``target`` lies in ``source``'s field of view (both are boxes:
    checking ``target``'s corners is enough)."""
    inside = source.world_to_voxel(target.voxel_to_world(_corners(target.shape)))
    upper = np.asarray(source.shape, dtype=np.float64) - 0.5 + tolerance
    return bool(np.all(inside >= -0.5 - tolerance) and np.all(inside <= upper))


def refined(space: Space, cell_mm: float) -> tuple[Space, int]:
    """``space`` with each voxel split into ``f`` x ``f`` x ``f`` so that voxels are at most ``cell_mm``.

    The fine grid covers the same box (its outer cell edges are the coarse grid's); ``f`` is the
    smallest integer that brings the largest voxel size to ``cell_mm`` or below (1: ``space`` itself).

    Returns
    -------
    (Space, int)
        The fine grid and ``f``.
    """
    factor = max(1, math.ceil(max(space.spacing) / float(cell_mm) - 1e-9))
    if factor == 1:
        return space, 1
    local = np.diag([1.0 / factor] * space.ndim + [1.0])
    local[: space.ndim, space.ndim] = (1.0 / factor - 1.0) / 2.0  # fine voxel 0 at coarse coordinate -0.5 + 1/(2f)
    affine = np.asarray(space.affine, dtype=np.float64)
    full = np.eye(4)
    full[: space.ndim, : space.ndim] = local[: space.ndim, : space.ndim]
    full[: space.ndim, 3] = local[: space.ndim, space.ndim]
    return Space(tuple(int(n) * factor for n in space.shape), affine @ full), factor
