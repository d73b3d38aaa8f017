"""Writers: heatmaps (float32) and masks (uint8) as NIfTI with the scanner's own affine.

The grid comes from ``layer.metadata["affine"]`` (and ``"axes"``, see :mod:`._reader`), so a map
or mask computed on a scan is saved on that scan's voxel grid, in its voxel order, with its
affine; the source NIfTI's sform/qform codes are copied when ``metadata["path"]`` is one. A layer
without that metadata (made by another plugin) is saved with its napari placement instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ._reader import file_grid

__all__ = ["write_heatmap", "write_mask"]

logger = logging.getLogger(__name__)


def write_heatmap(path: str, data: Any, attributes: dict) -> list[str]:
    """Save an image layer (a heatmap or a scan) as float32.

    Parameters
    ----------
    path : str
        ``.nii.gz`` or ``.nii`` (``.nrrd``, ``.mha`` also work).
    data : array_like
        The layer's data.
    attributes : dict
        The layer's state (napari passes it), with ``metadata``.

    Returns
    -------
    list of str
        The written path.
    """
    return [str(_write(path, data, attributes, np.float32))]


def write_mask(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a labels layer (a mask) as uint8 (uint16 when labels exceed 255).

    Parameters
    ----------
    path : str
    data : array_like
        The layer's integer labels.
    attributes : dict

    Returns
    -------
    list of str
    """
    data = np.asarray(data)
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"Labels must lie in 0..65535 to be saved as a mask, not {data.min()}..{data.max()}.")
    dtype = np.uint8 if not data.size or data.max() <= 255 else np.uint16
    return [str(_write(path, data, attributes, dtype))]


def _write(path: str, data: Any, attributes: dict, dtype: Any) -> Path:
    metadata = attributes.get("metadata") or {}
    data = np.asarray(data)
    affine = metadata.get("affine")
    if affine is None:
        logger.warning("Layer %r has no metadata['affine']; saving it with its napari placement.",
                       attributes.get("name"))
        affine = _napari_placement(attributes, data.ndim)
        axes = None
    else:
        axes = metadata.get("axes")
    array, space = file_grid(data, affine, axes)
    source = metadata.get("path")
    like = source if source and str(source).lower().endswith((".nii", ".nii.gz")) and Path(source).is_file() else None
    return io.write(path, array, space, like=like, dtype=dtype, descrip=metadata.get("descrip"))


def _napari_placement(attributes: dict, ndim: int) -> np.ndarray:
    """A 4x4 data -> world affine from a layer's napari transforms (scale, ..., affine)."""
    from napari.utils.transforms import Affine

    if ndim not in (2, 3):
        raise ValueError(f"Only 2D or 3D layers can be saved as an image, not {ndim}D.")
    placement = Affine(
        scale=attributes.get("scale", np.ones(ndim)),
        translate=attributes.get("translate", np.zeros(ndim)),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        ndim=ndim,
    )
    world = np.asarray(attributes.get("affine", np.eye(ndim + 1)), dtype=np.float64)
    matrix = world @ placement.affine_matrix
    if ndim == 3:
        return matrix
    affine = np.eye(4)  # 2D: embed (i, j) -> (x, y)
    affine[:2, :2] = matrix[:2, :2]
    affine[:2, 3] = matrix[:2, 2]
    return affine
