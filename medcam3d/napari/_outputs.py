"""Saved medcam3d outputs opened again as heatmaps and masks, recognised by their NIfTI ``descrip``.

``medcam3d explain``/``batch`` (and :meth:`medcam3d.heatmap.Heatmap.save`,
:func:`medcam3d.scan_maps.save_scan_maps`, the napari writer) write each class's map with the
descrip ``medcam3d <method> layer=<layer> class=<index>:<label>`` under the names
``<case>_<method>_<label>.nii.gz`` (the map on the scan's grid), ``..._norm`` (the same, min-max
scaled to [0, 1]), ``..._feature`` (the map on the model's feature grid, exact) and ``..._mask``
(its uint8 localisation mask on the scan's grid, same descrip). The reader
(:func:`._reader.read_image`) opens them as:

- **maps** (the scan-grid map, its ``_norm`` copy, or a ``_feature`` file on its own coarse grid):
  an image layer styled and described like a heatmap of the *Explain* action
  (``metadata["medcam3d"] == "heatmap"``, method, layer, class, class_index, max, peak...), so that
  *Threshold to mask* and *Segment* work on it. The ``<stem>_feature`` file next to a map becomes
  ``metadata["feature_map"]``/``["feature_affine"]`` (scaled like the ``_norm`` copy for one), so
  that *Segment* and the writers work from the exact feature grid as after *Explain* (and an
  oblique scan's map is shown resampled once from it, as *Explain* shows it); the class's
  probability and score come from the case's ``summary.json`` when it is there;
- **masks**: a uint8 labels layer on the grid the scan is shown on (nearest neighbour when that
  grid is resampled), named like the widget's masks (``... · mask fraction 0.5``, the threshold
  read from the ``_box.json`` beside it).

A ``--four-d`` file (``<case>_<method>.nii.gz`` and its ``_norm`` copy, descrip ``medcam3d <method>
layer=<layer> classes=<label>,<label>...``; a list longer than the 80-byte field is read whole
from the header extension, :func:`medcam3d.io.full_descrip`) opens as one such heatmap per class
(:func:`saved_map_volumes`), named by its class, with the class's ``_feature`` file and
probability when they are beside it.

Placement is the reader's (:func:`._scan.image_layer_data`): reordered axes, oblique files
resampled onto the same axis-aligned grid as their scan. Anything else, a file whose descrip is
another program's, or medcam3d's in another form (a segmentation), a malformed one, a 2D map,
opens as the reader decides (a label map as labels, :mod:`._labels`; else a plain image).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..heatmap import file_label
from ..space import Space, resample
from ._grid import axis_aligned_grid, layer_grid, napari_affine, needs_display_grid, resample_labels
from ._scan import image_layer_data
from ._shared import ascii_text, checksum, heatmap_layer_kwargs, heatmap_name
from ._view import AXIS_LABELS, UNITS

__all__ = ["Provenance", "parse_descrip", "read_descrip", "output_kind", "saved_output_layer", "saved_map_volumes",
           "KINDS"]

logger = logging.getLogger(__name__)

#: What a saved file is, from its name: the scan-grid map, its normalized copy, the feature-grid map, a mask.
KINDS = ("map", "norm", "feature", "mask")
_SUFFIXES = (("_feature", "feature"), ("_mask", "mask"), ("_norm", "norm"))
_NIFTI = (".nii.gz", ".nii")
# medcam3d <method> layer=<layer> class=<index>:<label>; the label is the rest (it may hold spaces)
_DESCRIP = re.compile(r"medcam3d (?P<method>[^\s=:]+) layer=(?P<layer>[^\s=]+) class=(?P<index>\d{1,9}):(?P<label>\S.*?)"
                      r"(?: place=(?:rf|ac))?")  # the placement of the feature grid (Heatmap.descrip)
# medcam3d <method> layer=<layer> classes=<label>,<label>...: a --four-d file (one volume per class)
_DESCRIP_4D = re.compile(r"medcam3d (?P<method>[^\s=:]+) layer=(?P<layer>[^\s=]+) classes=(?P<labels>\S.*)")
_SIDECAR_BYTES = 4 << 20  # summary.json / _box.json read at most this large


@dataclass(frozen=True)
class Provenance:
    """What a medcam3d descrip says: the method, target layer and class of a map."""

    method: str
    layer: str
    class_index: int
    label: str


def parse_descrip(text: str | bytes | None) -> Provenance | None:
    """The provenance in a medcam3d map's descrip, or None for any other text (never raises).

    Parameters
    ----------
    text : str or bytes or None
        The NIfTI ``descrip`` (80 bytes, NUL padded); not ASCII, not medcam3d's, or malformed: None.
    """
    if isinstance(text, (bytes, bytearray, np.bytes_)):
        try:
            text = bytes(text).split(b"\x00", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str):
        return None
    found = _DESCRIP.fullmatch(text.split("\x00", 1)[0].strip())
    if found is None or not found["label"].isprintable():
        return None
    return Provenance(found["method"], found["layer"], int(found["index"]), found["label"].strip())


def read_descrip(path: str | Path) -> str | None:
    """The description of a NIfTI file (ASCII), whole (:func:`medcam3d.io.full_descrip`: a text longer
    than the 80-byte ``descrip`` field is kept in a header extension); None when the file is not
    NIfTI, is unreadable or its description is not ASCII."""
    if not str(path).lower().endswith(_NIFTI):
        return None
    try:
        import nibabel as nib

        text = io.full_descrip(nib.load(str(path)).header)
    except Exception:  # any header problem: not ours
        logger.debug("no descrip in %s", path, exc_info=True)
        return None
    return text if text is not None and text.isascii() else None


def _stem(path: Path) -> str:
    name = path.name
    for ext in _NIFTI:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def output_kind(path: str | Path) -> tuple[str, str]:
    """``(kind, base)``: one of :data:`KINDS` from the file name, and the name without that suffix and extension."""
    stem = _stem(Path(path))
    for suffix, kind in _SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return kind, stem[: -len(suffix)]
    return "map", stem


def _case_of(base: str, found: Provenance) -> str | None:
    """The case id in ``<case>_<method>_<label>``, or None when the name is not in that form."""
    tail = f"_{file_label(found.method)}_{file_label(found.label)}"
    return base[: -len(tail)] if base.endswith(tail) and len(base) > len(tail) else None


def _json(path: Path) -> dict:
    """A small JSON object beside the file, or {} (absent, too large, not JSON, not an object)."""
    try:
        if not path.is_file() or path.stat().st_size > _SIDECAR_BYTES:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else None


def _from_summary(folder: Path, case: str | None, found: Provenance) -> tuple[float | None, float | None]:
    """The class's probability and the explained score from the case's ``summary.json`` (None when unknown)."""
    summary = _json(folder / "summary.json") if case is not None else {}
    if summary.get("case_id") != case:
        return None, None
    probabilities = summary.get("probabilities")
    probability = _number(probabilities.get(found.label)) if isinstance(probabilities, dict) else None
    score = None
    for finding in summary.get("findings") or []:
        if isinstance(finding, dict) and finding.get("method") == found.method and \
                finding.get("class_index") == found.class_index:
            score = _number(finding.get("score"))
    return probability, score


def _feature_map(path: Path, base: str, kind: str, found: Provenance, space: Space,
                 fill: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The map's ``<base>_feature`` file (array in its own order, affine), scaled like a ``_norm`` map; or None."""
    from ..heatmap import Heatmap
    from ..scan_maps import ScanGridMap

    for ext in _NIFTI:
        sibling = path.with_name(f"{base}_feature{ext}")
        if not sibling.is_file() or parse_descrip(read_descrip(sibling)) != found:
            continue
        try:
            array, grid = io.read(sibling, dtype=np.float32)
        except Exception:  # unreadable: the layer's own data are used
            logger.debug("cannot read %s", sibling, exc_info=True)
            return None
        if array.ndim != 3:
            return None
        feature = np.ascontiguousarray(array, dtype=np.float32)
        if kind == "norm":  # as save_scan_maps normalized it: by the range of the map on the scan's grid
            low, high = ScanGridMap(Heatmap(feature, grid, found.method, found.layer, found.class_index), space,
                                    fill=fill).value_range()
            if high - low > 1e-8:
                feature = ((feature - np.float32(low)) / np.float32(high - low)).astype(np.float32)
            else:
                feature = np.zeros_like(feature)
        return feature, np.array(grid.affine, dtype=np.float64)
    return None


