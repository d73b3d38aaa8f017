"""Reader: medical images as napari image or labels layers placed in scanner space (RAS mm).

What a file opens as:

- a medcam3d **heatmap** (a map that ``medcam3d explain`` wrote, its ``_norm`` or ``_feature``
  copy, or one heatmap per class of a ``--four-d`` file, named by its class) or a medcam3d
  ``_mask`` (:mod:`._outputs`, recognised by the NIfTI descrip);
- a **label map** (ground truth such as ``case_04_mask.nii.gz``, ``..._segmentation.nii.gz``,
  masks saved by the plugin, any file of few whole non-negative values): a napari Labels layer in
  its own colours (:mod:`._labels` states the rule: whole non-negative values, at most 256 distinct
  ones when the name, NIfTI intent or descrip says labels, at most 64 otherwise, then an integer
  voxel type);
- anything else: a grey **scan** image.

A layer's world coordinates are RAS+ millimetres, with the axes labelled R, A, S and the units
mm; a scan opens in the axial view (anterior up, the patient's right on the screen's left).
napari draws a 2D slice only along data axes that match world axes, so:

- a file that stores its axes in another order than R-A-S (e.g. coronal slices, ``LIP``) is
  shown with its voxel axes reordered, never resampled: ``layer.data = file_array.transpose(axes)``
  and the affine's columns follow (:func:`._grid.layer_grid`); flips are kept;
- an **oblique** file (voxel axes tilted from the world axes, so that napari would draw it more
  than a tenth of a voxel away from its true place) is shown **resampled** (trilinear; label maps
  by nearest neighbour) onto an
  axis-aligned grid with the scan's own voxel size that covers its whole extent
  (:func:`._grid.axis_aligned_grid`); a notification says so once. The file's own grid is kept in
  the metadata and writers save on it.

``layer.metadata`` holds ``"medcam3d": "scan"``, ``"affine"`` (4x4 float64 voxel -> RAS mm of
``layer.data``), ``"axes"`` (None when resampled), ``"path"``, ``"volume"``, ``"dtype"`` (the
stored voxel type, kept when saving), ``"resampled"``, ``"file_shape"`` and ``"file_affine"`` (the
file's own grid, in its own voxel order) and, for a resampled scan, ``"checksum"`` (of the shown
voxels, so that a writer knows whether they still are the file's) and ``"stamp"`` (the file's
modification time and size).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..space import Space, resample
from ._grid import axis_aligned_grid, drawing_error_mm, file_grid, layer_grid, napari_affine, needs_display_grid, tilt_degrees
from ._labels import FEW_LABELS, MAX_LABELS, label_hint, label_values, labels_layer_data
from ._view import AXIS_LABELS, UNITS, open_axial_when_added
from ._writer import prefer_medcam3d_writers

__all__ = ["napari_get_reader", "read_image", "image_layer_data", "label_layer", "layer_grid", "file_grid",
           "napari_affine", "checksum", "file_stamp", "display_window", "CT_WINDOW"]

logger = logging.getLogger(__name__)

_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[tuple]] | None:
    """The reader for ``path`` when medcam3d can read it, else None.

    Parameters
    ----------
    path : str or list of str
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, or a folder holding a DICOM
        series. A list is accepted when every entry is.

    Returns
    -------
    callable or None
        :func:`read_image`.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_image


def _readable(path: Path) -> bool:
    if path.is_dir():
        return _holds_dicom(path)
    return path.name.lower().endswith(io.READ_FORMATS)


def _holds_dicom(folder: Path, probe: int = 16) -> bool:
    """A folder with ``.dcm``-like files, or files with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    except OSError:
        return False
    if any(p.name.lower().endswith(_DICOM_SUFFIXES) for p in files):
        return True
    for p in files[:probe]:
        try:
            with open(p, "rb") as stream:
                stream.seek(128)
                if stream.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def read_image(path: str | Sequence[str]) -> list[tuple]:
    """Read one or more images as napari layer data tuples.

    A 4D file gives one layer per volume, read once (a ``--four-d`` map of medcam3d: one heatmap
    per class, named by its class); a file of more than :data:`MAX_VOLUME_LAYERS` volumes is
    refused (see :func:`_volume_layers`). A map or mask that medcam3d saved (recognised by its
    NIfTI ``descrip``) opens as a heatmap image layer or a mask labels layer, as the *Explain*
    widget makes them (:mod:`._outputs`); any other label map (:func:`label_layer`) as a labels
    layer; the rest as scans (:func:`image_layer_data`).

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of (data, kwargs, "image" or "labels")
        ``data`` in the file's stored voxel type (float64 becomes float32; labels uint8 or
        uint16), in (i, j, k) order (reordered for non-RAS axis orders, resampled for oblique
        files, see the module doc);
        ``kwargs["affine"]`` the voxel -> RAS placement, ``kwargs["metadata"]`` as the module doc says.

    Raises
    ------
    medcam3d.io.ImageReadError, FileNotFoundError
        With a message that names the file and what was wrong (napari shows it).
    """
    from ..jobs.cases import case_id_of
    from ._outputs import saved_output_layer

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    open_axial_when_added()
    prefer_medcam3d_writers()
    for p in map(Path, paths):
        name = case_id_of(p)
        try:
            array, space = io.read(p, dtype=None)
        except io.VolumeError:  # 4D (found from the header, before any voxel is read): one layer per volume
            layers.extend(_volume_layers(p, name))
            continue
        found = saved_output_layer(array, space, p)  # a medcam3d map or mask: a heatmap or labels layer
        if found is None:
            found = label_layer(array, space, name=name, path=p)
        layers.append(found if found is not None else
                      image_layer_data(array, space, name=name, path=p, header=_nifti_header(p)))
    return layers


def _nifti_header(path: Path) -> Any:
    """The NIfTI header of ``path`` (None for other formats or an unreadable header)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        import nibabel as nib

        return nib.load(str(path)).header
    except Exception:  # the voxels were read already; a header problem only means no hint
        logger.debug("no NIfTI header in %s", path, exc_info=True)
        return None


