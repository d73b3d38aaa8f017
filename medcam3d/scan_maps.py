"""Maps on a scan's grid sampled only where asked, and their NIfTI files.

One concept: a feature-grid :class:`~medcam3d.heatmap.Heatmap` seen on the scan's grid without
resampling the whole volume (:class:`ScanGridMap`: planes for pictures, slabs for a file, a few
candidate voxels for the peak and the value range), and the maps written as NIfTI, streamed slab
by slab (:func:`save_scan_maps`; :func:`save_heatmaps` for whole arrays on one grid). The
streaming writer and the one header rule are :mod:`medcam3d.io.streaming` and
:mod:`medcam3d.io.nifti`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .heatmap import Heatmap, file_label, heatmap_list
from .io.nifti import like_header, nifti_header
from .io.streaming import Constant, Scaling, Volume, slab_ranges, write_nifti_files
from .space import Resampler, Space, SpaceError

__all__ = ["ScanGridMap", "save_heatmaps", "save_scan_maps"]

logger = logging.getLogger(__name__)

# Above this many candidate voxels (see ScanGridMap.peak), or this share of the scan, a map's
# peak and range are taken from the whole resampled map instead.
_MAX_CANDIDATES = 2**22


class ScanGridMap:
    """A heatmap on its feature grid, seen on the scan's grid without resampling the whole volume.

    The scan-grid map is the trilinear resampling of the feature-grid map (:func:`~medcam3d.space.resample`),
    but only the parts that are needed are computed: planes for pictures, slabs for a file, a
    few candidate voxels for the peak and the value range. When the grids' axes are parallel
    (the usual case) these are separable 1D interpolations (:class:`~medcam3d.space.Resampler`);
    for oblique grids, or feature grids too fine for the candidate search, the whole map is
    resampled once (``dense``) and kept until :meth:`release`.

    Parameters
    ----------
    heatmap : Heatmap
        On its feature grid (``feature_maps(explanation)``), or any
        grid.
    scanner_space : Space
        The scan's grid.
    fill : float
        Value outside the model's field of view.

    Attributes
    ----------
    heatmap, space, fill, resampler
    """

    def __init__(self, heatmap: Heatmap, scanner_space: Space, *, fill: float = 0.0) -> None:
        self.heatmap = heatmap
        self.space = Space.of(scanner_space)
        self.fill = float(fill)
        self.resampler = Resampler(heatmap.space, self.space)
        self._data = torch.from_numpy(np.ascontiguousarray(heatmap.data, dtype=np.float32))
        self._dense: np.ndarray | None = None
        self._fixed = False  # the map is given on the scan grid (of_array): nothing to release
        self._inside: list | None = None  # per scan axis, the index range inside the field of view
        self._summary: tuple | None = None

    @classmethod
    def of_array(cls, heatmap: Heatmap) -> ScanGridMap:
        """A map that is already on its output grid (``heatmap.space``)."""
        view = cls(heatmap, heatmap.space)
        view._dense = np.asarray(heatmap.data, dtype=np.float32)
        view._fixed = True
        return view

    # -- what the map is ---------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.heatmap.method

    @property
    def label(self) -> str:
        return self.heatmap.label

    @property
    def file_label(self) -> str:
        return self.heatmap.file_label

    @property
    def class_index(self) -> int:
        return self.heatmap.class_index

    @property
    def descrip(self) -> str:
        return self.heatmap.descrip

    @property
    def dense(self) -> bool:
        """Whether the whole scan-grid map is (or will be) computed rather than sampled in parts."""
        if self._dense is not None:
            return True
        if not self.resampler.separable:
            return True
        count = math.prod(len(c) for c in self._candidates())
        return count > min(_MAX_CANDIDATES, math.prod(self.space.shape) // 4)

    def release(self) -> None:
        """Drop the whole resampled map if one was computed (it is recomputed when needed)."""
        if not self._fixed:
            self._dense = None

    # -- values ------------------------------------------------------------------------------
    def array(self) -> np.ndarray:
        """The whole map on the scan's grid, ``(*space.shape)`` float32 (computed once, kept until :meth:`release`)."""
        if self._dense is None:
            self._dense = self.resampler(self._data, fill=self.fill).numpy()
        return self._dense

    def to_heatmap(self) -> Heatmap:
        """The whole map as a scan-grid :class:`Heatmap` (what :func:`~medcam3d.heatmap.to_scanner_space` gives)."""
        h = self.heatmap
        return Heatmap(np.ascontiguousarray(self.array()), self.space, h.method, h.layer, h.class_index,
                       h.class_name, h.score, h.placement)

    def sample(self, indices: Sequence[Any] | None = None, *, scale: float = 1.0, offset: float = 0.0,
               layout: str = "C") -> torch.Tensor:
        """``scale * map + offset`` at the product of target ``indices`` (default: everywhere), float32 tensor.

        Parameters
        ----------
        indices : sequence of int arrays, one per scan axis, optional
        scale, offset : float
            An affine change of the values (a storage scaling), applied before interpolation,
            which is exact because trilinear weights sum to one.
        layout : {"C", "F"}
            Memory order of the result (see :class:`~medcam3d.space.Resampler`).

        Returns
        -------
        torch.Tensor, shape (n_0, n_1[, n_2])
        """
        fill = self.fill * scale + offset
        if self._dense is not None or not self.resampler.separable:
            full = torch.from_numpy(self.array())
            index = [np.arange(n) for n in self.space.shape] if indices is None else indices
            values = full
            for axis, i in enumerate(index):
                i = np.asarray(i, dtype=np.int64)
                if not np.array_equal(i, np.arange(self.space.shape[axis])):
                    values = values.index_select(axis, torch.as_tensor(i))
            values = values * scale + offset if (scale != 1.0 or offset != 0.0) else values.clone()
            if layout == "F":
                back = tuple(range(values.ndim - 1, -1, -1))
                values = values.permute(*back).contiguous().permute(*back)
            return values
        data = self._data if (scale == 1.0 and offset == 0.0) else self._data * scale + offset
        return self.resampler(data, fill=fill, indices=indices, layout=layout)

    def encoded_slab(self, start: int, stop: int, scaling: Scaling, *, scale: float = 1.0, offset: float = 0.0):
        """Stored values of the slab ``start:stop`` of the last axis, column-major (file order).

        ``scale * map + offset`` must already be in the stored units of ``scaling`` (see
        :meth:`Scaling.affine_to_stored`). Only the part inside the model's field of view is
        interpolated; the rest is the stored fill value.

        Returns
        -------
        (*space.shape[:-1], stop - start) ndarray of the stored dtype, Fortran-contiguous, or
        :class:`~medcam3d.io.streaming.Constant` when the slab holds only the fill.
        """
        shape = (*self.space.shape[:-1], stop - start)
        if self._dense is not None or not self.resampler.separable:
            index = [np.arange(n) for n in self.space.shape[:-1]] + [np.arange(start, stop)]
            return scaling.encode(self.sample(index, scale=scale, offset=offset, layout="F"))
        fill = scaling.encode(np.array([self.fill * scale + offset], dtype=np.float32))[0]
        if self._inside is None:
            self._inside = [self.resampler.inside_range(axis) for axis in range(self.space.ndim)]
        box = [list(b) for b in self._inside]
        box[-1] = [max(box[-1][0], start), min(box[-1][1], stop - 1)]
        if any(lo > hi for lo, hi in box):
            return Constant(np.asarray(fill).tobytes(), math.prod(shape))
        out = np.empty(shape[::-1], dtype=fill.dtype).T
        out.fill(fill)
        values = self.sample([np.arange(lo, hi + 1) for lo, hi in box], scale=scale, offset=offset, layout="F")
        box[-1] = [box[-1][0] - start, box[-1][1] - start]
        out[tuple(slice(lo, hi + 1) for lo, hi in box)] = scaling.encode(values)
        return out

    def plane(self, axis: int, index: int) -> np.ndarray:
        """The map on the scan plane ``index`` across ``axis``: a 2D array over the other axes."""
        indices = [np.arange(n) for n in self.space.shape]
        indices[axis] = np.array([index])
        return self.sample(indices).numpy().squeeze(axis)

    def _candidates(self) -> list[np.ndarray]:
        """Per scan axis, the voxels where the map's maximum or minimum over the grid can lie.

        Between consecutive candidates the interpolation weights along that axis are affine in
        the voxel index (no feature-grid node, field-of-view edge or clamp edge in between), so
        the map is multilinear on each box of candidates and its extremes over the voxels of a
        box are at the box's corners; the first voxel (C order) of the maximum is one as well.
        """
        axes = self.resampler.axes
        assert axes is not None  # callers check resampler.separable first
        out = []
        for axis, spec in enumerate(axes):
            n_source = self.heatmap.space.shape[spec.source_axis]
            n = self.space.shape[axis]
            edges = np.concatenate([np.arange(n_source, dtype=np.float64), [-0.5, n_source - 0.5]])
            t = (edges - spec.offset) / spec.scale
            first, last = self.resampler.inside_range(axis)
            points = np.concatenate([np.floor(t), np.ceil(t), [0, n - 1, first, last, first - 1, last + 1]])
            points = points[np.isfinite(points)]
            out.append(np.unique(np.clip(points, 0, n - 1).astype(np.int64)))
        return out

    def _summarise(self) -> tuple:
        """(first argmax voxel, max, min, any NaN) over the scan grid, NaN ignored; computed once."""
        if self._summary is None:
            if self.dense:
                values = self.array()
                index = [np.arange(n) for n in self.space.shape]
            else:
                index = self._candidates()
                values = self.sample(index).numpy()
            finite = np.where(np.isnan(values), -np.inf, values)
            position = np.unravel_index(int(np.argmax(finite)), finite.shape)
            voxel = tuple(int(index[a][p]) for a, p in enumerate(position))
            high = float(finite[position]) if values.size else float("nan")
            low = float(np.nanmin(values)) if np.isfinite(values).any() else float("nan")
            self._summary = (voxel, high, low, bool(np.isnan(values).any()))
        return self._summary

    def value_range(self) -> tuple[float, float]:
        """Smallest and largest value of the map over the scan's voxels (fill included where it shows; NaN ignored)."""
        _, high, low, _ = self._summarise()
        return low, high

    @property
    def has_nan(self) -> bool:
        """Whether some scan voxels are NaN (a NaN fill outside the field of view)."""
        return self._summarise()[3]

    def peak(self) -> tuple[tuple[int, ...], np.ndarray] | None:
        """Voxel of the map's maximum over the scan grid (the first in C order) and its world position.

        Exact and cheap (see :meth:`_candidates`): the same voxel as ``np.argmax`` of the whole
        resampled map. ``None`` when the map is flat (e.g. all zero, a ReLU'd negative map):
        a flat map has no peak.

        Returns
        -------
        (voxel, world) or None
            ``voxel``: tuple of int; ``world``: (3,) RAS mm of that voxel's centre.
        """
        voxel, high, low, _ = self._summarise()
        if not high > low:
            return None
        return voxel, self.space.voxel_to_world(np.asarray(voxel, dtype=float))