def _heatmap_layer(array: np.ndarray, space: Space, path: Path, kind: str, base: str, found: Provenance,
                   descrip: str, volume: int | None = None) -> tuple:
    from ..masks import peak

    values = np.asarray(array, dtype=np.float32)
    fill = float("nan") if np.isnan(values).any() else 0.0
    case = _case_of(base, found)
    source = case or base
    data, options, _ = image_layer_data(values, space, name=source, path=path, volume=volume, lazy=False)
    data = np.asarray(data, dtype=np.float32)
    scan_meta = options["metadata"]
    shown = Space(data.shape, scan_meta["affine"])
    if kind == "feature":  # the exact map itself, on its own grid
        feature: tuple[np.ndarray, np.ndarray] | None = (np.ascontiguousarray(values),
                                                         np.array(space.affine, dtype=np.float64))
    else:
        feature = _feature_map(path, base, kind, found, space, fill)
        if feature is not None and scan_meta["resampled"]:  # shown once from the feature grid, as Explain does
            data = resample(feature[0], Space(feature[0].shape, feature[1]), shown, fill=fill).astype(np.float32)
    top_voxel = peak(data, shown)
    top = float(np.nanmax(data)) if data.size and not np.isnan(data).all() else 0.0
    probability, score = _from_summary(path.parent, case, found)
    meta: dict[str, Any] = {
        "medcam3d": "heatmap",
        "method": found.method,
        "layer": found.layer,
        "class": found.label,
        "class_index": found.class_index,
        "score": score,
        "probability": probability,
        "peak_voxel": None if top_voxel is None else top_voxel[0],
        "peak_mm": None if top_voxel is None else top_voxel[1],
        "max": top if np.isfinite(top) else 0.0,
        **{k: scan_meta[k] for k in ("axes", "path", "volume", "resampled", "file_shape", "file_affine")},
        "affine": np.array(shown.affine, dtype=np.float64),
        "scan_shape": tuple(int(n) for n in shown.shape),
        "scan_affine": np.array(shown.affine, dtype=np.float64),
        "source": source,
        "config": None,
        "descrip": ascii_text(descrip),
        "explained_on": None,
        "input_shape": None,
        "fill": fill,
        "checksum": checksum(data),
        "fov_covers_scan": None,
        "output_activation": None,  # not recorded in the file
        "output": kind,
    }
    if feature is not None:
        meta["feature_map"], meta["feature_affine"] = feature
    name = heatmap_name(source, found.method, found.layer, found.label, probability)
    name += {"map": "", "norm": " · normalized", "feature": " · feature grid"}[kind]
    return data, heatmap_layer_kwargs(name, shown.affine, found.class_index, meta["max"], meta), "image"


