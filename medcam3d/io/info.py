""":func:`describe`: what an image file or DICOM folder holds, from its headers only
(:class:`ImageInfo`, :class:`SeriesInfo`; the ``medcam3d info`` command)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError
from ._common import _check_exists, _fmt_mm, _kind, _spatial_shape, _suffix, _without_extra_singletons
from .limits import DEFAULT_MAX_EXPANSION, DEFAULT_MAX_SLICES, MAX_VOXEL_MM, _Limits, _check_voxel_sizes, _limits
from .nifti import _check_nifti_size, _load_nifti, _nifti_affine
from .itk import _check_itk_size, _itk_dtype, _itk_info, _native_messages
from .dicom import (_Slice, _check_dicom_links, _check_dicom_sizes, _dicom_geometry, _dicom_header_reader,
                    _dicom_slice, _series_files, _series_reader)
from .reading import _space_for


def _plain_affine(affine: np.ndarray | None) -> list | None:
    return None if affine is None else [[float(v) for v in row] for row in np.asarray(affine)]


def _axcodes(affine: np.ndarray | None, ndim: int) -> tuple[str, ...] | None:
    if affine is None:
        return None
    import nibabel.orientations as nio

    try:
        codes = nio.aff2axcodes(np.asarray(affine, dtype=np.float64))
    except Exception:  # a singular affine: no orientation to name
        return None
    return tuple(str(c) for c in codes[:ndim]) if all(c is not None for c in codes[:ndim]) else None


def _voxel_sizes(affine: np.ndarray | None, ndim: int) -> tuple[float, ...] | None:
    if affine is None:
        return None
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :ndim], axis=0))


#: Axes tilted less than this (degrees) from the scanner's axes count as aligned.
_OBLIQUE_DEGREES = 0.01


def _obliquity(affine: np.ndarray | None, ndim: int) -> float | None:
    """The largest angle (degrees) between a voxel axis and its nearest scanner axis; None without an affine."""
    if affine is None:
        return None
    axes = np.asarray(affine, dtype=np.float64)[:3, :ndim]
    norms = np.linalg.norm(axes, axis=0)
    if not np.all(norms > 0):
        return None
    cosines = np.abs(axes / norms).max(axis=0).clip(-1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def _oblique_text(affine: np.ndarray | None, ndim: int) -> str:
    """``" (oblique: axes up to 21.3° from the scanner's)"`` for a tilted grid, else ``""``."""
    angle = _obliquity(affine, ndim)
    if angle is None or angle < _OBLIQUE_DEGREES:
        return ""
    return f" (oblique: axes up to {angle:.3g}° from the scanner's; the orientation names the nearest axes)"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)


def _fmt_size(values: Any) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """One DICOM series of a folder, from its files' headers (see :func:`describe`).

    Attributes
    ----------
    uid : str
        SeriesInstanceUID: pass it as ``series=`` to :func:`read`.
    description : str or None
        SeriesDescription.
    modality : str or None
        Modality (CT, MR, PT ...).
    slices : int
        Number of files (slices) in the series.
    shape : tuple of int
        Grid size ``(I, J, K)``: columns, rows, slices.
    spacing : tuple of float or None
        Voxel size in mm along i, j, k (k from the slice positions).
    orientation : tuple of str or None
        Axis codes of i, j, k in RAS terms (``("L", "P", "S")`` for a plain axial LPS series).
    affine : numpy.ndarray or None
        Voxel -> RAS+ mm ``(4, 4)``, from ImagePositionPatient, ImageOrientationPatient and
        PixelSpacing (None when the headers cannot place the slices).
    problem : str or None
        Why :func:`read` would refuse the series (uneven or duplicated slices, colour pixels ...),
        or None. With a problem the grid above is approximate.
    """

    uid: str
    description: str | None
    modality: str | None
    slices: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    orientation: tuple[str, ...] | None
    affine: np.ndarray | None
    problem: str | None = None

    @property
    def oblique_degrees(self) -> float | None:
        """The largest angle (degrees) between a voxel axis and the nearest scanner axis (0 for an
        axis-aligned series; None when the headers cannot place it)."""
        return _obliquity(self.affine, 3)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (the affine as a nested list)."""
        return {
            "uid": self.uid, "description": self.description, "modality": self.modality, "slices": self.slices,
            "shape": list(self.shape), "spacing": list(self.spacing) if self.spacing else None,
            "orientation": "".join(self.orientation) if self.orientation else None,
            "affine": _plain_affine(self.affine), "oblique_degrees": self.oblique_degrees, "problem": self.problem,
        }

    def __str__(self) -> str:
        name = f' "{self.description}"' if self.description else ""
        spacing = f", {_fmt_size(self.spacing)} mm" if self.spacing else ""
        orientation = f", {''.join(self.orientation)}{_oblique_text(self.affine, 3)}" if self.orientation else ""
        text = f"series {self.uid}{name} ({self.modality or 'modality ?'}): {self.slices} slices, {_fmt_shape(self.shape)} voxels{spacing}{orientation}"
        if self.affine is not None:
            text += "\n    voxel -> RAS mm: " + "; ".join(_fmt_mm(row) for row in np.asarray(self.affine)[:3])
        return text + (f"\n    problem: {self.problem}" if self.problem else "")


