"""DICOM series (a folder) through SimpleITK/GDCM: listing the series, each file's header, the
geometry checks, the one grid built from the headers (for :func:`medcam3d.io.read`,
:func:`medcam3d.io.read_space` and :func:`medcam3d.io.describe` alike) and reading the voxels."""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from .._files import is_inside
from ..errors import GeometryError, ImageReadError, ImageTooLargeError, SpaceError, UntrustedFileError
from ..orientation import lps_to_ras, ras_to_lps
from ._common import READ_FORMATS, _SLICE_ABS_TOL_MM, _SLICE_REL_TOL, _fmt_mm
from .limits import MAX_VOXEL_MM, MIN_VOXEL_MM, _Limits, _check_allocation, _lift, _out_itemsize, _too_large_for_file
from .itk import _COLLECTED, _check_itk_voxel_type, _execute, _itk_affine, _itk_component_bytes, _sitk_run, _sitk_to_numpy

logger = logging.getLogger(__name__)


# orientation cosines of the slices of one DICOM series may differ by this much
_IOP_TOL = 1e-4
# each ImageOrientationPatient vector must have length 1 and the two a dot product of 0, within this
_IOP_UNIT_TOL = 1e-3


@dataclass(frozen=True)
class _Slice:
    file: str
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row and column cosines), orthonormalised
    size: tuple[int, ...]
    spacing: tuple[float, ...]  # SimpleITK's (x, y[, z])
    components: int
    component_bytes: int
    modality: str | None = None  # (0008,0060)
    description: str | None = None  # SeriesDescription (0008,103e)
    colour: str | None = None  # why the pixels are not greyscale (read only with strict=False)
    pixel_spacing: tuple[float, float] | None = None  # PixelSpacing as (between columns, between rows) = (x, y)
    malformed: str | None = None  # why a geometry tag cannot be used (GeometryError)
    itk_affine: np.ndarray | None = None  # SimpleITK's voxel -> RAS for this file alone
    pixel_bytes: int = 0  # bytes of pixel data the header claims
    file_bytes: int = 0  # the file's size
    native: bool = True  # an uncompressed transfer syntax (the pixel data must fit the file)


# Uncompressed transfer syntaxes: implicit VR little endian, explicit little endian, explicit big endian.
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def _series_reader(p: Path, limits: _Limits) -> tuple[Any, list[str]]:
    """SimpleITK's series reader for the DICOM folder ``p``, and the UIDs of the series it holds (at least one)."""
    import SimpleITK as sitk

    _check_dicom_folder_size(p, limits.max_slices)
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(_sitk_run(lambda: reader.GetGDCMSeriesIDs(str(p))))
    except RuntimeError as error:
        raise _unreadable_folder(p, error) from None
    if not ids:
        raise ImageReadError(
            f"'{p}' is a directory but holds no DICOM series; expected a directory of DICOM files "
            f"of one series, or an image file ({', '.join(READ_FORMATS)})."
        )
    return reader, ids


def _series_files(reader: Any, p: Path, uid: str) -> list[str]:
    """The files of series ``uid`` in folder ``p``, as GDCM sorts them."""
    try:
        return list(_sitk_run(lambda: reader.GetGDCMSeriesFileNames(str(p), uid)))
    except RuntimeError as error:
        raise _unreadable_folder(p, error) from None


#: Files named in the message about a folder GDCM cannot list.
_NAMED_FILES = 3