# --------------------------------------------------------------------------------------------
# NIfTI storage of scan-grid maps (the streaming writer is medcam3d.io.streaming)
# --------------------------------------------------------------------------------------------

def _map_volume(view: ScanGridMap, scaling: Scaling, scale: float = 1.0, offset: float = 0.0) -> Volume:
    """The volume of ``scale * map + offset`` stored with ``scaling``."""
    a, b = scaling.affine_to_stored()
    total_scale, total_offset = a * scale, a * offset + b
    shape = view.space.shape

    def slabs():
        for start, stop in slab_ranges(shape):
            yield view.encoded_slab(start, stop, scaling, scale=total_scale, offset=total_offset)

    fill = scaling.encode(np.array([view.fill * total_scale + total_offset], dtype=np.float32))[0]
    return Volume(shape, slabs, background=fill)


def _storage_for(view: ScanGridMap, dtype: str) -> Scaling:
    low, high = view.value_range()
    if dtype != "float32" and view.has_nan:
        logger.info("%s has NaN voxels (fill outside the field of view): stored as float32", view.label)
        dtype = "float32"
    return Scaling.for_range(low, high, dtype)


def _normalizer(view: ScanGridMap, eps: float = 1e-8) -> tuple[float, float]:
    """``(scale, offset)`` with ``scale * value + offset`` = the min–max normalized map (zeros when flat)."""
    low, high = view.value_range()
    if not high - low > eps:
        return 0.0, 0.0
    return 1.0 / (high - low), -low / (high - low)


