"""A voxel grid in world coordinates: :class:`Space` (a spatial shape and a voxel -> RAS+ mm affine).

``shape`` is in NIfTI ``(i, j, k)`` order and ``affine`` maps voxel indices to RAS+ millimetres (the
nibabel / MONAI convention). Two-dimensional grids are supported: ``shape`` has two entries and
``affine`` is still 4x4 with the third voxel axis unused (a 3x3 2D affine, as MONAI produces for 2D
images, is embedded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SpaceError
from ..orientation import lps_to_ras

logger = logging.getLogger(__name__)


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
        from nibabel.affines import voxel_sizes

        return tuple(float(v) for v in voxel_sizes(self.affine)[: self.ndim])

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
        from nibabel.affines import apply_affine

        xyz = apply_affine(self.affine, p)
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
        from nibabel.affines import apply_affine

        ijk = apply_affine(np.linalg.inv(self.affine), p)[:, : self.ndim]
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