def _unreadable_folder(p: Path, error: BaseException) -> ImageReadError:
    """Why GDCM could not list the series of folder ``p``: its scanner stops at a file it cannot parse,
    without naming it. Each file is listed alone (through a link in a temporary folder) to find it."""
    import tempfile

    import SimpleITK as sitk

    logger.debug("GDCM could not list the series of '%s': %s", p, error)
    with os.scandir(p) as entries:
        files = sorted(entry.path for entry in entries if entry.is_file())
    bad: list[str] = []
    quiet = _COLLECTED.set({})  # what GDCM prints about each file alone is not news: the message names them
    try:
        with tempfile.TemporaryDirectory(prefix="medcam3d-dicom-") as alone:
            link = os.path.join(alone, "file")
            for file in files:
                try:
                    os.symlink(os.path.abspath(file), link)
                except OSError:  # no links here: the folder is reported as a whole
                    bad = []
                    break
                try:
                    _sitk_run(lambda: sitk.ImageSeriesReader.GetGDCMSeriesIDs(alone))
                except RuntimeError:
                    bad.append(os.path.basename(file))
                finally:
                    os.unlink(link)
    finally:
        _COLLECTED.reset(quiet)
    if not bad:
        return ImageReadError(
            f"'{p}': GDCM could not sort its files into DICOM series (one of them is malformed). Give a folder holding "
            "the DICOM files of one series only."
        )
    named = ", ".join(f"'{name}'" for name in bad[:_NAMED_FILES])
    more = f" and {len(bad) - _NAMED_FILES} more" if len(bad) > _NAMED_FILES else ""
    return ImageReadError(
        f"'{p}' holds {len(bad)} file(s) that GDCM cannot parse ({named}{more}: damaged, or a DICOM object that "
        "is not an image series, e.g. an RT dose), so its series cannot be listed. Move them out of the folder, or give "
        "a folder holding the DICOM files of one series only."
    )


def _check_dicom_folder_size(p: Path, max_slices: int | None) -> None:
    """Refuse a folder of more than ``max_slices`` files before GDCM opens each of them."""
    if max_slices is None:
        return
    count = 0
    try:
        with os.scandir(p) as entries:
            for entry in entries:
                try:
                    count += entry.is_file()
                except OSError:
                    continue
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ImageReadError(f"could not list the DICOM folder '{p}': {e.strerror or e}") from None
    if count > max_slices:
        raise ImageTooLargeError(
            f"'{p}' holds {count} files, more than max_slices={max_slices}: reading a DICOM folder opens "
            "every file in it (a few ms each), and a 3D series has at most a few thousand slices. Put each "
            "series in its own folder; if this really is one series, raise the limit "
            f"({_lift('max_slices')}; none lifts it)."
        )