@dataclass(frozen=True, eq=False)
class ImageInfo:
    """What an image file or DICOM folder holds, read from headers only (see :func:`describe`).

    Attributes
    ----------
    path : Path
        The file or folder.
    format : str
        ``NIfTI``, ``NRRD``, ``MetaImage`` or ``DICOM``.
    shape : tuple of int or None
        ``(I, J[, K])`` for one volume, ``(I, J, K, T)`` for a 4D file (trailing axes of size 1
        dropped, as :func:`read` does); None for a folder of several DICOM series (see ``series``).
    dtype : str or None
        The stored voxel type (``int16``, ``float32`` ...); None for DICOM.
    volumes : int
        Volumes in the file: ``T`` of a 4D file (pass ``volume=`` to :func:`read`), else 1.
    spacing : tuple of float or None
        Voxel size in mm along each spatial axis.
    orientation : tuple of str or None
        Axis codes of the spatial axes in RAS terms (e.g. ``("L", "P", "S")``).
    affine : numpy.ndarray or None
        Voxel -> RAS+ mm ``(4, 4)`` of the spatial grid.
    series : tuple of SeriesInfo
        DICOM folders: every series (pass its ``uid`` as ``series=`` to :func:`read`).
    """

    path: Path
    format: str
    shape: tuple[int, ...] | None
    dtype: str | None
    volumes: int
    spacing: tuple[float, ...] | None
    orientation: tuple[str, ...] | None
    affine: np.ndarray | None
    series: tuple[SeriesInfo, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """The shape of one volume, ``(I, J[, K])`` (None for a folder of several series)."""
        return None if self.shape is None else _spatial_shape(self.shape)

    @property
    def oblique_degrees(self) -> float | None:
        """The largest angle (degrees) between a voxel axis and the nearest scanner axis (0 for an
        axis-aligned grid; None without a grid, e.g. a folder of several DICOM series)."""
        spatial = self.spatial_shape
        return None if spatial is None else _obliquity(self.affine, len(spatial))

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (paths as str, the affine as a nested list)."""
        return {
            "path": str(self.path), "format": self.format, "shape": list(self.shape) if self.shape else None,
            "spatial_shape": list(self.spatial_shape) if self.spatial_shape else None, "dtype": self.dtype,
            "volumes": self.volumes, "spacing": list(self.spacing) if self.spacing else None,
            "orientation": "".join(self.orientation) if self.orientation else None,
            "affine": _plain_affine(self.affine), "oblique_degrees": self.oblique_degrees,
            "series": [s.to_dict() for s in self.series],
        }

    def __str__(self) -> str:
        if self.format == "DICOM":
            lines = [f"{self.path}: DICOM folder with {len(self.series)} series"
                     + (" (pass series=<uid> to choose)" if len(self.series) > 1 else "")]
            lines += [f"  {s}" for s in self.series]
            return "\n".join(lines)
        spatial = self.spatial_shape
        assert spatial is not None, "only a folder of several DICOM series has no shape"
        what = (f"{self.volumes} volumes of {_fmt_shape(spatial)} voxels (pass volume=<index>, 0 to {self.volumes - 1})"
                if self.volumes > 1 else f"{_fmt_shape(spatial)} voxels")
        lines = [f"{self.path}: {self.format}, {len(spatial)}D, {what}, {self.dtype}"]
        if self.spacing:
            lines.append(f"  spacing {_fmt_size(self.spacing)} mm, orientation {''.join(self.orientation or '?')}"
                         f"{_oblique_text(self.affine, len(spatial))}")
        if self.affine is not None:
            lines.append("  voxel -> RAS mm: " + "; ".join(_fmt_mm(row) for row in np.asarray(self.affine)[:3]))
        return "\n".join(lines)


def _image_info(p: Path, fmt: str, shape: tuple[int, ...], dtype: str | None, affine: np.ndarray) -> ImageInfo:
    shape = _without_extra_singletons(tuple(int(n) for n in shape))
    ndim = len(_spatial_shape(shape))
    volumes = math.prod(shape[3:]) if len(shape) > 3 else 1
    affine = np.asarray(affine, dtype=np.float64)
    return ImageInfo(p, fmt, shape, dtype, int(volumes), _voxel_sizes(affine, ndim), _axcodes(affine, ndim), affine)


def _series_info(p: Path, uid: str, slices: list[_Slice], max_voxel_mm: float | None, alone: bool) -> SeriesInfo:
    """One series for :func:`describe`: its grid from :func:`_dicom_geometry` (what :func:`read` uses).

    A series whose headers :func:`read` would refuse outright (malformed tags, absurd voxel sizes)
    raises when it is the folder's only series (``alone``), else its ``problem`` says why.
    """
    first = slices[0]
    depth = sum(int(s.size[2]) if len(s.size) > 2 else 1 for s in slices)
    shape = (int(first.size[0]), int(first.size[1]), depth)
    colour = next((s.colour for s in slices if s.colour), None)
    try:
        _, affine, problem = _dicom_geometry(p, uid, slices, max_voxel_mm)
        if affine is not None:
            _check_voxel_sizes(p, np.linalg.norm(affine[:3, :3], axis=0), f"series {uid}, from its headers", max_voxel_mm)
    except GeometryError as e:
        if alone and colour is None:
            raise
        affine, problem = None, str(e)
    return SeriesInfo(uid, first.description, first.modality, len(slices), shape, _voxel_sizes(affine, 3),
                      _axcodes(affine, 3), affine, colour or problem)


def _describe_dicom(p: Path, trust: bool, limits: _Limits) -> ImageInfo:
    reader, ids = _series_reader(p, limits)
    header_reader = _dicom_header_reader()
    series = []
    for uid in ids:
        files = _series_files(reader, p, uid)
        _check_dicom_links(p, files, trust)
        slices = [_dicom_slice(p, f, header_reader, False, limits.max_voxel_mm) for f in files]
        _check_dicom_sizes(p, uid, slices, None, limits)
        series.append(_series_info(p, uid, slices, limits.max_voxel_mm, alone=len(ids) == 1))
    if len(series) == 1:
        one = series[0]
        return ImageInfo(p, "DICOM", one.shape, None, 1, one.spacing, one.orientation, one.affine, tuple(series))
    return ImageInfo(p, "DICOM", None, None, 1, None, None, None, tuple(series))


def describe(
    path: str | os.PathLike,
    *,
    trust: bool = False,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    max_voxel_mm: float | None = MAX_VOXEL_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> ImageInfo:
    """What an image file or DICOM folder holds, from its headers, without reading voxels.

    The header checks of :func:`read` that guard against hostile files apply (detached data
    files must stay in the header's folder, the header may not claim more data than the file
    holds, a compressed file may not expand beyond ``max_expansion``, DICOM files may not be links
    out of the folder, DICOM folders hold at most ``max_slices`` files, voxel sizes must make
    sense), so a file that passes can be handed to another reader (a MONAI bundle's
    ``LoadImaged``). A DICOM series' grid is built by the same code as :func:`read`'s. Problems
    that only stop :func:`read` from assembling a DICOM series (uneven slices, colour pixels) are
    reported in :attr:`SeriesInfo.problem` instead of raised, and so are malformed headers of one
    series of a folder that holds several (a folder of one such series raises, as :func:`read`).

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`read`.
    trust, max_expansion, max_voxel_mm, max_slices : optional
        As for :func:`read` (``max_expansion`` counts the stored voxels plus a float32 copy).

    Returns
    -------
    ImageInfo
        ``print(info)`` gives a readable summary; ``info.to_dict()`` JSON-ready values.

    Raises
    ------
    ImageNotFoundError, UnsupportedFormatError, ImageReadError, GeometryError,
    ImageTooLargeError, UntrustedFileError
        As :func:`read` would, for what a header shows (no size limit ``max_bytes``).
    """
    limits = dataclasses.replace(_limits(None, max_expansion, max_voxel_mm, max_slices), max_bytes=None)
    p = _check_exists(path)
    kind = _kind(p)
    with _native_messages(p):
        if kind == "dicom":
            return _describe_dicom(p, trust, limits)
        if kind == "nifti":
            img = _load_nifti(p)
            affine = _nifti_affine(p, img, limits.max_voxel_mm)
            _check_nifti_size(p, img, np.float32, limits, None)
            _space_for(p, _spatial_shape(tuple(img.shape)), affine, limits.max_voxel_mm)
            return _image_info(p, "NIfTI", tuple(img.shape), str(np.dtype(img.header.get_data_dtype())), affine)
        info = _itk_info(p, trust, limits.max_voxel_mm)
        _check_itk_size(p, info, np.float32, limits, None)
        _space_for(p, info.size[: min(info.dim, 3)], info.affine, limits.max_voxel_mm)
        shape = info.size + ((info.components,) if info.components > 1 else ())
        fmt = "MetaImage" if _suffix(p) in (".mha", ".mhd") else "NRRD"
        return _image_info(p, fmt, shape, _itk_dtype(int(info.reader.GetPixelID())), info.affine)
