"""Label maps: which files hold labels, and how they are shown (napari Labels layers, nearest neighbour).

The rule (:func:`label_values`, used by :func:`._reader.read_image` for every 3D file that is not a
medcam3d heatmap):

    A file is a **label map** when its voxels are whole non-negative numbers below 65536 (an
    integer type, or floating-point values that are all whole, e.g. a mask saved as float32)
    with at most :data:`MAX_LABELS` (256) distinct values if the file says it holds labels
    (:func:`label_hint`: a word of its name such as ``mask``, ``seg``, ``segmentation``,
    ``label(s)``, ``dseg`` - ``case_04_mask.nii.gz``, ``case_04_hirescam_segmentation.nii.gz`` -,
    the NIfTI intent ``NIFTI_INTENT_LABEL``, or a descrip that medcam3d writes on masks and
    segmentations or that starts with ``labels``), and at most :data:`FEW_LABELS` (64)
    distinct values otherwise.

A CT (negative values) or an MRI (hundreds of grey levels) fails on a strided sample of about a
million voxels, so the check costs little; a label map is then checked whole, in slabs.

A label map opens as a napari **Labels** layer (:func:`labels_layer_data`) in napari's label
colours (one per value, 0 transparent), half transparent, with the label names when its descrip
lists them (``labels 0 bg 1 bright_round 2 dark_elongated``, ``medcam3d segment ...: 0 bg,
1 bright_round``). It is placed like a scan (:func:`._scan.image_layer_data`): axes reordered
into R-A-S order, and an oblique one **resampled by nearest neighbour** onto the same axis-aligned
grid as its scan (:func:`._grid.resample_labels`: no label is blended away or invented). Its
metadata keeps the file's grid, so that the writers save it there.

Unlike an oblique scan (a lazy pyramid of :class:`._lazy.ResampledView`), an oblique label map is
resampled **once, eagerly**, onto that grid: a label map is there to be reviewed and edited, and
napari edits a Labels layer in place - painting, filling and erasing write ``layer.data[index] =
value`` and keep a copy of ``layer.data[index]`` for undo - while a lazy view can be read but not
written, and napari makes a multiscale Labels layer read-only (``editable = not multiscale``). The
copy is uint8 (1 byte per display voxel: for a 512 x 512 x 300 CT tilted 25 x 25 degrees, whose
display grid is 917 x 966 x 362 voxels, 4.1 times its own, about 320 MB, the CT's float32 size), made
slab by slab, and a
label file from :data:`._reader.BACKGROUND_VOXELS` voxels is read and resampled in the reader's
worker thread, off the UI thread.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space
from ._grid import axis_aligned_grid, layer_grid, napari_affine, needs_display_grid, resample_labels
from ._view import AXIS_LABELS, UNITS

__all__ = ["label_hint", "label_values", "labels_layer_data", "label_names", "MAX_LABELS", "FEW_LABELS", "LABEL_WORDS"]

#: Most distinct values of a file that says it holds labels.
MAX_LABELS = 256
#: Most distinct values of a file that does not (but is whole and non-negative).
FEW_LABELS = 64
#: Words of a file name that say it holds labels (the name is split at ``_``, ``-``, ``.``, ``+``).
LABEL_WORDS = frozenset({"mask", "masks", "seg", "segmentation", "segmentations", "label", "labels", "labelmap",
                         "labelmaps", "dseg", "aseg", "aparc", "parcellation", "annotation", "annotations", "roi",
                         "rois", "groundtruth", "gt"})
#: NIfTI intent code of a label map (NIFTI_INTENT_LABEL).
NIFTI_INTENT_LABEL = 1002
_LARGEST = 65535  # labels are saved as uint8 or uint16
_SAMPLE = 1_000_000  # voxels of the strided first look
_SLAB = 1 << 22  # voxels per step of the whole check
_DESCRIPS = ("medcam3d mask", "medcam3d segment", "labels", "label ", "mask", "segmentation")
_NAMED = re.compile(r"(?<![\w.])(\d{1,5})\s+([^\s,;:]+)")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def label_hint(path: str | Path | None, header: Any = None) -> str | None:
    """Why a file is taken to hold labels (its name, NIfTI intent or descrip), or None.

    Parameters
    ----------
    path : path or None
    header : nibabel NIfTI header, optional
        The file's header (read from ``path`` when it is a NIfTI file and none is given).

    Returns
    -------
    str or None
        E.g. ``"name"``, ``"intent"``, ``"descrip"``.
    """
    if path is None:
        return None
    path = Path(path)
    words = {word for word in re.split(r"[_\-.+\s]+", _stem(path).lower()) if word}
    if words & LABEL_WORDS:
        return "name"
    if header is None and path.name.lower().endswith((".nii", ".nii.gz")):
        try:
            import nibabel as nib

            header = nib.load(str(path)).header
        except Exception:  # unreadable header: no hint (the reader reports real problems)
            header = None
    if header is None or "intent_code" not in header:
        return None
    if int(header["intent_code"]) == NIFTI_INTENT_LABEL:
        return "intent"
    from .. import io

    descrip = (io.full_descrip(header) or "").strip().lower()
    return "descrip" if descrip.startswith(_DESCRIPS) else None


def _whole(values: np.ndarray) -> bool:
    """All values whole, >= 0 and <= 65535 (NaN fails)."""
    if values.size == 0:
        return True
    if values.dtype.kind == "b":
        return True
    if values.dtype.kind in "iu":
        return int(values.min()) >= 0 and int(values.max()) <= _LARGEST
    if values.dtype.kind != "f":
        return False
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > _LARGEST:
        return False
    return bool(np.all(np.floor(values) == values))


def label_values(array: Any, limit: int = MAX_LABELS) -> np.ndarray | None:
    """The distinct values of a label map, or None when ``array`` is no label map under ``limit``.

    Parameters
    ----------
    array : ndarray
        Any shape.
    limit : int
        Most distinct values.

    Returns
    -------
    (n,) int64 ndarray or None
        Sorted values (0 included when present); None when a value is negative, not whole, above
        65535 or NaN, or there are more than ``limit`` values. A strided sample of about a million
        voxels is checked first, so scans are turned down quickly.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" or array.ndim == 0:
        return None
    step = max(1, round((array.size / _SAMPLE) ** (1 / array.ndim)))
    sample = array[(slice(None, None, step),) * array.ndim]
    if not _whole(sample) or np.unique(sample).size > limit:
        return None
    seen = np.zeros(_LARGEST + 1, dtype=bool)
    flat = array.reshape(-1)
    for start in range(0, flat.size, _SLAB):
        slab = flat[start:start + _SLAB]
        if not _whole(slab):
            return None
        seen[np.flatnonzero(np.bincount(slab.astype(np.uint16)))] = True
        if np.count_nonzero(seen) > limit:
            return None
    return np.flatnonzero(seen).astype(np.int64)


