"""The size limit of preprocessing: the grid each transform would make, told from metadata before it
runs (MONAI's lazy mode), and refused when it is too large.

Size limit (with or without trust): no transform may make a grid of more than :data:`MAX_VOXELS`
voxels (2^30; ``max_voxels=``, CLI ``--max-voxels``) unless the image it is given is already that
large; nor, above :data:`GROWTH_FLOOR` voxels (256^3), a grid more than ``max_voxels /
GROWTH_FLOOR`` times (64 at the default) the voxels of the scan the preprocessing was given: a
35 kB scan of 32^3 voxels of 40 mm resampled to the demo's 2 mm makes 640^3 voxels, within 2^30,
but its resampling took 7 GB and 90 s. The transforms run one at a time (:func:`run_steps`, :class:`medcam3d.preprocess.CheckedCompose`), and before each runs, the grid it
would make is computed from the image's shape and voxel size and the transform's arguments (MONAI's
lazy mode: metadata only, nothing is resampled), so a 35 kB scan with 40 mm voxels resampled to
1 mm, or ``BorderPad`` of 600 voxels, is refused in milliseconds instead of allocating gigabytes.
A failing transform is named by its place and name in the config (``preprocessing[1] (Spacing)``),
with the root cause on one line.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import numpy as np
import torch

from .config import DEFAULT_MAX_VOXELS
from .errors import Medcam3dError, PreprocessingError, cause_line

__all__ = ["MAX_VOXELS", "GROWTH_FLOOR", "MAX_VOXELS_HINT", "size_voxels", "spatial_shape", "check_grid", "takes_lazy",
           "lazy_shape", "working_shape", "predict_shape", "run_steps"]

#: The largest grid (voxels per channel) a transform may make, unless its input is already larger
#: (default of ``max_voxels``; CLI ``--max-voxels``). 2^30 voxels: 4 GiB per channel in float32.
MAX_VOXELS = DEFAULT_MAX_VOXELS

#: Above this many voxels (256^3), a transform's grid may be at most ``max_voxels / GROWTH_FLOOR``
#: times (64 at the default) the voxels of the scan the preprocessing was given: a small scan with
#: huge voxels resampled to fine ones costs gigabytes (a resampling needs about 7 times 4 bytes per
#: output voxel), however far below ``max_voxels`` the grid stays.
GROWTH_FLOOR = 1 << 24

#: How an error about the limit ends: how to lift it.
MAX_VOXELS_HINT = "or raise the limit with --max-voxels (Python: max_voxels=...; none for no limit)"


def size_voxels(size: object) -> int | None:
    """The voxel count a size argument asks for (None if it is not a list of ints)."""
    values = size if isinstance(size, (list, tuple)) else [size]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    count = 1
    for value in values:
        count *= max(int(cast(int, value)), 1)  # checked above
    return count


def _grid_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def spatial_shape(data: object) -> tuple[int, ...] | None:
    shape = getattr(data, "shape", None)
    return tuple(int(n) for n in shape[1:]) if shape is not None and len(shape) >= 2 else None


def _voxel_size_text(data: object) -> str:
    """`` with voxels of 40 x 40 x 40 mm`` from a MetaTensor's affine ('' without one)."""
    affine = getattr(data, "affine", None)
    try:
        matrix = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        sizes = np.linalg.norm(matrix[:-1, :-1], axis=0)
    except Exception:
        return ""
    if sizes.ndim != 1 or not np.all(np.isfinite(sizes)):
        return ""
    return " with voxels of " + " x ".join(f"{size:.3g}" for size in sizes) + " mm"


