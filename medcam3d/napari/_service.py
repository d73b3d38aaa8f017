"""The *Explain* service: everything the dock widget does that needs no Qt.

Pure functions (no Qt; napari only for colormaps) that return napari layer data tuples, run by
:class:`._widget.ExplainWidget` in worker threads, and usable from scripts:

- the **model cache**: :func:`load_configured_model` (a config's model read by
  :func:`medcam3d.models.load_configured`, as the CLI and :meth:`medcam3d.Explainer.from_config`
  read it, kept until the config or weights change), :func:`candidate_layers`/:func:`cached_layers`
  (the model's target layers, listed once per model and input shape);
- :func:`model_input`: a scan preprocessed as the CLI preprocesses it (the config's list, or a
  MONAI bundle's own chain on the scan's file, :func:`medcam3d.jobs.case_loading.load_case`'s rule);
- **explain steps**: :func:`explain_steps` (a generator: scan + config -> progress
  :class:`._shared.Step` s, then one heatmap layer per class and the model's field of view) and
  :func:`explain_image` (the same, run to the end);
- **masks and segment steps**: :func:`mask_steps`/:func:`mask_from_heatmap` (heatmap -> labels layer + bounding
  box),
  :func:`segment_steps`/:func:`segment_from_heatmap` (scan + heatmap -> weakly-supervised label
  map + lesion boxes, :mod:`medcam3d.segment`);
- :func:`colour_limits`, :func:`threshold_problem`, :func:`layer_placement`, :func:`is_foreign`.

Heatmap names carry the scan, method, target layer, class and probability
(``case_01 · hirescam · class_layers.relu · bright_round (p=0.67)``, :func:`._shared.heatmap_name`).
All maths goes through the library: :mod:`medcam3d.jobs.runner` (``Runner``, probabilities),
:mod:`medcam3d.preprocess`, :mod:`medcam3d.heatmap`, :mod:`medcam3d.space` (``resample``),
:mod:`medcam3d.masks` and :mod:`medcam3d.segment`.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space
from ._grid import covers, drawable, napari_affine, refined, resample_labels
from ._lazy import shape_of, source_of
from ._shared import Step, ascii_text, run_steps, checksum, file_stamp, heatmap_layer_kwargs, heatmap_name
from ._view import AXIS_LABELS, UNITS

__all__ = [
    "Step",
    "load_configured_model",
    "load_explainable",
    "model_input",
    "explain_steps",
    "explain_image",
    "listing_steps",
    "mask_from_heatmap",
    "mask_steps",
    "segment_steps",
    "segment_from_heatmap",
    "candidate_layers",
    "cached_layers",
    "any_listing",
    "colour_limits",
    "layer_placement",
    "is_foreign",
    "threshold_problem",
    "ALL_CLASSES",
    "AUTO",
    "SCALES",
    "THRESHOLD_METHODS",
    "THRESHOLD_RANGE",
    "POSITIVE",
    "MASK_CELL_MM",
    "SEGMENT_COLOUR",
]

ALL_CLASSES = "all classes"
AUTO = "auto"
THRESHOLD_METHODS = ("fraction", "percentile", "otsu")
#: Voxel size (mm) a coarse heatmap (on the model's feature grid) is thresholded at (:func:`mask_from_heatmap`).
MASK_CELL_MM = 2.0
# method: (smallest, largest, step, default) of the threshold value
THRESHOLD_RANGE = {"fraction": (0.01, 1.0, 0.05, 0.5), "percentile": (0.1, 99.9, 0.5, 99.0),
                    "otsu": (0.01, 1.0, 0.05, 0.5)}
#: Colour scales of the heatmaps (the first is the default).
SCALES = ("shared: largest positive-class map", "shared: largest map", "each map to its own maximum")
#: A class counts as positive (for the shared colour scale) from this probability.
POSITIVE = 0.5

# One model use at a time: explaining and probing layers both hook the (cached) model.
_MODEL_LOCK = threading.RLock()
_MODEL_CACHE: dict[tuple, Any] = {}
# Target-layer listings: (config key, model input shape) -> layer names; and which input shape a
# scan grid gives: (config key, scan grid key) -> input shape.
_LISTINGS: dict[tuple, list[str]] = {}
_INPUT_SHAPES: dict[tuple, tuple[int, ...]] = {}



def _stamp(path: Path | None) -> int | None:
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


def _config_key(config_path: str | Path, trust: bool) -> tuple:
    """What identifies a config's network for the listing cache: the file, its version, trust."""
    path = Path(config_path).expanduser().resolve()
    return str(path), _stamp(path), bool(trust)