def _mask_layer(array: np.ndarray, space: Space, path: Path, base: str, found: Provenance,
                descrip: str) -> tuple | None:
    from ..masks import bounding_box

    labels = np.asarray(array)
    if labels.dtype.kind not in "iub" or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        return None
    labels = labels.astype(np.uint8)
    data, affine, order = layer_grid(labels, space)
    axes: tuple[int, ...] | None = order
    shown = Space(data.shape, affine)
    resampled = needs_display_grid(shown)
    if resampled:  # the grid its scan is shown on (the reader's), nearest neighbour
        shown = axis_aligned_grid(shown)
        data, axes = resample_labels(labels, space, shown), None
    data = np.ascontiguousarray(data, dtype=np.uint8)
    case = _case_of(base, found)
    source = case or base
    box_file = _json(path.with_name(f"{base}_box.json"))
    threshold = box_file.get("threshold")
    if isinstance(threshold, dict) and isinstance(threshold.get("method"), str) and _number(threshold.get("value")) is not None:
        threshold = {"method": threshold["method"], "value": _number(threshold["value"]),
                     "keep_largest": box_file.get("kind") == "largest_component"}
        setting = f"{threshold['method']} {threshold['value']:g}"
    else:
        threshold, setting = None, "saved"
    box = bounding_box(data > 0, shown)
    probability, _ = _from_summary(path.parent, case, found)
    meta = {
        "method": found.method, "layer": found.layer, "class": found.label, "class_index": found.class_index,
        "axes": axes, "path": str(path), "volume": None, "source": source, "resampled": resampled,
        "file_shape": tuple(space.shape), "file_affine": np.array(space.affine, dtype=np.float64),
        "medcam3d": "mask",
        "affine": np.array(shown.affine, dtype=np.float64),
        "threshold": threshold,
        "box": None if box is None else box.to_dict(),
        "descrip": ascii_text(descrip),
        "output": "mask",
    }
    name = f"{heatmap_name(source, found.method, found.layer, found.label, probability)} · mask {setting}"
    colormap = {0: "transparent", 1: "cyan", None: "cyan"}  # as the widget's masks
    return data, {"name": name, "affine": napari_affine(shown.affine, 3), "opacity": 0.8, "colormap": colormap,
                  "metadata": meta, "axis_labels": AXIS_LABELS, "units": UNITS}, "labels"


