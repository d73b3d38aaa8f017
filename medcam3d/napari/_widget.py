"""The *Explain* dock widget: class activation maps on the scan's grid, masks from them, honest colour.

Two layers of code:

- pure functions that do the work without Qt and return napari layer data tuples:
  :func:`explain_steps` (a generator: scan + config -> progress steps, then one heatmap layer per
  class and the model's field of view), :func:`explain_image` (the same, run to the end),
  :func:`mask_from_heatmap` (heatmap -> labels layer + bounding box), :func:`segment_from_heatmap`
  (scan + heatmap -> weakly-supervised label map + lesion boxes, :mod:`medcam3d.segment`), :func:`candidate_layers`
  (cached per model and input shape), :func:`colour_limits`, :func:`layer_placement`;
- :class:`ExplainWidget`, a thin magicgui container that runs them in worker threads
  (``napari.qt.threading.thread_worker``, cancellable between steps) and reports errors as napari
  notifications.

Results never overwrite work: every mask is a new Labels layer (so napari's undo history of an
edited mask is never applied to another one), and heatmap names carry the scan, method, target
layer, class and probability (``case_01 · hirescam · class_layers.relu · bright_round (p=0.67)``).
Explaining the same thing again refreshes that heatmap in place; anything else gets its own layer.

All maths goes through the library: :mod:`medcam3d.jobs.runner` (``Runner``, probabilities),
:mod:`medcam3d.preprocess`, :mod:`medcam3d.heatmap`, :mod:`medcam3d.space` (``resample``),
:mod:`medcam3d.masks` and :mod:`medcam3d.segment`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import threading
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton

import medcam3d
from ..space import Space
from ._grid import covers, drawable, napari_affine, refined, resample_labels
from ._lazy import shape_of, source_of
from ._view import AXIS_LABELS, UNITS, VIEWS, apply_display_style, follow_ndisplay, set_view
from ._writer import ascii_text, prefer_medcam3d_writers

__all__ = [
    "ExplainWidget",
    "Step",
    "explain_steps",
    "explain_image",
    "mask_from_heatmap",
    "segment_from_heatmap",
    "candidate_layers",
    "cached_layers",
    "colour_limits",
    "heatmap_colormap",
    "heatmap_name",
    "probability_text",
    "heatmap_layer_kwargs",
    "layer_placement",
    "is_foreign",
    "load_explainable",
    "threshold_problem",
    "set_view",
    "ALL_CLASSES",
    "AUTO",
    "DEMO_CONFIG",
    "SCALES",
]

logger = logging.getLogger(__name__)

ALL_CLASSES = "all classes"
AUTO = "auto"
#: The demo config of a source checkout (preselected in the widget when present).
DEMO_CONFIG = Path(medcam3d.__file__).parent.parent / "configs" / "demo.yaml"
THRESHOLD_METHODS = ("fraction", "percentile", "otsu")
#: Voxel size (mm) a coarse heatmap (on the model's feature grid) is thresholded at (:func:`mask_from_heatmap`).
MASK_CELL_MM = 2.0
# method: (smallest, largest, step, default) of the threshold value
_THRESHOLD_RANGE = {"fraction": (0.01, 1.0, 0.05, 0.5), "percentile": (0.1, 99.9, 0.5, 99.0),
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


# --------------------------------------------------------------------------------------------
# Pure functions (no Qt)
# --------------------------------------------------------------------------------------------


def _stamp(path: Path | None) -> int | None:
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


def _config_key(config_path: str | Path, trust: bool) -> tuple:
    """What identifies a config's network for the listing cache: the file, its version, trust."""
    path = Path(config_path).expanduser().resolve()
    return str(path), _stamp(path), bool(trust)