def save_scan_maps(
    maps: Sequence[ScanGridMap],
    out_dir: str | Path,
    *,
    prefix: str = "heatmap",
    like: Any = None,
    normalized: bool = True,
    four_d: bool = False,
    dtype: str = "uint8",
    compress: bool = True,
) -> list[Path]:
    """Write scan-grid maps as NIfTI files, streamed from their feature grids.

    One file per class, ``<prefix>_<method>_<class>.nii.gz``, plus a ``..._norm`` copy min–max
    scaled to [0, 1] when ``normalized``; or, with ``four_d``, one 4D file ``<prefix>_<method>``
    (and ``..._norm``) with a volume per class, in order.

    Parameters
    ----------
    maps : sequence of ScanGridMap
        On one scan grid, from one method.
    out_dir : path
    prefix : str
    like : path or nibabel image, optional
        Source NIfTI whose sform/qform codes and units are copied.
    normalized, four_d : bool
    dtype : {"uint8", "int16", "float32"}
        ``uint8``/``int16``: quantised, with the raw scale in ``scl_slope``/``scl_inter`` (read
        back as raw values, to within :attr:`Scaling.precision`); the ``_norm`` copy of a
        per-class file shares its voxels and differs only in the header. ``float32``: exact.
        A map with NaN voxels is stored as float32.
    compress : bool
        ``.nii.gz`` (gzip level 1) or ``.nii``.

    Returns
    -------
    list of Path
    """
    if not maps:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = maps[0]
    if any(m.space != first.space for m in maps):
        raise SpaceError("save_scan_maps needs all maps on one grid; got several.")
    header_of = like_header(like)
    ext = ".nii.gz" if compress else ".nii"
    stem = f"{file_label(prefix)}_{file_label(first.method)}"
    shape = first.space.shape
    written: list[Path] = []
    if four_d:
        volume_shape = (*shape, *(1,) * (3 - len(shape)), len(maps))
        labels = ",".join(m.label for m in maps)
        descrip = f"medcam3d {first.method} layer={first.heatmap.layer} classes={labels}"
        ranges = [m.value_range() for m in maps]
        kind = "float32" if any(m.has_nan for m in maps) else dtype
        low = min((r[0] for r in ranges if np.isfinite(r[0])), default=0.0)
        high = max((r[1] for r in ranges if np.isfinite(r[1])), default=0.0)
        scaling = Scaling.for_range(low, high, kind)
        header = nifti_header(volume_shape, kind, first.space, like_header=header_of, descrip=descrip,
                              scaling=scaling, display=(low, high))
        written += write_nifti_files([(out / f"{stem}{ext}", header)], [_map_volume(m, scaling) for m in maps],
                                     compress=compress)
        if normalized:
            scaling = Scaling.for_range(0.0, 1.0, kind)
            header = nifti_header(volume_shape, kind, first.space, like_header=header_of, descrip=descrip,
                                  scaling=scaling, display=(0.0, 1.0))
            volumes = [_map_volume(m, scaling, *_normalizer(m)) for m in maps]
            written += write_nifti_files([(out / f"{stem}_norm{ext}", header)], volumes, compress=compress)
        for m in maps:
            m.release()
        return written
    for m in maps:
        scaling = _storage_for(m, dtype)
        low, high = m.value_range()
        raw = nifti_header(shape, scaling.dtype, m.space, like_header=header_of, descrip=m.descrip, scaling=scaling,
                           display=(low, high))
        targets = [(out / f"{stem}_{m.file_label}{ext}", raw)]
        if normalized and scaling.dtype != "float32":
            # the same stored voxels, read back as (value - min) / (max - min)
            scale, offset = _normalizer(m)
            norm = Scaling(scaling.dtype, scaling.slope * scale, scaling.inter * scale + offset) if scale else \
                Scaling(scaling.dtype, 1.0, 0.0)
            targets.append((out / f"{stem}_{m.file_label}_norm{ext}",
                            nifti_header(shape, scaling.dtype, m.space, like_header=header_of, descrip=m.descrip,
                                         scaling=norm, display=(0.0, 1.0))))
        written += write_nifti_files(targets, [_map_volume(m, scaling)], compress=compress)
        if normalized and scaling.dtype == "float32":
            scale, offset = _normalizer(m)
            header = nifti_header(shape, "float32", m.space, like_header=header_of, descrip=m.descrip,
                                  display=(0.0, 1.0))
            written += write_nifti_files([(out / f"{stem}_{m.file_label}_norm{ext}", header)],
                                         [_map_volume(m, Scaling("float32"), scale, offset)], compress=compress)
        m.release()
    return written