def _transfer_syntax(file: str) -> str | None:
    """The TransferSyntaxUID (0002,0010) of a DICOM Part 10 file; ``""`` without a file meta header
    (implicit VR little endian, native), None when the meta header names none."""
    with open(file, "rb") as f:
        head = f.read(132 + 8192)
    if head[128:132] != b"DICM":
        return ""
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 2:
            break
        if head[pos + 4 : pos + 6] in _LONG_VRS:
            length, value = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if element == 0x0010:
            return head[value : value + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = value + length
    return None


def _ds_numbers(text: str, n: int, name: str) -> tuple[np.ndarray | None, str | None]:
    """``n`` finite numbers from a DICOM multi-value string, or None and what is wrong with it."""
    parts = [t.strip() for t in text.replace("\x00", "").strip().split("\\")]
    shown = "[" + ", ".join(parts) + "]"
    try:
        values = np.array([float(t) for t in parts], dtype=np.float64)
    except ValueError:
        return None, f"{name} is {shown[:80]}: expected {n} numbers"
    if values.size != n:
        return None, f"{name} is {shown[:80]}, {values.size} value(s): expected {n} numbers"
    if not np.all(np.isfinite(values)):
        return None, f"{name} is {shown[:80]}: expected {n} finite numbers"
    return values, None


def _orientation(text: str) -> tuple[np.ndarray | None, str | None]:
    """ImageOrientationPatient, checked (two unit vectors at right angles, within 1e-3) and orthonormalised."""
    name = "ImageOrientationPatient (0020,0037)"
    values, wrong = _ds_numbers(text, 6, name)
    if values is None:
        return None, f"{wrong} (the row and column direction cosines)"
    row, col = values[:3], values[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if max(abs(lengths[0] - 1.0), abs(lengths[1] - 1.0)) > _IOP_UNIT_TOL:
        return None, (f"{name} is ({_fmt_mm(values)}): the row and column directions have lengths "
                      f"{lengths[0]:.6g} and {lengths[1]:.6g}, expected unit vectors (length 1 within {_IOP_UNIT_TOL:g})")
    cosine = float(row @ col) / (lengths[0] * lengths[1])
    if abs(cosine) > _IOP_UNIT_TOL:
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
        return None, (f"{name} is ({_fmt_mm(values)}): the row and column directions are {angle:.4g} degrees apart "
                      f"(cosine {cosine:.3g}), expected a right angle (cosine within {_IOP_UNIT_TOL:g} of 0): the pixels "
                      "would be sheared, and SimpleITK would silently straighten them")
    row = row / lengths[0]
    col = col - (col @ row) * row
    return np.concatenate([row, col / np.linalg.norm(col)]), None


def _pixel_spacing(text: str, max_voxel_mm: float | None) -> tuple[tuple[float, float] | None, str | None]:
    """PixelSpacing as (x, y) = (between columns, between rows), checked, or None and what is wrong."""
    name = "PixelSpacing (0028,0030)"
    values, wrong = _ds_numbers(text, 2, name)
    if values is None:
        return None, f"{wrong} (between rows, between columns, in mm)"
    top = math.inf if max_voxel_mm is None else max_voxel_mm
    for v in values:
        if v <= 0 or v < MIN_VOXEL_MM or v > top:
            what = "0 (SimpleITK would read 1 mm)" if v == 0 else (
                f"negative ({v:g} mm)" if v < 0 else f"{v:g} mm, outside {MIN_VOXEL_MM:g} to {top:g} mm (max_voxel_mm)")
            return None, f"{name} is [{_fmt_mm(values)}]: a pixel size is {what}; expected two positive sizes in mm"
    return (float(values[1]), float(values[0])), None


def _dicom_header_reader() -> Any:
    """One SimpleITK reader for many DICOM headers (GDCM named at once: no search of every image IO)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        reader.SetImageIO("GDCMImageIO")
    except RuntimeError:  # pragma: no cover - a SimpleITK built without GDCM
        pass
    return reader


def _dicom_slice(p: Path, file: str, reader: Any = None, strict: bool = True,
                 max_voxel_mm: float | None = MAX_VOXEL_MM) -> _Slice:
    """The header of one DICOM file; colour pixels raise, or with ``strict=False`` are recorded.

    Malformed geometry tags are recorded in ``malformed`` (:func:`_dicom_geometry` raises).
    """
    reader = _dicom_header_reader() if reader is None else reader
    reader.SetFileName(file)
    try:
        _sitk_run(reader.ReadImageInformation)
    except RuntimeError as e:
        raise ImageReadError(f"could not read the DICOM header of '{file}' in '{p}': {e}") from None

    def tag(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    ipp, iop, pixel_spacing = tag("0020|0032"), tag("0020|0037"), tag("0028|0030")
    samples = tag("0028|0002")
    photometric = (tag("0028|0004") or "").strip().upper()
    colour = None
    if (samples is not None and samples.strip() not in ("", "1")) or photometric.startswith(("RGB", "YBR", "PALETTE")):
        colour = (
            f"'{file}' in '{p}' holds colour pixels (PhotometricInterpretation {photometric or '?'}, "
            f"SamplesPerPixel {(samples or '?').strip()}); expected a greyscale series (CT, MR, PET). "
            "Pick the right series with series=<uid>, or export the images as greyscale."
        )
        if strict:
            raise ImageReadError(colour)
    pixel_id = int(reader.GetPixelID())
    if strict:
        _check_itk_voxel_type(Path(file), pixel_id)
    components = int(reader.GetNumberOfComponents())
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    text = {key: (value.replace("\x00", "").strip() or None) if value is not None else None
            for key, value in (("modality", tag("0008|0060")), ("description", tag("0008|103e")))}
    problems = []
    position = orientation = None
    if ipp is not None:
        position, wrong = _ds_numbers(ipp, 3, "ImagePositionPatient (0020,0032)")
        problems.append(wrong)
    if iop is not None:
        orientation, wrong = _orientation(iop)
        problems.append(wrong)
    ps = None
    if pixel_spacing is not None:
        ps, wrong = _pixel_spacing(pixel_spacing, max_voxel_mm)
        problems.append(wrong)
    elif ipp is not None and iop is not None:
        problems.append("there is no PixelSpacing (0028,0030), so the pixel size in mm is unknown (SimpleITK would "
                        "assume 1 mm); expected it with ImagePositionPatient and ImageOrientationPatient")
    malformed = next((f"'{os.path.basename(file)}': {w}" for w in problems if w), None)
    component_bytes = _itk_component_bytes(pixel_id, components)
    bits = tag("0028|0100")
    try:
        bits_allocated = int(bits.strip()) if bits is not None else component_bytes * 8
    except ValueError:
        bits_allocated = component_bytes * 8
    values = math.prod(size) * max(components, 1)
    try:
        syntax = _transfer_syntax(file)
        file_bytes = os.path.getsize(file)
    except OSError as e:
        raise ImageReadError(f"could not read '{file}' in '{p}': {e.strerror or e}") from None
    try:
        itk_affine = _itk_affine(len(size), reader.GetDirection(), spacing, reader.GetOrigin())
    except (ValueError, SpaceError):  # pragma: no cover - SimpleITK's own geometry is always complete
        itk_affine = None
    return _Slice(
        file=file,
        position=position,
        orientation=orientation,
        size=size,
        spacing=spacing,
        components=components,
        component_bytes=component_bytes,
        modality=text["modality"],
        description=text["description"],
        colour=colour,
        pixel_spacing=ps,
        malformed=malformed,
        itk_affine=itk_affine,
        pixel_bytes=(values * max(bits_allocated, 1) + 7) // 8,
        file_bytes=file_bytes,
        native=syntax == "" or syntax in _NATIVE_SYNTAXES,
    )


def _dicom_fix_hint() -> str:
    return (
        " Export the series again from the scanner or PACS (all slices, one series per folder), or "
        "pick the intended series with series=<uid>. If you know the geometry is good enough, pass "
        "allow_uneven_slices=True to read it as is."
    )


def _check_dicom_geometry(p: Path, slices: list[_Slice]) -> tuple[list[_Slice], str | None]:
    """Sort the slices along their normal and check the stack; returns (sorted slices, problem)."""
    names = [os.path.basename(s.file) for s in slices]
    first = slices[0]
    for s, name in zip(slices, names):
        if s.size[:2] != first.size[:2] or not np.allclose(s.pixel_spacing or s.spacing[:2],
                                                           first.pixel_spacing or first.spacing[:2], rtol=1e-4, atol=1e-6):
            return slices, (
                f"slice '{name}' has {s.size[0]}x{s.size[1]} pixels of {_fmt_mm(s.spacing[:2])} mm but "
                f"'{names[0]}' has {first.size[0]}x{first.size[1]} pixels of {_fmt_mm(first.spacing[:2])} mm; "
                "expected one in-plane grid for the whole series."
            )
    missing = [n for s, n in zip(slices, names) if s.position is None or s.orientation is None]
    if missing:
        return slices, (
            f"{len(missing)} of {len(slices)} files have no readable ImagePositionPatient / "
            f"ImageOrientationPatient (e.g. '{missing[0]}'), so the slices cannot be placed in space."
        )
    iop0 = cast(np.ndarray, first.orientation)  # every slice has one (checked above)
    for s, name in zip(slices, names):
        if np.max(np.abs(cast(np.ndarray, s.orientation) - iop0)) > _IOP_TOL:
            return slices, (
                f"slices have different orientations: '{name}' has ImageOrientationPatient "
                f"({_fmt_mm(s.orientation)}) but '{names[0]}' has ({_fmt_mm(iop0)}); expected one "
                "orientation for the whole series (a localizer or a reformatted plane mixed in?)."
            )
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return slices, f"ImageOrientationPatient ({_fmt_mm(iop0)}) has parallel row and column directions."
    normal /= norm
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    names = [names[i] for i in order]
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    positive = gaps[gaps > _SLICE_ABS_TOL_MM]
    typical = float(np.median(positive)) if positive.size else 0.0
    tol = _SLICE_REL_TOL * typical + _SLICE_ABS_TOL_MM
    listing = _fmt_mm(along) if len(along) <= 12 else f"{_fmt_mm(along[:6])}, ..., {_fmt_mm(along[-3:])}"
    for k, g in enumerate(gaps):
        if g <= tol:
            return slices, (
                f"duplicated slice: '{names[k]}' and '{names[k + 1]}' are both at {along[k]:.6g} mm "
                "along the slice normal (two acquisitions or time points in one series, or a file copied twice)."
            )
    for k, g in enumerate(gaps):
        if abs(g - typical) > tol:
            ratio = g / typical if typical else math.inf
            if math.isfinite(ratio) and ratio > 1.5 and abs(ratio - round(ratio)) * typical <= tol:
                what = (
                    f"{round(ratio) - 1} missing slice(s) between '{names[k]}' ({along[k]:.6g} mm) "
                    f"and '{names[k + 1]}' ({along[k + 1]:.6g} mm): that gap is {g:.6g} mm, "
                    f"{round(ratio)} times the spacing of {typical:.6g} mm"
                )
            else:
                what = (
                    f"uneven slice spacing: the gap between '{names[k]}' ({along[k]:.6g} mm) and "
                    f"'{names[k + 1]}' ({along[k + 1]:.6g} mm) is {g:.6g} mm, but the median gap is "
                    f"{typical:.6g} mm"
                )
            return slices, (
                f"{what} (positions along the slice normal: {listing} mm; tolerance {tol:.3g} mm). "
                "Expected evenly spaced slices; SimpleITK would use one average spacing and put "
                "slices in the wrong places."
            )
    drift = positions - positions[:1] - np.outer(along - along[0], normal)
    worst = int(np.argmax(np.linalg.norm(drift, axis=1)))
    in_plane_tol = _SLICE_REL_TOL * float(min(first.spacing[:2])) + _SLICE_ABS_TOL_MM
    if np.linalg.norm(drift[worst]) > max(in_plane_tol, tol):
        return slices, (
            f"the slices are not stacked along their normal: '{names[worst]}' is shifted by "
            f"{np.linalg.norm(drift[worst]):.4g} mm in plane relative to '{names[0]}' (gantry tilt or a "
            "sheared stack), which a SimpleITK image cannot describe. Expected slice positions along "
            "the normal of ImageOrientationPatient; resample the series (e.g. gantry-tilt correction) first."
        )
    return slices, None


def _dicom_geometry(p: Path, uid: str, slices: list[_Slice],
                    max_voxel_mm: float | None = MAX_VOXEL_MM) -> tuple[list[_Slice], np.ndarray | None, str | None]:
    """The one place a DICOM series' grid is built from its headers (:func:`read`, :func:`read_space`
    and :func:`describe` all use it).

    Returns
    -------
    slices : list of _Slice
        Sorted along the slice normal (as given when they cannot be sorted).
    affine : (4, 4) ndarray or None
        Voxel -> RAS mm: columns along the row direction times the spacing between columns, rows
        along the column direction times the spacing between rows, slices along the normal at
        the mean step between the first and last slice (one file: SimpleITK's slice spacing), the
        origin at the first slice's ImagePositionPatient. A file without position tags has
        SimpleITK's own geometry; None when several files cannot be placed.
    problem : str or None
        Why the stack is not evenly spaced (see :func:`_check_dicom_geometry`), or None.

    Raises
    ------
    GeometryError
        A file with a malformed PixelSpacing, ImageOrientationPatient or ImagePositionPatient.
    """
    bad = next((s.malformed for s in slices if s.malformed), None)
    if bad is not None:
        raise GeometryError(
            f"'{p}' (series {uid}): {bad}. The geometry of this series cannot be trusted; export the series "
            "again from the scanner or PACS (or fix the tag)."
        )
    ordered, problem = _check_dicom_geometry(p, slices) if len(slices) > 1 else (list(slices), None)
    first = ordered[0]
    if not all(s.position is not None and s.orientation is not None and s.pixel_spacing is not None for s in ordered):
        return ordered, (first.itk_affine if len(ordered) == 1 else None), problem
    orientation, origin, last = cast(np.ndarray, first.orientation), cast(np.ndarray, first.position), ordered[-1]
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    if len(ordered) > 1:
        step = normal * float((cast(np.ndarray, last.position) - origin) @ normal) / (len(ordered) - 1)
    else:
        step = normal * (float(first.spacing[2]) if len(first.spacing) > 2 else 1.0)
    x, y = cast(tuple, first.pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * x, col * y, step, origin
    return ordered, lps_to_ras(lps), problem


def _check_dicom_links(p: Path, files: list[str], trust: bool) -> None:
    if trust:
        return
    folder = os.path.realpath(p)
    plain: dict[str, bool] = {}  # directory as given -> it is the folder itself (no link on the way)
    for f in files:
        parent = os.path.dirname(f)
        if parent not in plain:
            plain[parent] = os.path.realpath(parent) == folder
        if plain[parent] and not os.path.islink(f):
            continue  # a plain file of the folder
        if not is_inside(f, p):
            raise UntrustedFileError(
                f"'{f}' in '{p}' is a link to '{os.path.realpath(f)}', outside the DICOM folder; "
                "expected the series' files inside the folder you named. Copy the files into the "
                "folder, or pass trust=True to medcam3d.io.read if you trust where the links lead."
            )


def _check_dicom_sizes(p: Path, uid: str, slices: list[_Slice], dtype: Any, limits: _Limits) -> None:
    """Each file must hold the pixel data its header claims (uncompressed files), and the series
    must fit ``limits`` (``max_bytes``; ``max_expansion`` for compressed files)."""
    for s in slices:
        if s.native and s.pixel_bytes > s.file_bytes:
            what = f"{' x '.join(str(n) for n in s.size)} pixels x {max(s.components, 1)} samples"
            raise _too_large_for_file(Path(s.file), s.pixel_bytes, what, s.file_bytes)
    n_values = sum(math.prod(s.size) * max(s.components, 1) for s in slices)
    stored = sum(math.prod(s.size) * max(s.components, 1) * s.component_bytes for s in slices)
    out = n_values * _out_itemsize(dtype, max(s.component_bytes for s in slices))
    compressed = [s.file_bytes for s in slices if not s.native]
    what = f"{len(slices)} DICOM slices of {slices[0].size[:2]} pixels (series {uid})"
    _check_allocation(p, stored + out, what, limits, sum(compressed) if compressed else None)


def _dicom_series(p: Path, series: str | None, allow_uneven: bool, trust: bool, limits: _Limits,
                  dtype: Any) -> tuple[Any, str, list[_Slice], np.ndarray | None, str | None]:
    """Find one series, check its files and headers, build its grid: (reader, uid, ordered slices, affine, problem)."""
    reader, ids = _series_reader(p, limits)
    if series is None:
        if len(ids) > 1:
            raise ImageReadError(
                f"'{p}' holds {len(ids)} DICOM series: {', '.join(ids)}; pass series=<uid> to pick one."
            )
        series = ids[0]
    elif series not in ids:
        raise ImageReadError(f"series '{series}' is not in '{p}'; found: {', '.join(ids)}")
    uid = series
    files = _series_files(reader, p, uid)
    _check_dicom_links(p, files, trust)
    header_reader = _dicom_header_reader()
    slices = [_dicom_slice(p, f, header_reader, True, limits.max_voxel_mm) for f in files]
    _check_dicom_sizes(p, uid, slices, dtype, limits)
    slices, affine, problem = _dicom_geometry(p, uid, slices, limits.max_voxel_mm)
    if problem is not None:
        if not allow_uneven:
            raise GeometryError(f"'{p}' (series {uid}): {problem}{_dicom_fix_hint()}")
        logger.warning(
            "'%s' (series %s): %s Reading it as is because allow_uneven_slices=True: slice "
            "positions in mm are approximate.", p, uid, problem
        )
    return reader, uid, slices, affine, problem


def _read_dicom(
    p: Path, dtype: Any, series: str | None, allow_uneven: bool, trust: bool, limits: _Limits
) -> tuple[np.ndarray, np.ndarray]:
    reader, uid, slices, affine, problem = _dicom_series(p, series, allow_uneven, trust, limits, dtype)
    try:
        reader.SetImageIO("GDCMImageIO")
    except RuntimeError:  # pragma: no cover - a SimpleITK built without GDCM
        pass
    reader.SetFileNames([s.file for s in slices])
    img, itk_affine = _execute(reader, f"the DICOM series in '{p}'", "The files may be truncated or corrupt.")
    arr = _sitk_to_numpy(img, dtype)
    if problem is not None or affine is None:
        return arr, itk_affine  # allow_uneven_slices: as SimpleITK assembles the series
    _check_dicom_placement(p, uid, slices, ras_to_lps(itk_affine), ras_to_lps(affine))
    return arr, affine


def _check_dicom_placement(p: Path, series: str, slices: list[_Slice], lps: np.ndarray, header_lps: np.ndarray) -> None:
    """SimpleITK's volume must lie where the headers put it: slice k at its ImagePositionPatient, the
    in-plane axes as :func:`_dicom_geometry` built them (guards SimpleITK's sorting and GDCM's fixes)."""
    spacing = float(np.linalg.norm(header_lps[:3, 2]))
    tol = _SLICE_REL_TOL * spacing + _SLICE_ABS_TOL_MM
    for k, s in enumerate(slices):
        if s.position is None:
            continue
        placed = lps[:3, 3] + k * lps[:3, 2]
        if np.linalg.norm(placed - s.position) > tol:
            raise GeometryError(
                f"'{p}' (series {series}): SimpleITK placed slice {k} ('{os.path.basename(s.file)}') at "
                f"({_fmt_mm(placed)}) mm (LPS) but its ImagePositionPatient is ({_fmt_mm(s.position)}); "
                f"expected them to agree within {tol:.3g} mm.{_dicom_fix_hint()}"
            )
    extent = np.asarray(slices[0].size[:2], dtype=np.float64)
    for axis in range(2):  # the far edge of the slice, along each in-plane axis
        gap = float(np.linalg.norm((lps[:3, axis] - header_lps[:3, axis]) * extent[axis]))
        if gap > _SLICE_REL_TOL * float(np.linalg.norm(header_lps[:3, axis])) + _SLICE_ABS_TOL_MM:
            raise GeometryError(
                f"'{p}' (series {series}): SimpleITK's voxel axis {axis} ({_fmt_mm(lps[:3, axis])}) differs from the "
                f"one PixelSpacing and ImageOrientationPatient give ({_fmt_mm(header_lps[:3, axis])}) by {gap:.3g} mm "
                f"across the slice; expected the same grid.{_dicom_fix_hint()}"
            )