def load_explainable(config_path: str | Path, *, trust: bool = False):
    """Read a config and its model; the model is cached until the config or weights change.

    Parameters
    ----------
    config_path : path
        A medcam3d YAML config (see ``configs/``).
    trust : bool
        Allow models that execute code (MONAI bundles, TorchScript, classes outside MONAI/torch).

    Returns
    -------
    (Config, nn.Module)

    Raises
    ------
    medcam3d.config.ConfigError, medcam3d.models.ModelLoadError, medcam3d.models.UntrustedModelError
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
        loaded = _MODEL_CACHE[key]
        return loaded.config, loaded.model


# Colours of the alpha-ramped colormaps, one per class (class index modulo their number): at 35 %,
# 65 % and 100 % of the contrast range; transparent black up to 10 % (black adds nothing in 3D).
_CLASS_COLOURS = (
    ("medcam3d heat", [[0.90, 0.10, 0.00], [1.00, 0.50, 0.00], [1.00, 1.00, 0.40]]),
    ("medcam3d ice", [[0.00, 0.45, 0.95], [0.10, 0.75, 1.00], [0.65, 1.00, 1.00]]),
    ("medcam3d green", [[0.10, 0.70, 0.10], [0.35, 0.90, 0.20], [0.85, 1.00, 0.60]]),
    ("medcam3d magenta", [[0.80, 0.10, 0.80], [1.00, 0.40, 1.00], [1.00, 0.80, 1.00]]),
)


def heatmap_colormap(class_index: int = 0):
    """An alpha-ramped colormap for one class: low values leave the scan visible.

    Parameters
    ----------
    class_index : int
        Class 0: dark red -> orange -> light yellow; 1: blue -> cyan; 2: green; 3: magenta; then
        again from red.

    Returns
    -------
    napari.utils.Colormap
        Transparent below 10 % of the contrast range, opaque at the top.
    """
    from napari.utils import Colormap

    name, (low, middle, high) = _CLASS_COLOURS[int(class_index) % len(_CLASS_COLOURS)]
    colors = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [*low, 0.55], [*middle, 0.85], [*high, 1.0]]
    return Colormap(colors=colors, controls=[0.0, 0.1, 0.35, 0.65, 1.0], name=name, interpolation="linear")


def probability_text(p: float) -> str:
    """A probability with two decimals, or as many more as it takes not to round onto 0, 0.5 or 1.

    ``0.67`` -> ``"0.67"``, ``0.496`` -> ``"0.496"`` (not ``0.50``: which side of 0.5 a class lies on is
    what the reader looks for), ``0.997`` -> ``"0.997"``, ``0.5`` -> ``"0.50"``.
    """
    p = float(p)
    if not math.isfinite(p):
        return str(p)
    for decimals in range(2, 7):
        text = f"{p:.{decimals}f}"
        shown = float(text)
        if all((shown == mark) == (p == mark) and (shown >= mark) == (p >= mark) for mark in (0.0, 0.5, 1.0)):
            return text
    return f"{p:.6g}"


def heatmap_name(scan: str, method: str, layer: str, label: str, probability: float | None = None) -> str:
    """``<scan> · <method> · <layer> · <class> (p=0.67)``: what a heatmap layer is called (:func:`probability_text`)."""
    suffix = "" if probability is None else f" (p={probability_text(probability)})"
    return f"{scan} · {method} · {layer} · {label}{suffix}"


def heatmap_layer_kwargs(name: str, affine: Any, class_index: int, top: float, metadata: dict) -> dict:
    """The ``add_image`` arguments of a heatmap layer (what *Explain* makes, and the reader for saved maps).

    Parameters
    ----------
    name : str
        :func:`heatmap_name`.
    affine : (4, 4) array_like
        Voxel -> RAS mm of the map's data.
    class_index : int
        Picks :func:`heatmap_colormap`.
    top : float
        The map's maximum: contrast ``(0, top)`` (``(0, 1)`` when not positive).
    metadata : dict
        ``"medcam3d": "heatmap"`` and the map's provenance (see :func:`explain_steps`).
    """
    return {
        "name": name,
        "affine": napari_affine(np.asarray(affine, dtype=np.float64), 3),
        "colormap": heatmap_colormap(class_index),
        "opacity": 0.6,
        "blending": "translucent",
        "contrast_limits": (0.0, top if top > 0 else 1.0),
        "interpolation2d": "linear",
        "rendering": "mip",
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "metadata": metadata,
    }


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


def _any_listing(config_path: str | Path, trust: bool) -> list[str] | None:
    """The most recent listing for this config on any input shape (layer names rarely depend on it)."""
    key = _config_key(config_path, trust)
    found = [names for (listed, _), names in _LISTINGS.items() if listed == key]
    return list(found[-1]) if found else None


def candidate_layers(data: Any, affine: Any, config_path: str | Path, *, trust: bool = False) -> list[str]:
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

    Returns
    -------
    list of str
    """
    from ..preprocess import build_transforms, preprocess

    config, model = load_explainable(config_path, trust=trust)
    key = _config_key(config_path, trust)
    grid = _grid_key(shape_of(data), affine)
    if (key, grid) not in _INPUT_SHAPES:
        voxels, space = source_of(data) or (data, _space(shape_of(data), affine))  # a lazy scan: its own voxels
        x, _ = preprocess(_model_input(voxels, space), build_transforms(config.preprocessing))
        _INPUT_SHAPES[key, grid] = tuple(int(n) for n in x.shape)
        del x
    return _listing(key, _INPUT_SHAPES[key, grid], model)


@dataclass(frozen=True)
class Step:
    """Progress of :func:`explain_steps`: ``done`` of ``total`` steps finished, ``text`` is under way."""

    done: int
    total: int
    text: str


