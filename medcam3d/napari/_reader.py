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
import math
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..space import Space
from ._labels import FEW_LABELS, MAX_LABELS, label_hint, label_values, labels_layer_data
from ._outputs import saved_map_volumes, saved_output_layer
from ._scan import image_layer_data
from ._shared import Step, run_steps
from ._view import open_axial_when_added
from ._writer import prefer_medcam3d_writers

__all__ = ["napari_get_reader", "read_image", "read_steps", "label_layer", "dicom_window", "BACKGROUND_VOXELS",
           "MAX_VOLUME_LAYERS", "READ_SLAB_VOXELS", "STEPS_PER_FILE"]

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


#: From this many voxels (all files of one call together; e.g. a 512 x 512 x 300 CT has 79M), a
#: reader called by a running napari viewer reads in a worker thread (:mod:`._workers`).
BACKGROUND_VOXELS = 16 * 2**20


def read_image(path: str | Sequence[str]) -> list[tuple]:
    """Read one or more images as napari layer data tuples (large files: in the background).

    A 4D file gives one layer per volume, read once (a ``--four-d`` map of medcam3d: one heatmap
    per class, named by its class); a file of more than :data:`MAX_VOLUME_LAYERS` volumes is
    refused (see :func:`_volume_layers`). A map or mask that medcam3d saved (recognised by its
    NIfTI ``descrip``) opens as a heatmap image layer or a mask labels layer, as the *Explain*
    widget makes them (:mod:`._outputs`); any other label map (:func:`label_layer`) as a labels
    layer; the rest as scans (:func:`._scan.image_layer_data`).

    Called by a running napari viewer for files of at least :data:`BACKGROUND_VOXELS` voxels (told
    from their headers), the files are read in a worker thread (:func:`._workers.open_in_background`:
    progress and *Cancel* in a panel, the layers added when read) and napari gets ``[(None,)]``
    (its sentinel for "no layer now") at once, so that the window never freezes while a CT is read.

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of (data, kwargs, "image" or "labels")
        ``data`` in the file's stored voxel type (float64 becomes float32; labels uint8 or
        uint16), in (i, j, k) order (reordered for non-RAS axis orders, resampled for oblique
        files, see the module doc);
        ``kwargs["affine"]`` the voxel -> RAS placement, ``kwargs["metadata"]`` as the module doc says;
        or ``[(None,)]`` when the files are read in the background.

    Raises
    ------
    medcam3d.io.ImageReadError, FileNotFoundError
        With a message that names the file and what was wrong (napari shows it).
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    open_axial_when_added()
    prefer_medcam3d_writers()
    viewer = _viewer_for_background(paths)
    if viewer is not None:
        from ._workers import open_in_background

        open_in_background(viewer, read_steps(paths), ", ".join(p.name for p in paths))
        return [(None,)]
    return run_steps(read_steps(paths))


def _voxels(path: Path) -> int:
    """The voxels a file's header promises (0 when it cannot be told without reading)."""
    try:
        info = io.describe(path)
    except Exception:  # read_steps reports the problem
        logger.debug("no header for %s", path, exc_info=True)
        return 0
    if info.shape is None:  # a folder of several DICOM series
        return sum(math.prod(series.shape) for series in info.series if getattr(series, "shape", None))
    return math.prod(int(n) for n in info.shape)


def _viewer_for_background(paths: Sequence[Path]) -> Any:
    """The current napari viewer when ``paths`` are large enough to read in the background, else None.

    Only from the Qt main thread of a running napari (a script calling :func:`read_image` gets
    layer tuples back as before).
    """
    if sum(_voxels(p) for p in paths) < BACKGROUND_VOXELS:
        return None
    try:
        from napari import current_viewer
        from qtpy.QtCore import QThread
        from qtpy.QtWidgets import QApplication
    except ImportError:
        return None
    app = QApplication.instance()
    if app is None or QThread.currentThread() is not app.thread():
        return None
    return current_viewer()