def check_grid(shape: Sequence[int], data: object, label: str, where: str, max_voxels: int | None, *, made: bool,
                scan_voxels: int | None = None) -> None:
    """Refuse a transform whose output grid ``shape`` is larger than its input's and over ``max_voxels``,
    or over :data:`GROWTH_FLOOR` and more than ``max_voxels / GROWTH_FLOOR`` times ``scan_voxels``
    (the voxels of the scan the preprocessing was given)."""
    if max_voxels is None:
        return
    voxels = math.prod(int(n) for n in shape)
    before = spatial_shape(data)
    if before is not None and voxels <= math.prod(before):
        return
    growth = max_voxels / GROWTH_FLOOR
    grows = (scan_voxels is not None and scan_voxels > 0 and growth >= 1 and voxels > GROWTH_FLOOR
             and voxels > growth * scan_voxels)
    if voxels <= max_voxels and not grows:
        return
    given = f"the {_grid_text(before)} image{_voxel_size_text(data)}" if before is not None else "its input"
    made_text = f"{where}{label} {'made' if made else 'would make'} a grid of {_grid_text(shape)} = {voxels:,} voxels from {given}"
    if voxels > max_voxels:
        limit = f"more than the {max_voxels:,} allowed"
    else:
        limit = (f"{voxels / cast(int, scan_voxels):,.0f} times the {scan_voxels:,} voxels of the scan given to the "
                 f"preprocessing, more than the {growth:g} times allowed for a grid over {GROWTH_FLOOR:,} voxels "
                 f"(max_voxels / {GROWTH_FLOOR:,})")
    message = (f"{made_text}, {limit}. Check the scan's voxel size and the transform's arguments (sizes and spacings "
               f"the model was trained with), {MAX_VOXELS_HINT}.")
    raise PreprocessingError(message)


def takes_lazy(transform: object) -> bool:
    """A MONAI lazy transform whose call takes ``lazy=`` (MONAI's array transforms do)."""
    from monai.transforms import LazyTrait

    if not isinstance(transform, LazyTrait):
        return False
    try:
        parameters = inspect.signature(transform.__call__).parameters  # type: ignore[operator]
    except (TypeError, ValueError):
        return False
    return "lazy" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def lazy_shape(transform: object, data: object, key: str | None = None) -> tuple[int, ...] | None:
    """The spatial shape ``transform`` would give ``data``, from metadata only (MONAI's lazy mode), or None.

    MONAI's lazy transforms (Spacing, Resize, pads, crops, Zoom, Rotate, Orientation ...) then only
    record the operation and the output shape; ``data`` itself is not changed. With ``key``,
    ``data`` is a dictionary and ``transform`` a dictionary transform; the shape is the one under
    ``key``.
    """
    from monai.data import MetaTensor

    image = data.get(key) if key is not None and isinstance(data, Mapping) else data
    if not isinstance(image, MetaTensor) or not takes_lazy(transform):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = transform(data, lazy=True)  # type: ignore[operator]
    except Exception:  # the real call reports it
        return None
    if key is not None:
        out = out.get(key) if isinstance(out, Mapping) else None
    if isinstance(out, MetaTensor) and out.pending_operations:
        return tuple(int(n) for n in out.peek_pending_shape())
    return spatial_shape(out)


def working_shape(transform: object, data: object) -> tuple[int, ...] | None:
    """The grid a transform makes on its way, when larger than its output, or None.

    ``Zoom(keep_size=True)`` interpolates the whole zoomed image (the input's shape times the
    zoom) and only then crops it back to the input's shape.
    """
    from monai.transforms import Zoom
    from monai.utils import ensure_tuple_rep

    shape = spatial_shape(data)
    if not isinstance(transform, Zoom) or not transform.keep_size or shape is None:
        return None
    try:
        factors = ensure_tuple_rep(transform.zoom, len(shape))
        return tuple(int(math.floor(float(n) * float(z))) for n, z in zip(shape, factors))
    except Exception:  # the real call reports it
        return None


#: MONAI array transforms without a lazy mode that keep the image's shape (voxel-wise maps, filters,
#: type casts): :func:`predict_shape` passes over them.
_SHAPE_KEEPING = frozenset({
    "CastToType", "ClipIntensityPercentiles", "EnsureType", "GaussianSmooth", "HistogramNormalize", "Identity",
    "MedianSmooth", "NormalizeIntensity", "ScaleIntensity", "ScaleIntensityFixedMean", "ScaleIntensityRange",
    "ScaleIntensityRangePercentiles", "ShiftIntensity", "StdShiftIntensity", "ThresholdIntensity",
})
#: Lazy transforms whose output shape depends on the voxel values (MONAI does not mark them as
#: needing current data): after a pending lazy step, :func:`predict_shape` cannot tell their shape.
_VALUE_DEPENDENT = frozenset({"CropForeground"})


