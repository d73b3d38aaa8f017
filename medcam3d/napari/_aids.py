"""Reading aids for heatmaps: a colour bar per class, isolines with a one-key toggle, jump to the peak.

- :func:`colour_bar_rows` and :class:`ColourBars`: one colour bar per heatmap layer (class),
  titled with its class, method and probability, its ticks in fractions of the layer's colour
  maximum (the shared maximum of :func:`._service.colour_limits`: equal colours mean equal
  values), with the map's own maximum marked as such a fraction and what 1 stands for
  (``1 = 0.00793 (shared maximum of the maps; this map reaches 0.62)``); shown in the *Explain* widget
  (napari's own ``layer.colorbar`` has no title and ticks in raw map values only);
- :func:`toggle_isolines` (key :data:`ISOLINES_KEY`): every heatmap drawn as isolines at
  :data:`ISOLINE_LEVELS` of its colour maximum instead of a filled map, and back. The lines are
  the outlines (napari ``contour``) of a Labels layer of the levels, on the map's grid refined to
  :data:`ISOLINE_CELL_MM` voxels (trilinear, as the screen draws the map), in the class's colours;
  in the 3D view (where napari draws Labels filled) as the surfaces of the levels (:data:`ISOLINES_3D`);
- :func:`jump_to_peak` (key :data:`PEAK_KEY`, the widget's *Jump to peak* button): the viewer's
  slices move to a heatmap layer's largest value, in world coordinates (RAS mm).

Qt only inside :class:`ColourBars`; the rest needs a napari viewer.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ..space import Space, resample
from ._grid import napari_affine, refined
from ._shared import probability_text
from ._view import AXIS_LABELS, UNITS

__all__ = ["peak_world", "jump_to_peak", "isoline_layer_data", "toggle_isolines", "colour_bar_rows", "ColourBars",
           "bind_keys", "ISOLINE_LEVELS", "ISOLINE_CELL_MM", "TICKS", "PEAK_KEY", "ISOLINES_KEY", "ISOLINES_3D"]

#: Fractions of a heatmap's colour maximum drawn as isolines.
ISOLINE_LEVELS = (0.25, 0.5, 0.75)
#: Largest voxel (mm) of the grid the isolines are traced on.
ISOLINE_CELL_MM = 2.0
#: Ticks of a colour bar, in fractions of the colour maximum.
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Key bindings of the viewer (napari's key names).
PEAK_KEY = "Shift-J"
ISOLINES_KEY = "Shift-I"
#: How isolines are drawn in the 3D view (napari draws Labels filled there, contour or not): the
#: surface of each level, the outermost (25 %) in front.
ISOLINES_3D = "iso_categorical"

# Heatmap layer -> its isoline layer.
_ISOLINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _heatmaps(viewer: Any) -> list:
    return [layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]


def peak_world(layer: Any) -> np.ndarray | None:
    """The world position (RAS mm) of the centre of a heatmap layer's largest voxel; None for a flat map.

    Parameters
    ----------
    layer : napari.layers.Image
        3D; placed by ``metadata["affine"]`` (medcam3d layers) or napari's ``data_to_world``.

    Returns
    -------
    (3,) float64 ndarray or None
    """
    values = np.asarray(layer.data, dtype=np.float32)
    if values.ndim != 3 or values.size == 0 or not values.max() > values.min():
        return None
    voxel = np.array(np.unravel_index(int(np.argmax(values)), values.shape), dtype=np.float64)
    affine = (layer.metadata or {}).get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64)[:3, :3] @ voxel + np.asarray(affine, dtype=np.float64)[:3, 3]
    return np.asarray(layer.data_to_world(voxel), dtype=np.float64)


def _chosen_heatmap(viewer: Any) -> Any:
    """The selected heatmap layer, else the first visible one, else the first (None without heatmaps)."""
    active = viewer.layers.selection.active
    if active is not None and (active.metadata or {}).get("medcam3d") == "heatmap":
        return active
    maps = _heatmaps(viewer)
    visible = [layer for layer in maps if layer.visible or layer in _ISOLINES]
    return (visible or maps or [None])[0]


def jump_to_peak(viewer: Any, layer: Any = None) -> np.ndarray | None:
    """Move the viewer's slices to a heatmap layer's peak (:func:`peak_world`); returns the peak (None: nothing).

    Parameters
    ----------
    viewer : napari.Viewer
        Its last three dims are the world axes R, A, S (as the medcam3d reader opens scans).
    layer : napari.layers.Image, optional
        Default: the selected heatmap, else the first visible one.

    Returns
    -------
    (3,) ndarray or None
        The peak in RAS mm; napari puts each slider on its step nearest to it (within half a step).
    """
    layer = _chosen_heatmap(viewer) if layer is None else layer
    if layer is None:
        return None
    point = peak_world(layer)
    if point is None or viewer.dims.ndim < 3:
        return None
    first = viewer.dims.ndim - 3
    viewer.dims.set_point(list(range(first, first + 3)), [float(v) for v in point])
    return point


def isoline_layer_data(layer: Any) -> tuple:
    """The isolines of a heatmap layer as a napari Labels layer data tuple (outlines of its levels).

    Parameters
    ----------
    layer : napari.layers.Image
        A medcam3d heatmap (``metadata["affine"]``), coloured on ``(0, top)`` (``layer.contrast_limits``).

    Returns
    -------
    (levels, kwargs, "labels")
        ``levels`` uint8: the number of :data:`ISOLINE_LEVELS` fractions of ``top`` a voxel's value
        reaches (0 below the first), on the layer's grid refined to at most
        :data:`ISOLINE_CELL_MM` voxels (trilinear); ``kwargs["metadata"]`` has ``"medcam3d":
        "isolines"``, ``"affine"``, ``"levels"`` and ``"top"``.
    """
    values = np.asarray(layer.data, dtype=np.float32)
    space = Space(values.shape, np.asarray(layer.metadata["affine"], dtype=np.float64))
    if max(space.spacing) > ISOLINE_CELL_MM:
        fine, _ = refined(space, ISOLINE_CELL_MM)
        values, space = resample(values, space, fine, fill=0.0), fine
    top = float(layer.contrast_limits[1])
    levels = np.zeros(values.shape, dtype=np.uint8)
    for fraction in ISOLINE_LEVELS:
        levels += values >= fraction * top
    colours: dict[Any, Any] = {0: "transparent", None: "transparent"}
    for number, fraction in enumerate(ISOLINE_LEVELS, start=1):
        rgba = np.array(layer.colormap.map(np.array([fraction]))[0], dtype=np.float32)
        rgba[3] = 1.0
        colours[number] = rgba
    meta = {"medcam3d": "isolines", "affine": np.array(space.affine, dtype=np.float64), "levels": ISOLINE_LEVELS,
            "top": top, "heatmap": layer.name, "axes": None, "resampled": True,
            **{k: layer.metadata[k] for k in ("scan_shape", "scan_affine", "file_shape", "file_affine", "path")
               if k in layer.metadata}}
    return levels, {"name": f"{layer.name} · isolines", "affine": napari_affine(space.affine, 3), "metadata": meta,
                    "colormap": colours, "opacity": 1.0, "blending": "translucent", "axis_labels": AXIS_LABELS,
                    "units": UNITS}, "labels"


def toggle_isolines(viewer: Any) -> bool:
    """Draw every heatmap as isolines instead of a filled map, or back; True when isolines are now shown.

    The first toggle (any heatmap drawn filled) hides the maps and shows their isolines (made, or
    remade for the map's current data and colour maximum); the next shows the maps again and hides
    the isolines.
    """
    from napari.layers import Layer

    maps = _heatmaps(viewer)
    to_lines = any(layer.visible for layer in maps)
    for layer in maps:
        lines = _ISOLINES.get(layer)
        if lines is not None and lines not in viewer.layers:
            lines = None
        if to_lines:
            data, kwargs, kind = isoline_layer_data(layer)
            if lines is None:
                lines = viewer.add_layer(Layer.create(data, kwargs, kind))
                _ISOLINES[layer] = lines
            else:
                lines.data, lines.metadata = data, kwargs["metadata"]
            lines.contour = 1  # 2D: outlines
            lines.rendering = ISOLINES_3D  # 3D: the surfaces of the levels, not filled blocks
            lines.visible = True
            layer.visible = False
        else:
            layer.visible = True
            if lines is not None:
                lines.visible = False
    return to_lines and bool(maps)


def colour_bar_rows(viewer: Any) -> list[dict]:
    """What each heatmap's colour bar shows: title, colour maximum, ticks and colours (no Qt).

    Returns
    -------
    list of dict
        One per heatmap layer, in layer order: ``"layer"`` (its name), ``"title"`` (class, method,
        p), ``"top"`` (the colour maximum: the shared maximum on a shared scale), ``"ticks"``
        (:data:`TICKS`, fractions of ``top``), ``"colours"`` ((len(TICKS), 4) RGBA of the layer's
        colormap at the ticks), ``"own"`` (the map's own maximum as a fraction of ``top``) and
        ``"scale"``: what 1 on the bar is, e.g. ``"1 = 0.00793 (shared maximum of the maps; this map
        reaches 0.62)"`` or ``"1 = 0.00793 (this map's maximum)"``.
    """
    rows = []
    for layer in _heatmaps(viewer):
        meta = layer.metadata
        low, top = (float(v) for v in layer.contrast_limits)
        p = meta.get("probability")
        title = " · ".join(str(part) for part in (meta.get("class", layer.name), meta.get("method"))
                           if part is not None)
        if p is not None:
            title += f" (p={probability_text(p)})"
        fractions = np.asarray(TICKS, dtype=np.float64)
        own = float(meta.get("max") or 0.0)
        fraction = own / top if top > 0 else 0.0
        if abs(fraction - 1.0) <= 1e-6:
            scale = f"1 = {top:.3g} (this map's maximum)"
        else:
            scale = f"1 = {top:.3g} (shared maximum of the maps; this map reaches {fraction:.2f})"
        rows.append({"layer": layer.name, "title": title, "top": top, "ticks": TICKS,
                     "colours": np.asarray(layer.colormap.map(fractions), dtype=np.float32),
                     "own": fraction, "scale": scale})
    return rows


class ColourBars:
    """A Qt panel of :func:`colour_bar_rows`: per heatmap its title, a colour ramp and fraction ticks.

    Parameters
    ----------
    viewer : napari.Viewer

    Attributes
    ----------
    native : QWidget
        Put into a dock or another widget's layout.
    rows : list of dict
        What is shown (:func:`colour_bar_rows` at the last :meth:`refresh`).
    """

    WIDTH, HEIGHT = 180, 12

    def __init__(self, viewer: Any) -> None:
        from qtpy.QtWidgets import QVBoxLayout, QWidget

        from qtpy.QtCore import QTimer

        self._viewer = weakref.ref(viewer)
        self.native = QWidget()
        self._layout = QVBoxLayout(self.native)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self.rows: list[dict] = []
        self._watched: weakref.WeakSet = weakref.WeakSet()  # heatmaps whose colour changes redraw the bars
        # A burst of changes (dragging the contrast slider) redraws once, when the event loop is free.
        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self.refresh)

    def _changed(self, _event: Any = None) -> None:
        try:
            self._timer.start()
        except RuntimeError:  # the Qt widget is gone with its dock
            pass

    def refresh(self) -> None:
        """Redraw the bars for the viewer's heatmaps and their current colour limits and colormaps."""
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QColor, QImage, QPixmap
        from qtpy.QtWidgets import QLabel

        viewer = self._viewer()
        for layer in _heatmaps(viewer) if viewer is not None else []:
            if layer not in self._watched:
                self._watched.add(layer)
                layer.events.contrast_limits.connect(self._changed)
                layer.events.colormap.connect(self._changed)
        while self._layout.count():
            item = self._layout.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None:
                widget.deleteLater()
        self.rows = [] if viewer is None else colour_bar_rows(viewer)
        layers = {layer.name: layer for layer in _heatmaps(viewer)} if viewer is not None else {}
        for row in self.rows:
            title = QLabel(row["title"])
            title.setToolTip(row["layer"])
            ramp = layers[row["layer"]].colormap.map(np.linspace(0.0, 1.0, self.WIDTH))
            image = QImage(self.WIDTH, self.HEIGHT, QImage.Format.Format_ARGB32)
            for x, rgba in enumerate(np.clip(np.asarray(ramp) * 255, 0, 255).astype(int)):
                colour = QColor(int(rgba[0]), int(rgba[1]), int(rgba[2]), int(rgba[3]))
                for y in range(self.HEIGHT):
                    image.setPixelColor(x, y, colour)
            bar = QLabel()
            bar.setPixmap(QPixmap.fromImage(image))
            bar.setAlignment(Qt.AlignmentFlag.AlignLeft)
            ticks = QLabel("   ".join(f"{t:g}" for t in row["ticks"]))
            scale = QLabel(row["scale"])
            scale.setWordWrap(True)
            for widget in (title, bar, ticks, scale):
                self._layout.addWidget(widget)


def bind_keys(viewer: Any) -> None:
    """Bind :data:`PEAK_KEY` (jump to the peak) and :data:`ISOLINES_KEY` (isolines on/off) on ``viewer``."""
    viewer.bind_key(PEAK_KEY, lambda target: jump_to_peak(target), overwrite=True)
    viewer.bind_key(ISOLINES_KEY, lambda target: toggle_isolines(target), overwrite=True)
