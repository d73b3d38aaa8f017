"""DICOM export for PACS: heatmaps as DICOM Parametric Maps, masks as DICOM Segmentations.

For a scan read from a DICOM series, a heatmap on the series' grid (``to_scanner_space(result,
medcam3d.io.read_space(folder))``) is written as a Parametric Map (float32 values, one frame per
source slice) and a mask as a binary Segmentation (one segment per class), both with
`highdicom <https://highdicom.readthedocs.io>`_. Each object references the source series: it
joins the source study (patient and study attributes copied), shares its frame of reference, and
every frame names the source slice it was derived from (``SourceImageSequence``) and carries that
slice's position and orientation. OHIF, 3D Slicer and PACS viewers therefore overlay the objects
on the source series.

Geometry: medcam3d's voxel ``(i, j, k)`` of a DICOM series is column ``i`` and row ``j`` of the
``k``-th slice along the slice normal (the order SimpleITK and :func:`medcam3d.io.read` give).
The export does not assume that order: it matches every source slice to its ``k`` by its
``ImagePositionPatient`` and checks the orientation, pixel spacing and size against the map's
grid, so a map on any other grid is refused rather than written misplaced.

Needs the ``dicom`` extra: ``pip install "medcam3d[dicom]"`` (highdicom, pydicom).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._files import MARK, atomic_write, is_inside, written_by_medcam3d
from .errors import ImageReadError, OutputConflictError, SpaceError, UntrustedFileError
from .orientation import ras_to_lps
from .space import Space

if TYPE_CHECKING:
    from pydicom import Dataset

    from .heatmap import Heatmap

__all__ = ["MANUFACTURER", "export_dicom", "read_series", "write_parametric_map", "write_segmentation"]

#: Manufacturer of the objects medcam3d writes (it recognises its own files by it).
MANUFACTURER = MARK

# Slice positions must match within 1 % of the slice spacing plus 1e-3 mm (as medcam3d.io reads
# series); orientations within 1e-4 (cosines); pixel spacings within 1e-4 relative.
_POSITION_REL_TOL = 0.01
_POSITION_ABS_TOL_MM = 1e-3
_COSINE_TOL = 1e-4


def _require_highdicom():
    try:
        import highdicom
    except ImportError:  # pragma: no cover - the dev extra installs it
        message = (
            "DICOM export needs highdicom and pydicom: pip install 'medcam3d[dicom]' "
            "(or pip install 'highdicom>=0.22' 'pydicom>=2.4')."
        )
        raise ImportError(message) from None
    return highdicom


# --------------------------------------------------------------------------------------------
# The source series
# --------------------------------------------------------------------------------------------


def read_series(folder: str | os.PathLike, *, series: str | None = None, trust: bool = False) -> list[Dataset]:
    """The headers of one DICOM series in a folder (pixel data are not read).

    Parameters
    ----------
    folder : path
        A folder holding the series' files (other files and other series may be there too).
    series : str, optional
        The SeriesInstanceUID to take when the folder holds several series.
    trust : bool
        Allow files reached through links that lead out of the folder (as :func:`medcam3d.io.read`).

    Returns
    -------
    list of pydicom.Dataset
        One per slice, in file-name order (the export orders them by position).

    Raises
    ------
    ImageReadError
        No DICOM image in the folder, several series without ``series``, an unknown ``series``.
    UntrustedFileError
        A link leading out of the folder, without ``trust``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"'{root}' is not a folder; expected the folder of a DICOM series.")
    found: dict[str, list[Dataset]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if not trust and not is_inside(path, root):
            message = (
                f"'{path}' is a link to '{os.path.realpath(path)}', outside the DICOM folder; copy the files into the folder, "
                "or pass trust=True if you trust where the links lead."
            )
            raise UntrustedFileError(message)
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # not a DICOM file (a DICOMDIR-less folder may hold notes, thumbnails ...)
        if "ImagePositionPatient" not in dataset or "SeriesInstanceUID" not in dataset:
            continue  # not a slice of an image series (a report, a presentation state ...)
        found.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    if not found:
        raise ImageReadError(f"'{root}' holds no DICOM image slices; expected the folder of one DICOM series.")
    if series is None:
        if len(found) > 1:
            raise ImageReadError(f"'{root}' holds {len(found)} DICOM series: {', '.join(found)}; pass series=<uid>.")
        series = next(iter(found))
    if series not in found:
        raise ImageReadError(f"series '{series}' is not in '{root}'; found: {', '.join(found)}.")
    return found[series]


def _source(source: str | os.PathLike | Sequence[Dataset], series: str | None, trust: bool) -> list[Dataset]:
    if isinstance(source, (str, os.PathLike)):
        return read_series(source, series=series, trust=trust)
    datasets = list(source)
    if not datasets:
        raise ImageReadError("No source slices given; expected the datasets of a DICOM series or its folder.")
    return datasets


def _series_folders(source: str | os.PathLike | Sequence[Dataset], datasets: Sequence[Dataset]) -> list[Path]:
    """The folders the source series lives in: the folder given, and each slice file's folder."""
    folders = {Path(source).expanduser().resolve()} if isinstance(source, (str, os.PathLike)) else set()
    for dataset in datasets:
        filename = getattr(dataset, "filename", None)
        if isinstance(filename, (str, os.PathLike)) and str(filename):
            folders.add(Path(filename).expanduser().resolve().parent)
    return sorted(folders)


def _check_out_dir(out_dir: str | os.PathLike, folders: Sequence[Path], *, containing: bool = True) -> None:
    """Refuse an output folder that is, lies inside or (``containing``) contains a source series folder.

    DICOM objects written among the slices become part of the folder a reader scans: it would then
    read two series (or refuse the folder), as ``medcam3d explain --out`` refuses an output folder
    over its inputs.
    """
    out = Path(out_dir).expanduser().resolve()
    for folder in folders:
        inside = is_inside(out, folder)
        if inside or (containing and is_inside(folder, out)):
            where = "is" if out == folder else ("lies inside" if inside else "contains")
            raise OutputConflictError(
                f"The output folder {str(out_dir)!r} {where} the source series folder '{folder}'; DICOM objects "
                "written there would be read as part of the series. Choose a folder outside it, e.g. 'export/'.")


def _floats(dataset: Dataset, keyword: str, n: int) -> np.ndarray:
    values = np.asarray([float(v) for v in getattr(dataset, keyword, [])], dtype=np.float64)
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        name = getattr(dataset, "SOPInstanceUID", "?")
        raise ImageReadError(f"Slice {name} has no valid {keyword} ({n} numbers); it cannot be placed in space.")
    return values


def _slice_order(space: Space, datasets: list[Dataset]) -> list[Dataset]:
    """The source slices ordered as the grid's k axis; raises unless the grid is the series' grid.

    Checks, per slice: ImagePositionPatient = the world position of voxel (0, 0, k) (LPS),
    ImageOrientationPatient = the grid's i and j directions, PixelSpacing = its j and i spacings,
    Columns x Rows = its i and j sizes; and one slice per k.
    """
    if space.ndim != 3:
        raise SpaceError(f"DICOM export needs a 3D grid, not {space.shape}.")
    lps = ras_to_lps(space.affine)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    directions = columns / spacing
    hint = (
        " The map must be on the series' own grid: resample it with "
        "medcam3d.heatmap.to_scanner_space(result, medcam3d.io.read_space(<series folder>))."
    )
    if len(datasets) != space.shape[2]:
        raise SpaceError(f"The series has {len(datasets)} slices but the map's grid has {space.shape[2]}.{hint}")
    tolerance = _POSITION_REL_TOL * float(spacing[2]) + _POSITION_ABS_TOL_MM
    order: list[Dataset | None] = [None] * space.shape[2]
    for dataset in datasets:
        name = getattr(dataset, "SOPInstanceUID", "?")
        orientation = _floats(dataset, "ImageOrientationPatient", 6)
        if np.abs(orientation - np.concatenate([directions[:, 0], directions[:, 1]])).max() > _COSINE_TOL:
            message = (
                f"Slice {name} has ImageOrientationPatient {orientation.round(6).tolist()}, but the map's grid has "
                f"row/column directions {np.concatenate([directions[:, 0], directions[:, 1]]).round(6).tolist()} (LPS).{hint}"
            )
            raise SpaceError(message)
        pixel = _floats(dataset, "PixelSpacing", 2)  # (between rows, between columns) = (j, i) spacing
        if not np.allclose(pixel, spacing[[1, 0]], rtol=1e-4, atol=1e-6):
            raise SpaceError(f"Slice {name} has PixelSpacing {pixel.tolist()} mm, the map's grid "
                             f"{spacing[[1, 0]].round(6).tolist()} mm.{hint}")
        if (int(dataset.Columns), int(dataset.Rows)) != tuple(space.shape[:2]):
            raise SpaceError(f"Slice {name} has {dataset.Columns} columns x {dataset.Rows} rows, the map's grid "
                             f"{space.shape[0]} x {space.shape[1]}.{hint}")
        position = _floats(dataset, "ImagePositionPatient", 3)
        k_real = float(np.dot(position - lps[:3, 3], directions[:, 2]) / spacing[2])
        k = round(k_real)
        expected = lps[:3, 3] + k * lps[:3, 2]
        if not 0 <= k < space.shape[2] or np.linalg.norm(position - expected) > tolerance:
            message = (
                f"Slice {name} at ImagePositionPatient {position.round(4).tolist()} mm (LPS) is not a slice of the "
                f"map's grid (nearest: slice {k} at {expected.round(4).tolist()} mm).{hint}"
            )
            raise SpaceError(message)
        taken = order[k]
        if taken is not None:
            raise SpaceError(f"Slices {taken.SOPInstanceUID} and {name} are both at slice {k} of the grid "
                             "(a duplicated slice?); expected one slice per position.")
        order[k] = dataset
    # Every k is filled: as many slices as positions, none twice. SliceThickness is type 2 in CT/MR
    # images (may be absent), but the derived objects' pixel measures need one: the grid's slice
    # spacing, on copies (the caller's datasets are not changed).
    ordered: list[Dataset] = []
    for found in order:
        assert found is not None
        if str(found.get("SliceThickness", "") or "").strip() == "":
            found = copy.deepcopy(found)
            found.SliceThickness = f"{float(spacing[2]):.6g}"
        ordered.append(found)
    return ordered


def _frames(volume: np.ndarray) -> np.ndarray:
    """``(I, J, K[, S])`` voxels -> ``(K, J, I[, S])`` frames (slice, row, column[, segment])."""
    return np.ascontiguousarray(np.swapaxes(volume, 0, 2))


def _series_number(datasets: list[Dataset], offset: int) -> int:
    number = getattr(datasets[0], "SeriesNumber", None)
    try:
        return int(number) + offset if number not in (None, "") else offset
    except (TypeError, ValueError):
        return offset


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _save(dataset: Any, path: str | os.PathLike, overwrite: bool | None) -> Path:
    """Write ``dataset`` atomically; replace an existing file only if medcam3d wrote it (or ``overwrite``)."""
    path = Path(path)
    if path.exists() and overwrite is not True and not (overwrite is None and written_by_medcam3d(path)):
        message = (f"{path} exists and was not written by medcam3d; it is not replaced. Choose another file name, "
                   "or pass overwrite=True.")
        raise OutputConflictError(message)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temporary: dataset.save_as(temporary, enforce_file_format=True), suffix=".tmp")


