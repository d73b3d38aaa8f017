"""Masks from heatmaps, without Qt: *Threshold to mask* and *Segment* as step generators.

- :func:`mask_steps`/:func:`mask_from_heatmap`: a heatmap thresholded into a Labels layer (a
  feature-grid map on :data:`MASK_CELL_MM` voxels) and its bounding box, in RAS mm;
- :func:`segment_steps`/:func:`segment_from_heatmap`: one class's lesions segmented from the scan
  and its heatmap (:mod:`medcam3d.segment`: seed, expand, constrain) on the scan's grid, with the
  lesions' boxes;
- :func:`threshold_problem`: why a threshold is refused.

Run by :class:`._widget.ExplainWidget` in worker threads, and usable from scripts.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from ._grid import napari_affine, refined, resample_labels
from ._lazy import shape_of, source_of
from ._shared import Step, ascii_text, checksum, grid_space, run_steps
from ._view import AXIS_LABELS, UNITS

__all__ = ["mask_steps", "mask_from_heatmap", "segment_steps", "segment_from_heatmap", "threshold_problem",
           "THRESHOLD_METHODS", "THRESHOLD_RANGE", "MASK_CELL_MM", "SEGMENT_COLOUR"]

THRESHOLD_METHODS = ("fraction", "percentile", "otsu")
#: Voxel size (mm) a coarse heatmap (on the model's feature grid) is thresholded at (:func:`mask_from_heatmap`).
MASK_CELL_MM = 2.0
# method: (smallest, largest, step, default) of the threshold value
THRESHOLD_RANGE = {"fraction": (0.01, 1.0, 0.05, 0.5), "percentile": (0.1, 99.9, 0.5, 99.0),
                    "otsu": (0.01, 1.0, 0.05, 0.5)}


def threshold_problem(method: str, value: float) -> str | None:
    """Why ``value`` is no threshold for ``method`` (None when it is)."""
    if method not in THRESHOLD_METHODS:
        return f"the threshold method must be one of {', '.join(THRESHOLD_METHODS)}, not {method!r}"
    if method == "fraction" and not 0 < value <= 1:
        return f"a fraction of the maximum lies in (0, 1], not {value:g}"
    if method == "percentile" and not 0 < value < 100:
        return f"a percentile lies in (0, 100), not {value:g}"
    return None


def mask_steps(
    data: Any,
    affine: Any,
    method: str = "fraction",
    value: float = 0.5,
    *,
    keep_largest: bool = True,
    name: str = "heatmap",
    metadata: dict | None = None,
) -> Generator[Step, None, list[tuple]]:
    """Threshold a heatmap into a mask, with its 3D bounding box, step by step (for a worker thread).

    Yields a :class:`Step` before reading the map, before refining it onto the mask grid, before
    thresholding and before the bounding box, so that a worker reports progress and a *Cancel*
    stops it between steps (nothing is returned then); :func:`mask_from_heatmap` runs it to the end.

    Parameters
    ----------
    data : (I, J, K) array_like
        The heatmap (a heatmap layer's data).
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data``.
    method : {"fraction", "percentile", "otsu"}
        See :func:`medcam3d.masks.threshold_mask`.
    value : float
        Fraction of the maximum (0-1] or percentile (0-100); unused for ``otsu``.
    keep_largest : bool
        Keep the largest connected component only.
    name : str
        The heatmap layer's name.
    metadata : dict, optional
        The heatmap layer's metadata (grid keys and provenance are passed on).

    Returns
    -------
    list of layer data tuples (the generator's return value)
        ``(mask uint8, kwargs, "labels")`` named ``<name> · mask <method> <value>``, on the heatmap's
        grid, a coarse one (voxels above twice :data:`MASK_CELL_MM`) with each voxel split until it
        is at most :data:`MASK_CELL_MM` (a map on the model's
        8 mm feature grid is thresholded on 2 mm voxels, resampled trilinearly from the exact
        ``metadata["feature_map"]`` while the layer is unchanged: the mask follows what the screen
        shows, at a fraction of the scan's voxels; the writer saves it on the scan's grid), and, when the
        mask is not empty, ``(edges, kwargs, "shapes")``: the box's 12 edges (``... · box``; a
        wireframe in the 3D view, its faces' outlines on the box's first and last slices in 2D).
        Both have ``metadata["box"]`` (:meth:`medcam3d.masks.BoundingBox.to_dict`, or None).

    Raises
    ------
    ValueError
        For a threshold that :func:`threshold_problem` refuses.
    """
    from ..masks import bounding_box, threshold_mask

    problem = threshold_problem(method, value)
    if problem is not None:
        raise ValueError(problem)
    from ..space import resample

    total = 4
    yield Step(0, total, f"reading {name}")
    heat = np.asarray(data, dtype=np.float32)
    space = grid_space(heat.shape, affine)
    source = dict(metadata or {})
    fine, factor = refined(space, MASK_CELL_MM) if max(space.spacing) > 2 * MASK_CELL_MM else (space, 1)
    yield Step(1, total, f"refining {name} onto {MASK_CELL_MM:g} mm voxels")
    if factor > 1:  # a coarse map (the feature grid): thresholded on a finer grid, trilinearly, like the screen
        feature = source.get("feature_map")
        if feature is not None and source.get("feature_affine") is not None and source.get("checksum") == checksum(heat):
            heat = resample(np.asarray(feature, dtype=np.float32), grid_space(np.shape(feature), source["feature_affine"]),
                            fine, fill=0.0)
        else:
            heat = resample(heat, space, fine, fill=0.0)
        space = fine
    yield Step(2, total, f"thresholding {name}")
    mask = threshold_mask(heat, method, value, keep_largest=keep_largest)
    yield Step(3, total, "measuring the mask's bounding box")
    box = bounding_box(mask, space)
    setting = "otsu" if method == "otsu" else f"{method} {value:g}"
    meta = {
        **{k: source[k] for k in ("method", "layer", "class", "class_index", "axes", "path", "volume", "source",
                                  "resampled", "file_shape", "file_affine", "scan_shape", "scan_affine", "config")
           if k in source},
        "medcam3d": "mask",
        "affine": np.array(space.affine, dtype=np.float64),
        "threshold": {"method": method, "value": float(value), "keep_largest": bool(keep_largest)},
        "box": None if box is None else box.to_dict(),
        "descrip": ascii_text(f"medcam3d mask {setting} of {source.get('descrip') or name}"),
    }
    placement = napari_affine(space.affine, 3)
    colormap = {0: "transparent", 1: "cyan", None: "cyan"}
    layers: list[tuple] = [(mask.astype(np.uint8), {"name": f"{name} · mask {setting}", "affine": placement,
                                                    "opacity": 0.8, "colormap": colormap, "metadata": meta,
                                                    "axis_labels": AXIS_LABELS, "units": UNITS}, "labels")]
    if box is not None:
        layers.append((_box_edges(box.voxel_min, box.voxel_max), {
            "name": f"{name} · box {setting}", "affine": placement, "shape_type": "line", "edge_color": "cyan",
            "edge_width": 0.5, "metadata": dict(meta), "axis_labels": AXIS_LABELS, "units": UNITS}, "shapes"))
    return layers


def mask_from_heatmap(*args: Any, **kwargs: Any) -> list[tuple]:
    """:func:`mask_steps` run to the end (same parameters and result): for scripts and tests."""
    return run_steps(mask_steps(*args, **kwargs))


def _box_edges(voxel_min: Sequence[int], voxel_max: Sequence[int]) -> list[np.ndarray]:
    """The 12 edges (pairs of voxel positions) of a box: a wireframe in 3D, its faces' outlines in 2D."""
    low, high = np.asarray(voxel_min, dtype=float), np.asarray(voxel_max, dtype=float)
    corners = np.array([[(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    return [corners[[n, n | bit]] for n in range(8) for bit in (4, 2, 1) if not n & bit]


#: Colour of the segmentation labels and their lesion boxes (the threshold masks are cyan).
SEGMENT_COLOUR = "magenta"


def segment_from_heatmap(
    scan: Any,
    scan_affine: Any,
    data: Any,
    affine: Any,
    *,
    scan_name: str = "scan",
    name: str = "heatmap",
    metadata: dict | None = None,
    settings: Any = None,
    scan_metadata: dict | None = None,
) -> list[tuple]:
    """Segment one class's lesions from the scan and its heatmap: seed, expand, constrain.

    :func:`medcam3d.segment.segment` with its default settings (or ``settings``), the class given
    by the heatmap and segmented on its own, on the scan's grid. A medcam3d heatmap is taken from
    its feature grid (``metadata["feature_map"]``, exact, as ``medcam3d explain --segment`` does)
    while its shown voxels are unchanged; otherwise from the layer's data on its own grid.

    Parameters
    ----------
    scan : (I, J, K) array_like
        The scan layer's data (e.g. HU).
    scan_affine : (4, 4) array_like
        Voxel -> RAS mm of ``scan`` (:func:`layer_placement`).
    data : (I', J', K') array_like
        The heatmap layer's data, on the grid ``affine`` (usually the scan's).
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data``.
    scan_name, name : str
        The scan and heatmap layers' names.
    metadata : dict, optional
        The heatmap layer's metadata: ``class_index`` and ``class`` (default 0 and ``name``),
        grid keys and provenance (passed on), ``feature_map``/``feature_affine``/``checksum``.
    settings : medcam3d.segment_records.SegmentSettings, optional
    scan_metadata : dict, optional
        The scan layer's metadata: its file's grid (``axes``, ``resampled``, ``file_shape``,
        ``file_affine``), ``path`` and ``volume`` go into the labels' metadata, so that the writer
        saves them on the scan's own grid and affine (nearest neighbour back from an oblique
        scan's display grid, axes back into the file's order), as it saves the scan.

    Returns
    -------
    list of layer data tuples
        ``(labels, kwargs, "labels")`` (uint8) named ``<scan> · segmentation <class>`` on the scan's
        grid (label ``class_index + 1`` as in :mod:`medcam3d.segment` and the demo masks), and,
        when a lesion was found, ``(edges, kwargs, "shapes")``: the 12 edges of each lesion's box
        (``<scan> · lesion boxes <class>``). Both have ``metadata["lesions"]`` (each lesion's
        volume, peak and box in voxels and RAS mm) and ``metadata["segmentation"]`` (the settings).
    """
    from ..heatmap import Heatmap
    from ..segment import segment

    source = dict(metadata or {})
    lazy = source_of(scan)  # an oblique scan shown lazily: segmented on its own voxels
    image = np.asarray(scan) if lazy is None else lazy[0]
    heat = np.asarray(data, dtype=np.float32)
    if image.ndim != 3 or heat.ndim != 3:
        raise ValueError(f"segmentation needs a 3D scan and a 3D heatmap, not {image.ndim}D and {heat.ndim}D.")
    space = grid_space(image.shape, scan_affine) if lazy is None else lazy[1]
    shown = grid_space(shape_of(scan), scan_affine)
    index = int(source.get("class_index") or 0)
    label = str(source.get("class") or name)
    method, layer = str(source.get("method") or "map"), str(source.get("layer") or "")
    feature = source.get("feature_map")
    if feature is not None and source.get("feature_affine") is not None and source.get("checksum") == checksum(heat):
        grid = grid_space(np.shape(feature), source["feature_affine"])
        heat = np.asarray(feature, dtype=np.float32)
    else:
        grid = grid_space(heat.shape, affine)
    result = segment(image, space, [Heatmap(heat, grid, method, layer, index, label)], classes=[index],
                     settings=settings)
    lesions = [lesion for lesion in result.lesions if lesion.class_index == index]
    labels = result.labels
    if lazy is not None:  # onto the grid the scan is shown on (nearest neighbour)
        labels = resample_labels(labels, space, shown)
    scan_meta = dict(scan_metadata or {})
    meta = {
        **{k: source[k] for k in ("method", "layer", "class", "class_index", "path", "volume", "source", "config")
           if k in source},
        **{k: scan_meta[k] for k in ("axes", "resampled", "file_shape", "file_affine", "path", "volume")
           if scan_meta.get(k) is not None},  # the scan's file grid, where the labels are saved
        "medcam3d": "mask",
        "affine": np.array(shown.affine, dtype=np.float64),
        "segmentation": result.settings.to_dict(),
        "lesions": [lesion.to_dict() for lesion in lesions],
        "descrip": ascii_text(f"medcam3d segment {result.settings.method} of {label}: {index + 1} {label}"),
    }
    placement = napari_affine(shown.affine, 3)
    colormap = {0: "transparent", index + 1: SEGMENT_COLOUR, None: SEGMENT_COLOUR}
    layers: list[tuple] = [(labels, {
        "name": f"{scan_name} · segmentation {label}", "affine": placement, "opacity": 0.8, "colormap": colormap,
        "metadata": meta, "axis_labels": AXIS_LABELS, "units": UNITS}, "labels")]
    if lesions:
        edges = [edge for lesion in lesions for edge in _box_edges(lesion.box.voxel_min, lesion.box.voxel_max)]
        if lazy is not None:  # the box corners in the shown grid's voxels
            edges = [shown.world_to_voxel(space.voxel_to_world(edge)) for edge in edges]
        layers.append((edges, {"name": f"{scan_name} · lesion boxes {label}", "affine": placement,
                               "shape_type": "line", "edge_color": SEGMENT_COLOUR, "edge_width": 0.5,
                               "metadata": dict(meta), "axis_labels": AXIS_LABELS, "units": UNITS}, "shapes"))
    return layers


def segment_steps(*args: Any, **kwargs: Any) -> Generator[Step, None, list[tuple]]:
    """:func:`segment_from_heatmap` as one step, for a worker thread (same parameters and result)."""
    yield Step(0, 1, f"segmenting {kwargs.get('scan_name', 'the scan')}")
    return segment_from_heatmap(*args, **kwargs)
