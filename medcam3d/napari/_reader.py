"""Reader: medical images as napari image layers placed in scanner space (RAS mm).

A layer's world coordinates are RAS+ millimetres: napari's ``affine=`` is the file's voxel -> RAS
affine. napari slices in 2D only along data axes that match world axes, so a file that stores its
axes in another order than R-A-S (e.g. coronal slices, ``LIP``) is shown with its voxel axes
reordered, never resampled: ``layer.data = file_array.transpose(axes)`` and the affine's columns
follow (:func:`layer_grid`). Flips and small obliquities are kept as they are.
``layer.metadata`` holds ``"affine"`` (4x4 float64 voxel -> RAS mm of ``layer.data``), ``"axes"``
and ``"path"``; :func:`file_grid` undoes the reordering for writing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..space import Space

__all__ = ["napari_get_reader", "read_image", "image_layer_data", "layer_grid", "file_grid", "napari_affine"]

# World axis (0 = R/L, 1 = A/P, 2 = S/I) of each axis code.
_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[tuple]] | None:
    """The reader for ``path`` when medcam3d can read it, else None.

    Parameters
    ----------
    path : str or list of str
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, or a folder holding a DICOM
        series. A list is accepted when every entry is.

    Returns
    -------
    callable or None
        :func:`read_image`.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_image


def _readable(path: Path) -> bool:
    if path.is_dir():
        return _holds_dicom(path)
    return path.name.lower().endswith(io.READ_FORMATS)


def _holds_dicom(folder: Path, probe: int = 16) -> bool:
    """A folder with ``.dcm``-like files, or files with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    except OSError:
        return False
    if any(p.name.lower().endswith(_DICOM_SUFFIXES) for p in files):
        return True
    for p in files[:probe]:
        try:
            with open(p, "rb") as stream:
                stream.seek(128)
                if stream.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def read_image(path: str | Sequence[str]) -> list[tuple]:
    """Read one or more images as napari layer data tuples.

    A 4D file (e.g. one heatmap per class) gives one layer per volume.

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of (data, kwargs, "image")
        ``data`` in (i, j, k) order (reordered only for non-RAS axis orders, see the module doc),
        ``kwargs["affine"]`` the voxel -> RAS placement, ``kwargs["metadata"]`` with ``affine``,
        ``axes`` and ``path``.

    Raises
    ------
    medcam3d.io.ImageReadError, FileNotFoundError
        With a message that names the file and what was wrong (napari shows it).
    """
    from ..pipeline import case_id_of

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in map(Path, paths):
        name = case_id_of(p)
        try:
            array, space = io.read(p)
        except io.VolumeError:  # 4D: one layer per volume
            for volume in range(10_000):
                try:
                    array, space = io.read(p, volume=volume)
                except io.VolumeIndexError:
                    break
                layers.append(image_layer_data(array, space, name=f"{name} [{volume}]", path=p, volume=volume))
            continue
        layers.append(image_layer_data(array, space, name=name, path=p))
    return layers


def layer_grid(array: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """A file's array and grid as napari shows them: voxel axes in R-A-S order.

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
        world = [_WORLD_AXIS[c] for c in space.orientation]
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


#: CT soft-tissue window (level 40 HU, width 400 HU), used for scans that look like CT.
CT_WINDOW = (-160.0, 240.0)


def _display_range(data: np.ndarray) -> tuple[float, float] | None:
    """Initial contrast limits: a soft-tissue window for CT in HU, else the 0.5-99.5 percentiles.

    A scan counts as CT when it holds air (below -500) and tissue (above 0); the percentiles are
    taken on a strided sample of at most ~1M voxels.
    """
    step = max(1, round((data.size / 1e6) ** (1 / max(data.ndim, 1))))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float64)
    if sample.size == 0:
        return None
    low, high = np.percentile(sample, [0.5, 99.5])
    if low < -500 and high > 0:
        return CT_WINDOW
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    return (float(low), float(high)) if high > low else None


def image_layer_data(array: np.ndarray, space: Space, *, name: str, path: str | Path | None = None,
                     volume: int | None = None, **kwargs: Any) -> tuple:
    """A scan as a napari image layer data tuple, placed in RAS mm.

    Parameters
    ----------
    array : (*space.shape) ndarray
        In the file's (i, j, k) order.
    space : Space
    name : str
    path : path, optional
        Source file, kept in ``metadata["path"]``.
    volume : int, optional
        Volume index of a 4D file, kept in ``metadata["volume"]``.
    **kwargs
        More napari ``add_image`` arguments.

    Returns
    -------
    (data, kwargs, "image")
    """
    data, affine, axes = layer_grid(np.asarray(array), space)
    metadata = {"affine": affine, "axes": axes, "path": None if path is None else str(path)}
    if volume is not None:
        metadata["volume"] = int(volume)
    options: dict[str, Any] = {"name": name, "affine": napari_affine(affine, data.ndim), "metadata": metadata,
                               "colormap": "gray"}
    limits = _display_range(data)
    if limits is not None:
        options["contrast_limits"] = limits
    options.update(kwargs)
    return data, options, "image"
