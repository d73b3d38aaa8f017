"""Writers: scans, heatmaps (float32) and masks (uint8) as NIfTI on the scan's own grid and affine.

The grid comes from the layer's metadata (see :mod:`._reader`):

- a layer shown on its file's grid (reordered at most) is saved in the file's voxel order with
  its affine;
- a layer shown **resampled** (an oblique scan and what was drawn on its display grid) or on a
  grid of its own (a heatmap on the model's feature grid, a mask thresholded from it) is saved on
  the scan file's original grid: a scan whose shown voxels are unchanged is copied from its file (exact, in
  its stored type); a heatmap is resampled once from the model's feature grid (exact, as
  ``medcam3d explain`` writes it); a mask by nearest neighbour; anything edited since, trilinearly
  from what is shown.

A scan keeps its stored voxel type (an int16 CT stays int16); heatmaps are float32; masks uint8
(uint16 above 255 labels). The source NIfTI's sform/qform codes are copied when
``metadata["path"]`` is one; ``descrip`` is ASCII. A layer without medcam3d metadata (made by
another plugin) is saved with its napari placement, with a warning.

File names that are not ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` are handed to napari's own
writers, so that the medcam3d entry, first in napari's *Save* dialog (see
:func:`prefer_medcam3d_writers`), saves a ``.tif`` as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..space import Space, resample
from ._grid import file_grid, resample_labels
from ._lazy import source_of
from ._shared import ascii_text, checksum, file_stamp

__all__ = ["write_image", "write_heatmap", "write_mask", "prefer_medcam3d_writers", "EXTENSIONS"]

logger = logging.getLogger(__name__)

#: What the medcam3d writers write themselves; other names go to napari's writers.
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
PLUGIN = "medcam3d"


def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    """Save an image layer: a heatmap as float32, a scan in its stored voxel type.

    Parameters
    ----------
    path : str
        ``.nii.gz`` or ``.nii`` (``.nrrd``, ``.mha`` also work); another extension is written by
        napari's own image writer.
    data : array_like
        The layer's data.
    attributes : dict
        The layer's state (napari passes it), with ``metadata``.

    Returns
    -------
    list of str
        The written path.
    """
    if not _ours(path):
        return _napari_writer("image", path, data, attributes)
    metadata = attributes.get("metadata") or {}
    lazy = source_of(data)
    if lazy is not None:  # an oblique scan shown lazily: its own voxels on its own grid, exact
        array, space = lazy
        return [str(_save(path, array, space, metadata, np.dtype(metadata.get("dtype") or array.dtype)))]
    data = np.asarray(data)
    if metadata.get("medcam3d") == "heatmap" or data.dtype.kind not in "iuf":
        dtype = np.dtype(np.float32)
    else:
        dtype = np.dtype(metadata.get("dtype") or (np.float32 if data.dtype == np.float64 else data.dtype))
    return [str(_write(path, data, attributes, dtype, labels=False))]


#: The image writer (named for what the widget makes; it writes scans too).
write_heatmap = write_image


def write_mask(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a labels layer (a mask) as uint8 (uint16 when labels exceed 255).

    Parameters
    ----------
    path : str
        As for :func:`write_image`; other extensions go to napari's labels writer.
    data : array_like
        The layer's integer labels.
    attributes : dict

    Returns
    -------
    list of str
    """
    if not _ours(path):
        return _napari_writer("labels", path, data, attributes)
    data = np.asarray(data)
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"Labels must lie in 0..65535 to be saved as a mask, not {data.min()}..{data.max()}.")
    dtype = np.uint8 if not data.size or data.max() <= 255 else np.uint16
    return [str(_write(path, data, attributes, np.dtype(dtype), labels=True))]


def _ours(path: str) -> bool:
    return str(path).lower().endswith(EXTENSIONS)


def _napari_writer(kind: str, path: str, data: Any, attributes: dict) -> list[str]:
    """Hand a file type medcam3d does not write to napari's own writer for ``kind``."""
    from napari_builtins.io import napari_write_image, napari_write_labels

    writer = napari_write_image if kind == "image" else napari_write_labels
    written = writer(path, data, attributes)
    if not written:
        raise ValueError(f"Cannot save {Path(path).name}: neither medcam3d ({', '.join(EXTENSIONS)}) nor napari's "
                         f"{kind} writer writes this file type.")
    return [str(written)]