def predict_shape(transforms: Sequence, data: object) -> tuple[int, ...] | None:
    """The shape ``(C, *spatial)`` that applying ``transforms`` to ``data`` in turn would give, from
    metadata only, or None where it cannot be told without running them.

    The lazy transforms (Spacing, Resize, pads, crops, Zoom, Orientation ...) run in MONAI's lazy
    mode, one after the other, as a lazy ``Compose`` would run them before resampling: they only
    record their operation and output shape, nothing is resampled or padded. The intensity
    transforms in :data:`_SHAPE_KEEPING` keep the shape. Any other transform, a ``Compose``, or a
    transform that needs the resampled data (``CropForeground`` after a lazy step) ends the
    prediction: None.

    Parameters
    ----------
    transforms : sequence of callables
        MONAI array transforms, applied in turn.
    data : MetaTensor
        Channel-first ``(C, *spatial)``; not changed.

    Returns
    -------
    tuple of int or None
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    current = data
    for transform in transforms:
        if not isinstance(current, MetaTensor) or isinstance(transform, Compose):
            return None
        if takes_lazy(transform):
            needs_values = getattr(transform, "requires_current_data", False) or type(transform).__name__ in _VALUE_DEPENDENT
            if current.pending_operations and needs_values:
                return None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    current = transform(current, lazy=True)
            except Exception:  # the real call reports it
                return None
        elif not (type(transform).__name__ in _SHAPE_KEEPING and type(transform).__module__.startswith("monai.transforms")):
            return None
    if not isinstance(current, MetaTensor) or current.ndim < 2:
        return None
    spatial = current.peek_pending_shape() if current.pending_operations else current.shape[1:]
    return (int(current.shape[0]), *(int(n) for n in spatial))


def run_steps(transforms: Sequence, labels: Sequence[str], data: object, *, max_voxels: int | None, where: str,
               check_input: Callable[[tuple[int, ...]], None] | None = None) -> object:
    """Apply ``transforms`` in turn, refusing a grid over ``max_voxels`` before it is made.

    Each error names the step (``labels[i]``) and gives its root cause on one line. ``check_input``
    is called first with the shape the steps will give (:func:`predict_shape`), when it can be told.
    """
    if check_input is not None:
        predicted_output = predict_shape(transforms, data)
        if predicted_output is not None:
            check_input(predicted_output)
    scan_shape = spatial_shape(data)
    scan_voxels = math.prod(scan_shape) if scan_shape is not None else None
    for transform, label in zip(transforms, labels):
        working = working_shape(transform, data)
        if working is not None:
            check_grid(working, data, label, where, max_voxels, made=False, scan_voxels=scan_voxels)
        predicted = lazy_shape(transform, data)
        if predicted is not None:
            check_grid(predicted, data, label, where, max_voxels, made=False, scan_voxels=scan_voxels)
        shape = tuple(getattr(data, "shape", ()))
        try:
            result = transform(data, lazy=False) if takes_lazy(transform) else transform(data)  # like Compose(lazy=False)
        except Medcam3dError:
            raise
        except MemoryError as error:
            message = (
                f"{where}{label} ran out of memory on an image of shape {shape}: {cause_line(error)}. Check the "
                f"transform's arguments, or lower --max-voxels (Python: max_voxels=...)."
            )
            raise PreprocessingError(message) from None
        except Exception as error:
            raise PreprocessingError(f"{where}{label} failed on an image of shape {shape}: {cause_line(error)}") from error
        after = spatial_shape(result)
        if predicted is None and after is not None:  # a transform without lazy mode: checked once made
            check_grid(after, data, label, where, max_voxels, made=True, scan_voxels=scan_voxels)
        data = result
    return data
