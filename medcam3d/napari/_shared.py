"""What the napari rooms share: progress steps, layer names and styles, checksums, ASCII text.

Every other module of the plugin imports these from here (none of them imports another room's
helpers), so the plugin's imports go one way (``tests/test_layering.py`` checks it, lazy imports
included):

- :class:`Step`: one step of a long task (reading, explaining, segmenting) for a progress bar;
- :func:`heatmap_name`, :func:`probability_text`, :func:`heatmap_colormap` and
  :func:`heatmap_layer_kwargs`: how a heatmap layer is named and drawn (by *Explain* and by the
  reader for saved maps);
- :func:`checksum` and :func:`file_stamp`: whether shown voxels or a file changed since a layer
  was made (the writers save unchanged layers exactly);
- :func:`ascii_text`: text for a NIfTI ``descrip``.

Needs no Qt (``napari.utils`` only, inside :func:`heatmap_colormap`).
"""

from __future__ import annotations

import math
import os
import unicodedata
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space
from ._grid import napari_affine
from ._view import AXIS_LABELS, UNITS

__all__ = ["Step", "run_steps", "checksum", "file_stamp", "ascii_text", "probability_text", "heatmap_name", "heatmap_colormap",
           "heatmap_layer_kwargs", "grid_space"]


@dataclass(frozen=True)
class Step:
    """Progress of a long task: ``done`` of ``total`` steps finished, ``text`` is under way."""

    done: int
    total: int
    text: str


def run_steps(steps: Generator[Any, None, Any]) -> Any:
    """Run a step generator (one that yields :class:`Step` progress and returns its result) to the
    end, in this thread, and return its result: for scripts, tests and callers without a worker."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def checksum(data: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order): tells a writer whether shown voxels were changed."""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1).data)


def file_stamp(path: str | Path | None) -> tuple[int, int] | None:
    """A file's modification time (ns) and size, or None when there is no such file."""
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if info is None else (int(info.st_mtime_ns), int(info.st_size))


def ascii_text(text: str, limit: int = 80) -> str:
    """``text`` as printable ASCII, at most ``limit`` characters (for NIfTI ``descrip``).

    Accents are dropped (``é`` -> ``e``), other non-ASCII characters (``·``) become ``-``, and
    runs of white space one space.
    """
    kept = []
    for char in unicodedata.normalize("NFKD", str(text)):
        if unicodedata.combining(char):
            continue
        kept.append(char if " " <= char <= "~" else " " if char.isspace() or char < " " else "-")
    return " ".join("".join(kept).split())[:limit]


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
        ``"medcam3d": "heatmap"`` and the map's provenance (see :func:`._service.explain_steps`).
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


def grid_space(shape: Any, affine: Any) -> Space:
    """The 3D grid of a layer's data: ``shape`` with its voxel -> RAS mm ``affine``.

    Raises
    ------
    ValueError
        For data that is not 3D (medcam3d explains, thresholds and segments 3D scans).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"medcam3d explains 3D scans; this layer has shape {shape} ({len(shape)}D).")
    return Space(shape, np.asarray(affine, dtype=np.float64))
