"""The *Explain* service: explaining a scan without Qt.

Pure functions (no Qt; napari only for colormaps) that return napari layer data tuples, run by
:class:`._widget.ExplainWidget` in worker threads, and usable from scripts:

- **explain steps**: :func:`explain_steps` (a generator: scan + config -> progress
  :class:`._shared.Step` s, then one heatmap layer per class and the model's field of view) and
  :func:`explain_image` (the same, run to the end); :func:`load_explainable` (a config and its model);
- :func:`colour_limits` (the heatmaps' shared colour scale), :func:`layer_placement`, :func:`is_foreign`.

The model cache, the model's input and the target-layer listings are :mod:`._models`'; masks and
segmentations from heatmaps are :mod:`._masking`'s.
Heatmap names carry the scan, method, target layer, class and probability
(``case_01 · hirescam · class_layers.relu · bright_round (p=0.67)``, :func:`._shared.heatmap_name`).
All maths goes through the library: :mod:`medcam3d.jobs.runner` (``Runner``, probabilities),
:mod:`medcam3d.preprocess`, :mod:`medcam3d.heatmap` and :mod:`medcam3d.masks`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space
from ._grid import covers, drawable, napari_affine
from ._lazy import shape_of, source_of
from ._models import (MODEL_LOCK, config_key, input_channels, layer_listing, load_configured_model, model_input,
                      remember_input_shape, scan_file, stack_channels)
from ._shared import Step, ascii_text, checksum, file_stamp, grid_space, heatmap_layer_kwargs, heatmap_name, run_steps
from ._view import AXIS_LABELS, UNITS

__all__ = ["load_explainable", "explain_steps", "explain_image", "colour_limits", "layer_placement", "is_foreign",
           "ALL_CLASSES", "AUTO", "SCALES", "POSITIVE"]

ALL_CLASSES = "all classes"
AUTO = "auto"
#: Colour scales of the heatmaps (the first is the default).
SCALES = ("shared: largest positive-class map", "shared: largest map", "each map to its own maximum")
#: A class counts as positive (for the shared colour scale) from this probability.
POSITIVE = 0.5


def load_explainable(config_path: str | Path, *, trust: bool = False):
    """``(config, model)`` of :func:`load_configured_model` (same parameters and errors)."""
    loaded = load_configured_model(config_path, trust=trust)
    return loaded.config, loaded.model


def _source_voxels(data: Any, shown: Space, metadata: dict) -> tuple[Any, Space, str]:
    """The voxels to explain: the file's own grid for a resampled scan whose file is unchanged."""
    from .. import io

    lazy = source_of(data)
    if lazy is not None:  # an oblique scan shown through lazy views: its own voxels, no reading
        return lazy[0], lazy[1], "file grid"
    path = metadata.get("path")
    if metadata.get("resampled") and path and metadata.get("stamp") and file_stamp(path) == metadata["stamp"]:
        array, space = io.read(path, volume=metadata.get("volume"), dtype=None)
        return array, space, "file grid"
    return data, shown, "shown grid"


