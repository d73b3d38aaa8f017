"""The *Explain* dock widget: class activation maps on the scan's own grid, and masks from them.

Two layers of code:

- pure functions that do the work without Qt and return napari layer data tuples:
  :func:`explain_image` (scan + config -> one heatmap layer per class), :func:`mask_from_heatmap`
  (heatmap -> labels layer + bounding box), :func:`candidate_layers`, :func:`set_view`;
- :class:`ExplainWidget`, a thin magicgui container that runs them in a worker thread
  (``napari.qt.threading.thread_worker``) and reports errors as napari notifications.

All maths goes through the library (:mod:`medcam3d.pipeline`, :mod:`medcam3d.masks`).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton

import medcam3d
from ..space import Space
from ._reader import napari_affine

__all__ = [
    "ExplainWidget",
    "explain_image",
    "mask_from_heatmap",
    "candidate_layers",
    "heatmap_colormap",
    "layer_placement",
    "load_explainable",
    "set_view",
    "ALL_CLASSES",
    "AUTO",
    "DEMO_CONFIG",
]

logger = logging.getLogger(__name__)

ALL_CLASSES = "all classes"
AUTO = "auto"
#: The demo config of a source checkout (preselected in the widget when present).
DEMO_CONFIG = Path(medcam3d.__file__).parent.parent / "configs" / "demo.yaml"
THRESHOLD_METHODS = ("fraction", "percentile", "otsu")
_DEFAULT_THRESHOLD = {"fraction": 0.5, "percentile": 99.0, "otsu": 0.5}

# One model use at a time: explaining and probing layers both hook the (cached) model.
_MODEL_LOCK = threading.RLock()
_MODEL_CACHE: dict[tuple, Any] = {}


# --------------------------------------------------------------------------------------------
# Pure functions (no Qt)
# --------------------------------------------------------------------------------------------


def _stamp(path: Path | None) -> int | None:
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


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
    from ..models import load_model

    path = Path(config_path).expanduser().resolve()
    config = load_config(path)
    spec = config.model
    source = spec.weights or spec.bundle or spec.torchscript
    key = (str(path), _stamp(path), None if source is None else str(source), _stamp(source), bool(trust))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # keep one model in memory
            _MODEL_CACHE[key] = load_model(config, trust=trust)
        return config, _MODEL_CACHE[key]


def heatmap_colormap():
    """A hot colormap whose alpha ramps from 0: low values leave the scan visible.

    Returns
    -------
    napari.utils.Colormap
        Transparent below 10 % of the contrast range, then dark red -> orange -> light yellow,
        opaque at the top.
    """
    from napari.utils import Colormap

    colors = [
        [0.40, 0.00, 0.00, 0.00],
        [0.60, 0.00, 0.00, 0.00],
        [0.90, 0.10, 0.00, 0.55],
        [1.00, 0.50, 0.00, 0.85],
        [1.00, 1.00, 0.40, 1.00],
    ]
    return Colormap(colors=colors, controls=[0.0, 0.1, 0.35, 0.65, 1.0], name="medcam3d heat", interpolation="linear")


def _space(data: np.ndarray, affine: Any) -> Space:
    if data.ndim != 3:
        raise ValueError(f"medcam3d explains 3D scans; this layer has shape {data.shape} ({data.ndim}D).")
    return Space(data.shape, np.asarray(affine, dtype=np.float64))


def candidate_layers(data: Any, affine: Any, config_path: str | Path, *, trust: bool = False) -> list[str]:
    """Names of the model's candidate target layers for this scan (the last is what "auto" picks).

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
    from ..layers import list_layers
    from ..preprocess import build_transforms, preprocess

    config, model = load_explainable(config_path, trust=trust)
    data = np.asarray(data, dtype=np.float32)
    x, _ = preprocess((data, _space(data, affine)), build_transforms(config.preprocessing))
    with _MODEL_LOCK:
        return [info.name for info in list_layers(model, tuple(x.shape))]


