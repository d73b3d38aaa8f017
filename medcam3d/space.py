"""Voxel grids in world coordinates, the feature grid of a CNN layer, and resampling between grids.

A :class:`Space` is a grid: a spatial ``shape`` in NIfTI ``(i, j, k)`` order and a 4x4 ``affine``
mapping voxel indices to RAS+ millimetres (the nibabel / MONAI convention). Three grids matter
(see DESIGN.md §3): the scan on disk (``scanner_space``), the tensor the model sees
(``input_space``) and the target layer's output (``feature_space``). :func:`feature_space` derives
the last from the second, and :func:`resample` moves a map from any grid onto any other in one
trilinear interpolation, so a heatmap goes straight from the feature grid to the scan's grid.

Two-dimensional grids are supported: ``shape`` has two entries and ``affine`` is still 4x4 with
the third voxel axis unused (a 3x3 2D affine, as MONAI produces for 2D images, is embedded).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from .errors import SpaceError  # noqa: F401  (re-exported)
from .orientation import lps_to_ras

__all__ = ["Space", "SpaceError", "feature_space", "resample"]

logger = logging.getLogger(__name__)

# Default work per resampling step: output values (voxels x channels). One step holds a float32
# grid (12 B per voxel), the float32 values (4 B per value) and a fill mask (1 B per voxel), about
# 2**20 x 20 B ~ 20 MB besides the output itself (measured: 512x512x400 output, 420 MB, peaks at
# ~445 MB). Coordinates are computed in float64 once per target slice, not per voxel.
DEFAULT_CHUNK_VOXELS = 2**20

# Tolerance (in source voxels) of the field-of-view test, so that rounding does not flip voxels
# that lie exactly on the outer cell edge of the source grid.
_FOV_TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Space
# --------------------------------------------------------------------------------------------


def _as_affine(affine: Any, ndim: int) -> np.ndarray:
    """Return ``affine`` as a validated, read-only 4x4 float64 array."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    try:
        a = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SpaceError(
            f"affine must be a 4x4 numeric array (voxel -> RAS mm); could not convert it: {e}"
        ) from None
    if a.shape == (3, 3) and ndim == 2:
        # MONAI's 2D affine (rows/cols: i, j, translation): embed, third axis unused.
        a4 = np.eye(4)
        a4[np.ix_([0, 1, 3], [0, 1, 3])] = a
        a = a4
    if a.shape != (4, 4):
        raise SpaceError(
            f"affine must have shape (4, 4) (or (3, 3) for a 2D grid), got {a.shape}. "
            "Pass the voxel -> RAS mm matrix, e.g. nibabel's img.affine or MetaTensor.affine."
        )
    if not np.all(np.isfinite(a)):
        raise SpaceError(f"affine contains NaN or inf values:\n{a}\nExpected a finite 4x4 matrix.")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-9):
        raise SpaceError(
            f"affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}. "
            "Expected a homogeneous voxel -> world matrix."
        )
    a[3] = [0.0, 0.0, 0.0, 1.0]
    det = float(np.linalg.det(a[:3, :3]))
    scale = float(np.prod(np.linalg.norm(a[:3, :3], axis=0)))
    if scale == 0.0 or abs(det) <= 1e-12 * max(scale, 1e-300):
        raise SpaceError(
            f"affine is singular (determinant of its 3x3 part = {det:.3g}); a voxel grid needs three "
            "independent, non-zero axes. Check the spacing (a zero pixdim?) and direction of the image."
        )
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Space:
    """A voxel grid: spatial ``shape`` and a voxel -> RAS+ mm ``affine``.

    Parameters
    ----------
    shape : tuple of int
        Spatial size, ``(I, J, K)`` or ``(I, J)`` for 2D; channels and batch are not part of it.
    affine : array_like, shape (4, 4)
        Maps homogeneous voxel indices ``[i, j, k, 1]`` to world ``[x, y, z, 1]`` in RAS+ mm.
        For 2D grids the third voxel axis is unused; a (3, 3) 2D affine is accepted and embedded.

    Notes
    -----
    Equality compares shapes exactly and affines to 1e-6 relative / 1e-5 mm absolute, so that a
    grid read back from a NIfTI file (which stores the affine in float32) equals the original.
    """

    shape: tuple[int, ...]
    affine: np.ndarray

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(n) for n in self.shape)
        except (TypeError, ValueError):
            raise SpaceError(f"shape must be a sequence of ints, got {self.shape!r}") from None
        if len(shape) not in (2, 3) or any(n < 1 for n in shape):
            raise SpaceError(
                f"shape must have 2 or 3 positive spatial sizes, got {shape}. "
                "Pass the spatial shape only (no channel or batch axis)."
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", _as_affine(self.affine, len(shape)))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def of(cls, obj: Any, *, batch: bool = False) -> Space:
        """Build a Space from a Space, a ``(shape, affine)`` pair, a nibabel image or a MetaTensor.

        Parameters
        ----------
        obj
            - a :class:`Space` (returned as is);
            - a ``(shape, affine)`` tuple or list;
            - a nibabel spatial image: ``shape = img.shape[:3]``, ``affine = img.affine``;
            - a MONAI ``MetaTensor``, channel-first ``(C, *shape)``, or ``(B, C, *shape)`` with
              ``batch=True``; a batched affine ``(B, 4, 4)`` uses its first entry;
            - any object with a ``space`` attribute holding a Space (e.g. a Heatmap).
        batch : bool
            MetaTensor only: the tensor has a leading batch axis.

        Returns
        -------
        Space
        """
        if isinstance(obj, Space):
            return obj
        if isinstance(obj, torch.Tensor):
            return cls._of_tensor(obj, batch)
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return cls(tuple(obj[0]), obj[1])
        if hasattr(obj, "affine") and hasattr(obj, "shape") and hasattr(obj, "header"):
            # nibabel image (4D images: the first three axes are spatial)
            if obj.affine is None:
                raise SpaceError("the nibabel image has no affine; cannot place it in world space")
            shape = tuple(obj.shape[:3])
            if len(obj.shape) == 2:
                shape = tuple(obj.shape)
            return cls(shape, obj.affine)
        space = getattr(obj, "space", None)
        if isinstance(space, Space):
            return space
        raise SpaceError(
            f"cannot build a Space from {type(obj).__name__}; expected a Space, (shape, affine), "
            "a nibabel image or a MONAI MetaTensor."
        )

    @classmethod
    def _of_tensor(cls, t: torch.Tensor, batch: bool) -> Space:
        affine = getattr(t, "affine", None)
        if affine is None:
            raise SpaceError(
                "a plain torch.Tensor has no affine; pass a MONAI MetaTensor, a Space or "
                "(shape, affine)."
            )
        affine = torch.as_tensor(affine).detach().cpu().to(torch.float64).numpy()
        if affine.ndim == 3:  # batched (B, 4, 4)
            if len(affine) > 1 and not np.allclose(affine, affine[:1]):
                logger.warning("MetaTensor holds %d different affines; using the first", len(affine))
            affine = affine[0]
        meta = getattr(t, "meta", None) or {}
        if str(meta.get("space", "RAS")).upper() == "LPS":
            affine = lps_to_ras(affine)  # medcam3d.orientation: the one LPS <-> RAS flip
        lead = 2 if batch else 1
        shape = tuple(t.shape[lead:])
        if len(shape) not in (2, 3):
            hint = "" if batch else " If it has a batch axis, pass batch=True."
            raise SpaceError(
                f"MetaTensor of shape {tuple(t.shape)} leaves spatial shape {shape} after removing "
                f"{lead} leading axis/axes; expected 2 or 3 spatial axes.{hint}"
            )
        return cls(shape, affine)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each voxel axis (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, : self.ndim], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS mm) of the centre of voxel 0."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> tuple[str, ...]:
        """Axis codes, e.g. ``('R', 'A', 'S')``: the world direction each voxel axis points to."""
        import nibabel.orientations as nio

        codes = nio.aff2axcodes(self.affine)
        return tuple(codes[: self.ndim])

    @property
    def is_sheared(self) -> bool:
        """True if the voxel axes are not mutually orthogonal (tolerance 1e-4 in cosine)."""
        cols = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        gram = cols.T @ cols
        return bool(np.max(np.abs(gram - np.eye(3))) > 1e-4)

    def voxel_to_world(self, ijk: Any) -> np.ndarray:
        """Map voxel indices to RAS mm.

        Parameters
        ----------
        ijk : array_like, shape (N, ndim) or (ndim,)
            Voxel coordinates (fractional allowed); 2D grids may also be given (N, 3).

        Returns
        -------
        numpy.ndarray, shape (N, 3) or (3,)
        """
        p = np.asarray(ijk, dtype=np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        if p.shape[-1] == self.ndim == 2:
            p = np.concatenate([p, np.zeros((len(p), 1))], axis=1)
        if p.ndim != 2 or p.shape[1] != 3:
            raise SpaceError(f"voxel coordinates must have shape (N, {self.ndim}), got {p.shape}")
        xyz = p @ self.affine[:3, :3].T + self.affine[:3, 3]
        return xyz[0] if single else xyz

    def world_to_voxel(self, xyz: Any) -> np.ndarray:
        """Map RAS mm to (fractional) voxel indices.

        Parameters
        ----------
        xyz : array_like, shape (N, 3) or (3,)

        Returns
        -------
        numpy.ndarray, shape (N, ndim) or (ndim,)
        """
        p = np.asarray(xyz, dtype=np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        if p.ndim != 2 or p.shape[1] != 3:
            raise SpaceError(f"world coordinates must have shape (N, 3), got {p.shape}")
        inv = np.linalg.inv(self.affine)
        ijk = (p @ inv[:3, :3].T + inv[:3, 3])[:, : self.ndim]
        return ijk[0] if single else ijk

    def isclose(self, other: Any, *, atol: float = 1e-5, rtol: float = 1e-6) -> bool:
        """Same shape and affines equal within ``atol`` mm + ``rtol`` relative."""
        other = Space.of(other)
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, rtol=rtol, atol=atol)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Space):
            return NotImplemented
        return self.isclose(other)

    def __hash__(self) -> int:  # consistent with the tolerant __eq__: equal spaces share a shape
        return hash(self.shape)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{v:.4g}" for v in self.spacing)
        origin = ", ".join(f"{v:.4g}" for v in self.origin)
        return (
            f"Space(shape={self.shape}, spacing=({spacing}) mm, origin=({origin}) mm, "
            f"orientation={''.join(self.orientation)})"
        )