def _write(path: str, data: np.ndarray, attributes: dict, dtype: np.dtype, *, labels: bool) -> Path:
    metadata = attributes.get("metadata") or {}
    affine = metadata.get("affine")
    if affine is None:
        logger.warning("Layer %r has no medcam3d metadata; saving it with its napari placement (taken as RAS mm).",
                       attributes.get("name"))
        array, space = data, Space(data.shape, _napari_placement(attributes, data.ndim))
    elif metadata.get("resampled"):
        array, space = _on_file_grid(data, metadata, labels=labels)
    else:
        array, space = file_grid(data, affine, metadata.get("axes"))
    if dtype.kind in "iu" and np.asarray(array).dtype.kind == "f":
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return _save(path, array, space, metadata, dtype)


def _save(path: str, array: Any, space: Space, metadata: dict, dtype: np.dtype) -> Path:
    source = metadata.get("path")
    like = source if source and str(source).lower().endswith((".nii", ".nii.gz")) and Path(source).is_file() else None
    descrip = metadata.get("descrip")
    return io.write(path, array, space, like=like, dtype=dtype, descrip=None if descrip is None else ascii_text(descrip))


def _on_file_grid(data: np.ndarray, metadata: dict, *, labels: bool) -> tuple[np.ndarray, Space]:
    """A resampled layer's voxels on the file's own grid (see the module doc)."""
    shown = Space(data.shape, metadata["affine"])
    target = _scan_grid(metadata)
    if target is None:  # a result of a scan without a known file grid: its own grid
        return file_grid(data, metadata["affine"], None)
    if labels:
        return resample_labels(data, shown, target), target
    unchanged = metadata.get("checksum") is not None and checksum(data) == metadata["checksum"]
    if unchanged and metadata.get("feature_map") is not None:  # a heatmap: once from the feature grid
        feature = Space(np.shape(metadata["feature_map"]), metadata["feature_affine"])
        return resample(np.asarray(metadata["feature_map"]), feature, target, fill=metadata.get("fill", 0.0)), target
    path = metadata.get("path")
    if unchanged and metadata.get("medcam3d") == "scan" and path and file_stamp(path) == metadata.get("stamp"):
        array, space = io.read(path, volume=metadata.get("volume"), dtype=None)
        if space.isclose(target, atol=1e-3):
            return array, space
    logger.warning("saving %s resampled back from the axis-aligned view onto its original grid (trilinear)",
                   metadata.get("name") or path or "a layer")
    return resample(data, shown, target, fill=float(data.min()) if data.size else 0.0), target


def _scan_grid(metadata: dict) -> Space | None:
    """The grid a layer is saved on: its scan's file grid, else the grid its scan was shown on (None: unknown)."""
    for shape, affine in (("file_shape", "file_affine"), ("scan_shape", "scan_affine")):
        if metadata.get(shape) is not None and metadata.get(affine) is not None:
            return Space(tuple(int(n) for n in metadata[shape]), np.asarray(metadata[affine], dtype=np.float64))
    return None


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


def prefer_medcam3d_writers() -> bool:
    """Put medcam3d's writers first among napari's writers for a layer type.

    napari's *File > Save Selected Layers* dialog preselects the first compatible writer's file
    type; napari registers its own writers first, so the preselected type is TIFF and saving
    ``x.nii.gz`` with it fails. npe2 orders writers of equal specificity by registration, and has
    no public setting for this, so the plugin moves its own entries to the front of npe2's writer
    index (the medcam3d writers hand other file types to napari's, see :func:`write_image`).

    Returns
    -------
    bool
        False when npe2's index could not be reordered (another npe2 version); saving then needs
        the medcam3d file type chosen in the dialog.
    """
    try:
        from npe2 import PluginManager

        index = PluginManager.instance()._contrib  # no public API orders writers
        entries = list(index._writers)
        ours = [entry for entry in entries if getattr(entry[-1], "plugin_name", None) == PLUGIN]
        if not ours or entries[: len(ours)] == ours:
            return bool(ours)
        index._writers = ours + [entry for entry in entries if entry not in ours]
        return True
    except Exception:  # an npe2 without this index: keep its order
        logger.debug("cannot reorder npe2's writers", exc_info=True)
        return False