def explain_steps(
    data: Any,
    affine: Any,
    config_path: str | Path,
    method: str = "hirescam",
    layer: str = AUTO,
    target: object = "all",
    *,
    name: str = "image",
    metadata: dict | None = None,
    trust: bool = False,
    device: str = "cpu",
    output_activation: str | None = None,
    channels: Sequence[tuple[Any, Any, dict | None, str]] = (),
) -> Generator[Step, None, list[tuple]]:
    """Explain one scan step by step; yields :class:`Step` before each step, returns the layers.

    The model sees the scan's own voxels: for an oblique scan shown lazily, the voxels behind the
    view (:mod:`._lazy`); for one shown resampled, the file read again on its original grid. Each
    class's map stays on the model's feature grid (:func:`._grid.drawable`: napari draws it
    through the layer's affine; an oblique feature grid goes onto an axis-aligned grid of its own
    cell size), so a map costs kilobytes, not a scan-sized float32 copy.

    Parameters
    ----------
    data : (I, J, K) array_like
        The scan (an image layer's data).
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data`` (the layer's ``metadata["affine"]``).
    config_path : path
        Model, class names and preprocessing (e.g. ``configs/demo.yaml``).
    method : str
        A key of :data:`medcam3d.METHODS`.
    layer : str
        Target layer name, or ``"auto"``.
    target : "all", class name or index
    name : str
        The scan's layer name (heatmaps are named by :func:`heatmap_name`).
    metadata : dict, optional
        The scan layer's metadata (grid, path; passed on for the writers).
    trust : bool
        Allow models that execute code.
    device : str
        ``cpu``, ``cuda``, ``auto``...
    output_activation : str, optional
        What the network applies to its logits (``auto``, ``none``, ``softmax``, ``sigmoid``);
        default the config's, as for ``medcam3d explain``.
    channels : sequence of (data, affine, metadata, name)
        More input channels (image layers: another MR sequence of the case), in the model's
        channel order after ``data`` (channel 0). Stacked on channel 0's grid as the CLI stacks
        ``--image`` files (:func:`._models.stack_channels`: another grid is resampled onto it, with
        a warning); the maps land on channel 0's grid. A config whose network states
        ``in_channels`` must get that many channels in all.

    Yields
    ------
    Step
        Before loading the model, reading, preprocessing, explaining, each class's map and the
        field of view.

    Returns
    -------
    list of (data, kwargs, kind)
        One ``"image"`` heatmap per class (float32, on the feature grid as :func:`._grid.drawable`
        places it, ``metadata["affine"]`` its voxel -> RAS placement and ``"resampled"`` True: it
        is not on the scan's grid, the writer resamples it there), the class's colormap,
        translucent, contrast ``(0, max)``, ``metadata`` with method, layer, class, class_index,
        score, probability, peak_voxel (of the layer's grid) and peak_mm (None for a flat map),
        max, the grid keys of the scan's file (``file_shape``, ``file_affine``, ``path``...) and
        the grid it is shown on (``scan_shape``, ``scan_affine``), ``feature_map``/``feature_affine``
        and ``checksum`` for the writer; with ``channels``, also ``channels`` (the layers' names, channel
        0 first) and ``channel_notes`` (what was resampled onto channel 0's grid)); then, when the model's input does not cover the whole
        scan, a ``"labels"`` layer of the model's field of view (its input grid, 1 inside, drawn
        as an outline).
    """
    from ..heatmap import heatmaps_of, input_space_of
    from ..jobs.runner import Runner
    from ..targets import probabilities
    from ..masks import peak
    source_meta = dict(metadata or {})
    shown = grid_space(shape_of(data), affine)
    total = 7
    yield Step(0, total, "loading the model")
    configured = load_configured_model(config_path, trust=trust)
    config, model = configured.config, configured.model
    wanted = input_channels(config)
    if wanted is not None and wanted != 1 + len(channels):
        raise ValueError(f"this config's network takes {wanted} input channel(s) (in_channels: {wanted}) but "
                         f"{1 + len(channels)} were given ({name}{''.join(', ' + c[3] for c in channels)}): in the "
                         f"Explain panel pick the scan and {wanted - 1} more channel layer(s) under 'more channels', "
                         "in the model's channel order.")
    total = 5 + (len(config.class_names or [0, 1]) if target in ("all", None) else 1)
    resampled = bool(source_meta.get("resampled"))
    yield Step(1, total, f"reading {name} on its original grid" if resampled else f"preparing {name}")
    voxels, voxel_space, explained_on = _source_voxels(data, shown, source_meta)
    channel_notes: list[str] = []
    if channels:
        others = []
        for other, other_affine, other_meta, other_name in channels:
            found, grid, _ = _source_voxels(other, grid_space(shape_of(other), other_affine), dict(other_meta or {}))
            others.append((found, grid, other_name))
        voxels, channel_notes = stack_channels(voxels, voxel_space, others, first_name=name)
    yield Step(2, total, "preprocessing")
    with MODEL_LOCK:
        runner = Runner(config, model, methods=[method], target=target, layer=layer, device=device, trust=trust,
                        reader=configured.preprocessing, output_activation=output_activation)
        x = model_input(configured, voxels, voxel_space, path=None if channels else scan_file(source_meta), trust=trust,
                        check_input=runner.input_check)
        del voxels
        input_shape = tuple(int(n) for n in x.shape)
    yield Step(3, total, f"explaining ({method})")
    with MODEL_LOCK:
        explanation = runner.explain_method(0, x[None].to(runner.device))  # a fold ensemble: the folds' mean
        del x
        key = config_key(config_path, trust)
        remember_input_shape(key, shown.shape, shown.affine, input_shape)
        layer_listing(key, input_shape, model)
    features = heatmaps_of(explanation)  # each class on the feature grid, exact affine
    probs = None
    if explanation.logits.ndim == 2:
        probs = probabilities(explanation.logits.float(), config.task)[0].tolist()
    total = 5 + len(features)
    grid_meta = {k: source_meta.get(k) for k in ("axes", "path", "volume", "resampled", "file_shape", "file_affine")}
    layers: list[tuple] = []
    for number, heat in enumerate(features):
        yield Step(4 + number, total, f"map {number + 1}/{len(features)}: {heat.label}")
        # The map stays on the feature grid: napari draws it through the layer's affine (no
        # scan-sized copy); an oblique feature grid is put on an axis-aligned one of its own cell size.
        values, map_affine, _ = drawable(np.asarray(heat.data, dtype=np.float32), heat.space)
        values = np.ascontiguousarray(values, dtype=np.float32)
        map_space = Space(values.shape, map_affine)
        top_voxel = peak(values, map_space)  # None for a flat map (e.g. a ReLU'd negative class)
        top = float(values.max()) if values.size else 0.0
        probability = None if probs is None or heat.class_index >= len(probs) else float(probs[heat.class_index])
        meta = {
            "medcam3d": "heatmap",
            "method": heat.method,
            "layer": heat.layer,
            "class": heat.label,
            "class_index": heat.class_index,
            "score": heat.score,
            "probability": probability,
            "peak_voxel": None if top_voxel is None else top_voxel[0],
            "peak_mm": None if top_voxel is None else top_voxel[1],
            "max": top,
            **grid_meta,
            "affine": map_affine,
            "axes": None,
            "resampled": True,  # not on the scan's file grid: the writer resamples it there (from feature_map)
            "scan_affine": np.array(shown.affine, dtype=np.float64),
            "scan_shape": tuple(shown.shape),
            "source": name,
            "config": str(config_path),
            "descrip": ascii_text(heat.descrip),
            "explained_on": explained_on,
            "input_shape": input_shape,
            "feature_map": heat.data,
            "feature_affine": np.array(heat.space.affine, dtype=np.float64),
            "fill": float(config.output.fill),
            "checksum": checksum(values),
            "output_activation": runner.explainers[0].output_activation,
            **({"channels": [name, *(c[3] for c in channels)], "channel_notes": list(channel_notes)} if channels else {}),
        }
        kwargs = heatmap_layer_kwargs(heatmap_name(name, heat.method, heat.layer, heat.label, probability),
                                      map_affine, heat.class_index, top, meta)
        layers.append((values, kwargs, "image"))
    yield Step(total - 1, total, "model field of view")
    input_space = input_space_of(explanation)
    covered = covers(input_space, shown)
    for _, kwargs, _ in layers:
        kwargs["metadata"]["fov_covers_scan"] = covered
    if not covered:  # the model's input grid, drawn as an outline (on its own grid, not the scan's)
        inside, fov_affine, _ = drawable(np.ones(input_space.shape, dtype=np.uint8), input_space, labels=True)
        fov_meta = {"medcam3d": "fov", **grid_meta, "affine": fov_affine, "axes": None, "resampled": True,
                    "source": name, "config": str(config_path), "input_shape": input_shape,
                    "descrip": ascii_text(f"medcam3d model field of view of {name}")}
        layers.append((np.ascontiguousarray(inside, dtype=np.uint8), {
            "name": f"{name} · model field of view", "affine": napari_affine(fov_affine, 3), "opacity": 0.9,
            "colormap": {0: "transparent", 1: "white", None: "white"}, "metadata": fov_meta,
            "axis_labels": AXIS_LABELS, "units": UNITS}, "labels"))
    return layers