def label_names(descrip: str | None) -> dict[int, str]:
    """Label names a descrip lists (``labels 0 bg 1 bright_round``, ``...: 0 bg, 1 bright_round``); {} when none."""
    if not descrip:
        return {}
    tail = descrip.split(":", 1)[1] if descrip.startswith("medcam3d segment") and ":" in descrip else descrip
    return {int(number): name for number, name in _NAMED.findall(tail)}


def labels_layer_data(labels: np.ndarray, space: Space, *, name: str, path: str | Path | None = None,
                      values: np.ndarray | None = None, descrip: str | None = None, volume: int | None = None,
                      **kwargs: Any) -> tuple:
    """A label map as a napari Labels layer data tuple, placed in RAS mm (nearest neighbour when oblique).

    Parameters
    ----------
    labels : (*space.shape) ndarray
        Whole non-negative values (see :func:`label_values`), in the file's (i, j, k) order.
    space : Space
        The file's grid.
    name : str
    path : path, optional
        Source file, kept in ``metadata["path"]``.
    values : ndarray, optional
        :func:`label_values` of ``labels`` (found when not given).
    descrip : str, optional
        The file's description: kept in ``metadata["descrip"]`` (written again when the layer is
        saved) and read for label names (:func:`label_names`).
    volume : int, optional
    **kwargs
        More napari ``add_labels`` arguments.

    Returns
    -------
    (data, kwargs, "labels")
        ``data`` uint8 (uint16 above 255) in R-A-S axis order; an oblique file is resampled by
        nearest neighbour onto :func:`._grid.axis_aligned_grid` of its grid, the grid the reader
        shows a scan of that grid on. ``metadata`` holds ``"medcam3d": "labels"``, ``"affine"``,
        ``"axes"``, ``"resampled"``, ``"file_shape"``, ``"file_affine"``, ``"path"``, ``"volume"``,
        ``"labels"`` (the values) and ``"label_names"``.
    """
    found = label_values(labels, _LARGEST + 1) if values is None else np.asarray(values)
    if found is None:
        raise ValueError(f"{name} holds no label map (values must be whole, non-negative and at most {_LARGEST}).")
    top = int(found.max()) if found.size else 0
    stored = np.asarray(labels)
    stored = stored.astype(np.uint8 if top <= 255 else np.uint16, copy=False)
    data, affine, axes = layer_grid(stored, space)
    order: tuple[int, ...] | None = axes
    shown = Space(data.shape, affine)
    resampled = needs_display_grid(shown)
    if resampled:
        display = axis_aligned_grid(shown)
        data, affine, order = resample_labels(stored, space, display), np.array(display.affine), None
    names = label_names(descrip)
    metadata: dict[str, Any] = {
        "medcam3d": "labels", "affine": np.array(affine, dtype=np.float64), "axes": order,
        "path": None if path is None else str(path), "volume": None if volume is None else int(volume),
        "resampled": resampled, "file_shape": tuple(space.shape), "file_affine": np.array(space.affine, dtype=np.float64),
        "labels": [int(v) for v in found], "label_names": names,
    }
    if descrip:
        metadata["descrip"] = descrip
    options: dict[str, Any] = {"name": name, "affine": napari_affine(metadata["affine"], data.ndim),
                               "metadata": metadata, "opacity": 0.5, "blending": "translucent",
                               "axis_labels": AXIS_LABELS[: data.ndim], "units": UNITS[: data.ndim]}
    if names:  # shown in the status bar under the cursor
        options["features"] = {"index": [int(v) for v in found],
                               "name": [names.get(int(v), str(int(v))) for v in found]}
    options.update(kwargs)
    return np.ascontiguousarray(data), options, "labels"

