"""Results added to a viewer without touching the user's work, and the heatmaps' colour scale.

- :func:`add_result`: a heatmap explained again (same scan, config, method, layer and class:
  :data:`PROVENANCE`) is refreshed in place; anything else is a new layer under a unique name
  (:func:`unique_name`: ``name [2]``), so that napari's undo history of an edited mask is never
  applied to another one;
- :func:`apply_colour_scale`: every heatmap's contrast limits by :func:`._service.colour_limits`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._service import SCALES, colour_limits

__all__ = ["add_result", "unique_name", "apply_colour_scale", "PROVENANCE"]


def unique_name(viewer: Any, name: str) -> str:
    """``name``, or ``name [2]``, ``name [3]``... when the viewer has a layer of that name."""
    if name not in viewer.layers:
        return name
    number = 2
    while f"{name} [{number}]" in viewer.layers:
        number += 1
    return f"{name} [{number}]"


#: What makes two results the same: a new one with these metadata refreshes the old one in place.
PROVENANCE = ("medcam3d", "source", "method", "layer", "class_index", "config", "input_shape", "channels")


def add_result(viewer: Any, data: Any, kwargs: dict, kind: str):
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
            all((existing.metadata or {}).get(k) == new_meta.get(k) for k in PROVENANCE):
        return existing  # the same model's view of the same scan: already outlined
    if kind == "image" and isinstance(existing, Image):
        old, new = existing.metadata or {}, kwargs.get("metadata", {})
        if all(old.get(k) == new.get(k) for k in PROVENANCE) and existing.data.shape == np.shape(data):
            existing.affine = kwargs["affine"]
            existing.data = data
            existing.metadata = new
            return existing
    kwargs = {**kwargs, "name": unique_name(viewer, name)}
    layer = viewer.add_layer(Layer.create(data, kwargs, kind))
    if kind == "labels":
        layer.contour = 1  # an outline in 2D: the heatmap and scan stay visible inside
    return layer


def apply_colour_scale(viewer: Any, scale: str = SCALES[0]) -> None:
    """Set the contrast limits of every medcam3d heatmap in ``viewer`` by :func:`colour_limits`."""
    heatmaps = [layer for layer in viewer.layers if (layer.metadata or {}).get("medcam3d") == "heatmap"]
    for layer, limits in zip(heatmaps, colour_limits([layer.metadata for layer in heatmaps], scale)):
        layer.contrast_limits = limits
