"""Synthetic CT-like phantoms with two kinds of lesions, defined in world coordinates.

A phantom is a set of continuous functions of the world position (RAS+ mm), so the same case can
be sampled on any grid: the model's small isotropic input grid for training, or realistic scanner
grids (anisotropic, LPS-stored, oblique, odd shapes) for the shipped samples. Only the noise is
per voxel (drawn on the grid it is sampled on).

Anatomy (Hounsfield units): air ``-1000`` outside an ellipsoidal body; a subcutaneous fat shell
(about ``-100``); soft tissue (about ``40``); an organ (about ``60``); a spine-like bone cylinder
(about ``450``); a smooth low-frequency intensity variation and Gaussian noise inside the body.

Lesions (multi-label, each present or not, never overlapping, inside the soft tissue):

========================  =====  ===========================================================
class (index)             label  shape and intensity
========================  =====  ===========================================================
``bright_round`` (0)      1      sphere-ish, radius 5-9 mm, +150 HU over the local tissue
``dark_elongated`` (1)    2      ellipsoid 7-9 x 7-9 x 22-30 mm along a random direction, -80 HU
========================  =====  ===========================================================

>>> from medcam3d.demo import synthetic
>>> grid = synthetic.model_grid()
>>> image, labels, info = synthetic.make_case(7, grid.shape, grid.affine, present=(True, False))
>>> image.shape, labels.dtype, info["labels_present"]
((64, 64, 64), dtype('uint8'), ['bright_round'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..space import Space

__all__ = [
    "CLASS_NAMES",
    "HARD_SEED0",
    "MODEL_CENTRE_MM",
    "MODEL_SHAPE",
    "MODEL_SPACING_MM",
    "PREPROCESSING",
    "Lesion",
    "Phantom",
    "grid_from_codes",
    "make_case",
    "make_hard_case",
    "make_hard_phantom",
    "make_phantom",
    "model_grid",
    "sample_grids",
    "scale_intensity",
]

CLASS_NAMES: tuple[str, ...] = ("bright_round", "dark_elongated")

AIR_HU = -1000.0
FAT_HU = -100.0
TISSUE_HU = 40.0
ORGAN_HU = 60.0
BONE_HU = 450.0

#: Width (mm) of the smooth edges: intensity = sigmoid(-signed_distance / EDGE_MM).
EDGE_MM = 0.5

#: The model's input grid: 64^3 voxels of 2 mm, RAS, centred on the nominal body centre.
MODEL_SHAPE: tuple[int, int, int] = (64, 64, 64)
MODEL_SPACING_MM = 2.0
MODEL_CENTRE_MM: tuple[float, float, float] = (0.0, -30.0, 50.0)

#: Intensity window of the model (HU -> [0, 1], clipped).
WINDOW_HU: tuple[float, float] = (-200.0, 300.0)

#: The preprocessing (``medcam3d.preprocess`` config) that maps a scan of a phantom onto
#: :func:`model_grid` exactly; ``configs/demo.yaml`` holds the same list. ``diagonal: true`` makes
#: the resampled grid axis-aligned for oblique scans too; ``border`` padding repeats the air at
#: the scan's edges (zero padding would be water, 0 HU).
PREPROCESSING: list[dict] = [
    {"name": "Orientation", "axcodes": "RAS"},
    {"name": "Spacing", "pixdim": [MODEL_SPACING_MM] * 3, "mode": "bilinear", "padding_mode": "border", "diagonal": True},
    {"name": "ScaleIntensityRange", "a_min": WINDOW_HU[0], "a_max": WINDOW_HU[1], "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"name": "ResizeWithPadOrCrop", "spatial_size": list(MODEL_SHAPE)},
]

_DIRECTIONS = {
    "R": (1.0, 0.0, 0.0), "L": (-1.0, 0.0, 0.0),
    "A": (0.0, 1.0, 0.0), "P": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def model_grid(shape: Sequence[int] = MODEL_SHAPE, spacing: float = MODEL_SPACING_MM) -> Space:
    """The model's input grid: isotropic, RAS, centred on :data:`MODEL_CENTRE_MM`.

    Returns
    -------
    Space
        ``shape`` (default ``(64, 64, 64)``) voxels of ``spacing`` mm (default 2 mm).
    """
    shape = tuple(int(n) for n in shape)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(MODEL_CENTRE_MM) - spacing * (np.asarray(shape) - 1) / 2.0
    return Space(shape, affine)


def _rotation(axis: Sequence[float] | np.ndarray, degrees: float) -> np.ndarray:
    """Rotation matrix (3, 3) about ``axis`` by ``degrees`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * (k @ k)


def grid_from_codes(
    codes: str,
    spacing: Sequence[float],
    shape: Sequence[int],
    *,
    centre: Sequence[float] = MODEL_CENTRE_MM,
    rotation: np.ndarray | None = None,
) -> Space:
    """A scanner-like grid from axis codes, spacing and shape, centred on ``centre``.

    Parameters
    ----------
    codes : str
        World direction of each voxel axis, e.g. ``"LPS"`` (DICOM-style storage) or ``"LIP"``.
    spacing : (3,) floats, mm
    shape : (3,) ints
    centre : (3,) floats
        World position (RAS mm) of the grid's centre.
    rotation : (3, 3) ndarray, optional
        Applied to the axis directions (an oblique grid).

    Returns
    -------
    Space
    """
    directions = np.array([_DIRECTIONS[c] for c in codes.upper()]).T  # columns: voxel axes
    if rotation is not None:
        directions = np.asarray(rotation, dtype=np.float64) @ directions
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Space(tuple(int(n) for n in shape), affine)


# name: (axis codes, spacing mm, shape, rotation (axis, degrees) or None)
_SCANNER_GRIDS: dict[str, tuple[str, tuple[float, ...], tuple[int, ...], tuple | None]] = {
    "lps_aniso": ("LPS", (0.8, 0.8, 2.5), (151, 123, 49), None),
    "ras_aniso": ("RAS", (0.9, 0.9, 3.0), (135, 107, 41), None),
    "lpi_iso": ("LPI", (1.25, 1.25, 1.25), (97, 79, 99), None),
    "lip_coronal": ("LIP", (0.8, 0.8, 2.5), (151, 155, 41), None),
    "lps_oblique": ("LPS", (0.9, 0.9, 2.5), (151, 129, 55), ((1.0, 0.3, 0.2), 10.0)),
}


def sample_grids(align: bool = True) -> dict[str, Space]:
    """Realistic scanner grids that cover any phantom body.

    ``lps_aniso`` (LPS, 0.8 x 0.8 x 2.5 mm, 151 x 123 x 49), ``ras_aniso`` (RAS, 0.9 x 0.9 x 3 mm),
    ``lpi_iso`` (LPI, 1.25 mm), ``lip_coronal`` (coronal slices: L, I, P; 0.8 x 0.8 x 2.5 mm) and
    ``lps_oblique`` (LPS rotated 10 degrees about an oblique axis, 0.9 x 0.9 x 2.5 mm). All have
    non-zero origins.

    Parameters
    ----------
    align : bool
        Shift each grid (by at most a few mm) so that :data:`PREPROCESSING` maps it onto
        :func:`model_grid` exactly: the model then sees a scan on the very grid it was trained on.
        The shift is measured by running the spatial transforms on an empty image once.

    Returns
    -------
    dict of str to Space
    """
    grids = {}
    for name, (codes, spacing, shape, rotate) in _SCANNER_GRIDS.items():
        rotation = _rotation(*rotate) if rotate is not None else None
        space = grid_from_codes(codes, spacing, shape, rotation=rotation)
        if align:
            space = _align_to_model_grid(space)
        grids[name] = space
    return grids


def _align_to_model_grid(space: Space) -> Space:
    """Translate ``space`` so that :data:`PREPROCESSING` outputs exactly :func:`model_grid`."""
    from ..preprocess import preprocess

    spatial = [step for step in PREPROCESSING if step["name"] != "ScaleIntensityRange"]
    out, _ = preprocess((np.zeros(space.shape, dtype=np.float32), space), spatial)
    target = model_grid()
    out_affine = np.asarray(out.affine, dtype=np.float64)
    if tuple(out.shape[1:]) != target.shape or not np.allclose(out_affine[:3, :3], target.affine[:3, :3], atol=1e-6):
        message = f"the preprocessing maps grid {space.shape} to {tuple(out.shape[1:])}, not onto the model grid"
        raise RuntimeError(message)
    affine = np.array(space.affine, dtype=np.float64)
    affine[:3, 3] += target.affine[:3, 3] - out_affine[:3, 3]  # all transforms are translation-equivariant
    return Space(space.shape, affine)


def scale_intensity(image: np.ndarray) -> np.ndarray:
    """HU -> model intensities: the window :data:`WINDOW_HU` to [0, 1], clipped (float32)."""
    low, high = WINDOW_HU
    return np.clip((np.asarray(image, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """One lesion: an ellipsoid with a smooth edge.

    Attributes
    ----------
    class_index : int
        0 ``bright_round``, 1 ``dark_elongated`` (label value ``class_index + 1``).
    centre : (3,) ndarray, RAS mm
    rotation : (3, 3) ndarray
        Columns: the ellipsoid's axes in world coordinates.
    semi_axes : (3,) ndarray, mm
    contrast : float
        HU added to the local tissue.
    """

    class_index: int
    centre: np.ndarray
    rotation: np.ndarray
    semi_axes: np.ndarray
    contrast: float

    @property
    def name(self) -> str:
        return CLASS_NAMES[self.class_index]

    @property
    def label(self) -> int:
        return self.class_index + 1

    @property
    def extent(self) -> float:
        """Largest semi-axis (mm): a bounding radius."""
        return float(np.max(self.semi_axes))

    def as_dict(self) -> dict:
        return {
            "class": self.name,
            "label": self.label,
            "centre_mm": [round(float(v), 3) for v in self.centre],
            "semi_axes_mm": [round(float(v), 3) for v in self.semi_axes],
            "long_axis": [round(float(v), 4) for v in self.rotation[:, 2]],
            "contrast_hu": round(float(self.contrast), 2),
        }


@dataclass(frozen=True)
class Phantom:
    """Parameters of one case; :meth:`sample` evaluates it on any grid.

    Attributes
    ----------
    seed : int
    body_centre, body_semi_axes : (3,) ndarray, mm
    fat_mm : float
        Thickness of the fat shell.
    organ_centre, organ_semi_axes : (3,) ndarray; organ_rotation : (3, 3); organ_hu : float
    spine_xy, spine_radii : (2,) ndarray, mm
        Centre and radii (x, y) of the bone cylinder along S-I.
    waves : (N, 5) ndarray
        Low-frequency variation: rows (kx, ky, kz in rad/mm, phase, amplitude HU).
    noise_hu : float
        Standard deviation of the Gaussian noise inside the body.
    lesions : tuple of Lesion
    """

    seed: int
    body_centre: np.ndarray
    body_semi_axes: np.ndarray
    fat_mm: float
    organ_centre: np.ndarray
    organ_semi_axes: np.ndarray
    organ_rotation: np.ndarray
    organ_hu: float
    spine_xy: np.ndarray
    spine_radii: np.ndarray
    waves: np.ndarray
    noise_hu: float
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)

    @property
    def present(self) -> tuple[bool, ...]:
        """Multi-label target: is each class present."""
        return tuple(any(lesion.class_index == c for lesion in self.lesions) for c in range(len(CLASS_NAMES)))

    def sample(self, space: Space, *, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the phantom at the voxel centres of ``space``.

        Parameters
        ----------
        space : Space
            Any 3D grid (shape, voxel -> RAS mm affine).
        noise : bool
            Add the Gaussian noise (drawn from the case's seed and this grid's shape).

        Returns
        -------
        image : (I, J, K) float32 ndarray, HU
        labels : (I, J, K) uint8 ndarray
            0 background, 1 ``bright_round``, 2 ``dark_elongated`` (voxel centre inside).
        """
        space = Space.of(space)
        shape = space.shape
        # World coordinates relative to the body centre (float32 keeps it light).
        ijk = [np.arange(n, dtype=np.float64) for n in shape]
        affine = np.asarray(space.affine, dtype=np.float64)
        offset = affine[:3, 3] - self.body_centre
        xyz = [
            (offset[r] + affine[r, 0] * ijk[0][:, None, None] + affine[r, 1] * ijk[1][None, :, None]
             + affine[r, 2] * ijk[2][None, None, :]).astype(np.float32)
            for r in range(3)
        ]  # fmt: skip
        zero = np.zeros(3)
        body = _soft_ellipsoid(xyz, zero, np.eye(3), self.body_semi_axes)
        inner = _soft_ellipsoid(xyz, zero, np.eye(3), self.body_semi_axes - self.fat_mm)
        tissue = FAT_HU + (TISSUE_HU - FAT_HU) * inner
        organ = _soft_ellipsoid(xyz, self.organ_centre - self.body_centre, self.organ_rotation, self.organ_semi_axes)
        tissue += (self.organ_hu - TISSUE_HU) * organ * inner
        spine_xy = self.spine_xy - self.body_centre[:2]
        rho = np.sqrt(((xyz[0] - spine_xy[0]) / self.spine_radii[0]) ** 2 + ((xyz[1] - spine_xy[1]) / self.spine_radii[1]) ** 2)
        spine = _sigmoid((rho - 1.0) * float(np.min(self.spine_radii)))
        tissue += (BONE_HU - tissue) * spine * inner
        for kx, ky, kz, phase, amplitude in self.waves:
            tissue += amplitude * np.cos(kx * xyz[0] + ky * xyz[1] + kz * xyz[2] + phase)
        labels = np.zeros(shape, dtype=np.uint8)
        for lesion in self.lesions:
            box = _voxel_box(space, lesion.centre, lesion.extent + 4 * EDGE_MM + 1.0)
            if box is None:
                continue
            local = [axis[box] for axis in xyz]
            soft, rho = _soft_ellipsoid(local, lesion.centre - self.body_centre, lesion.rotation, lesion.semi_axes, with_rho=True)
            tissue[box] += lesion.contrast * soft
            labels[box][rho <= 1.0] = lesion.label
        image = AIR_HU + (tissue - AIR_HU) * body
        if noise:
            rng = np.random.default_rng([self.seed, 1, *shape])
            image += (self.noise_hu * body) * rng.standard_normal(shape, dtype=np.float32)
        return image.astype(np.float32, copy=False), labels

    def info(self) -> dict:
        """JSON-friendly description (centres in RAS mm)."""
        return {
            "seed": self.seed,
            "present": [bool(p) for p in self.present],
            "labels_present": [CLASS_NAMES[c] for c, p in enumerate(self.present) if p],
            "lesions": [lesion.as_dict() for lesion in self.lesions],
            "body_centre_mm": [round(float(v), 3) for v in self.body_centre],
            "body_semi_axes_mm": [round(float(v), 3) for v in self.body_semi_axes],
            "noise_hu": round(float(self.noise_hu), 3),
        }


def _sigmoid(distance: np.ndarray) -> np.ndarray:
    """Smooth inside indicator from a signed distance (mm, negative inside)."""
    return 0.5 - 0.5 * np.tanh(distance * (0.5 / EDGE_MM))


def _soft_ellipsoid(xyz, centre, rotation, semi_axes, *, with_rho: bool = False):
    """Smooth indicator of an ellipsoid at points ``xyz`` (3 arrays, mm).

    The signed distance to the surface is approximated to first order,
    ``(rho - 1) * rho / |u / s|`` with ``u = R^T (x - c) / s`` and ``rho = |u|``.
    """
    rotation = np.asarray(rotation, dtype=np.float32)
    semi_axes = np.asarray(semi_axes, dtype=np.float32)
    d = [xyz[r] - np.float32(centre[r]) for r in range(3)]
    u = [(rotation[0, a] * d[0] + rotation[1, a] * d[1] + rotation[2, a] * d[2]) / semi_axes[a] for a in range(3)]
    rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    gradient = np.sqrt((u[0] / semi_axes[0]) ** 2 + (u[1] / semi_axes[1]) ** 2 + (u[2] / semi_axes[2]) ** 2)
    distance = (rho - 1.0) * rho / np.maximum(gradient, 1e-6)
    soft = _sigmoid(distance)
    return (soft, rho) if with_rho else soft


def _voxel_box(space: Space, centre: np.ndarray, radius: float):
    """Index box (tuple of slices) of ``space`` holding the ball (centre, radius); None if outside."""
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    world = np.asarray(centre, dtype=np.float64) + radius * corners
    ijk = world @ np.linalg.inv(space.affine[:3, :3]).T - np.linalg.solve(space.affine[:3, :3], space.affine[:3, 3])
    low = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, space.shape)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation (3, 3) (QR of a Gaussian matrix, sign-fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_phantom(seed: int, present: Sequence[bool] | None = None) -> Phantom:
    """Draw one case's parameters from ``numpy.random.default_rng([seed, 0])``.

    Both lesions are always drawn (so the anatomy and the lesion positions do not depend on
    ``present``) and then kept or dropped.

    Parameters
    ----------
    seed : int
    present : (2,) bools, optional
        Which classes the case holds; default: each with probability 1/2 (from the seed).

    Returns
    -------
    Phantom
    """
    rng = np.random.default_rng([int(seed), 0])
    drawn_present = rng.random(2) < 0.5
    flags = drawn_present if present is None else np.asarray(present, dtype=bool)
    if flags.shape != (2,):
        raise ValueError(f"present must be two booleans (bright_round, dark_elongated), got {flags!r}.")
    body_centre = np.asarray(MODEL_CENTRE_MM) + rng.uniform(-3.0, 3.0, 3)
    body_semi_axes = np.array([48.0, 36.0, 50.0]) * rng.uniform(0.92, 1.05, 3)
    fat_mm = rng.uniform(4.0, 7.0)
    inner_axes = body_semi_axes - fat_mm
    organ_centre = body_centre + np.array([18.0, 4.0, 6.0]) + rng.uniform(-4.0, 4.0, 3)
    organ_semi_axes = np.array([20.0, 15.0, 22.0]) * rng.uniform(0.9, 1.1, 3)
    organ_rotation = _rotation(rng.standard_normal(3), rng.uniform(-20.0, 20.0))
    organ_hu = ORGAN_HU + rng.uniform(-6.0, 6.0)
    spine_xy = body_centre[:2] + np.array([rng.uniform(-2.0, 2.0), -0.68 * inner_axes[1]])
    spine_radii = np.array([8.0, 7.0]) * rng.uniform(0.9, 1.1, 2)
    directions = rng.standard_normal((3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(60.0, 150.0, 3)
    waves = np.column_stack([directions * (2 * np.pi / wavelengths)[:, None], rng.uniform(0, 2 * np.pi, 3), rng.uniform(3.0, 8.0, 3)])
    noise_hu = rng.uniform(8.0, 15.0)

    # Lesion 0: bright, sphere-ish; lesion 1: dark, elongated along a random direction.
    radius = rng.uniform(5.0, 9.0)
    bright = (_random_rotation(rng), radius * rng.uniform(0.9, 1.1, 3), 150.0 + rng.uniform(-20.0, 20.0))
    width = rng.uniform(3.5, 4.5)
    dark = (_random_rotation(rng), np.array([width, width * rng.uniform(0.9, 1.1), rng.uniform(11.0, 15.0)]), -80.0 + rng.uniform(-10.0, 10.0))
    lesions: list[Lesion] = []
    for class_index, (rotation, semi_axes, contrast) in enumerate((bright, dark)):
        extent = float(np.max(semi_axes))
        for _ in range(1000):
            centre = body_centre + _uniform_in_ball(rng) * (inner_axes - extent - 3.0)
            spine_gap = np.hypot(*((centre[:2] - spine_xy) / 1.0)) - np.max(spine_radii)
            if spine_gap < extent + 3.0:
                continue
            if any(np.linalg.norm(centre - other.centre) < extent + other.extent + 3.0 for other in lesions):
                continue
            break
        lesions.append(Lesion(class_index, centre, rotation, np.asarray(semi_axes, dtype=np.float64), float(contrast)))
    kept = tuple(lesion for lesion in lesions if flags[lesion.class_index])
    return Phantom(
        seed=int(seed),
        body_centre=body_centre,
        body_semi_axes=body_semi_axes,
        fat_mm=float(fat_mm),
        organ_centre=organ_centre,
        organ_semi_axes=organ_semi_axes,
        organ_rotation=organ_rotation,
        organ_hu=float(organ_hu),
        spine_xy=spine_xy,
        spine_radii=spine_radii,
        waves=waves,
        noise_hu=float(noise_hu),
        lesions=kept,
    )


def _uniform_in_ball(rng: np.random.Generator) -> np.ndarray:
    """A point uniformly distributed in the unit ball, shape (3,)."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return direction * rng.random() ** (1.0 / 3.0)


def make_case(
    seed: int,
    shape: Sequence[int] | Space | None = None,
    affine: np.ndarray | None = None,
    present: Sequence[bool] | None = None,
    *,
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Generate one labelled case on a grid.

    Parameters
    ----------
    seed : int
        Same seed (and grid) -> identical arrays.
    shape : (3,) ints or Space, optional
        The grid's spatial shape (or the whole grid); default :func:`model_grid`.
    affine : (4, 4) ndarray, optional
        Voxel -> RAS mm; required with a plain ``shape``.
    present : (2,) bools, optional
        ``(bright_round, dark_elongated)``; default drawn from the seed (each 1/2).
    noise : bool
        Add per-voxel Gaussian noise.

    Returns
    -------
    image : (I, J, K) float32 ndarray
        HU.
    labels : (I, J, K) uint8 ndarray
        0 background, 1 ``bright_round``, 2 ``dark_elongated``.
    info : dict
        ``present``, ``labels_present``, ``lesions`` (class, label, ``centre_mm`` in RAS mm,
        semi-axes, long axis, contrast), body centre and size, noise level.
    """
    if shape is None:
        space = model_grid()
    elif isinstance(shape, Space):
        space = shape
    else:
        if affine is None:
            raise ValueError("make_case needs an affine (voxel -> RAS mm) with a plain shape, or a Space.")
        space = Space(tuple(shape), affine)
    phantom = make_phantom(seed, present)
    image, labels = phantom.sample(space, noise=noise)
    return image, labels, phantom.info()


# --------------------------------------------------------------------------------------------
# The harder held-out set (weakly-supervised segmentation benchmark)
# --------------------------------------------------------------------------------------------

#: First seed of the harder held-out set (``benchmarks/weak_segmentation.py``); disjoint from the
#: training (0-1599), accuracy (1 000 000+), peak (2 000 000+) and sample (900 001+) seeds.
HARD_SEED0 = 3_000_000

#: Where a lesion of the harder set sits: inside soft tissue, straddling the organ's edge, against
#: the fat shell, or against the bone cylinder.
PLACEMENTS: tuple[str, ...] = ("free", "organ", "fat", "bone")

#: Smallest gap (mm) between two lesions of a harder case: wider than any 26-neighbour step of the
#: sample grids (at most 3.3 mm), so each lesion is its own connected component.
HARD_GAP_MM = 4.0


def make_hard_phantom(seed: int) -> tuple[Phantom, list[str]]:
    """A case of the harder held-out set: the same anatomy code, harder lesions.

    The anatomy is :func:`make_phantom`'s for ``seed`` (so the body, organ, bone, waves and noise
    come from the same code and the same ``default_rng([seed, 0])``); the lesions are drawn from
    ``default_rng([seed, 2])``:

    - each class has 0 (probability 0.25), 1 (0.45) or 2 (0.3) lesions;
    - they are smaller: ``bright_round`` radius 3.5-6 mm (training: 5-9 mm); ``dark_elongated``
      semi-axes 2.5-3.5 x 2.5-3.5 x 8-12 mm (training: 3.5-4.5 x 3.5-4.5 x 11-15 mm); the same
      contrasts (+150 ± 20 HU, -80 ± 10 HU);
    - each one is placed (:data:`PLACEMENTS`, uniformly) freely in the soft tissue, straddling the
      organ's edge, touching the fat shell, or touching the bone cylinder;
    - lesions are at least :data:`HARD_GAP_MM` apart.

    Parameters
    ----------
    seed : int

    Returns
    -------
    phantom : Phantom
    placements : list of str
        Where each of ``phantom.lesions`` sits, in order.
    """
    base = make_phantom(seed, present=(False, False))
    rng = np.random.default_rng([int(seed), 2])
    counts = [int(rng.choice(3, p=[0.25, 0.45, 0.3])) for _ in CLASS_NAMES]
    inner_axes = base.body_semi_axes - base.fat_mm
    lesions: list[Lesion] = []
    placements: list[str] = []
    for class_index, count in enumerate(counts):
        for _ in range(count):
            if class_index == 0:
                radius = rng.uniform(3.5, 6.0)
                semi_axes = radius * rng.uniform(0.9, 1.1, 3)
                contrast = 150.0 + rng.uniform(-20.0, 20.0)
            else:
                width = rng.uniform(2.5, 3.5)
                semi_axes = np.array([width, width * rng.uniform(0.9, 1.1), rng.uniform(8.0, 12.0)])
                contrast = -80.0 + rng.uniform(-10.0, 10.0)
            rotation = _random_rotation(rng)
            placement = PLACEMENTS[int(rng.integers(len(PLACEMENTS)))]
            lesion = None
            for attempt in range(400):
                kind = placement if attempt < 300 else "free"
                centre = _hard_centre(base, kind, float(np.max(semi_axes)), inner_axes, rng)
                candidate = Lesion(class_index, centre, rotation, np.asarray(semi_axes, dtype=np.float64), float(contrast))
                if _hard_fits(base, candidate, kind, inner_axes, lesions):
                    lesion, placement = candidate, kind
                    break
            if lesion is None:
                continue  # no room left (rare): the case has one lesion fewer
            lesions.append(lesion)
            placements.append(placement)
    return replace(base, lesions=tuple(lesions)), placements


def _hard_centre(base: Phantom, kind: str, extent: float, inner_axes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A candidate lesion centre (RAS mm) for a placement kind."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    if kind == "organ":  # on the organ's surface: the lesion straddles its edge
        return base.organ_centre + base.organ_rotation @ (base.organ_semi_axes * direction)
    if kind == "fat":  # against the inside of the fat shell (the ellipsoid shrunk by the extent)
        return base.body_centre + (inner_axes - extent) * direction
    if kind == "bone":  # against the bone cylinder, at a random height
        angle = rng.uniform(0.0, 2.0 * np.pi)
        xy = base.spine_xy + (np.max(base.spine_radii) + extent) * np.array([np.cos(angle), np.sin(angle)])
        return np.array([xy[0], xy[1], base.body_centre[2] + rng.uniform(-0.6, 0.6) * (inner_axes[2] - extent)])
    return base.body_centre + _uniform_in_ball(rng) * (inner_axes - extent - 3.0)


def _hard_fits(base: Phantom, lesion: Lesion, kind: str, inner_axes: np.ndarray, others: list[Lesion]) -> bool:
    """Inside the soft tissue (touching the shell only for "fat"), clear of the bone (touching it
    only for "bone") and at least :data:`HARD_GAP_MM` from the other lesions."""
    extent = lesion.extent
    offset = lesion.centre - base.body_centre
    limit = inner_axes - extent - (0.0 if kind == "fat" else 1.0)
    if np.any(limit <= 0) or np.sum((offset / limit) ** 2) > 1.0 + 1e-9:
        return False
    spine_gap = np.hypot(*(lesion.centre[:2] - base.spine_xy)) - np.max(base.spine_radii)
    if spine_gap < extent - 1e-6 or (kind != "bone" and spine_gap < extent + 3.0):
        return False
    return all(np.linalg.norm(lesion.centre - other.centre) >= extent + other.extent + HARD_GAP_MM for other in others)


def make_hard_case(seed: int, space: Space, *, noise: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """One case of the harder held-out set (:func:`make_hard_phantom`) sampled on ``space``.

    Returns
    -------
    image : (I, J, K) float32 ndarray, HU
    labels : (I, J, K) uint8 ndarray
        0 background, 1 ``bright_round``, 2 ``dark_elongated`` (two lesions of a class share a label).
    info : dict
        As :func:`make_case`, each lesion with its ``placement``.
    """
    phantom, placements = make_hard_phantom(seed)
    image, labels = phantom.sample(Space.of(space), noise=noise)
    info = phantom.info()
    for entry, placement in zip(info["lesions"], placements):
        entry["placement"] = placement
    return image, labels, info
