"""Slice pictures: three orthogonal slices through a heatmap's peak, over the scan.

Both volumes are shown in the closest RAS orientation of the scan's grid, in radiological
convention (the patient's right on the image's left; anterior and superior up), with the voxel
spacing respected and the sides labelled (R/L, A/P, S/I). The heatmap uses a colormap whose alpha
ramps from 0, so the grey scan shows through where the map is low; the colour bar shows the same
colours opaque. Only the three planes are read, so a picture costs the same for any volume size.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path
from typing import Any, Literal, TextIO, TypedDict, Unpack

import numpy as np

from .._files import atomic_write, atomic_write_text
from ..space import Space

__all__ = ["save_slices", "slices_figure", "PictureOptions", "SlicePainter", "alpha_colormap", "default_window", "save_figure", "write_csv", "write_text", "print_table",
           "escape_cell", "unescape_cell", "unescape_row"]


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


# A spreadsheet reads a cell that starts with one of these as a formula (=HYPERLINK(...), @SUM(...),
# +cmd|...; full-width forms too, which some locales accept); OWASP's "CSV injection" advice.
_FORMULA_START = "=+-@\t\r\n\uff1d\uff0b\uff0d\uff20"
_NUMBERS = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?: [+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)*")


def _formula_like(text: str) -> bool:
    core = text.lstrip("'")
    return bool(core) and core[0] in _FORMULA_START and _NUMBERS.fullmatch(core) is None


def escape_cell(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula.

    Text starting with ``= + - @``, a tab, CR or LF (or their full-width forms) gets a leading
    single quote (``'=1+1``), as OWASP advises against formula injection; numbers, and text that
    is only numbers (``-3.5``, ``-12.0 4.5 7.25``), stay as they are. Text that already starts with
    quotes before such a character gets one more, so :func:`unescape_cell` gives back exactly the
    original. Other values are returned unchanged.
    """
    if isinstance(value, str) and _formula_like(value):
        return "'" + value
    return value


def unescape_cell(text: str) -> str:
    """The original text of a cell written by :func:`escape_cell` (its inverse)."""
    if text.startswith("'") and _formula_like(text[1:]):
        return text[1:]
    return text


