"""A crop after a resampling, done in one resampling: the same model input without the large grid in between.

A typical config resamples the scan to the training voxel size, maps the intensities, then crops the
model's input size (``Orientation``, ``Spacing``, ``ScaleIntensityRange``, ``ResizeWithPadOrCrop``).
On a 512 x 512 x 300 CT with 2 mm voxels, ``Spacing`` makes a 321 x 338 x 452 grid (about 200 MB of
float32, and several times that while it resamples) of which the crop keeps 64^3. Where the crop only
crops (no axis is padded), the crop commutes with the voxel-wise intensity steps between them, and the
resampling and the crop can be done as one resampling onto the cropped grid (MONAI's lazy mode
composes their matrices): every kept voxel is interpolated at the same world position from the same
scan voxels, so the affine is the same and the values too, up to float32 rounding of the composed
matrix (about 1e-5 of the intensity range), and the grid in between is never made.

:func:`find_fusion` finds such a run; :func:`medcam3d.preprocess_grid.run_steps` runs them, after the
same size checks on each step as when they run one by one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Fusion", "find_fusion"]

#: Lazy MONAI array transforms whose eager result is a resampling (or an exact flip/permutation) at the
#: grid points that their lazy matrix gives: fused with a crop, they sample the same positions.
RESAMPLING = frozenset({"Orientation", "Spacing", "Flip", "Rotate90"})
#: MONAI array transforms that map each voxel's value on its own with fixed parameters (no statistics
#: of the image): they commute with a crop.
VOXELWISE = frozenset({"ScaleIntensityRange", "ThresholdIntensity", "ShiftIntensity"})
#: MONAI array transforms that cut a box out of the grid (``ResizeWithPadOrCrop`` only where it pads no axis).
CROPS = frozenset({"ResizeWithPadOrCrop", "CenterSpatialCrop", "SpatialCrop"})


@dataclass(frozen=True)
class Fusion:
    """Steps ``start`` .. ``crop`` of a pipeline run as: the resamplings and the crop in one lazy
    resampling, then the voxel-wise steps between them (``voxelwise``, indices in order)."""

    start: int
    crop: int
    resampling: tuple[int, ...]
    voxelwise: tuple[int, ...]


def _is_monai(transform: object, names: frozenset[str]) -> bool:
    return type(transform).__name__ in names and type(transform).__module__.startswith("monai.transforms")


def _crop_only(transforms: Sequence, resampling: Sequence[int], crop: int, data: object) -> bool:
    """Whether the crop, after the resamplings, cuts on every axis and pads none (metadata only)."""
    from monai.data import MetaTensor

    if not isinstance(data, MetaTensor) or data.pending_operations:
        return False
    current = data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in resampling:
                current = transforms[i](current, lazy=True)
            before = tuple(int(n) for n in current.peek_pending_shape())
            after = tuple(int(n) for n in transforms[crop](current, lazy=True).peek_pending_shape())
    except Exception:  # the steps run one by one, and report it
        return False
    if type(transforms[crop]).__name__ != "ResizeWithPadOrCrop":
        return True
    return len(before) == len(after) and all(b >= a for b, a in zip(before, after))


def find_fusion(transforms: Sequence, data: object) -> Fusion | None:
    """The run of ``transforms`` that :func:`medcam3d.preprocess_grid.run_steps` does as one resampling.

    A run is one or more :data:`RESAMPLING` steps, then any :data:`VOXELWISE` steps, then one of
    :data:`CROPS` that pads no axis, with only voxel-wise steps before it (a later run would need the
    data that the earlier steps make).

    Parameters
    ----------
    transforms : sequence of callables
        MONAI array transforms, applied in turn.
    data : MetaTensor
        Channel-first ``(C, *spatial)`` with no pending operations; not changed.

    Returns
    -------
    Fusion or None
        None where no run qualifies (the steps then run one by one).
    """
    for start in range(len(transforms)):
        end = start
        while end < len(transforms) and _is_monai(transforms[end], RESAMPLING):
            end += 1
        if end == start:
            if not _is_monai(transforms[start], VOXELWISE):
                return None  # a step that changes what the resampling would see: nothing fused
            continue
        crop = end
        while crop < len(transforms) and _is_monai(transforms[crop], VOXELWISE):
            crop += 1
        if crop == len(transforms) or not _is_monai(transforms[crop], CROPS):
            return None
        resampling = tuple(range(start, end))
        if not _crop_only(transforms, resampling, crop, data):  # voxel-wise steps before keep the grid
            return None
        return Fusion(start, crop, resampling, tuple(range(end, crop)))
    return None