def load_configured_model(config_path: str | Path, *, trust: bool = False):
    """A config and its model as :func:`medcam3d.models.load_configured` reads them (the CLI's loader).

    Cached until the config or its weights change (one model in memory).

    Parameters
    ----------
    config_path : path
        A medcam3d YAML config (see ``configs/``).
    trust : bool
        Allow models that execute code (MONAI bundles, TorchScript, classes outside MONAI/torch).

    Returns
    -------
    medcam3d.models.ConfiguredModel
        ``config`` (with a bundle's class names), ``model``, and ``preprocessing``: a MONAI
        bundle's own chain when the config gives no ``preprocessing`` list (else None).

    Raises
    ------
    medcam3d.errors.ConfigError, medcam3d.errors.ModelLoadError, medcam3d.errors.UntrustedModelError
    """
    from ..config import load_config
    from ..models import load_configured

    path = Path(config_path).expanduser().resolve()
    config = load_config(path)
    spec = config.model
    source = spec.weights or spec.bundle or spec.torchscript
    key = (str(path), _stamp(path), None if source is None else str(source), _stamp(source), bool(trust))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # keep one model in memory
            _MODEL_CACHE[key] = load_configured(config, trust=trust)
        return _MODEL_CACHE[key]


def load_explainable(config_path: str | Path, *, trust: bool = False):
    """``(config, model)`` of :func:`load_configured_model` (same parameters and errors)."""
    loaded = load_configured_model(config_path, trust=trust)
    return loaded.config, loaded.model


def _space(shape: Sequence[int], affine: Any) -> Space:
    if len(shape) != 3:
        raise ValueError(f"medcam3d explains 3D scans; this layer has shape {tuple(shape)} ({len(shape)}D).")
    return Space(tuple(shape), np.asarray(affine, dtype=np.float64))


def _grid_key(shape: Sequence[int], affine: Any) -> tuple:
    return tuple(int(n) for n in shape), tuple(np.round(np.asarray(affine, dtype=np.float64), 4).ravel().tolist())


def _model_input(data: Any, space: Space):
    """A float32 channel-first MetaTensor of ``data`` (one copy) for :func:`medcam3d.preprocess.preprocess`."""
    import torch
    from monai.data import MetaTensor

    voxels = torch.from_numpy(np.array(data, dtype=np.float32, order="C"))
    return MetaTensor(voxels[None], affine=torch.as_tensor(np.array(space.affine)))


