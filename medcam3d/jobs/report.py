"""Slice pictures: three orthogonal slices through a heatmap's peak, over the scan.

Both volumes are shown in the closest RAS orientation of the scan's grid, in radiological
convention (the patient's right on the image's left; anterior and superior up), with the voxel
spacing respected and the sides labelled (R/L, A/P, S/I). The heatmap uses a colormap whose alpha
ramps from 0, so the grey scan shows through where the map is low.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from .._files import atomic_write, atomic_write_text
from ..space import Space

__all__ = ["save_slices", "alpha_colormap", "save_figure", "write_csv", "write_text", "print_table"]


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write rows (the union of their keys, in order of appearance, as columns) to CSV atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["empty"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def save_figure(path: str | Path, figure, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically (no pyplot state is touched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda name: figure.savefig(name, dpi=dpi, format="png"))


def print_table(rows: list[dict], columns: list[str] | None = None, stream: TextIO | None = None) -> None:
    """Print rows as an aligned text table (columns: the union of the rows' keys)."""
    stream = stream or sys.stdout
    if not rows:
        return
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=stream)
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns), file=stream)


def alpha_colormap(name: str = "inferno", max_alpha: float = 0.85):
    """A matplotlib colormap whose alpha rises linearly from 0 (low values invisible)."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    base = matplotlib.colormaps[name](np.linspace(0.15, 1.0, 256))
    base[:, 3] = np.linspace(0.0, max_alpha, 256)
    return ListedColormap(base, name=f"{name}_alpha")


def _canonical(array: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Array in the closest RAS orientation, the orientation transform, and its spacing."""
    import nibabel.orientations as nio

    orientation = nio.io_orientation(space.affine)
    canonical = nio.apply_orientation(array, orientation)
    spacing = np.asarray(space.spacing)[orientation[:, 0].astype(int)]
    return canonical, orientation, tuple(float(s) for s in spacing)


def save_slices(
    path: str | Path,
    scan: np.ndarray,
    heat: np.ndarray,
    space: Space,
    *,
    title: str = "",
    peak_mm: tuple[float, float, float] | None = None,
    window: tuple[float, float] | None = None,
    colormap: str = "inferno",
) -> Path:
    """Write a PNG with axial, coronal and sagittal slices through the heatmap's peak.

    Parameters
    ----------
    path : path
        Output ``.png`` (written atomically).
    scan, heat : (*space.shape) ndarray
        The scan and a heatmap on the same grid (scanner space).
    space : Space
        Their grid (3D).
    title : str
        First title line (case, method, class, probability).
    peak_mm : (3,) optional
        Printed in the title; default: the heatmap's maximum.
    window : (low, high), optional
        Grey-level window of the scan; default: a soft-tissue window (−160 to 240 HU) for CT,
        else the 1st–99th percentile of the non-background voxels.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if scan.shape != heat.shape or tuple(scan.shape) != tuple(space.shape) or len(space.shape) != 3:
        raise ValueError(f"scan {scan.shape}, heat {heat.shape} and space {space.shape} must share one 3D grid.")
    peak_voxel = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if peak_mm is None:
        peak_mm = tuple(space.voxel_to_world(np.asarray(peak_voxel, dtype=float)))
    scan_c, orientation, spacing = _canonical(scan.astype(np.float32), space)
    heat_c, _, _ = _canonical(heat.astype(np.float32), space)
    peak_c = np.unravel_index(int(np.argmax(heat_c)), heat_c.shape)
    if window is None:
        # CT in HU (air at about -1000): a soft-tissue window; otherwise percentiles of the
        # non-background voxels, so a large empty background does not wash the image out.
        body = scan_c[scan_c > scan_c.min()]
        window = (-160.0, 240.0) if scan_c.min() <= -500 else tuple(np.percentile(body if body.size else scan_c, [1, 99]))
    low, high = window
    top = float(heat_c.max())
    heat_display = np.clip(heat_c / top, 0, 1) if top > 0 else np.zeros_like(heat_c)

    i, j, k = peak_c
    sx, sy, sz = spacing
    # (2D slice with rows = up axis, cols = the other; flipped so R is on the left), extent, labels
    panels = [
        ("axial", lambda v: v[:, :, k].T[:, ::-1], (sx, sy), ("R", "L", "A", "P"), k, 2),
        ("coronal", lambda v: v[:, j, :].T[:, ::-1], (sx, sz), ("R", "L", "S", "I"), j, 1),
        ("sagittal", lambda v: v[i, :, :].T[:, ::-1], (sy, sz), ("A", "P", "S", "I"), i, 0),
    ]
    figure = Figure(figsize=(13, 4.8), facecolor="black")  # no pyplot: the caller's backend is left alone
    axes = figure.subplots(1, 3)
    cmap = alpha_colormap(colormap)
    image = None
    for axis, (name, cut, (du, dv), (left, right, upper, lower), index, _) in zip(axes, panels):
        grey, hot = cut(scan_c), cut(heat_display)
        extent = (0, grey.shape[1] * du, 0, grey.shape[0] * dv)
        axis.imshow(grey, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent, interpolation="nearest")
        image = axis.imshow(hot, cmap=cmap, norm=Normalize(0, 1), origin="lower", extent=extent, interpolation="bilinear")
        axis.set_title(f"{name} (slice {index})", color="white", fontsize=10)
        axis.set_axis_off()
        style = dict(color="yellow", fontsize=12, fontweight="bold", transform=axis.transAxes)
        axis.text(0.02, 0.5, left, ha="left", va="center", **style)
        axis.text(0.98, 0.5, right, ha="right", va="center", **style)
        axis.text(0.5, 0.98, upper, ha="center", va="top", **style)
        axis.text(0.5, 0.02, lower, ha="center", va="bottom", **style)
    colorbar = figure.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01)
    colorbar.set_label(f"heatmap / max (max = {top:.3g})", color="white")
    colorbar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    peak_text = "peak (RAS mm): ({:.1f}, {:.1f}, {:.1f})".format(*peak_mm)
    figure.suptitle(f"{title}\n{peak_text} · radiological view", color="white", fontsize=11)
    figure.subplots_adjust(top=0.80, bottom=0.03, left=0.02, right=0.90, wspace=0.08)

    return atomic_write(path, lambda name: figure.savefig(name, dpi=90, facecolor="black"))