def label_layer(array: np.ndarray, space: Space, *, name: str, path: str | Path | None = None) -> tuple | None:
    """A 3D label map as a napari Labels layer data tuple, or None when ``array`` is no label map.

    The rule (:mod:`._labels`): whole non-negative values (at most 65535), at most
    :data:`._labels.MAX_LABELS` (256) distinct ones when the file says it holds labels
    (:func:`._labels.label_hint`: its name, NIfTI intent or descrip), else an integer voxel type
    and at most :data:`._labels.FEW_LABELS` (64). A scan is turned down after a strided sample.

    Parameters
    ----------
    array : (*space.shape) ndarray
        As :func:`medcam3d.io.read` gives it (``dtype=None``).
    space : Space
    name : str
    path : path, optional

    Returns
    -------
    (data, kwargs, "labels") or None
        :func:`._labels.labels_layer_data` (nearest neighbour onto the display grid when oblique).
    """
    if np.ndim(array) != 3:
        return None
    header = _nifti_header(Path(path)) if path is not None else None
    hint = label_hint(path, header)
    if hint is None and np.asarray(array).dtype.kind not in "biu":
        return None
    values = label_values(array, MAX_LABELS if hint else FEW_LABELS)
    if values is None:
        return None
    descrip = io.full_descrip(header) if header is not None else None
    return labels_layer_data(array, space, name=name, path=path, values=values, descrip=descrip)


#: The most volumes of a 4D file the reader opens (one 3D layer each).
MAX_VOLUME_LAYERS = 128


def _volume_layers(path: Path, name: str) -> list[tuple]:
    """One image layer per volume of a 4D file, read once (:func:`medcam3d.io.read_volumes`).

    Each volume is a 3D layer (``"<name> [t]"``, ``metadata["volume"] = t``), so the Explain and
    Segment widgets can use it and a 4D map of a few classes shows one toggleable layer per class.
    A file of more than :data:`MAX_VOLUME_LAYERS` volumes (a time series) is refused, naming how to
    open one volume, before its voxels are read.
    """
    volumes = io.describe(path).volumes
    if volumes > MAX_VOLUME_LAYERS:
        raise io.VolumeError(
            f"'{path}' holds {volumes} volumes; medcam3d's napari reader opens a 4D file as one layer per volume, "
            f"at most {MAX_VOLUME_LAYERS}. Open one volume instead: save it as its own file (medcam3d.io.read(path, "
            "volume=<index>) then medcam3d.io.write), or explain it with 'medcam3d explain --volume <index>'."
        )
    data, space = io.read_volumes(path, dtype=None, max_volumes=MAX_VOLUME_LAYERS)
    from ._outputs import saved_map_volumes

    maps = saved_map_volumes(data, space, path)  # medcam3d explain --four-d: one heatmap per class
    if maps is not None:
        return maps
    return [image_layer_data(data[t], space, name=f"{name} [{t}]", path=path, volume=t) for t in range(len(data))]


#: CT soft-tissue window (level 40 HU, width 400 HU), used for scans that look like CT.
CT_WINDOW = (-160.0, 240.0)
#: A scan is taken as CT in HU when it holds values this low (air is -1000 HU) ...
CT_AIR = -500.0
#: ... and this high (water is 0 HU), however few voxels of either there are.
CT_TISSUE = 0.0


def display_window(data: np.ndarray, header: Any = None) -> tuple[float, float] | None:
    """Initial contrast limits of a scan: the file's own window, a CT window, else percentiles.

    In this order: the NIfTI header's ``cal_min``/``cal_max`` when set (the window its writer
    chose); :data:`CT_WINDOW` (soft tissue, W400/L40) when the scan holds air and tissue
    (values below :data:`CT_AIR` and above :data:`CT_TISSUE`, whatever fraction of the voxels
    each is: a body filling 0.1 % of the volume still opens in the soft-tissue window); else the
    0.5-99.5 percentiles. Taken on a strided sample of at most ~1M voxels (its minimum and maximum
    widened by the whole array's, which NumPy finds without a copy).
    """
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
                     volume: int | None = None, lazy: bool = True, header: Any = None, **kwargs: Any) -> tuple:
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
    from ._lazy import pyramid

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
    limits = display_window(array, header)
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