def write_parametric_map(
    heatmap: Heatmap,
    source: str | os.PathLike | Sequence[Dataset],
    path: str | os.PathLike,
    *,
    series: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
    normalized: bool = False,
    trust: bool = False,
    overwrite: bool | None = None,
) -> Path:
    """Write one heatmap as a DICOM Parametric Map that references its source series.

    Parameters
    ----------
    heatmap : Heatmap
        On the source series' grid (``heatmap.space`` equals ``medcam3d.io.read_space(folder)``).
    source : path or sequence of pydicom.Dataset
        The source series' folder (or its slices' datasets, with or without pixel data).
    path : path
        The file to write (``.dcm``), atomically.
    series : str, optional
        SeriesInstanceUID of the source, when its folder holds several series.
    series_number : int, optional
        Default: the source's SeriesNumber + 1000.
    series_description : str, optional
        Default: ``"<method> <class>"``.
    normalized : bool
        Store the map min-max scaled to [0, 1] instead of its raw values.
    trust : bool
        As for :func:`read_series`.
    overwrite : bool or None
        ``None``: replace an existing file only if medcam3d wrote it; True: always; False: never.

    Returns
    -------
    Path

    Raises
    ------
    SpaceError
        The map is not on the source series' grid.
    OutputConflictError
        (FileExistsError) ``path`` exists and may not be replaced, or lies in the source series' folder.
    """
    hd = _require_highdicom()
    from pydicom.sr.codedict import codes

    from . import __version__

    slices = _source(source, series, trust)
    _check_out_dir(Path(path).parent, _series_folders(source, slices), containing=False)
    datasets = _slice_order(heatmap.space, slices)
    values = heatmap.normalized() if normalized else np.asarray(heatmap.data, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("The heatmap has NaN/Inf voxels (a NaN fill?); DICOM float maps need finite values. "
                         "Resample it with a finite fill value.")
    low, high = float(values.min()), float(values.max())
    label = heatmap.label
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=heatmap.method.upper()[:16],
        lut_explanation=f"{heatmap.method} map of {label}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.Saliency,
    )
    centre, width = (low + high) / 2, max(high - low, 1e-6)
    description = series_description or f"{heatmap.method} {label}"
    pmap = hd.pm.ParametricMap(
        source_images=datasets,
        pixel_array=_frames(values.astype(np.float32)),
        series_instance_uid=hd.UID(),
        series_number=series_number if series_number is not None else _series_number(datasets, 1000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{heatmap.method} {heatmap.layer}"[:64],
        software_versions=__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=centre, window_width=width)],
        content_label="HEATMAP",
        content_description=description[:64],
    )
    pmap.SeriesDescription = description[:64]
    return _save(pmap, path, overwrite)