def unescape_row(row: dict) -> dict:
    """A row read back (e.g. with ``csv.DictReader``) from a CSV that medcam3d wrote: keys and values unescaped."""
    return {(unescape_cell(k) if isinstance(k, str) else k): (unescape_cell(v) if isinstance(v, str) else v)
            for k, v in row.items()}


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write rows (the union of their keys, in order of appearance, as columns) to CSV atomically.

    Every cell, the header's too, goes through :func:`escape_cell`, so a case id, a class name or
    an error message such as ``=HYPERLINK(...)`` is shown as text, never run, when the file is
    opened in a spreadsheet; :func:`unescape_row` reads it back.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["empty"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # CRLF line ends (RFC 4180): a cell holding a CR or LF is quoted, so it reads back
    writer.writerow([escape_cell(column) for column in columns])
    writer.writerows([escape_cell(row.get(column, "")) for column in columns] for row in rows)
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


def _opaque(colormap):
    """The same colours without transparency (for the colour bar)."""
    from matplotlib.colors import ListedColormap

    colours = colormap(np.linspace(0.0, 1.0, colormap.N))
    colours[:, 3] = 1.0
    return ListedColormap(colours, name=f"{colormap.name}_opaque")


def default_window(scan: np.ndarray, max_voxels: int = 2**21) -> tuple[float, float]:
    """Grey-level window of a scan, from an even subsample of at most ``max_voxels`` voxels.

    A soft-tissue window (−160 to 240 HU) for CT (air at about −1000 HU); otherwise the 1st–99th
    percentile of the non-background voxels, so a large empty background does not wash the
    image out.
    """
    scan = np.asarray(scan)
    step = max(1, int(np.ceil((scan.size / max_voxels) ** (1.0 / max(scan.ndim, 1)))))
    sample = np.asarray(scan[(slice(None, None, step),) * scan.ndim], dtype=np.float32)
    low = float(sample.min())
    if low <= -500:
        return (-160.0, 240.0)
    body = sample[sample > low]
    lo, hi = np.percentile(body if body.size else sample, [1, 99])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _orientation(space: Space) -> np.ndarray:
    """Per voxel axis: (RAS axis it is closest to, +1 or -1 along it)."""
    import nibabel.orientations as nio

    return nio.io_orientation(space.affine).astype(int)


def _canonical_plane(plane: np.ndarray, axes: tuple[int, int], orientation: np.ndarray) -> np.ndarray:
    """A 2D plane over voxel ``axes`` (in that order) as (lower RAS axis, higher RAS axis), increasing."""
    out = np.asarray(plane)
    if orientation[axes[0], 0] > orientation[axes[1], 0]:
        out = out.T
        axes = axes[::-1]
    for position, axis in enumerate(axes):
        if orientation[axis, 1] < 0:
            out = np.flip(out, axis=position)
    return out


class PictureOptions(TypedDict, total=False):
    """Keyword options of :func:`save_slices` and :func:`slices_figure` (see :class:`SlicePainter`).

    title : str — the first title line; peak_mm / peak_voxel : (3,) — where to cut (default: the
    map's peak); window : (low, high) — the scan's grey window; colormap : str (default "inferno").
    """

    title: str
    peak_mm: tuple[float, float, float] | None
    peak_voxel: tuple[int, int, int] | None
    window: tuple[float, float] | None
    colormap: str


def save_slices(path: str | Path, scan: np.ndarray, heat, space: Space, *, dpi: int = 80,
                **options: Unpack[PictureOptions]) -> Path:
    """Write a PNG with axial, coronal and sagittal slices through the heatmap's peak.

    See :class:`SlicePainter` (which draws many maps over one scan faster) for the parameters.
    """
    painter, cut = _painter_and_cut(scan, space, options)
    return painter.save(path, heat, dpi=dpi, **cut)


def slices_figure(scan: np.ndarray, heat, space: Space, **options: Unpack[PictureOptions]):
    """The matplotlib Figure of :func:`save_slices` (object API, no pyplot); see :class:`SlicePainter`."""
    painter, cut = _painter_and_cut(scan, space, options)
    return painter.paint(heat, **cut)


def _painter_and_cut(scan: np.ndarray, space: Space, options: PictureOptions) -> tuple[SlicePainter, dict[str, Any]]:
    """A painter for one picture, and the options that say where to cut and what to title."""
    painter = SlicePainter(scan, space, window=options.get("window"), colormap=options.get("colormap", "inferno"))
    cut: dict[str, Any] = {key: value for key, value in options.items() if key in ("title", "peak_mm", "peak_voxel")}
    return painter, cut


class SlicePainter:
    """Axial, coronal and sagittal slices through a heatmap's peak over one scan, for many maps.

    The figure (matplotlib's object API: no pyplot, the caller's backend is left alone) is laid
    out once per scan and repainted for each map. Only three planes are read from the scan and
    sampled from each map, so a picture costs the same for any volume size. The peak is marked
    (a cyan cross); the colour bar shows the map's colours without the overlay's transparency, in
    its own column. A panel that would be a single voxel thick (a one-slice volume's coronal and
    sagittal cuts) is left out; a panel much longer than wide is stretched to 1:5 and says so.

    Parameters
    ----------
    scan : (*space.shape) ndarray
        The scan on its grid (scanner space).
    space : Space
        Its grid (3D).
    window : (low, high), optional
        Grey-level window of the scan; default :func:`default_window`.
    colormap : str
    """

    def __init__(self, scan: np.ndarray, space: Space, *, window: tuple[float, float] | None = None,
                 colormap: str = "inferno") -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        shape = tuple(space.shape)
        if len(shape) != 3 or tuple(scan.shape) != shape:
            raise ValueError(f"scan {scan.shape} and space {shape} must share one 3D grid.")
        self.scan, self.space, self.shape = scan, space, shape
        low, high = window if window is not None else default_window(scan)
        self.orientation = orientation = _orientation(space)
        axis_of = {int(orientation[a, 0]): a for a in range(3)}  # RAS axis -> voxel axis
        spacing = np.asarray(space.spacing)
        names = {2: "axial", 1: "coronal", 0: "sagittal"}
        sides = {0: ("L", "R"), 1: ("P", "A"), 2: ("I", "S")}  # low, high end of each RAS axis
        chosen = []
        for fixed in (2, 1, 0):  # axial, coronal, sagittal
            cut = axis_of[fixed]
            shown = tuple(a for a in range(3) if a != cut)
            if all(shape[a] == 1 for a in shown) or (any(shape[a] == 1 for a in shown) and fixed != 2):
                continue  # a line, not a picture
            chosen.append((fixed, cut, shown))
        if not chosen:
            chosen.append((2, axis_of[2], tuple(a for a in range(3) if a != axis_of[2])))
        layout = []
        for fixed, cut, shown in chosen:
            u_axis, v_axis = sorted(shown, key=lambda a: orientation[a, 0])  # canonical order: lower RAS axis first
            width, height = shape[u_axis] * spacing[u_axis], shape[v_axis] * spacing[v_axis]
            ratio = width / height
            layout.append((fixed, cut, shown, u_axis, v_axis, width, height, float(np.clip(ratio, 0.2, 5.0)),
                           not 0.2 <= ratio <= 5.0))

        # geometry (inches): panels side by side at one height, the colour bar in its own column
        margin, gap, bar, bar_gap, title_height, bottom = 0.15, 0.12, 0.22, 0.45, 0.95, 0.15
        total_ratio = sum(item[7] for item in layout)
        panel_height = min(4.2, (11.5 - gap * (len(layout) - 1)) / total_ratio)
        fig_width = margin + panel_height * total_ratio + gap * (len(layout) - 1) + bar_gap + bar + 0.1 + margin + 0.35
        fig_height = bottom + panel_height + title_height
        self.figure = figure = Figure(figsize=(fig_width, fig_height), facecolor="black")
        self.cmap = cmap = alpha_colormap(colormap)
        norm = Normalize(0.0, 1.0)
        self.panels = []
        x = margin
        for fixed, cut, shown, u_axis, v_axis, width, height, ratio, stretched in layout:
            w = panel_height * ratio
            axis = figure.add_axes((x / fig_width, bottom / fig_height, w / fig_width, panel_height / fig_height),
                                   label=names[fixed])
            centre = (x + w / 2) / fig_width
            x += w + gap
            # rows: the higher RAS axis (up); columns: the lower one, reversed (radiological: R on the left)
            extent = (0, width, 0, height)
            aspect: Literal["auto", "equal"] = "auto" if stretched else "equal"
            blank = np.zeros((shape[v_axis], shape[u_axis]), np.float32)
            grey = axis.imshow(blank, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                               interpolation="nearest", aspect=aspect)
            hot = axis.imshow(blank, cmap=cmap, norm=norm, origin="lower", extent=extent, interpolation="bilinear",
                              aspect=aspect)
            (marker,) = axis.plot([0.0], [0.0], marker="+", markersize=18, markeredgewidth=1.6, color="cyan")
            axis.set_xlim(0, width)
            axis.set_ylim(0, height)
            axis.set_axis_off()
            narrow = w < 2.2
            # a figure text, not an axes title: titles re-measure the (hidden) tick labels on every draw
            label = figure.text(centre, (bottom + panel_height + 0.06) / fig_height, "", color="white",
                                fontsize=8 if narrow else 10, ha="center", va="bottom")
            style: dict[str, Any] = dict(color="yellow", fontsize=12, fontweight="bold", transform=axis.transAxes)
            (u_low, u_high), (v_low, v_high) = sides[int(orientation[u_axis, 0])], sides[int(orientation[v_axis, 0])]
            axis.text(0.02, 0.5, u_high, ha="left", va="center", **style)  # reversed columns: high end on the left
            axis.text(0.98, 0.5, u_low, ha="right", va="center", **style)
            axis.text(0.5, 0.98, v_high, ha="center", va="top", **style)
            axis.text(0.5, 0.02, v_low, ha="center", va="bottom", **style)
            name = f"{names[fixed]}{chr(10) if narrow else ' '}(slice {{}})" + (f"{chr(10)}stretched" if stretched else "")
            self.panels.append(dict(cut=cut, shown=shown, u=u_axis, v=v_axis, du=spacing[u_axis], dv=spacing[v_axis],
                                    grey=grey, hot=hot, marker=marker, label=label, name=name))
        bar_axis = figure.add_axes(((x - gap + bar_gap) / fig_width, bottom / fig_height, bar / fig_width,
                                    panel_height / fig_height), label="colour bar")
        self.colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=_opaque(cmap)), cax=bar_axis)
        self.colorbar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
        self.title = figure.suptitle("", color="white", fontsize=11, y=1 - 0.1 / fig_height, va="top")
        self._grey: dict[tuple[int, int], np.ndarray] = {}

    def _plane(self, volume, cut: int, index: int, shown: tuple[int, int]) -> np.ndarray:
        values = volume.plane(cut, index) if hasattr(volume, "plane") else volume[(slice(None),) * cut + (index,)]
        return _canonical_plane(np.asarray(values, dtype=np.float32), shown, self.orientation)

    def paint(self, heat, *, title: str = "", peak_mm: tuple[float, float, float] | None = None,
              peak_voxel: tuple[int, int, int] | None = None):
        """Draw ``heat`` over the scan and return the figure.

        Parameters
        ----------
        heat : (*space.shape) ndarray or ScanGridMap
            The heatmap on the scan's grid: an array, or a
            :class:`~medcam3d.scan_maps.ScanGridMap`, sampled on the three planes only.
        title : str
            First title line (case, method, class, probability).
        peak_mm : (3,) optional
            Where to cut when ``peak_voxel`` is not given (the nearest voxel); printed in the title.
        peak_voxel : (3,) optional
            The voxel to cut through. Default: the map's peak; for a flat map (no peak), the
            volume's centre, and the title says so.

        Returns
        -------
        matplotlib.figure.Figure
            Panel axes first (labelled ``"axial"``, ``"coronal"``, ``"sagittal"``), then the
            colour bar's.
        """
        from ..masks import peak as array_peak

        shape, space = self.shape, self.space
        if hasattr(heat, "plane"):
            found = heat.peak()
            top = heat.value_range()[1]
        else:
            heat = np.asarray(heat)
            if tuple(heat.shape) != shape:
                raise ValueError(f"heat {heat.shape} must be on the scan's grid {shape}.")
            found = array_peak(heat, space)
            top = float(np.nanmax(heat)) if heat.size else 0.0
        top = float(top) if top is not None and np.isfinite(top) else 0.0
        note = ""
        voxel: tuple[int, ...] | None = peak_voxel
        mm: tuple[float, ...] | None = peak_mm
        if voxel is None and mm is not None:
            voxel = tuple(int(v) for v in np.clip(np.rint(space.world_to_voxel(np.asarray(mm, float))), 0,
                                                  np.asarray(shape) - 1))
        if voxel is None and found is not None:
            voxel, mm = found[0], tuple(float(v) for v in found[1])
        if voxel is None:
            voxel = tuple((n - 1) // 2 for n in shape)
            note = "no peak: the map is flat (all zero) · slices through the volume's centre"
        voxel = tuple(int(v) for v in voxel)
        orientation = self.orientation
        for panel in self.panels:
            cut, shown, u_axis, v_axis = panel["cut"], panel["shown"], panel["u"], panel["v"]
            key = (cut, voxel[cut])
            if key not in self._grey:
                self._grey[key] = self._plane(self.scan, cut, voxel[cut], shown).T[:, ::-1]
            hot = self._plane(heat, cut, voxel[cut], shown)
            display = np.clip(hot / top, 0, 1) if top > 0 else np.zeros_like(hot)
            panel["grey"].set_data(self._grey[key])
            panel["hot"].set_data(display.T[:, ::-1])
            u = voxel[u_axis] if orientation[u_axis, 1] > 0 else shape[u_axis] - 1 - voxel[u_axis]
            v = voxel[v_axis] if orientation[v_axis, 1] > 0 else shape[v_axis] - 1 - voxel[v_axis]
            panel["marker"].set_data([(shape[u_axis] - 1 - u + 0.5) * panel["du"]], [(v + 0.5) * panel["dv"]])
            panel["marker"].set_visible(not note)
            panel["label"].set_text(panel["name"].format(voxel[cut]))
        self.colorbar.set_label(f"heatmap / max (max = {top:.3g})", color="white")
        if note:
            second = note
        else:
            where = mm if mm is not None else space.voxel_to_world(np.asarray(voxel, float))
            second = "peak (RAS mm, +): ({:.1f}, {:.1f}, {:.1f}) · radiological view".format(*where)
        self.title.set_text(f"{title}\n{second}")
        return self.figure

    def save(self, path: str | Path, heat, *, title: str = "", peak_mm=None, peak_voxel=None, dpi: int = 80) -> Path:
        """:meth:`paint` ``heat`` and write the PNG atomically."""
        figure = self.paint(heat, title=title, peak_mm=peak_mm, peak_voxel=peak_voxel)
        # zlib level 1 for the PNG: a third of the encoding time of the default 6, a few % larger
        return atomic_write(path, lambda name: figure.savefig(name, dpi=dpi, facecolor="black",
                                                              pil_kwargs={"compress_level": 1}))