def explain_image(
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
) -> list[tuple]:
    """Explain one scan; one heatmap layer per class on the scan's own grid and placement.

    Parameters
    ----------
    data : (I, J, K) array_like
        The scan (e.g. an image layer's data).
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data`` (the layer's ``metadata["affine"]``).
    config_path : path
        Model, class names and preprocessing (e.g. ``configs/demo.yaml``).
    method : str
        A key of :data:`medcam3d.EXPLAINERS`.
    layer : str
        Target layer name, or ``"auto"``.
    target : "all", class name or index
    name : str
        The scan's layer name; heatmaps are named ``<name> · <method> · <class>``.
    metadata : dict, optional
        The scan layer's metadata; ``axes`` and ``path`` are passed on (for the writer).
    trust : bool
        Allow models that execute code.
    device : str
        ``cpu``, ``cuda``, ``auto``...

    Returns
    -------
    list of (data, kwargs, "image")
        ``data`` float32 of shape ``data.shape``; ``kwargs`` with the same ``affine``, an
        alpha-ramped colormap, ``opacity=0.6``, translucent blending, contrast limits
        ``(0, max)`` and ``metadata`` (method, layer, class, class_index, score, probability,
        peak, affine, axes, path).
    """
    from ..pipeline import Runner, probabilities
    from ..preprocess import preprocess

    config, model = load_explainable(config_path, trust=trust)
    data = np.asarray(data, dtype=np.float32)
    space = _space(data, affine)
    with _MODEL_LOCK:
        runner = Runner(config, model, methods=[method], target=target, layer=layer, device=device)
        x, scanner_space = preprocess((data, space), runner.transforms)
        explanation = runner.explain(runner.explainers[0], x[None].to(runner.device))  # sliding windows if configured
    heatmaps = explanation.to_scanner_space(scanner_space, fill=config.output.fill)
    probs = None
    if explanation.logits.ndim == 2:
        probs = probabilities(explanation.logits.float(), config.task)[0].tolist()
    source = dict(metadata or {})
    layers = []
    for heat in heatmaps:
        voxel, world = heat.peak()
        top = float(heat.data.max())
        meta = {
            "medcam3d": "heatmap",
            "method": heat.method,
            "layer": heat.layer,
            "class": heat.label,
            "class_index": heat.class_index,
            "score": heat.score,
            "probability": None if probs is None or heat.class_index >= len(probs) else float(probs[heat.class_index]),
            "peak_voxel": voxel,
            "peak_mm": tuple(float(v) for v in world),
            "affine": np.array(space.affine, dtype=np.float64),
            "axes": source.get("axes", tuple(range(3))),
            "path": source.get("path"),
            "source": name,
            "config": str(config_path),
            "descrip": heat.descrip,
        }
        kwargs = {
            "name": f"{name} · {heat.method} · {heat.label}",
            "affine": napari_affine(space.affine, 3),
            "colormap": heatmap_colormap(),
            "opacity": 0.6,
            "blending": "translucent",
            "contrast_limits": (0.0, top if top > 0 else 1.0),
            "interpolation2d": "linear",
            "rendering": "mip",
            "metadata": meta,
        }
        layers.append((heat.data, kwargs, "image"))
    return layers


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
        The heatmap layer's metadata (``axes``, ``path``, provenance are passed on).

    Returns
    -------
    list of layer data tuples
        ``(mask uint8, kwargs, "labels")`` named ``<name> · mask``, and, when the mask is not
        empty, ``(edges, kwargs, "shapes")``: the box's 12 edges (``<name> · box``; a wireframe
        in the 3D view, its faces' outlines on the box's first and last slices in 2D). Both have
        ``metadata["box"]`` (:meth:`medcam3d.masks.BoundingBox.to_dict`, or None).
    """
    from ..masks import bounding_box, threshold_mask

    heat = np.asarray(data, dtype=np.float32)
    space = _space(heat, affine)
    mask = threshold_mask(heat, method, value, keep_largest=keep_largest)
    box = bounding_box(mask, space)
    source = dict(metadata or {})
    meta = {
        "medcam3d": "mask",
        **{k: source[k] for k in ("method", "layer", "class", "class_index", "axes", "path", "source") if k in source},
        "affine": np.array(space.affine, dtype=np.float64),
        "threshold": {"method": method, "value": float(value), "keep_largest": bool(keep_largest)},
        "box": None if box is None else box.to_dict(),
        "descrip": f"medcam3d mask {method}={value:g} of {name}"[:80],
    }
    placement = napari_affine(space.affine, 3)
    colormap = {0: "transparent", 1: "cyan", None: "cyan"}
    layers: list[tuple] = [(mask.astype(np.uint8), {"name": f"{name} · mask", "affine": placement, "opacity": 0.8,
                                                    "colormap": colormap, "metadata": meta}, "labels")]
    if box is not None:
        low, high = np.asarray(box.voxel_min, dtype=float), np.asarray(box.voxel_max, dtype=float)
        corners = np.array([[(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]]
                            for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        edges = [corners[[n, n | bit]] for n in range(8) for bit in (4, 2, 1) if not n & bit]
        layers.append((edges, {"name": f"{name} · box", "affine": placement, "shape_type": "line",
                               "edge_color": "cyan", "edge_width": 1.0, "metadata": dict(meta)}, "shapes"))
    return layers


def layer_placement(layer: Any) -> tuple[np.ndarray, dict]:
    """The voxel -> RAS mm affine (4x4) of a layer's data, and its metadata.

    ``metadata["affine"]`` when the layer has one (medcam3d's reader, sample, results), else the
    layer's napari placement (scale, translate, rotate, shear, affine).
    """
    from ._writer import _napari_placement

    metadata = dict(layer.metadata or {})
    affine = metadata.get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64), metadata
    state = {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
             "affine": layer.affine.affine_matrix}
    return _napari_placement(state, layer.ndim), metadata


_VIEWS = {  # world axes (0 = R, 1 = A, 2 = S): (sliced, vertical, horizontal)
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}


def set_view(viewer: Any, plane: str = "axial") -> None:
    """Show a 3D RAS scene in radiological convention: anterior (or superior) up, patient right on the left.

    Parameters
    ----------
    viewer : napari.Viewer
    plane : {"axial", "coronal", "sagittal"}
    """
    if plane not in _VIEWS:
        raise ValueError(f"plane must be one of {sorted(_VIEWS)}, not {plane!r}.")
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    lead = tuple(range(ndim - 3))
    viewer.dims.order = lead + tuple(ndim - 3 + axis for axis in _VIEWS[plane])
    viewer.dims.axis_labels = tuple(viewer.dims.axis_labels[: ndim - 3]) + ("R", "A", "S")
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "left")


def _add_or_update(viewer: Any, data: Any, kwargs: dict, kind: str):
    """Add a layer, or refresh the layer of the same name (keeps the user's display settings)."""
    from napari.layers import Image, Labels, Layer, Shapes

    name = kwargs.get("name")
    kinds = {"image": Image, "labels": Labels, "shapes": Shapes}
    if name in viewer.layers and kind == "shapes":
        viewer.layers.remove(name)  # shapes cannot take new data of another shape count in place
    elif name in viewer.layers and isinstance(viewer.layers[name], kinds[kind]):
        layer = viewer.layers[name]
        layer.affine = kwargs["affine"]
        layer.data = data
        layer.metadata = kwargs.get("metadata", {})
        if "contrast_limits" in kwargs:
            layer.contrast_limits = kwargs["contrast_limits"]
        return layer
    return viewer.add_layer(Layer.create(data, kwargs, kind))


# --------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """An error caught in a worker, reported as a notification instead of a traceback."""

    error: BaseException


def _guarded(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as error:  # reported to the user, the viewer keeps running
        logger.debug("medcam3d worker failed", exc_info=True)
        return _Failure(error)


def _while_open(callback):
    """Skip a worker's callback when the widget was closed (its Qt objects deleted) meanwhile."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
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

    Pick a scan (image layer), a config (the demo config when present), a method, a target layer
    and a class, then *Explain*: the maps are computed in a worker thread (progress in napari's
    activity panel) and added as one heatmap layer per class on the scan's grid. *Threshold to
    mask* turns the chosen heatmap into a labels layer and a box (reported in mm). Errors become
    napari notifications.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Attributes
    ----------
    worker : FunctionWorker or None
        The last explain worker (its ``finished`` signal ends a run).
    busy : bool
        True while a worker runs.
    """

    def __init__(self, napari_viewer: Any) -> None:
        image_layer = ComboBox(label="image", tooltip="The scan to explain.")
        config = FileEdit(label="config", mode="r", filter="*.yaml *.yml",
                          value=str(DEMO_CONFIG) if DEMO_CONFIG.is_file() else "",
                          tooltip="medcam3d YAML config: model, class names, preprocessing.")
        method = ComboBox(label="method", choices=list(medcam3d.EXPLAINERS), value="hirescam")
        target_layer = ComboBox(label="target layer", choices=[AUTO],
                                tooltip="'auto': the last layer with a spatial output.")
        target_class = ComboBox(label="class", choices=[ALL_CLASSES])
        trust = CheckBox(text="trust model code (bundles, TorchScript)", value=False)
        run_button = PushButton(text="Explain")
        progress = ProgressBar(min=0, max=0, visible=False, label="")
        status = Label(value="")
        heatmap = ComboBox(label="heatmap")
        threshold_method = ComboBox(label="threshold", choices=list(THRESHOLD_METHODS), value="fraction")
        threshold_value = FloatSpinBox(label="value", value=0.5, min=0.0, max=100.0, step=0.05,
                                       tooltip="fraction of the maximum (0-1] or percentile (0-100)")
        keep_largest = CheckBox(text="largest component only", value=True)
        mask_button = PushButton(text="Threshold to mask")
        box = Label(value="")
        views = [PushButton(text=plane.capitalize(), name=plane) for plane in _VIEWS]
        view_row = Container(widgets=views, layout="horizontal", label="view", labels=False)
        super().__init__(widgets=[
            image_layer, config, method, target_layer, target_class, trust, run_button, progress, status,
            Label(value="Threshold a heatmap into a mask:"), heatmap, threshold_method, threshold_value,
            keep_largest, mask_button, box, view_row,
        ])
        self._viewer = napari_viewer
        self.worker = None  # the last explain worker
        self.layers_worker = None
        self._active: list = []  # started workers that have not finished yet
        self.image_layer, self.config, self.method = image_layer, config, method
        self.target_layer, self.target_class, self.trust = target_layer, target_class, trust
        self.run_button, self.progress, self.status = run_button, progress, status
        self.heatmap, self.threshold_method, self.threshold_value = heatmap, threshold_method, threshold_value
        self.keep_largest, self.mask_button, self.box = keep_largest, mask_button, box
        for label in (status, box):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        # Choices are callables so that reset_choices() (napari calls it on layer events) keeps them.
        self._classes: list[str] = [ALL_CLASSES]
        self._layers: list[str] = [AUTO]
        self.image_layer.choices = self._scan_choices
        self.heatmap.choices = self._heatmap_choices
        self.target_class.choices = lambda _widget=None: self._classes
        self.target_layer.choices = lambda _widget=None: self._layers
        self.config.changed.connect(self._on_config_changed)
        self.image_layer.changed.connect(self._refresh_target_layers)
        self.trust.changed.connect(self._refresh_target_layers)
        self.run_button.changed.connect(self.run)
        self.mask_button.changed.connect(self.make_mask)
        self.threshold_method.changed.connect(self._on_threshold_method)
        for button in views:
            button.changed.connect(lambda _=None, plane=button.name: set_view(self._viewer, plane))
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._on_layers_changed)
        self._on_config_changed(notify=False)

    # ---------------------------------------------------------------- choices
    def _scan_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        images = [layer for layer in self._viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        scans = [layer for layer in images if (layer.metadata or {}).get("medcam3d") != "heatmap"]
        return [(layer.name, layer) for layer in scans]

    def _heatmap_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and (layer.metadata or {}).get("medcam3d") == "heatmap"]

    @_while_open
    def _on_layers_changed(self, _event=None) -> None:
        before = self.image_layer.value
        self.reset_choices()
        if self.image_layer.value != before:
            self._refresh_target_layers()

    def _config_path(self) -> Path | None:
        value = self.config.value
        if value is None or str(value) in ("", "."):
            return None
        path = Path(value)
        return None if path.is_dir() else path

    def _on_config_changed(self, _value=None, *, notify: bool = True) -> None:
        from napari.utils.notifications import show_error

        from ..config import load_config

        names: list[str] = []
        path = self._config_path()
        if path is not None:
            try:
                names = list(load_config(path).class_names or [])
                self.status.value = ""
            except Exception as error:
                text = f"medcam3d: {_message(error)}"
                self.status.value = text[:200]
                if notify:
                    show_error(text)
        self._classes = [ALL_CLASSES, *names]
        self.target_class.reset_choices()
        self.target_class.value = ALL_CLASSES
        self._refresh_target_layers()

    def _refresh_target_layers(self, _value=None) -> None:
        from napari.qt.threading import thread_worker

        layer, path = self.image_layer.value, self._config_path()
        current = self.target_layer.value
        self._layers = [AUTO]
        self.target_layer.reset_choices()
        if layer is None or path is None:
            return
        affine, _ = layer_placement(layer)
        worker = thread_worker(_guarded, start_thread=False)(candidate_layers, layer.data, affine, path,
                                                              trust=self.trust.value)
        request = (layer, path)

        @_while_open
        def done(result) -> None:
            if (self.image_layer.value, self._config_path()) != request:
                return  # stale: the user changed the scan or config meanwhile
            if isinstance(result, _Failure):
                self.status.value = f"cannot list layers: {_message(result.error)}"[:200]
                return
            self._layers = [AUTO, *result]
            self.target_layer.reset_choices()
            self.target_layer.value = current if current in result else AUTO

        worker.returned.connect(done)
        self.layers_worker = worker
        self._start(worker)

    def _on_threshold_method(self, method: str) -> None:
        self.threshold_value.value = _DEFAULT_THRESHOLD[method]
        self.threshold_value.enabled = method != "otsu"

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
        affine, metadata = layer_placement(layer)
        target = "all" if self.target_class.value == ALL_CLASSES else self.target_class.value
        worker = thread_worker(_guarded, start_thread=False, progress={"desc": f"medcam3d: explaining {layer.name}"})(
            explain_image, layer.data, affine, path, method=self.method.value, layer=self.target_layer.value,
            target=target, name=layer.name, metadata=metadata, trust=self.trust.value, device="auto",
        )
        worker.returned.connect(lambda result: self._on_explained(result, layer.name))
        worker.finished.connect(self._on_finished)
        self.run_button.enabled = False
        self.progress.visible = True
        self.status.value = f"explaining {layer.name} with {self.method.value}..."
        self.worker = worker
        self._start(worker)
        return worker

    def _start(self, worker) -> None:
        self._active.append(worker)
        worker.finished.connect(lambda: self._active.remove(worker) if worker in self._active else None)
        worker.start()

    @property
    def busy(self) -> bool:
        """True while an explanation or a layer listing runs in the background."""
        return bool(self._active)

    @_while_open
    def _on_finished(self) -> None:
        self.run_button.enabled = True
        self.progress.visible = False

    @_while_open
    def _on_explained(self, result, name: str) -> None:
        from napari.utils.notifications import show_error

        if isinstance(result, _Failure):
            text = f"medcam3d could not explain {name}: {_message(result.error)}"
            self.status.value = text[:200]
            show_error(text)
            return
        added = [_add_or_update(self._viewer, *item) for item in result]
        self.reset_choices()
        if added:
            self.heatmap.value = added[0]
        parts = []
        for layer in added:
            meta = layer.metadata
            p = meta.get("probability")
            peak = ", ".join(f"{v:.0f}" for v in meta["peak_mm"])
            probability = "" if p is None else f"p={p:.2f}, "
            parts.append(f"{meta['class']}: {probability}peak ({peak}) mm")
        self.status.value = f"layer {added[0].metadata['layer'] if added else '?'}; " + "; ".join(parts)

    # ---------------------------------------------------------------- mask
    def make_mask(self, _value=None) -> list:
        """Threshold the chosen heatmap into a labels layer (and its box); returns the new layers."""
        from napari.utils.notifications import show_error

        heat = self.heatmap.value
        if heat is None:
            show_error("medcam3d: no heatmap layer to threshold; run Explain first.")
            return []
        affine, metadata = layer_placement(heat)
        try:
            result = mask_from_heatmap(heat.data, affine, self.threshold_method.value, self.threshold_value.value,
                                       keep_largest=self.keep_largest.value, name=heat.name, metadata=metadata)
        except Exception as error:
            show_error(f"medcam3d: cannot threshold {heat.name}: {_message(error)}")
            return []
        added = [_add_or_update(self._viewer, *item) for item in result]
        added[0].contour = 1  # an outline in 2D: the heatmap stays visible inside
        box = result[0][1]["metadata"]["box"]
        if box is None:
            self.box.value = "empty mask (the heatmap is zero everywhere above the threshold)"
        else:
            size = " x ".join(f"{v:.1f}" for v in box["size_mm"])
            centre = ", ".join(f"{v:.1f}" for v in box["centre_mm"])
            self.box.value = f"box {size} mm, centre ({centre}) mm RAS, {box['voxels']} voxels"
        return added