def save_heatmaps(
    heatmaps: Sequence[Heatmap] | Mapping[Any, Heatmap],
    out_dir: str | Path,
    *,
    prefix: str = "heatmap",
    like=None,
    normalized: bool = True,
    four_d: bool = False,
    dtype: str = "float32",
    compress: bool = True,
) -> list[Path]:
    """Save heatmaps (whole arrays on one grid) as NIfTI files in ``out_dir`` (created if needed).

    One file per class, ``<prefix>_<method>_<class>.nii.gz`` (raw float32 by default), plus a
    ``..._norm.nii.gz`` copy scaled to [0, 1] when ``normalized``; or, with ``four_d``, one 4D file
    ``<prefix>_<method>.nii.gz`` with a volume per class, in order. Each write is atomic. See
    :func:`save_scan_maps` for ``dtype`` (quantised storage) and ``compress``; to write maps on a
    scan's grid straight from their feature grid, without whole-volume arrays, use that.

    Returns
    -------
    list of Path
        The files written.
    """
    heatmaps = heatmap_list(heatmaps)
    if not heatmaps:
        return []
    first = heatmaps[0]
    if any(h.space != first.space for h in heatmaps):
        raise SpaceError("save_heatmaps needs all heatmaps on one grid; got several.")
    return save_scan_maps([ScanGridMap.of_array(h) for h in heatmaps], out_dir, prefix=prefix, like=like,
                          normalized=normalized, four_d=four_d, dtype=dtype, compress=compress)