def explain_image(*args: Any, **kwargs: Any) -> list[tuple]:
    """Run :func:`explain_steps` to the end and return its layers (same parameters)."""
    return run_steps(explain_steps(*args, **kwargs))


def colour_limits(maps: Sequence[dict], scale: str = SCALES[0]) -> list[tuple[float, float]]:
    """Contrast limits for heatmaps so that equal colours mean equal values where it is fair.

    Maps are compared within a group of the same config, method and target layer (raw values
    of different layers or methods are not on one scale).

    Parameters
    ----------
    maps : sequence of dict
        Heatmap metadata: ``max``, ``probability`` (None for segmentation models), ``config``,
        ``method``, ``layer``.
    scale : str
        One of :data:`SCALES`: ``"shared: largest positive-class map"`` (every map of a group
        on ``(0, the largest maximum among maps whose class probability is at least 0.5)``, so
        that a negative class or case stays faint; the largest map when none is positive),
        ``"shared: largest map"`` (raw values, one scale per group) or
        ``"each map to its own maximum"``.

    Returns
    -------
    list of (low, high)
        One per map, in order; ``high > 0``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, not {scale!r}.")

    def group(meta: dict) -> tuple:
        return meta.get("config"), meta.get("method"), meta.get("layer")

    tops: dict[tuple, float] = {}
    for meta in maps:
        p = meta.get("probability")
        if scale == SCALES[1] or p is None or p >= POSITIVE:
            tops[group(meta)] = max(tops.get(group(meta), 0.0), float(meta.get("max") or 0.0))
    limits = []
    for meta in maps:
        own = float(meta.get("max") or 0.0)
        top = own if scale == SCALES[2] else tops.get(group(meta))
        if top is None:  # no positive class in this group: the largest map
            top = max(float(m.get("max") or 0.0) for m in maps if group(m) == group(meta))
        limits.append((0.0, top if top > 0 else 1.0))
    return limits


def is_foreign(layer: Any) -> bool:
    """True for a layer without medcam3d placement metadata (opened by another reader or made in code)."""
    return (layer.metadata or {}).get("affine") is None


def layer_placement(layer: Any) -> tuple[np.ndarray, dict]:
    """The voxel -> RAS mm affine (4x4) of a layer's data, and its metadata.

    ``metadata["affine"]`` when the layer has one (medcam3d's reader, samples, results); else the
    placement napari gives the layer (``data_to_world``: its scale, translate, rotate, shear and
    affine), whose world axes are taken as R, A, S in mm (:func:`is_foreign` tells; the widget
    warns).
    """
    metadata = dict(layer.metadata or {})
    affine = metadata.get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64), metadata
    ndim = layer.ndim
    if ndim not in (2, 3):
        raise ValueError(f"medcam3d places 2D or 3D layers, not {ndim}D ({layer.name}).")
    origin = np.asarray(layer.data_to_world(np.zeros(ndim)), dtype=np.float64)
    columns = [np.asarray(layer.data_to_world(np.eye(ndim)[axis]), dtype=np.float64) - origin for axis in range(ndim)]
    placement = np.eye(4)
    placement[:ndim, :ndim] = np.stack(columns, axis=1)
    placement[:ndim, 3] = origin
    return placement, metadata