# --------------------------------------------------------------------------------------------
# Feature grid
# --------------------------------------------------------------------------------------------


def feature_space(input_space: Any, feature_shape: Sequence[int]) -> Space:
    """The grid of a layer output of spatial size ``feature_shape`` computed from ``input_space``.

    With stride ``s = input_shape / feature_shape`` per axis, feature cell ``u`` covers input
    voxels ``[u*s, (u+1)*s)`` and its centre is input voxel ``u*s + (s-1)/2``::

        feature_affine = input_affine @ [[diag(s), (s - 1) / 2], [0, 1]]

    This is the geometry of ``F.interpolate(mode="trilinear", align_corners=False)`` and MONAI's
    ``scale_affine(centered=True)``.

    Parameters
    ----------
    input_space : Space or anything :meth:`Space.of` accepts
        Grid of the model input, spatial shape ``(I, J, K)``.
    feature_shape : sequence of int
        Spatial shape ``(D, V, U)`` of the layer output (no batch or channel axis).

    Returns
    -------
    Space
        Shape ``feature_shape``.

    Warns
    -----
    UserWarning
        If a stride is not an integer (padding or odd sizes: the cell centres are then only
        approximately where the network's receptive fields are centred).
    """
    src = Space.of(input_space)
    fshape = tuple(int(n) for n in feature_shape)
    if len(fshape) != src.ndim:
        raise SpaceError(
            f"feature_shape {fshape} has {len(fshape)} axes but the input grid {src.shape} has "
            f"{src.ndim}; pass the spatial shape only, e.g. activations.shape[2:]."
        )
    if any(n < 1 for n in fshape):
        raise SpaceError(f"feature_shape must be positive, got {fshape}")
    stride = np.array(src.shape, dtype=np.float64) / np.array(fshape, dtype=np.float64)
    if not np.allclose(stride, np.round(stride), rtol=0, atol=1e-9):
        warnings.warn(
            f"input shape {src.shape} is not an integer multiple of feature shape {fshape} "
            f"(stride {tuple(round(float(s), 4) for s in stride)}); the feature grid is placed by "
            "scaling, which only approximates the network's receptive-field centres. Pad or crop "
            "the input to a multiple of the network's total stride for an exact placement.",
            stacklevel=2,
        )
    scale = np.eye(4)
    for ax, s in enumerate(stride):
        scale[ax, ax] = s
        scale[ax, 3] = (s - 1.0) / 2.0
    return Space(fshape, src.affine @ scale)


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def resample(
    data: Any,
    source: Any,
    target: Any,
    *,
    fill: float = 0.0,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> Any:
    """Trilinear (bilinear in 2D) pull-resampling of ``data`` from grid ``source`` onto ``target``.

    Each target voxel ``p`` takes the value at source voxel coordinate
    ``inv(source.affine) @ target.affine @ p``, interpolated linearly. Points outside the source
    grid's field of view, i.e. beyond ``[-0.5, n - 0.5]`` (outer cell edges) on any axis, get
    ``fill``; points inside that band but beyond the outermost voxel centres take the edge value,
    so a coarse feature map covers the whole grid it was computed from.

    Parameters
    ----------
    data : numpy.ndarray or torch.Tensor, shape (..., *source.shape)
        Any leading axes (channels, batch); the trailing axes must equal ``source.shape``.
    source, target : Space or anything :meth:`Space.of` accepts
        Grids of ``data`` and of the result; both 3D or both 2D (2D grids use the i, j axes of
        the affines only and ignore the third axis).
    fill : float
        Value outside the source field of view (NaN allowed).
    chunk_voxels : int
        Upper bound on output values (target voxels x leading channels) computed per step; the
        target is processed in slabs along its first axis.

    Returns
    -------
    numpy.ndarray or torch.Tensor, shape (..., *target.shape), float32
        Same kind as ``data``; a tensor stays on ``data``'s device.

    Notes
    -----
    Implemented with ``torch.nn.functional.grid_sample(mode="bilinear", align_corners=True,
    padding_mode="border")`` plus the fill mask. The voxel -> voxel map is composed in float64
    and evaluated in float64 per target slice; grid_sample's float32 grid then limits the
    position error to about 1e-7 x the source axis length (~5e-5 voxel on a 512-voxel axis).
    If both grids coincide (same shape, voxel centres within 1e-4 voxel) the data are copied.
    The result is differentiable with respect to a ``data`` tensor that requires grad.
    """
    src = Space.of(source)
    dst = Space.of(target)
    if src.ndim != dst.ndim:
        raise SpaceError(f"source grid is {src.ndim}D but target grid is {dst.ndim}D; expected the same")
    nd = src.ndim

    is_numpy = not isinstance(data, torch.Tensor)
    if is_numpy:
        arr = np.asarray(data)
        if arr.dtype == np.float32:
            x = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        # plain tensor (a MetaTensor's metadata would only slow grid_sample down)
        x = data.as_subclass(torch.Tensor).to(torch.float32)
    if x.ndim < nd or tuple(x.shape[x.ndim - nd :]) != src.shape:
        raise SpaceError(
            f"data of shape {tuple(x.shape)} does not end with the source grid's shape {src.shape}; "
            "expected (..., *source.shape) with spatial axes last in (i, j, k) order."
        )
    lead = tuple(x.shape[: x.ndim - nd])
    channels = math.prod(lead)
    device = x.device

    # Target voxel -> source voxel, restricted to the used axes (2D: i, j and translation).
    m = np.linalg.inv(src.affine) @ dst.affine
    axes = list(range(nd)) + [3]
    m = m[np.ix_(axes, axes)]  # (nd+1, nd+1)

    # Same grid (voxel centres coincide to 1e-4 voxel, e.g. one read back from a NIfTI header,
    # which stores float32): copy, rather than interpolate with
    # float32 grid coordinates (which would perturb values by ~1e-5 x the local gradient).
    if src.shape == dst.shape and _max_displacement(m, dst.shape) < 1e-4:
        out = x.clone()
        return out.numpy() if is_numpy else out

    out = torch.empty((channels, *dst.shape), dtype=torch.float32, device=device)
    if channels == 0:
        return _finish(out, lead, dst.shape, is_numpy)

    xin = x.reshape(1, channels, *src.shape)
    # MPS has no float64: build coordinates on the CPU there.
    cdev = device if device.type != "mps" else torch.device("cpu")

    # Source coordinate of target voxel (i, *rest) along source axis a is affine in i:
    #   c_a = m[a, 0] * i + plane_a(rest),  plane_a = m[a, 1:nd] . rest + m[a, nd].
    # The planes (one target slice) are built once in float64; per slab, grid = plane + i * step.
    rest = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64, device=cdev) for n in dst.shape[1:]], indexing="ij"
    )
    n_src = src.shape
    planes = []  # float64, shape dst.shape[1:], source voxel coordinate at i = 0
    for a in range(nd):
        p = torch.full(dst.shape[1:], float(m[a, nd]), dtype=torch.float64, device=cdev)
        for b in range(1, nd):
            p += float(m[a, b]) * rest[b - 1]
        planes.append(p)
    del rest

    # Field of view, per target column: rows [first, last] map inside [-0.5, n - 0.5] on all axes.
    first, last = _inside_rows(m, planes, n_src, dst.shape[0])
    if bool((first > last).all()):
        logger.debug("target grid lies entirely outside the source field of view; filling")
        out.fill_(fill)
        return _finish(out, lead, dst.shape, is_numpy)
    first_max, last_min = int(first.max()), int(last.min())

    # grid_sample (align_corners=True) takes voxel c as 2c/(n-1) - 1 (any value when n == 1),
    # with the last grid axis ordered (last source axis, ..., first source axis).
    scale = [2.0 / (n - 1) if n > 1 else 0.0 for n in n_src]
    shift = [1.0 if n > 1 else 0.0 for n in n_src]
    grid_plane = torch.stack(
        [planes[a] * scale[a] - shift[a] for a in reversed(range(nd))], dim=-1
    ).to(torch.float32)[None]  # (1, *dst.shape[1:], nd)
    step = torch.tensor([float(m[a, 0]) * scale[a] for a in reversed(range(nd))], dtype=torch.float64)
    del planes

    plane = math.prod(dst.shape[1:])
    rows = max(1, int(chunk_voxels) // max(1, plane * channels))
    view = (-1,) + (1,) * (nd - 1)
    for start in range(0, dst.shape[0], rows):
        stop = min(start + rows, dst.shape[0])
        i = torch.arange(start, stop, dtype=torch.float64)
        offset = (i[:, None] * step[None, :]).to(torch.float32).to(cdev)  # (rows, nd)
        grid = grid_plane + offset.view(*view, nd)  # (rows, *rest, nd), float32
        if cdev != device:
            grid = grid.to(device)
        vals = F.grid_sample(
            xin, grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]  # (C, rows, *rest)
        del grid
        if not (first_max <= start and last_min >= stop - 1):  # slab touches the FOV edge
            irows = torch.arange(start, stop, dtype=first.dtype, device=first.device).view(view)
            outside = (first > irows) | (last < irows)
            vals.masked_fill_(outside.to(device), fill)
            del outside
        out[:, start:stop] = vals
        del vals
    return _finish(out, lead, dst.shape, is_numpy)


def _finish(out: torch.Tensor, lead: tuple[int, ...], shape: tuple[int, ...], is_numpy: bool) -> Any:
    out = out.reshape(*lead, *shape)
    return out.numpy() if is_numpy else out


def _max_displacement(m: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (source voxels) between target voxel p and m @ p over the grid's corners."""
    nd = len(shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), dtype=np.float64)
    corners = corners.reshape(nd, -1)
    mapped = m[:nd, :nd] @ corners + m[:nd, nd:]
    return float(np.max(np.abs(mapped - corners)))


def _inside_rows(
    m: np.ndarray, planes: list[torch.Tensor], n_src: tuple[int, ...], n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last target row (first axis) inside the source field of view, per column.

    Along source axis ``a`` the coordinate is ``m[a, 0] * i + planes[a]``; it must lie in
    ``[-0.5, n_a - 0.5]`` (plus a rounding tolerance). Returns int64 tensors of shape
    ``planes[0].shape``; ``first > last`` where no row is inside.
    """
    first = torch.zeros_like(planes[0])
    last = torch.full_like(planes[0], float(n_rows - 1))
    for a, p in enumerate(planes):
        lo, hi = -0.5 - _FOV_TOL, n_src[a] - 0.5 + _FOV_TOL
        slope = float(m[a, 0])
        if abs(slope) < 1e-12:  # independent of the row: all in or all out
            ok = (p >= lo) & (p <= hi)
            last = torch.where(ok, last, torch.full_like(last, -1.0))
            continue
        t_lo, t_hi = (lo - p) / slope, (hi - p) / slope
        if slope < 0:
            t_lo, t_hi = t_hi, t_lo
        first = torch.maximum(first, torch.ceil(t_lo - 1e-9))
        last = torch.minimum(last, torch.floor(t_hi + 1e-9))
    first = first.clamp(-1, n_rows).to(torch.int64)
    last = last.clamp(-1, n_rows).to(torch.int64)
    return first, last