def _source_voxels(data: Any, shown: Space, metadata: dict) -> tuple[Any, Space, str]:
    """The voxels to explain: the file's own grid for a resampled scan whose file is unchanged."""
    from .. import io
    from ._reader import file_stamp

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
    from ..jobs.runner import Runner, probabilities
    from ..masks import peak
    from ..preprocess import preprocess
    from ._reader import checksum

    source_meta = dict(metadata or {})
    shown = _space(shape_of(data), affine)
    total = 7
    yield Step(0, total, "loading the model")
    config, model = load_explainable(config_path, trust=trust)
    total = 5 + (len(config.class_names or [0, 1]) if target in ("all", None) else 1)
    resampled = bool(source_meta.get("resampled"))
    yield Step(1, total, f"reading {name} on its original grid" if resampled else f"preparing {name}")
    voxels, voxel_space, explained_on = _source_voxels(data, shown, source_meta)
    tensor = _model_input(voxels, voxel_space)
    del voxels
    yield Step(2, total, "preprocessing")
    with _MODEL_LOCK:
        runner = Runner(config, model, methods=[method], target=target, layer=layer, device=device,
                        output_activation=output_activation)
        x, _ = preprocess(tensor, runner.transforms, check_input=runner.input_check)
        del tensor
        input_shape = tuple(int(n) for n in x.shape)
    yield Step(3, total, f"explaining ({method})")
    with _MODEL_LOCK:
        explanation = runner.explain(runner.explainers[0], x[None].to(runner.device))
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
    steps = explain_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


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