#: Progress steps per file of :func:`read_steps` (the first nine tenths for reading its voxels).
STEPS_PER_FILE = 100
#: Voxels per slab when a NIfTI file is read in the background (:func:`medcam3d.io.read_in_slabs`).
READ_SLAB_VOXELS = 1 << 22


def read_steps(paths: Sequence[str | Path]) -> Generator[Step, None, list[tuple]]:
    """Read files into layer data tuples step by step (:func:`read_image`'s work, no Qt).

    Yields a :class:`Step` before reading each file, after each slab of :data:`READ_SLAB_VOXELS`
    voxels of a NIfTI file (:func:`medcam3d.io.read_in_slabs`; other formats are read at once) and
    before making its layers, so that a worker can report progress and stop between steps (a
    cancelled NIfTI file is not read to its end); returns what :func:`read_image` returns.
    """
    from ..jobs.case_ids import case_id_of

    files = [Path(p) for p in paths]
    layers: list[tuple] = []
    total = STEPS_PER_FILE * len(files)
    placing = STEPS_PER_FILE * 9 // 10  # reading takes the first nine tenths of a file's steps
    for number, p in enumerate(files):
        name = case_id_of(p)
        first = STEPS_PER_FILE * number
        yield Step(first, total, f"reading {p.name}")
        reading = io.read_in_slabs(p, dtype=None, slab_voxels=READ_SLAB_VOXELS)
        try:
            while True:  # a NIfTI file slab by slab: a worker can stop between slabs
                try:
                    done, slices = next(reading)
                except StopIteration as read:
                    array, space = read.value
                    break
                yield Step(first + placing * done // max(slices, 1), total,
                           f"reading {p.name}: {done} of {slices} slices")
        except io.VolumeError:  # 4D (found from the header, before any voxel is read): one layer per volume
            yield Step(first + placing, total, f"reading the volumes of {p.name}")
            layers.extend(_volume_layers(p, name))
            continue
        finally:
            reading.close()
        yield Step(first + placing, total, f"placing {p.name} in RAS mm")
        found = saved_output_layer(array, space, p)  # a medcam3d map or mask: a heatmap or labels layer
        if found is None:
            found = label_layer(array, space, name=name, path=p)
        layers.append(found if found is not None else
                      image_layer_data(array, space, name=name, path=p, header=_nifti_header(p),
                                       window=dicom_window(p) if p.is_dir() else None))
    return layers


#: DICOM tags of the window a series was meant to be read in (the first value when several are given).
WINDOW_CENTER, WINDOW_WIDTH = "0028|1050", "0028|1051"


def dicom_window(folder: Path) -> tuple[float, float] | None:
    """The display window a DICOM series' first slice names (WindowCenter ± WindowWidth / 2, in HU), or None.

    Read from one file's header (SimpleITK, no pixels); a series without the tags, or with values
    that are not numbers, gives None (the scan then opens in :func:`._scan.display_window`'s window).
    """
    import SimpleITK as sitk

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(_DICOM_SUFFIXES)) or \
        sorted(p for p in folder.iterdir() if p.is_file())
    for file in files[:4]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.LoadPrivateTagsOff()
        try:
            reader.ReadImageInformation()
        except RuntimeError:  # not a DICOM file: try the next
            continue
        if not (reader.HasMetaDataKey(WINDOW_CENTER) and reader.HasMetaDataKey(WINDOW_WIDTH)):
            return None
        try:
            centre = float(reader.GetMetaData(WINDOW_CENTER).split("\\")[0])
            width = float(reader.GetMetaData(WINDOW_WIDTH).split("\\")[0])
        except ValueError:
            return None
        if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
            return None
        return (centre - width / 2.0, centre + width / 2.0)
    return None


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
    maps = saved_map_volumes(data, space, path)  # medcam3d explain --four-d: one heatmap per class
    if maps is not None:
        return maps
    return [image_layer_data(data[t], space, name=f"{name} [{t}]", path=path, volume=t) for t in range(len(data))]