def write_segmentation(
    masks: np.ndarray | Sequence[np.ndarray],
    space: Space,
    source: str | os.PathLike | Sequence[Dataset],
    path: str | os.PathLike,
    *,
    labels: Sequence[str],
    algorithm: str = "medcam3d",
    series: str | None = None,
    series_number: int | None = None,
    series_description: str = "medcam3d masks",
    trust: bool = False,
    overwrite: bool | None = None,
) -> Path:
    """Write binary masks as one DICOM Segmentation (a segment per mask) that references its source series.

    Parameters
    ----------
    masks : (I, J, K) bool array, or sequence of them
        One mask per segment, on ``space``; segments may overlap.
    space : Space
        The source series' grid (``medcam3d.io.read_space(folder)``).
    source : path or sequence of pydicom.Dataset
    path : path
    labels : sequence of str
        Segment labels (e.g. the class names), one per mask.
    algorithm : str
        Algorithm name recorded for every segment (e.g. ``"medcam3d hirescam"``).
    series, series_number, series_description, trust, overwrite
        As for :func:`write_parametric_map` (default series number: the source's + 2000).

    Returns
    -------
    Path
    """
    hd = _require_highdicom()
    from pydicom.sr.codedict import codes

    from . import __version__

    space = Space.of(space)
    stack = [np.asarray(m) for m in ([masks] if isinstance(masks, np.ndarray) and masks.ndim == 3 else masks)]
    if len(stack) != len(labels):
        raise ValueError(f"{len(stack)} masks but {len(labels)} labels; give one label per mask.")
    for mask in stack:
        if mask.shape != space.shape:
            raise SpaceError(f"A mask has shape {mask.shape}, the grid {space.shape}; expected masks on the grid.")
    slices = _source(source, series, trust)
    _check_out_dir(Path(path).parent, _series_folders(source, slices), containing=False)
    datasets = _slice_order(space, slices)
    pixels = _frames(np.stack([m.astype(bool) for m in stack], axis=-1))
    identification = hd.AlgorithmIdentificationSequence(name=algorithm[:64], version=__version__,
                                                        family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=str(label)[:64],
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=codes.DCM.RegionInSpace,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for n, label in enumerate(labels)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number if series_number is not None else _series_number(datasets, 2000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm[:64],
        software_versions=__version__,
        device_serial_number="0",
        content_label="MASK",
        content_description=series_description[:64],
        omit_empty_frames=False,
    )
    seg.SeriesDescription = series_description[:64]
    return _save(seg, path, overwrite)


def export_dicom(
    heatmaps: Sequence[Heatmap] | Mapping[Any, Heatmap],
    source: str | os.PathLike | Sequence[Dataset],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "heatmap",
    threshold: float = 0.5,
    series: str | None = None,
    trust: bool = False,
    overwrite: bool | None = None,
) -> list[Path]:
    """Write each heatmap as a Parametric Map and their thresholded masks as one Segmentation.

    Parameters
    ----------
    heatmaps : ClassMaps or sequence of Heatmap
        On the source series' grid (``to_scanner_space(result, medcam3d.io.read_space(folder))``).
    source : path or sequence of pydicom.Dataset
        The source series.
    out_dir : path
        Created if needed. Files: ``<prefix>_<method>_<class>.dcm`` (Parametric Maps) and
        ``<prefix>_<method>_seg.dcm`` (the Segmentation, a segment per class). It may not be, lie
        inside or contain the source series' folder (the objects would be read as part of it).
    threshold : float
        The mask of a class: voxels >= ``threshold`` x the map's maximum
        (:func:`medcam3d.masks.threshold_mask` with ``"fraction"``).
    series, trust, overwrite
        As for :func:`write_parametric_map`.

    Returns
    -------
    list of Path

    Raises
    ------
    OutputConflictError
        ``out_dir`` is, lies inside or contains the source series' folder (nothing is written), or
        a file exists that may not be replaced.
    """
    from .heatmap import heatmap_list
    from .masks import threshold_mask

    heatmaps = heatmap_list(heatmaps)
    if not heatmaps:
        return []
    if not re.fullmatch(r"[\w.+-]+", prefix) or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain file-name part (letters, digits, '._+-'), not {prefix!r}.")
    datasets = _source(source, series, trust)
    _check_out_dir(out_dir, _series_folders(source, datasets))
    out = Path(out_dir)
    first = heatmaps[0]
    if any(h.space != first.space or h.method != first.method for h in heatmaps):
        raise ValueError("export_dicom needs heatmaps of one method on one grid.")
    method = re.sub(r"[^\w.+-]+", "-", first.method)
    stem = f"{prefix}_{method}"
    names = [f"{stem}_{h.file_label}.dcm" for h in heatmaps]
    if len({n.casefold() for n in names}) != len(names):
        raise ValueError(f"Two heatmaps would be written to the same file ({names}); give the classes distinct names.")
    written = [write_parametric_map(h, datasets, out / name, overwrite=overwrite) for h, name in zip(heatmaps, names)]
    masks = [threshold_mask(h.data, "fraction", threshold) for h in heatmaps]
    written.append(write_segmentation(masks, first.space, datasets, out / f"{stem}_seg.dcm",
                                      labels=[h.label for h in heatmaps], algorithm=f"medcam3d {first.method}",
                                      overwrite=overwrite))
    return written
