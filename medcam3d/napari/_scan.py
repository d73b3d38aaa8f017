"""A scan as a napari image layer, placed in RAS mm, with its initial window.

:func:`image_layer_data` places a scan's voxels (reordered for non-RAS axis orders; an oblique
scan through a lazy multiscale pyramid on an axis-aligned display grid, :mod:`._lazy`) and keeps
its file's grid in ``layer.metadata`` (see :mod:`._reader`); :func:`display_window` chooses the
initial contrast limits (the file's own window, a CT soft-tissue window, else percentiles).
The reader, the saved-output reader (:mod:`._outputs`) and the sample data use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space, resample
from ._grid import axis_aligned_grid, drawing_error_mm, layer_grid, napari_affine, needs_display_grid, tilt_degrees
from ._lazy import pyramid
from ._shared import checksum, file_stamp
from ._view import AXIS_LABELS, UNITS

__all__ = ["image_layer_data", "display_window", "CT_WINDOW", "CT_AIR", "CT_TISSUE"]


#: CT soft-tissue window (level 40 HU, width 400 HU), used for scans that look like CT.
CT_WINDOW = (-160.0, 240.0)
#: A scan is taken as CT in HU when it holds values this low (air is -1000 HU) ...
CT_AIR = -500.0
#: ... and this high (water is 0 HU), however few voxels of either there are.
CT_TISSUE = 0.0


def display_window(data: np.ndarray, header: Any = None, window: tuple[float, float] | None = None
                   ) -> tuple[float, float] | None:
    """Initial contrast limits of a scan: the file's own window, a CT window, else percentiles.

    In this order: ``window`` (a DICOM series' WindowCenter/WindowWidth, see
    :func:`._reader.dicom_window`); the NIfTI header's ``cal_min``/``cal_max`` when set (the window its writer
    chose); :data:`CT_WINDOW` (soft tissue, W400/L40) when the scan holds air and tissue
    (values below :data:`CT_AIR` and above :data:`CT_TISSUE`, whatever fraction of the voxels
    each is: a body filling 0.1 % of the volume still opens in the soft-tissue window); else the
    0.5-99.5 percentiles. Taken on a strided sample of at most ~1M voxels (its minimum and maximum
    widened by the whole array's, which NumPy finds without a copy).
    """
    if window is not None and all(np.isfinite(window)) and window[1] > window[0]:
        return (float(window[0]), float(window[1]))
    if header is not None:
        try:
            low, high = float(header["cal_min"]), float(header["cal_max"])
        except (KeyError, TypeError, ValueError):
            low = high = 0.0
        if np.isfinite(low) and np.isfinite(high) and high > low:
            return (low, high)
    data = np.asarray(data)
    if data.size == 0:
        return None
    step = max(1, round((data.size / 1e6) ** (1 / max(data.ndim, 1))))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    if float(sample.min()) < CT_AIR and float(sample.max()) > CT_TISSUE:
        return CT_WINDOW
    if data.dtype.kind in "iu" and data.size <= 64 * 2**20:  # a body too small for the sample
        if float(data.min()) < CT_AIR and float(data.max()) > CT_TISSUE:
            return CT_WINDOW
    low, high = np.percentile(sample, [0.5, 99.5])
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    return (float(low), float(high)) if high > low else None



_TOLD: set[str] = set()  # scans already announced as resampled


def _tell_resampled(name: str, key: str, source: Space, display: Space) -> None:
    """Say once per scan that an oblique scan is shown resampled (a napari notification)."""
    if key in _TOLD:
        return
    _TOLD.add(key)
    from napari.utils.notifications import show_info

    size = " x ".join(f"{v:g}" for v in display.spacing)
    show_info(f"medcam3d: {name} is oblique (voxel axes up to {tilt_degrees(source):.1f} degrees from R/A/S; napari "
              f"would draw its 2D slices up to {drawing_error_mm(source):.0f} mm off), so it is shown resampled onto "
              f"an axis-aligned {size} mm grid, slice by slice as you look. Positions read true RAS mm; files are "
              "saved on the original grid.")


def image_layer_data(array: np.ndarray, space: Space, *, name: str, path: str | Path | None = None,
                     volume: int | None = None, lazy: bool = True, header: Any = None,
                     window: tuple[float, float] | None = None, **kwargs: Any) -> tuple:
    """A scan as a napari image layer data tuple, placed in RAS mm (an oblique one on a display grid).

    Parameters
    ----------
    array : (*space.shape) ndarray
        In the file's (i, j, k) order.
    space : Space
    name : str
    path : path, optional
        Source file, kept in ``metadata["path"]``.
    volume : int, optional
        Volume index of a 4D file, kept in ``metadata["volume"]``.
    lazy : bool
        An oblique scan is shown through a multiscale pyramid of :class:`._lazy.ResampledView`
        (resampled where napari looks, nothing copied; the default), or, with False, resampled
        once onto the display grid (an ndarray, for maps read from files).
    header : nibabel header, optional
        Its ``cal_min``/``cal_max`` (when set) are the initial window (:func:`display_window`).
    window : (low, high), optional
        The file's own window (a DICOM series' WindowCenter/WindowWidth), before the header's.
    **kwargs
        More napari ``add_image`` arguments.

    Returns
    -------
    (data, kwargs, "image")
        ``data`` has ``array``'s type (float64 becomes float32) in R-A-S axis order (a view); for
        an oblique scan a list of :class:`._lazy.ResampledView` levels on :func:`._grid.axis_aligned_grid`
        (``kwargs["multiscale"]`` True; outside the scan: its minimum, e.g. air), or with
        ``lazy=False`` that grid's voxels resampled trilinearly and rounded back to an integer type.
    """
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    data: Any
    data, affine, axes = layer_grid(array, space)
    metadata: dict[str, Any] = {
        "medcam3d": "scan", "affine": affine, "axes": axes, "path": None if path is None else str(path),
        "volume": None if volume is None else int(volume), "dtype": array.dtype.str, "resampled": False,
        "file_shape": tuple(space.shape), "file_affine": np.array(space.affine, dtype=np.float64),
    }
    options: dict[str, Any] = {}
    shown = Space(data.shape, affine)
    limits = display_window(array, header, window)
    if needs_display_grid(shown):
        display = axis_aligned_grid(shown)
        fill = float(array.min()) if array.size else 0.0
        if lazy and array.ndim == 3:
            data = pyramid(array, space, display, fill=fill)
            options["multiscale"] = True
            metadata.update(affine=np.array(display.affine, dtype=np.float64), axes=None, resampled=True, lazy=True,
                            stamp=file_stamp(path))
        else:
            data = resample(array, space, display, fill=fill)  # float32, straight from the file's grid
            if array.dtype.kind in "iub":
                data = np.rint(data, out=data).astype(array.dtype)
            metadata.update(affine=np.array(display.affine, dtype=np.float64), axes=None, resampled=True,
                            checksum=checksum(data), stamp=file_stamp(path))
        _tell_resampled(name, str(path) if path is not None else name, shown, display)
    ndim = len(space.shape)
    options.update({"name": name, "affine": napari_affine(metadata["affine"], ndim), "metadata": metadata,
                    "colormap": "gray", "axis_labels": AXIS_LABELS[:ndim], "units": UNITS[:ndim],
                    "rendering": "attenuated_mip", "attenuation": 2.0})  # 3D: the nearer tissue in front
    if limits is not None:
        options["contrast_limits"] = limits
    options.update(kwargs)
    return data, options, "image"