def mask_from_heatmap(
    data: Any,
    affine: Any,
    method: str = "fraction",
    value: float = 0.5,
    *,
    keep_largest: bool = True,
    name: str = "heatmap",
    metadata: dict | None = None,
) -> list[tuple]:
    """Threshold a heatmap into a mask, with its 3D bounding box.

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
    list of layer data tuples
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
    from ._reader import checksum

    heat = np.asarray(data, dtype=np.float32)
    space = _space(heat.shape, affine)
    source = dict(metadata or {})
    fine, factor = refined(space, MASK_CELL_MM) if max(space.spacing) > 2 * MASK_CELL_MM else (space, 1)
    if factor > 1:  # a coarse map (the feature grid): thresholded on a finer grid, trilinearly, like the screen
        feature = source.get("feature_map")
        if feature is not None and source.get("feature_affine") is not None and source.get("checksum") == checksum(heat):
            heat = resample(np.asarray(feature, dtype=np.float32), _space(np.shape(feature), source["feature_affine"]),
                            fine, fill=0.0)
        else:
            heat = resample(heat, space, fine, fill=0.0)
        space = fine
    mask = threshold_mask(heat, method, value, keep_largest=keep_largest)
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
    settings : medcam3d.segment.SegmentSettings, optional
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
    from ._reader import checksum

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


def _unique_name(viewer: Any, name: str) -> str:
    if name not in viewer.layers:
        return name
    number = 2
    while f"{name} [{number}]" in viewer.layers:
        number += 1
    return f"{name} [{number}]"


_PROVENANCE = ("medcam3d", "source", "method", "layer", "class_index", "config", "input_shape")


def _add_result(viewer: Any, data: Any, kwargs: dict, kind: str):
    """Add a result layer without touching the user's work.

    A heatmap with the same name and provenance (the same scan, config, method, layer and class)
    is refreshed in place (images have no undo history; the user's display settings stay), the
    same field of view is kept as it is; anything else is a new layer, under a unique name
    (``name [2]``).
    """
    from napari.layers import Image, Layer

    name = kwargs["name"]
    existing = viewer.layers[name] if name in viewer.layers else None
    new_meta = kwargs.get("metadata", {})
    if existing is not None and new_meta.get("medcam3d") == "fov" and \
            all((existing.metadata or {}).get(k) == new_meta.get(k) for k in _PROVENANCE):
        return existing  # the same model's view of the same scan: already outlined
    if kind == "image" and isinstance(existing, Image):
        old, new = existing.metadata or {}, kwargs.get("metadata", {})
        if all(old.get(k) == new.get(k) for k in _PROVENANCE) and existing.data.shape == np.shape(data):
            existing.affine = kwargs["affine"]
            existing.data = data
            existing.metadata = new
            return existing
    kwargs = {**kwargs, "name": _unique_name(viewer, name)}
    layer = viewer.add_layer(Layer.create(data, kwargs, kind))
    if kind == "labels":
        layer.contour = 1  # an outline in 2D: the heatmap and scan stay visible inside
    return layer


def apply_colour_scale(viewer: Any, scale: str = SCALES[0]) -> None:
    """Set the contrast limits of every medcam3d heatmap in ``viewer`` by :func:`colour_limits`."""
    heatmaps = [layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]
    for layer, limits in zip(heatmaps, colour_limits([layer.metadata for layer in heatmaps], scale)):
        layer.contrast_limits = limits


# --------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """An error caught in a worker, reported as a notification instead of a traceback."""

    error: BaseException


def _guarded(function, *args, **kwargs):
    """Run a step generator in a worker: pass its steps on, return its result or a :class:`_Failure`."""
    try:
        result = yield from function(*args, **kwargs)
    except Exception as error:  # reported to the user, the viewer keeps running
        logger.debug("medcam3d worker failed", exc_info=True)
        return _Failure(error)
    return result


def _listing_steps(data, affine, config_path, trust) -> Generator[Step, None, list[str]]:
    yield Step(0, 2, "loading the model")
    load_explainable(config_path, trust=trust)
    yield Step(1, 2, "listing the model's layers")
    return candidate_layers(data, affine, config_path, trust=trust)


# Workers started by any ExplainWidget that have not finished: quit and waited for at exit, so
# that no worker thread outlives the Qt objects it reports to (Qt aborts the process otherwise).
_RUNNING: set = set()


@atexit.register
def _stop_workers() -> None:
    if not _RUNNING:
        return
    for worker in list(_RUNNING):
        worker.quit()
    try:
        from qtpy.QtCore import QThreadPool

        pool = QThreadPool.globalInstance()
        assert pool is not None  # Qt's global pool always exists
        pool.waitForDone(120_000)
    except Exception:  # pragma: no cover - Qt already gone
        logger.debug("could not wait for medcam3d workers", exc_info=True)


def _while_open(callback):
    """Skip a callback once the widget is closed (its Qt objects deleted, or torn down)."""

    @functools.wraps(callback)
    def wrapper(self, *args, **kwargs):
        if self._closed:
            return None
        try:
            return callback(self, *args, **kwargs)
        except RuntimeError as error:
            if "has been deleted" in str(error):
                logger.debug("medcam3d widget closed before its worker finished")
                return None
            raise

    return wrapper


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (ValueError, OSError, LookupError)):  # medcam3d's errors say what was wrong
        return text
    return f"{type(error).__name__}: {text}"


class ExplainWidget(Container):
    """The *Explain* dock widget.

    Pick a scan (image layer), a config (the demo config when present), a method, a target layer,
    a class and the network's output activation (each defaults to the config's ``method``,
    ``layer``, ``target`` and ``output_activation``, as for ``medcam3d explain``; a layer or method
    the model lacks is refused with the command line's error), then *Explain*: the maps are computed in a worker thread (steps shown in the
    progress bar, *Cancel* stops after the current step) and added as one heatmap layer per class
    on the grid the scan is shown on, coloured per class on the chosen colour scale, with the
    model's field of view as an outline when the model does not see the whole scan. *Threshold
    to mask* turns the chosen heatmap into a new labels layer and a box (reported in mm);
    *Segment* segments the chosen heatmap's class from the scan (:func:`segment_from_heatmap`) into
    a new labels layer and lesion boxes. Errors become napari notifications.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Attributes
    ----------
    worker : GeneratorWorker or None
        The last explain worker (its ``finished`` signal ends a run).
    layers_worker : GeneratorWorker or None
        The last worker that listed target layers.
    steps : list of Step
        The steps the last explanation reported so far.
    busy : bool
        True while a worker runs or a refresh is pending.
    """

    def __init__(self, napari_viewer: Any) -> None:
        from qtpy.QtCore import QTimer

        image_layer = ComboBox(label="image", tooltip="The scan to explain.")
        config = FileEdit(label="config", mode=FileDialogMode.EXISTING_FILE, filter="*.yaml *.yml",
                          value=DEMO_CONFIG if DEMO_CONFIG.is_file() else None,
                          tooltip="medcam3d YAML config: model, class names, preprocessing.")
        from ..modeling import OUTPUT_ACTIVATIONS

        method = ComboBox(label="method", choices=list(medcam3d.METHODS), value="hirescam",
                          tooltip="Default: the config's method.")
        target_layer = ComboBox(label="target layer", choices=[AUTO],
                                tooltip="Default: the config's layer. 'auto': the last layer with a spatial output.")
        target_class = ComboBox(label="class", choices=[ALL_CLASSES], tooltip="Default: the config's target.")
        output_activation = ComboBox(label="output activation", choices=list(OUTPUT_ACTIVATIONS), value="auto",
                                     tooltip="What the network applies to its logits (default: the config's "
                                             "output_activation; auto detects a trailing Softmax/Sigmoid).")
        trust = CheckBox(text="trust model code (bundles, TorchScript)", value=False)
        scale = ComboBox(label="colour scale", choices=list(SCALES), value=SCALES[0],
                         tooltip="Shared scales make a faint map mean a weak map: compare classes and cases.")
        run_button = PushButton(text="Explain")
        cancel_button = PushButton(text="Cancel", enabled=False, tooltip="Stop after the current step.")
        buttons = Container(widgets=[run_button, cancel_button], layout="horizontal", labels=False)
        progress = ProgressBar(min=0, max=1, value=0, visible=False, label="")
        status = Label(value="")
        heatmap = ComboBox(label="heatmap")
        threshold_method = ComboBox(label="threshold", choices=list(THRESHOLD_METHODS), value="fraction")
        low, high, step, default = _THRESHOLD_RANGE["fraction"]
        threshold_value = FloatSpinBox(label="value", value=default, min=low, max=high, step=step,
                                       tooltip="fraction of the maximum (0-1] or percentile (0-100)")
        keep_largest = CheckBox(text="largest component only", value=True)
        mask_button = PushButton(text="Threshold to mask")
        segment_button = PushButton(text="Segment", tooltip="Seed, expand, constrain (medcam3d.segment): the chosen "
                                                            "heatmap's class segmented from the scan, with lesion boxes.")
        mask_row = Container(widgets=[mask_button, segment_button], layout="horizontal", labels=False)
        box = Label(value="")
        views = [PushButton(text=plane.capitalize(), name=plane) for plane in VIEWS]
        view_row = Container(widgets=views, layout="horizontal", label="view", labels=False)
        super().__init__(widgets=[
            image_layer, config, method, target_layer, target_class, output_activation, trust, scale, buttons,
            progress, status,
            Label(value="Threshold a heatmap into a mask:"), heatmap, threshold_method, threshold_value,
            keep_largest, mask_row, box, view_row,
        ])
        self._viewer = napari_viewer
        self._closed = False
        self.worker = None  # the last explain worker
        self.layers_worker = None
        self.steps: list[Step] = []
        self._active: list = []  # started workers that have not finished yet
        self._status_token = 0  # bumped by each user change; late results do not overwrite newer status
        self._run_token = -1  # the status token of the last explanation
        self._warned: weakref.WeakSet = weakref.WeakSet()  # foreign layers already warned about
        self.image_layer, self.config, self.method = image_layer, config, method
        self.target_layer, self.target_class, self.trust, self.scale = target_layer, target_class, trust, scale
        self.output_activation = output_activation
        self.run_button, self.cancel_button, self.progress, self.status = run_button, cancel_button, progress, status
        self.heatmap, self.threshold_method, self.threshold_value = heatmap, threshold_method, threshold_value
        self.keep_largest, self.mask_button, self.segment_button, self.box = keep_largest, mask_button, segment_button, box
        for label in (status, box):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        # Choices are callables so that reset_choices() (napari calls it on layer events) keeps them.
        self._classes: list[str] = [ALL_CLASSES]
        self._layers: list[str] = [AUTO]
        # The config's defaults (medcam3d explain's): a method or layer the model lacks is offered as
        # it is, so that Explain refuses it as the command line does; targets that are no class name.
        self._methods: list[str] = list(medcam3d.METHODS)
        self._config_layer = AUTO
        self._targets: dict[str, object] = {}
        self.image_layer.choices = self._scan_choices
        self.method.choices = self._method_choices
        self.heatmap.choices = self._heatmap_choices
        self.target_class.choices = self._class_choices
        self.target_layer.choices = self._layer_choices
        # Listing target layers waits for the event loop: a burst of layer events (opening
        # several files, or the viewer removing every layer while it closes) starts nothing.
        self._refresh_timer = QTimer(self.native)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self._refresh_target_layers)
        self.config.changed.connect(self._on_config_changed)
        self.image_layer.changed.connect(self._schedule_refresh)
        self.trust.changed.connect(self._schedule_refresh)
        self.scale.changed.connect(self._on_scale_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.mask_button.changed.connect(self.make_mask)
        self.segment_button.changed.connect(self.make_segmentation)
        self.threshold_method.changed.connect(self._on_threshold_method)
        for button in views:
            button.changed.connect(lambda _=None, plane=button.name: set_view(self._viewer, plane))
        events = napari_viewer.layers.events
        self._connections = [(event, self._on_layers_changed) for event in (events.inserted, events.removed,
                                                                           events.reordered)]
        for event, handler in self._connections:
            event.connect(handler)
        self.native.destroyed.connect(functools.partial(ExplainWidget._teardown, weakref.ref(self)))
        follow_ndisplay(napari_viewer)
        prefer_medcam3d_writers()
        self._on_config_changed(notify=False)

    # ---------------------------------------------------------------- teardown
    @staticmethod
    def _teardown(ref, *_args) -> None:
        """The Qt widget is gone: disconnect from the viewer and ask running workers to stop."""
        self = ref()
        if self is None:
            return
        self.close_workers(wait_ms=0)

    def close_workers(self, wait_ms: int = 0) -> None:
        """Stop reacting to the viewer, ask this widget's workers to quit, and wait up to ``wait_ms``.

        Called when the widget's Qt object is destroyed (the viewer closing); scripts may call it
        before ``viewer.close()``.
        """
        self._closed = True
        for event, handler in self._connections:
            try:
                event.disconnect(handler)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._connections = []
        for worker in list(self._active):
            worker.quit()
        if wait_ms > 0:
            from qtpy.QtCore import QThreadPool

            pool = QThreadPool.globalInstance()
            assert pool is not None  # Qt's global pool always exists
            pool.waitForDone(wait_ms)

    # ---------------------------------------------------------------- choices
    def _scan_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        images = [layer for layer in self._viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        scans = [layer for layer in images if (layer.metadata or {}).get("medcam3d") != "heatmap"]
        return [(layer.name, layer) for layer in scans]

    def _class_choices(self, _widget=None) -> list[str]:
        return self._classes

    def _method_choices(self, _widget=None) -> list[str]:
        return self._methods

    def _layer_choices(self, _widget=None) -> list[str]:
        return self._layers

    def _heatmap_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and (layer.metadata or {}).get("medcam3d") == "heatmap"]

    @_while_open
    def _on_layers_changed(self, _event=None) -> None:
        self.reset_choices()  # a changed scan choice schedules the listing (image_layer.changed)

    @_while_open
    def _schedule_refresh(self, _value=None) -> None:
        self._refresh_timer.start()

    def _config_path(self) -> Path | None:
        value = self.config.value
        if value is None or str(value) in ("", "."):
            return None
        path = Path(cast(Path, value))  # one file: the widget's mode is EXISTING_FILE
        return None if path.is_dir() else path

    def _set_status(self, text: str, token: int | None = None) -> None:
        """Show ``text`` unless it answers an older request than the current status (``token``)."""
        if token is None or token == self._status_token:
            self.status.value = text[:300]

    @_while_open
    def _on_config_changed(self, _value=None, *, notify: bool = True) -> None:
        from napari.utils.notifications import show_error

        from ..config import load_config

        self._status_token += 1
        names: list[str] = []
        config = None
        path = self._config_path()
        if path is None:
            self._set_status("choose a config file (a .yaml with the model, e.g. configs/demo.yaml)")
        else:
            try:
                config = load_config(path)
                names = list(config.class_names or [])
                self._set_status("")
            except Exception as error:
                text = f"medcam3d: {_message(error)}"
                self._set_status(text)
                if notify:
                    show_error(text)
        self._targets = {}
        target = self._target_choice("all" if config is None else config.target, names)
        self._classes = [ALL_CLASSES, *names, *self._targets]
        self.target_class.reset_choices()
        self.target_class.value = target
        if config is not None:  # the config's defaults, as medcam3d explain takes them
            self._methods = list(medcam3d.METHODS) + ([config.method] if config.method not in medcam3d.METHODS else [])
            self.method.reset_choices()
            self.method.value = config.method
            self.output_activation.value = config.output_activation
            self._config_layer = config.layer
            self._layers = self._base_layers()
            self.target_layer.reset_choices()
            self.target_layer.value = config.layer
        self._schedule_refresh()

    def _target_choice(self, target: object, names: list[str]) -> str:
        """The class choice showing a config's ``target``; one that is no class name is added to
        :attr:`_targets` as it is (``predicted``, a list, an unknown class), for Explain to take or refuse."""
        if target in ("all", None):
            return ALL_CLASSES
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(names):
            return names[target]
        if isinstance(target, str) and target in names:
            return target
        text = ", ".join(map(str, target)) if isinstance(target, list) else str(target)
        self._targets[text] = target
        return text

    def _base_layers(self) -> list[str]:
        """``auto`` and the config's layer: the choices before the model's layers are listed."""
        return [AUTO] + ([self._config_layer] if self._config_layer != AUTO else [])

    def _placement(self, layer) -> tuple[np.ndarray, dict]:
        """:func:`layer_placement`, with a warning (once per layer) for layers from elsewhere."""
        from napari.utils.notifications import show_warning

        affine, metadata = layer_placement(layer)
        if is_foreign(layer) and layer not in self._warned:
            self._warned.add(layer)
            show_warning(f"medcam3d: {layer.name} was not opened by the medcam3d reader; its napari placement "
                         "(scale, translate, rotate, shear, affine) is used, with world axes taken as R, A, S in mm. "
                         "Open the file with the medcam3d reader for its true scanner placement.")
        return affine, metadata

    @_while_open
    def _refresh_target_layers(self, _value=None) -> None:
        from napari.qt.threading import thread_worker

        layer, path = self.image_layer.value, self._config_path()
        current = self.target_layer.value
        self._layers = self._base_layers()
        self.target_layer.reset_choices()
        if current in self._layers:
            self.target_layer.value = current
        if layer is None or path is None or self._closed:
            return
        affine = layer_placement(layer)[0]
        trust = self.trust.value
        names = cached_layers(layer.data.shape, affine, path, trust=trust) or _any_listing(path, trust)
        if names is not None:  # listed before (for this grid, or this model on another input size)
            self._show_layers(names, current)
            return
        worker = thread_worker(_guarded, start_thread=False)(_listing_steps, layer.data, affine, path, trust)
        request, token = (layer, path), self._status_token
        worker.returned.connect(lambda result: self._on_listed(result, request, token))
        self.layers_worker = worker
        self._start(worker)

    @_while_open
    def _on_listed(self, result, request: tuple, token: int) -> None:
        if (self.image_layer.value, self._config_path()) != request:
            return  # stale: the user changed the scan or config meanwhile
        if isinstance(result, _Failure):
            self._set_status(f"cannot list layers: {_message(result.error)}", token)
            return
        self._show_layers(result, self.target_layer.value)

    def _show_layers(self, names: list[str], current: str) -> None:
        self._layers = [AUTO, *names, *[name for name in self._base_layers()[1:] if name not in names]]
        self.target_layer.reset_choices()
        self.target_layer.value = current if current in self._layers else AUTO

    def _on_threshold_method(self, method: str) -> None:
        low, high, step, default = _THRESHOLD_RANGE[method]
        self.threshold_value.range = (low, high)
        self.threshold_value.step = step
        self.threshold_value.value = default
        self.threshold_value.enabled = method != "otsu"

    @_while_open
    def _on_scale_changed(self, _value=None) -> None:
        apply_colour_scale(self._viewer, self.scale.value)

    # ---------------------------------------------------------------- explain
    def run(self, _value=None):
        """Explain the chosen scan in a worker thread; returns the worker (None on bad input)."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        layer, path = self.image_layer.value, self._config_path()
        if layer is None:
            show_error("medcam3d: no 3D image layer to explain; open a scan first "
                       "(File > Open, or File > Open Sample).")
            return None
        if path is None:
            show_error("medcam3d: choose a config file (a .yaml with the model, e.g. configs/demo.yaml).")
            return None
        affine, metadata = self._placement(layer)
        choice = self.target_class.value
        target = "all" if choice == ALL_CLASSES else self._targets.get(choice, choice)
        worker = thread_worker(_guarded, start_thread=False)(
            explain_steps, layer.data, affine, path, method=self.method.value, layer=self.target_layer.value,
            target=target, name=layer.name, metadata=metadata, trust=self.trust.value, device="auto",
            output_activation=self.output_activation.value,
        )
        self._status_token += 1
        token = self._run_token = self._status_token
        worker.yielded.connect(self._on_step)
        request = (tuple(layer.data.shape), affine, path, self.trust.value)
        worker.returned.connect(lambda result: self._on_explained(result, layer.name, token, request))
        worker.aborted.connect(lambda: self._on_cancelled(layer.name, token))
        worker.finished.connect(self._on_finished)
        self.steps = []
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value, self.progress.visible = 1, 0, True
        self._set_status(f"explaining {layer.name} with {self.method.value}...")
        self.worker = worker
        self._start(worker)
        return worker

    def cancel(self, _value=None) -> None:
        """Ask the running explanation to stop after its current step (``worker.quit()``)."""
        if self.worker is not None and self.worker in self._active:
            self.worker.quit()
            self.cancel_button.enabled = False
            self._set_status("cancelling after the current step...")

    def _start(self, worker) -> None:
        self._active.append(worker)
        _RUNNING.add(worker)

        def forget() -> None:
            _RUNNING.discard(worker)
            if worker in self._active:
                self._active.remove(worker)

        worker.finished.connect(forget)
        worker.start()

    @property
    def busy(self) -> bool:
        """True while an explanation or a layer listing runs, or a listing is about to start."""
        try:
            pending = self._refresh_timer.isActive()
        except RuntimeError:  # the Qt timer was deleted with the widget
            pending = False
        return bool(self._active) or pending

    @_while_open
    def _on_step(self, step: Step) -> None:
        self.steps.append(step)
        self.progress.max = max(step.total, 1)
        self.progress.value = min(step.done, step.total)
        self.progress.label = step.text
        if self.cancel_button.enabled:
            self._set_status(f"step {step.done + 1}/{step.total}: {step.text}", self._run_token)

    @_while_open
    def _on_finished(self) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress.visible = False

    @_while_open
    def _on_cancelled(self, name: str, token: int) -> None:
        self._set_status(f"cancelled: {name} was not explained", token)

    @_while_open
    def _on_explained(self, result, name: str, token: int, request: tuple) -> None:
        from napari.utils.notifications import show_error

        if isinstance(result, _Failure):
            text = f"medcam3d could not explain {name}: {_message(result.error)}"
            self._set_status(text, token)
            show_error(text)
            return
        added = [_add_result(self._viewer, *item) for item in result]
        heatmaps = [layer for layer in added if layer.metadata.get("medcam3d") == "heatmap"]
        apply_colour_scale(self._viewer, self.scale.value)
        apply_display_style(self._viewer)
        self.reset_choices()
        if heatmaps:
            self.heatmap.value = heatmaps[0]
        shape, affine, path, trust = request
        listed = cached_layers(shape, affine, path, trust=trust)  # the explanation listed them on its input
        if listed is not None and self.image_layer.value is not None and \
                tuple(self.image_layer.value.data.shape) == shape and self._config_path() == path:
            self._show_layers(listed, self.target_layer.value)
        parts = []
        for layer in heatmaps:
            meta = layer.metadata
            p = meta.get("probability")
            peak = "no peak (flat map)" if meta["peak_mm"] is None else \
                "peak (" + ", ".join(f"{v:.0f}" for v in meta["peak_mm"]) + ") mm"
            probability = "" if p is None else f"p={probability_text(p)}, "
            parts.append(f"{meta['class']}: {probability}{peak}")
        where = "" if not heatmaps or heatmaps[0].metadata.get("fov_covers_scan") else \
            "; outline: the model's field of view (no map outside it)"
        self._set_status(f"layer {heatmaps[0].metadata['layer'] if heatmaps else '?'}; " + "; ".join(parts) + where,
                         token)

    # ---------------------------------------------------------------- mask
    def make_mask(self, _value=None) -> list:
        """Threshold the chosen heatmap into a new labels layer (and its box); returns the new layers."""
        from napari.utils.notifications import show_error

        heat = self.heatmap.value
        if heat is None:
            self.box.value = ""
            show_error("medcam3d: no heatmap layer to threshold; run Explain first.")
            return []
        method, value = self.threshold_method.value, float(self.threshold_value.value)
        try:
            affine, metadata = layer_placement(heat)
            result = mask_from_heatmap(heat.data, affine, method, value, keep_largest=self.keep_largest.value,
                                       name=heat.name, metadata=metadata)
        except Exception as error:
            self.box.value = ""  # no stale box from an earlier threshold
            show_error(f"medcam3d: cannot threshold {heat.name}: {_message(error)}")
            return []
        added = [_add_result(self._viewer, *item) for item in result]
        box = result[0][1]["metadata"]["box"]
        if box is None:
            self.box.value = f"{added[0].name}: empty (no voxel above the threshold)"
        else:
            size = " x ".join(f"{v:.1f}" for v in box["size_mm"])
            centre = ", ".join(f"{v:.1f}" for v in box["centre_mm"])
            self.box.value = f"{added[0].name}: box {size} mm, centre ({centre}) mm RAS, {box['voxels']} voxels"
        return added

    # ---------------------------------------------------------------- segment
    def make_segmentation(self, _value=None) -> list:
        """Segment the chosen heatmap's class from the chosen scan (:func:`segment_from_heatmap`) into a new
        labels layer on the scan's grid, with a shapes layer of the lesion boxes; returns the new layers."""
        from napari.utils.notifications import show_error

        heat, scan = self.heatmap.value, self.image_layer.value
        if heat is None or scan is None:
            self.box.value = ""
            show_error("medcam3d: no heatmap layer to segment from; run Explain first." if heat is None else
                       "medcam3d: no 3D image layer to segment; open a scan first.")
            return []
        try:
            scan_affine, scan_metadata = self._placement(scan)
            affine, metadata = layer_placement(heat)
            result = segment_from_heatmap(scan.data, scan_affine, heat.data, affine, scan_name=scan.name,
                                          name=heat.name, metadata=metadata, scan_metadata=scan_metadata)
        except Exception as error:
            logger.debug("medcam3d segmentation failed", exc_info=True)
            self.box.value = ""  # no stale report from an earlier mask
            show_error(f"medcam3d: cannot segment {scan.name} from {heat.name}: {_message(error)}")
            return []
        added = [_add_result(self._viewer, *item) for item in result]
        lesions = result[0][1]["metadata"]["lesions"]
        if not lesions:
            self.box.value = f"{added[0].name}: no lesion found"
        else:
            boxes = "; ".join(" x ".join(f"{v:.1f}" for v in lesion["box"]["size_mm"]) + " mm, centre (" +
                              ", ".join(f"{v:.1f}" for v in lesion["box"]["centre_mm"]) + ") mm RAS" for lesion in lesions)
            self.box.value = f"{added[0].name}: {len(lesions)} lesion(s): {boxes}"
        return added
