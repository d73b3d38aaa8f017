"""How a viewer shows medcam3d layers: the radiological axial view, and the 2D/3D look of results.

- :func:`set_view` puts a RAS scene in the axial, coronal or sagittal view, anterior (or superior)
  up and the patient's right on the screen's left (radiological convention).
- :func:`open_axial_when_added` makes a viewer open a scan in the axial view (the reader and the
  sample data call it): napari's default for a 3D layer is to slice along the first world axis,
  which for RAS coordinates is a sideways sagittal view.
- :func:`show_reading_aids` turns on a scale bar (in mm) and the axes with their R/A/S labels
  (in the canvas corner), once per viewer, when a scan opens;
- :func:`follow_ndisplay` switches heatmap layers between translucent blending (2D, the scan
  shows through) and additive blending with maximum-intensity rendering (3D, several classes
  add up in their own colours instead of hiding each other), shows scans at half opacity in 3D
  (their attenuated MIP alone would be white where a map adds to it), and hides field-of-view
  outlines in 3D (napari draws label contours in 2D only).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

__all__ = ["set_view", "open_axial_when_added", "follow_ndisplay", "show_reading_aids", "VIEWS", "AXIS_LABELS",
           "UNITS"]

logger = logging.getLogger(__name__)

VIEWS = {  # world axes (0 = R, 1 = A, 2 = S): (sliced, vertical, horizontal)
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
#: Names and units of the world axes of every layer placed by medcam3d.
AXIS_LABELS = ("R", "A", "S")
UNITS = ("mm", "mm", "mm")

# Viewers already following ndisplay (one connection per viewer).
_FOLLOWING: weakref.WeakSet = weakref.WeakSet()
# Field-of-view outlines hidden for the 3D display, with their 2D visibility; scans dimmed for
# the 3D display, with their 2D opacity.
_HIDDEN_IN_3D: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DIMMED_IN_3D: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Opacity of scans in the 3D display, under heatmaps.
SCAN_OPACITY_3D = 0.5


def set_view(viewer: Any, plane: str = "axial") -> None:
    """Show a 3D RAS scene in radiological convention: anterior (or superior) up, patient right on the left.

    Parameters
    ----------
    viewer : napari.Viewer
    plane : {"axial", "coronal", "sagittal"}
    """
    if plane not in VIEWS:
        raise ValueError(f"plane must be one of {sorted(VIEWS)}, not {plane!r}.")
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    lead = tuple(range(ndim - 3))
    viewer.dims.order = lead + tuple(ndim - 3 + axis for axis in VIEWS[plane])
    viewer.dims.axis_labels = tuple(viewer.dims.axis_labels[: ndim - 3]) + AXIS_LABELS
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
    camera.orientation2d = ("up", "left")


# Viewers whose reading aids were turned on (once: the user may turn them off again).
_AIDED: weakref.WeakSet = weakref.WeakSet()


def show_reading_aids(viewer: Any) -> None:
    """Turn on the scale bar (mm, boxed) and the canvas axes labelled R, A, S, once per viewer.

    napari >= 0.9 keeps them in ``viewer.canvas.overlays`` (``scale_bar``, ``axes``); older
    versions as ``viewer.scale_bar``/``viewer.axes``. Missing overlays are skipped.
    """
    if viewer in _AIDED:
        return
    _AIDED.add(viewer)
    canvas = getattr(getattr(viewer, "canvas", None), "overlays", None)
    scale_bar = getattr(canvas, "scale_bar", None) if canvas is not None else getattr(viewer, "scale_bar", None)
    axes = getattr(canvas, "axes", None) if canvas is not None else getattr(viewer, "axes", None)
    try:
        if scale_bar is not None:
            scale_bar.visible, scale_bar.box = True, True
        if axes is not None:
            axes.visible, axes.labels, axes.colored = True, True, True
    except (AttributeError, ValueError):  # another napari's overlays
        logger.debug("cannot show napari's scale bar or axes", exc_info=True)


def _is_scan(layer: Any) -> bool:
    return (getattr(layer, "metadata", None) or {}).get("medcam3d") == "scan"


def open_axial_when_added() -> None:
    """Open the next medcam3d scan added to the current viewer in the axial view.

    Does nothing without a viewer, and leaves the view alone when the viewer already shows
    another 3D layer (the user's view is kept). The hook disconnects itself after the first
    medcam3d scan is added.
    """
    try:
        from napari import current_viewer
    except ImportError:  # pragma: no cover - the plugin runs inside napari
        return
    viewer = current_viewer()
    if viewer is None or any(layer.ndim >= 3 for layer in viewer.layers):
        return

    def added(event) -> None:
        layer = event.value
        if not _is_scan(layer):
            return
        viewer.layers.events.inserted.disconnect(added)
        show_reading_aids(viewer)
        if layer.ndim == 3 and not any(other.ndim >= 3 for other in viewer.layers if other is not layer):
            set_view(viewer, "axial")
            viewer.reset_view()

    viewer.layers.events.inserted.connect(added)


def follow_ndisplay(viewer: Any) -> None:
    """Give heatmaps the blending of the current display (2D translucent, 3D additive) from now on."""
    if viewer in _FOLLOWING:
        apply_display_style(viewer)
        return
    _FOLLOWING.add(viewer)
    ref = weakref.ref(viewer)

    def changed(_event=None) -> None:
        target = ref()
        if target is not None:
            apply_display_style(target)

    viewer.dims.events.ndisplay.connect(changed)
    apply_display_style(viewer)


def apply_display_style(viewer: Any) -> None:
    """Set the blending/rendering of medcam3d heatmaps and outlines for the viewer's 2D or 3D display."""
    three_d = viewer.dims.ndisplay == 3
    layers = list(viewer.layers)
    maps = any((layer.metadata or {}).get("medcam3d") == "heatmap" for layer in layers)
    for layer in layers:
        kind = (layer.metadata or {}).get("medcam3d")
        if kind == "scan" and three_d and maps and layer not in _DIMMED_IN_3D:
            _DIMMED_IN_3D[layer] = layer.opacity
            layer.opacity = min(layer.opacity, SCAN_OPACITY_3D)
        elif kind == "scan" and not three_d and layer in _DIMMED_IN_3D:
            layer.opacity = _DIMMED_IN_3D.pop(layer)
        elif kind == "heatmap":
            layer.blending = "additive" if three_d else "translucent"
            layer.rendering = "mip"
        elif kind == "fov" and three_d and layer not in _HIDDEN_IN_3D:
            _HIDDEN_IN_3D[layer] = layer.visible, layer.contour  # outlines are drawn per 2D slice only
            layer.visible, layer.contour = False, 0
        elif kind == "fov" and not three_d and layer in _HIDDEN_IN_3D:
            layer.visible, layer.contour = _HIDDEN_IN_3D.pop(layer)