def model_input(configured: Any, voxels: Any, space: Space, *, path: str | Path | None = None, trust: bool = False,
                check_input: Any = None):
    """A scan preprocessed for the model as the CLI preprocesses it (:func:`medcam3d.jobs.case_loading.load_case`).

    The config's ``preprocessing`` list (built with ``trust`` and named by the config file in
    errors), or, for a MONAI bundle whose config gives none, the bundle's own chain
    (``configured.preprocessing``, as :meth:`medcam3d.Explainer.preprocess` uses it), which reads
    the scan's file itself.

    Parameters
    ----------
    configured : medcam3d.models.ConfiguredModel
        :func:`load_configured_model`.
    voxels : (I, J, K) array_like
        The scan's voxels on ``space``.
    space : Space
    path : path, optional
        The scan's file, unchanged since it was read (needed by a bundle's own chain).
    trust : bool
    check_input : callable, optional
        Refuses an input shape before the preprocessing makes it (:attr:`medcam3d.jobs.runner.Runner.input_check`).

    Returns
    -------
    MetaTensor
        ``(C, *input_shape)``.

    Raises
    ------
    medcam3d.errors.InputError
        A bundle's own chain without a file to read.
    """
    from ..preprocess import build_transforms, preprocess

    config = configured.config
    if configured.preprocessing is not None:  # a MONAI bundle's own chain reads the file, as the CLI does
        if path is None:
            from ..errors import InputError

            raise InputError("this model is a MONAI bundle whose own preprocessing reads the scan's file, and this layer "
                             "has none (or its file changed since it was opened): open the file with the medcam3d reader, "
                             "or give the config a preprocessing list.")
        x, _ = configured.preprocessing(path, trust=trust)
        return x
    transforms = build_transforms(config.preprocessing, trust=trust, source=config.source)
    x, _ = preprocess(_model_input(voxels, space), transforms, check_input=check_input)
    return x


def _scan_file(metadata: dict) -> str | None:
    """The scan's file when the layer shows it unchanged and whole (a bundle's own chain reads it), else None."""
    path = metadata.get("path")
    if not path or metadata.get("volume") is not None or metadata.get("medcam3d") not in (None, "scan"):
        return None
    stamp = metadata.get("stamp")
    if stamp is not None and file_stamp(path) != tuple(stamp):
        return None
    return str(path) if Path(path).is_file() else None


def _listing(key: tuple, input_shape: tuple[int, ...], model) -> list[str]:
    from ..layers import list_layers

    if (key, input_shape) not in _LISTINGS:
        with _MODEL_LOCK:
            _LISTINGS[key, input_shape] = [info.name for info in list_layers(model, input_shape)]
    return list(_LISTINGS[key, input_shape])


def cached_layers(shape: Sequence[int], affine: Any, config_path: str | Path, *, trust: bool = False) -> list[str] | None:
    """The target-layer names already listed for a scan grid and config, without any work (or None).

    Parameters
    ----------
    shape : (3,) ints
        The scan layer's data shape.
    affine : (4, 4) array_like
    config_path : path
    trust : bool

    Returns
    -------
    list of str or None
        None when neither an explanation nor :func:`candidate_layers` has run on that grid yet.
    """
    key = _config_key(config_path, trust)
    input_shape = _INPUT_SHAPES.get((key, _grid_key(shape, affine)))
    return None if input_shape is None else list(_LISTINGS.get((key, input_shape), [])) or None


def any_listing(config_path: str | Path, trust: bool) -> list[str] | None:
    """The most recent listing for this config on any input shape (layer names rarely depend on it)."""
    key = _config_key(config_path, trust)
    found = [names for (listed, _), names in _LISTINGS.items() if listed == key]
    return list(found[-1]) if found else None