def _class_index(folder: Path, case: str | None, method: str, label: str, default: int) -> int:
    """The class index of ``label`` from the case's ``summary.json`` findings (``default`` when not there)."""
    summary = _json(folder / "summary.json") if case is not None else {}
    if summary.get("case_id") == case:
        for finding in summary.get("findings") or []:
            if isinstance(finding, dict) and finding.get("method") == method and finding.get("class") == label and \
                    isinstance(finding.get("class_index"), int) and not isinstance(finding.get("class_index"), bool):
                return int(finding["class_index"])
    return default


def saved_map_volumes(volumes: np.ndarray, space: Space, path: str | Path) -> list[tuple] | None:
    """A ``medcam3d explain --four-d`` file (one map per class) as one heatmap layer per class.

    Parameters
    ----------
    volumes : (T, *space.shape) ndarray
        The file's volumes (:func:`medcam3d.io.read_volumes`).
    space : Space
        The grid of one volume.
    path : path
        ``<case>_<method>.nii.gz`` or its ``_norm`` copy; its descrip lists the classes in order.

    Returns
    -------
    list of (data, kwargs, "image") or None
        Heatmap layers like :func:`saved_output_layer`'s (``metadata["volume"]`` the volume),
        named by their class (``case_04 · hirescam · class_layers.relu · bright_round (p=0.83)``,
        ``· normalized`` for the ``_norm`` copy); None when the file is no medcam3d 4D map (the
        reader then opens one plain image per volume).
    """
    path = Path(path)
    descrip = read_descrip(path)
    matched = _DESCRIP_4D.fullmatch(descrip.strip()) if descrip is not None and len(space.shape) == 3 else None
    if matched is None or np.ndim(volumes) != 4:
        return None
    labels = [label.strip() for label in matched["labels"].split(",")]
    method, layer = matched["method"], matched["layer"]
    if len(labels) != len(volumes) or not all(label and label.isprintable() for label in labels):
        logger.warning("%s: its descrip names %d classes for %d volumes; classes are numbered instead",
                       path.name, len(labels), len(volumes))
        labels = [f"class{t}" for t in range(len(volumes))]
    stem = _stem(path)
    kind, base = ("norm", stem[: -len("_norm")]) if stem.endswith("_norm") and len(stem) > 5 else ("map", stem)
    case = base[: -len(f"_{file_label(method)}")] if base.endswith(f"_{file_label(method)}") else None
    layers = []
    try:
        for t, label in enumerate(labels):
            index = _class_index(path.parent, case, method, label, t)
            found = Provenance(method, layer, index, label)
            per_class = f"{base}_{file_label(label)}"  # as the class's own files are named (its _feature file)
            layers.append(_heatmap_layer(volumes[t], space, path, kind, per_class, found,
                                         f"medcam3d {method} layer={layer} class={index}:{label}", volume=t))
    except Exception:  # never fail to open a file because it looks like ours
        logger.warning("medcam3d: %s opened as plain images (not readable as medcam3d maps)", path.name, exc_info=True)
        return None
    return layers


def saved_output_layer(array: np.ndarray, space: Space, path: str | Path) -> tuple | None:
    """A saved medcam3d map or mask (3D NIfTI with medcam3d's descrip) as a heatmap or labels layer tuple.

    Parameters
    ----------
    array : (*space.shape) ndarray
        The file's voxels, as :func:`medcam3d.io.read` gives them (``dtype=None``).
    space : Space
        The file's grid.
    path : path
        The file (its name says which output it is, its descrip what it shows).

    Returns
    -------
    (data, kwargs, "image" | "labels") or None
        None when the file is not a medcam3d map or mask, or cannot be shown as one: the reader
        then opens it as a plain image.
    """
    path = Path(path)
    if np.ndim(array) != 3:
        return None
    descrip = read_descrip(path)
    found = parse_descrip(descrip)
    if found is None or descrip is None:
        return None
    kind, base = output_kind(path)
    try:
        if kind == "mask":
            return _mask_layer(array, space, path, base, found, descrip)
        return _heatmap_layer(array, space, path, kind, base, found, descrip)
    except Exception:  # never fail to open a file because it looks like ours
        logger.warning("medcam3d: %s opened as a plain image (not readable as a medcam3d output)", path.name,
                       exc_info=True)
        return None