def candidate_layers(data: Any, affine: Any, config_path: str | Path, *, trust: bool = False,
                     metadata: dict | None = None) -> list[str]:
    """Names of the model's candidate target layers for this scan (the last is what "auto" picks).

    The scan is preprocessed once per grid (shape and affine) to learn the model's input shape;
    the listing is cached per (model, input shape).

    Parameters
    ----------
    data : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data``.
    config_path : path
    trust : bool
    metadata : dict, optional
        The scan layer's metadata (its file, for a MONAI bundle's own preprocessing).

    Returns
    -------
    list of str
    """
    configured = load_configured_model(config_path, trust=trust)
    key = _config_key(config_path, trust)
    grid = _grid_key(shape_of(data), affine)
    if (key, grid) not in _INPUT_SHAPES:
        voxels, space = source_of(data) or (data, _space(shape_of(data), affine))  # a lazy scan: its own voxels
        x = model_input(configured, voxels, space, path=_scan_file(metadata or {}), trust=trust)
        _INPUT_SHAPES[key, grid] = tuple(int(n) for n in x.shape)
        del x
    return _listing(key, _INPUT_SHAPES[key, grid], configured.model)



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
        and ``checksum`` for the writer); then, when the model's input does not cover the whole
        scan, a ``"labels"`` layer of the model's field of view (its input grid, 1 inside, drawn
        as an outline).
    """
    from ..heatmap import heatmaps_of, input_space_of
    from ..jobs.runner import Runner
    from ..targets import probabilities
    from ..masks import peak
    source_meta = dict(metadata or {})
    shown = _space(shape_of(data), affine)
    total = 7
    yield Step(0, total, "loading the model")
    configured = load_configured_model(config_path, trust=trust)
    config, model = configured.config, configured.model
    total = 5 + (len(config.class_names or [0, 1]) if target in ("all", None) else 1)
    resampled = bool(source_meta.get("resampled"))
    yield Step(1, total, f"reading {name} on its original grid" if resampled else f"preparing {name}")
    voxels, voxel_space, explained_on = _source_voxels(data, shown, source_meta)
    yield Step(2, total, "preprocessing")
    with _MODEL_LOCK:
        runner = Runner(config, model, methods=[method], target=target, layer=layer, device=device, trust=trust,
                        reader=configured.preprocessing, output_activation=output_activation)
        x = model_input(configured, voxels, voxel_space, path=_scan_file(source_meta), trust=trust,
                        check_input=runner.input_check)
        del voxels
        input_shape = tuple(int(n) for n in x.shape)
    yield Step(3, total, f"explaining ({method})")
    with _MODEL_LOCK:
        explanation = runner.explain_method(0, x[None].to(runner.device))  # a fold ensemble: the folds' mean
        del x
        key = _config_key(config_path, trust)
        _INPUT_SHAPES[key, _grid_key(shown.shape, shown.affine)] = input_shape
        _listing(key, input_shape, model)
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
    space = _space(heat.shape, affine)
    source = dict(metadata or {})
    fine, factor = refined(space, MASK_CELL_MM) if max(space.spacing) > 2 * MASK_CELL_MM else (space, 1)
    yield Step(1, total, f"refining {name} onto {MASK_CELL_MM:g} mm voxels")
    if factor > 1:  # a coarse map (the feature grid): thresholded on a finer grid, trilinearly, like the screen
        feature = source.get("feature_map")
        if feature is not None and source.get("feature_affine") is not None and source.get("checksum") == checksum(heat):
            heat = resample(np.asarray(feature, dtype=np.float32), _space(np.shape(feature), source["feature_affine"]),
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
    space = _space(image.shape, scan_affine) if lazy is None else lazy[1]
    shown = _space(shape_of(scan), scan_affine)
    index = int(source.get("class_index") or 0)
    label = str(source.get("class") or name)
    method, layer = str(source.get("method") or "map"), str(source.get("layer") or "")
    feature = source.get("feature_map")
    if feature is not None and source.get("feature_affine") is not None and source.get("checksum") == checksum(heat):
        grid = _space(np.shape(feature), source["feature_affine"])
        heat = np.asarray(feature, dtype=np.float32)
    else:
        grid = _space(heat.shape, affine)
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


def listing_steps(data: Any, affine: Any, config_path: str | Path, trust: bool = False,
                  metadata: dict | None = None) -> Generator[Step, None, list[str]]:
    """Load the model, then list its candidate target layers for this scan (:func:`candidate_layers`), in steps."""
    yield Step(0, 2, "loading the model")
    load_configured_model(config_path, trust=trust)
    yield Step(1, 2, "listing the model's layers")
    return candidate_layers(data, affine, config_path, trust=trust, metadata=metadata)
