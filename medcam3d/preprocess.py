"""Preprocessing from a config: MONAI array transforms -> a MetaTensor that knows its grid.

A config is a list of transforms, each a mapping with the MONAI class name under ``name`` (or
``_target_``, MONAI-bundle style) and its keyword arguments::

    - {name: Orientation, axcodes: RAS}
    - {name: Spacing, pixdim: [1.5, 1.5, 1.5], mode: bilinear}
    - {name: ScaleIntensityRange, a_min: -1000, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}
    - {name: ResizeWithPadOrCrop, spatial_size: [96, 96, 96]}

Images are read by :mod:`medcam3d.io` (the only place that converts LPS to RAS); ``LoadImage`` and
``EnsureChannelFirst`` entries are accepted for MONAI familiarity and mean exactly that step (they
are not built). Only array classes from ``monai.transforms`` are built (no imports, no
expressions). Without trust (CLI ``--trust``) a config may only name the side-effect-free
transforms in :data:`SAFE_TRANSFORMS` (no file I/O, no callables), with plain-data arguments (see
:func:`medcam3d.config.plain_data_problem`). Every spatial MONAI transform updates the MetaTensor's
affine, so the result's affine is the input grid's affine and heatmaps go back to the scan without
replaying the transforms.

Size limit (with or without trust): no transform may make a grid of more than :data:`MAX_VOXELS`
voxels (2^30; ``max_voxels=``, CLI ``--max-voxels``) unless the image it is given is already that
large; nor, above :data:`GROWTH_FLOOR` voxels (256^3), a grid more than ``max_voxels /
GROWTH_FLOOR`` times (64 at the default) the voxels of the scan the preprocessing was given: a
35 kB scan of 32^3 voxels of 40 mm resampled to the demo's 2 mm makes 640^3 voxels, within 2^30,
but its resampling took 7 GB and 90 s. The transforms run one at a time (:class:`CheckedCompose`), and before each runs, the grid it
would make is computed from the image's shape and voxel size and the transform's arguments (MONAI's
lazy mode: metadata only, nothing is resampled), so a 35 kB scan with 40 mm voxels resampled to
1 mm, or ``BorderPad`` of 600 voxels, is refused in milliseconds instead of allocating gigabytes.
A failing transform is named by its place and name in the config (``preprocessing[1] (Spacing)``),
with the root cause on one line.

A MONAI bundle's own ``preprocessing`` chain (built by :func:`medcam3d.models.load_bundle`) runs
as a :class:`BundlePreprocessing`: under the same size limit, on a file checked as
:func:`medcam3d.io.read` checks it, returning what :func:`preprocess` returns.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .config import DEFAULT_MAX_VOXELS, _one_line, _short, plain_data_problem
from .errors import Medcam3dError, PreprocessingError, UntrustedTransformError
from .space import Space

__all__ = [
    "DEFAULT_TRANSFORMS",
    "SAFE_TRANSFORMS",
    "MAX_VOXELS",
    "GROWTH_FLOOR",
    "CheckedCompose",
    "BundlePreprocessing",
    "build_transforms",
    "load_image",
    "predict_shape",
    "preprocess",
]

#: Used when a config gives no transforms: the model sees the scan in RAS orientation whatever
#: orientation the file was stored in.
DEFAULT_TRANSFORMS: list[dict] = [{"name": "Orientation", "axcodes": "RAS"}]

_LOADING_STEPS = {"LoadImage", "EnsureChannelFirst"}

#: MONAI array transforms a config may name without trust: deterministic, no file or network I/O,
#: no callable or expression arguments. Everything else in ``monai.transforms`` (SaveImage,
#: LoadImage with a reader, Lambda, Invert, random transforms ...) needs ``trust=True``.
SAFE_TRANSFORMS = frozenset(
    {
        # geometry (each updates the MetaTensor's affine)
        "Orientation", "Spacing", "Resize", "ResizeWithPadOrCrop", "SpatialPad", "BorderPad", "DivisiblePad",
        "CenterSpatialCrop", "CenterScaleCrop", "SpatialCrop", "CropForeground", "Flip", "Rotate90", "Rotate", "Zoom",
        # intensity
        "ScaleIntensity", "ScaleIntensityRange", "ScaleIntensityRangePercentiles", "ScaleIntensityFixedMean",
        "NormalizeIntensity", "ThresholdIntensity", "ClipIntensityPercentiles", "ShiftIntensity", "StdShiftIntensity",
        "HistogramNormalize", "GaussianSmooth", "MedianSmooth",
        # types and channels
        "EnsureChannelFirst", "EnsureType", "CastToType", "Identity",
    }
)

#: The largest grid (voxels per channel) a transform may make, unless its input is already larger
#: (default of ``max_voxels``; CLI ``--max-voxels``). 2^30 voxels: 4 GiB per channel in float32.
MAX_VOXELS = DEFAULT_MAX_VOXELS

#: Above this many voxels (256^3), a transform's grid may be at most ``max_voxels / GROWTH_FLOOR``
#: times (64 at the default) the voxels of the scan the preprocessing was given: a small scan with
#: huge voxels resampled to fine ones costs gigabytes (a resampling needs about 7 times 4 bytes per
#: output voxel), however far below ``max_voxels`` the grid stays.
GROWTH_FLOOR = 1 << 24

_SIZE_ARGUMENTS = ("spatial_size",)
_TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"
_VOXELS_HINT = "or raise the limit with --max-voxels (Python: max_voxels=...; none for no limit)"
_DEFAULT: Any = object()


#: Resampling transforms that MONAI runs in float64 unless told otherwise; medcam3d uses float32.
_FLOAT64_BY_DEFAULT = {"Spacing", "Orientation", "Rotate", "Zoom", "Resize", "Affine"}


def _is_routine(value: object) -> bool:
    import functools

    return inspect.isroutine(value) or isinstance(value, functools.partial)


def _refuse(where: str, key: str, reason: str, fix: str) -> UntrustedTransformError:
    return UntrustedTransformError(f"{where}{key}: {reason}. {fix} {_TRUST_HINT}.")


def _voxels(size: object) -> int | None:
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


def _spatial_shape(data: object) -> tuple[int, ...] | None:
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


def _check_grid(shape: Sequence[int], data: object, label: str, where: str, max_voxels: int | None, *, made: bool,
                scan_voxels: int | None = None) -> None:
    """Refuse a transform whose output grid ``shape`` is larger than its input's and over ``max_voxels``,
    or over :data:`GROWTH_FLOOR` and more than ``max_voxels / GROWTH_FLOOR`` times ``scan_voxels``
    (the voxels of the scan the preprocessing was given)."""
    if max_voxels is None:
        return
    voxels = math.prod(int(n) for n in shape)
    before = _spatial_shape(data)
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
               f"the model was trained with), {_VOXELS_HINT}.")
    raise PreprocessingError(message)


def _takes_lazy(transform: object) -> bool:
    """A MONAI lazy transform whose call takes ``lazy=`` (MONAI's array transforms do)."""
    from monai.transforms import LazyTrait

    if not isinstance(transform, LazyTrait):
        return False
    try:
        parameters = inspect.signature(transform.__call__).parameters  # type: ignore[operator]
    except (TypeError, ValueError):
        return False
    return "lazy" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _lazy_shape(transform: object, data: object, key: str | None = None) -> tuple[int, ...] | None:
    """The spatial shape ``transform`` would give ``data``, from metadata only (MONAI's lazy mode), or None.

    MONAI's lazy transforms (Spacing, Resize, pads, crops, Zoom, Rotate, Orientation ...) then only
    record the operation and the output shape; ``data`` itself is not changed. With ``key``,
    ``data`` is a dictionary and ``transform`` a dictionary transform; the shape is the one under
    ``key``.
    """
    from monai.data import MetaTensor

    image = data.get(key) if key is not None and isinstance(data, Mapping) else data
    if not isinstance(image, MetaTensor) or not _takes_lazy(transform):
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
    return _spatial_shape(out)


def _working_shape(transform: object, data: object) -> tuple[int, ...] | None:
    """The grid a transform makes on its way, when larger than its output, or None.

    ``Zoom(keep_size=True)`` interpolates the whole zoomed image (the input's shape times the
    zoom) and only then crops it back to the input's shape.
    """
    from monai.transforms import Zoom
    from monai.utils import ensure_tuple_rep

    shape = _spatial_shape(data)
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
        if _takes_lazy(transform):
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


def _run_steps(transforms: Sequence, labels: Sequence[str], data: object, *, max_voxels: int | None, where: str,
               check_input: Callable[[tuple[int, ...]], None] | None = None) -> object:
    """Apply ``transforms`` in turn, refusing a grid over ``max_voxels`` before it is made.

    Each error names the step (``labels[i]``) and gives its root cause on one line. ``check_input``
    is called first with the shape the steps will give (:func:`predict_shape`), when it can be told.
    """
    if check_input is not None:
        predicted_output = predict_shape(transforms, data)
        if predicted_output is not None:
            check_input(predicted_output)
    scan_shape = _spatial_shape(data)
    scan_voxels = math.prod(scan_shape) if scan_shape is not None else None
    for transform, label in zip(transforms, labels):
        working = _working_shape(transform, data)
        if working is not None:
            _check_grid(working, data, label, where, max_voxels, made=False, scan_voxels=scan_voxels)
        predicted = _lazy_shape(transform, data)
        if predicted is not None:
            _check_grid(predicted, data, label, where, max_voxels, made=False, scan_voxels=scan_voxels)
        shape = tuple(getattr(data, "shape", ()))
        try:
            result = transform(data, lazy=False) if _takes_lazy(transform) else transform(data)  # like Compose(lazy=False)
        except Medcam3dError:
            raise
        except MemoryError as error:
            message = (
                f"{where}{label} ran out of memory on an image of shape {shape}: {_one_line(error)}. Check the "
                f"transform's arguments, or lower --max-voxels (Python: max_voxels=...)."
            )
            raise PreprocessingError(message) from None
        except Exception as error:
            raise PreprocessingError(f"{where}{label} failed on an image of shape {shape}: {_one_line(error)}") from error
        after = _spatial_shape(result)
        if predicted is None and after is not None:  # a transform without lazy mode: checked once made
            _check_grid(after, data, label, where, max_voxels, made=True, scan_voxels=scan_voxels)
        data = result
    return data


_COMPOSE: Any = None


def _compose_class() -> Any:
    """:class:`CheckedCompose`, defined on first use (importing MONAI's transforms takes seconds)."""
    global _COMPOSE
    if _COMPOSE is None:
        from monai.transforms import Compose

        class CheckedCompose(Compose):
            """A ``monai.transforms.Compose`` that runs its transforms one at a time, under a size limit.

            Before each transform runs, the grid it would make is computed from metadata (MONAI's
            lazy mode) and refused if it has more than ``max_voxels`` voxels and more than its input
            (transforms without a lazy mode are checked once they ran). Errors name the step by
            ``labels[i]`` (``preprocessing[1] (Spacing)``) with the root cause on one line.

            Parameters
            ----------
            transforms : sequence of callables
            labels : sequence of str, optional
                One per transform; default ``transform <i> (<class name>)``.
            max_voxels : int or None
                None: no limit.
            where : str
                Prefix of every error message (the config file, ``"path: "``).
            """

            def __init__(self, transforms=None, labels: Sequence[str] | None = None, *,
                         max_voxels: int | None = MAX_VOXELS, where: str = "") -> None:
                super().__init__(transforms)
                self.labels = (list(labels) if labels is not None
                               else [f"transform {i} ({type(t).__name__})" for i, t in enumerate(self.transforms)])
                if len(self.labels) != len(self.transforms):
                    raise ValueError(f"{len(self.labels)} labels for {len(self.transforms)} transforms.")
                self.max_voxels, self.where = max_voxels, where

            def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
                return _run_steps(self.transforms[start:end], self.labels[start:end], input_,
                                  max_voxels=self.max_voxels, where=self.where)

        CheckedCompose.__module__ = __name__
        CheckedCompose.__qualname__ = "CheckedCompose"
        _COMPOSE = CheckedCompose
    return _COMPOSE


def __getattr__(name: str) -> Any:
    if name == "CheckedCompose":
        return _compose_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_device(value: object, where: str, key: str, name: str) -> None:
    """A transform's ``device`` argument: a real device (not ``meta``, which holds no data)."""
    if value is None:
        return
    try:
        device = torch.device(value) if isinstance(value, (str, torch.device)) else None
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None:
        message = f"{where}{key} ({name}): {_short(value)} is not a device; give cpu or cuda[:i], or leave device out."
        raise PreprocessingError(message)
    if device.type == "meta":
        message = (
            f"{where}{key} ({name}): 'meta' is PyTorch's device without data, so the scan would be lost. Leave device "
            "out (medcam3d moves the input to the model's device), or give cpu or cuda[:i]."
        )
        raise PreprocessingError(message)


def build_transforms(config: Sequence[Mapping] | None = None, *, trust: bool = False, source: str | Path | None = None,
                     max_voxels: Any = _DEFAULT):
    """Build a :class:`CheckedCompose` (a ``monai.transforms.Compose``) from a config list.

    Parameters
    ----------
    config : sequence of mappings, optional
        See the module docstring. ``None`` uses :data:`DEFAULT_TRANSFORMS`.
    trust : bool
        Allow any array transform of ``monai.transforms`` with any arguments. Without it, only
        :data:`SAFE_TRANSFORMS` with plain-data arguments.
    source : str or Path, optional
        The config file, named in errors. Defaults to ``config.source`` when ``config`` is the
        :class:`medcam3d.config.PreprocessingSteps` of a loaded config.
    max_voxels : int or None, optional
        The largest grid (voxels per channel) a transform may make unless its input is already
        larger, checked before each transform runs; None: no limit. Default: ``config.max_voxels``
        for the :class:`~medcam3d.config.PreprocessingSteps` of a loaded config, else
        :data:`MAX_VOXELS`.

    Returns
    -------
    CheckedCompose
        A ``monai.transforms.Compose``; call it with a channel-first MetaTensor.

    Raises
    ------
    UntrustedTransformError
        Without ``trust``: a transform outside :data:`SAFE_TRANSFORMS`, an argument that is not plain
        data or takes a callable. Subclasses :class:`PreprocessingError`.
    PreprocessingError
        Unknown transform (with the closest names), dictionary transforms, unknown or invalid
        arguments, a ``device`` that is not a real device (``meta``), a ``spatial_size`` list over
        ``max_voxels``; the message names the file and the entry.
    """
    import monai.transforms as mt

    if source is None:
        source = getattr(config, "source", None)
    if max_voxels is _DEFAULT:
        max_voxels = getattr(config, "max_voxels", MAX_VOXELS)
    if max_voxels is not None and (isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1):
        raise PreprocessingError(f"max_voxels must be a positive int or None (no limit), not {_short(max_voxels)}.")
    where = f"{source}: " if source else ""
    if config is None:
        config = DEFAULT_TRANSFORMS
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        message = f"{where}preprocessing must be a list of transforms (mappings with a 'name'), not {type(config).__name__}."
        raise PreprocessingError(message)
    transforms, labels = [], []
    for position, entry in enumerate(config):
        item = f"preprocessing[{position}]"
        if not isinstance(entry, Mapping):
            message = f"{where}{item} must be a mapping like {{name: Orientation, axcodes: RAS}}, not {_short(entry)}."
            raise PreprocessingError(message)
        arguments = dict(entry)
        name = arguments.pop("name", None) or arguments.pop("_target_", None)
        if not isinstance(name, str):
            message = f"{where}{item} has no transform 'name' (e.g. name: Spacing): {_short(dict(entry))}."
            raise PreprocessingError(message)
        module_name, _, name = name.rpartition(".")
        if module_name and not (module_name == "monai.transforms" or module_name.startswith("monai.transforms.")):
            message = (
                f"{where}{item}.name: {_short(module_name + '.' + name)} is not a MONAI transform; only classes of "
                "monai.transforms are built. Give the class name, e.g. name: Spacing."
            )
            raise PreprocessingError(message)
        if not trust:
            problem = plain_data_problem(arguments, item)
            if problem:
                raise _refuse(
                    where, *problem,
                    "Without --trust, transform arguments may only be plain data: numbers, strings, booleans, null, "
                    "lists and mappings (no _target_-style keys, no $expressions, @references or %macros).",
                )
        if name in _LOADING_STEPS:
            continue
        cls = getattr(mt, name, None) if name.isidentifier() and not name.startswith("_") else None
        if not (inspect.isclass(cls) and issubclass(cls, mt.Transform)):
            names = [n for n in dir(mt) if inspect.isclass(getattr(mt, n)) and issubclass(getattr(mt, n), mt.Transform)]
            close = difflib.get_close_matches(name[:100], names, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            message = f"{where}{item}: {_short(name)} is not a MONAI transform.{hint}"
            raise PreprocessingError(message)
        if issubclass(cls, mt.MapTransform):
            message = (
                f"{where}{item}: {name} is a dictionary transform; use the array version "
                f"{name[:-1] if name.endswith('d') else name} (medcam3d passes the image itself)."
            )
            raise PreprocessingError(message)
        if not trust and name not in SAFE_TRANSFORMS:
            raise _refuse(
                where, f"{item}.name", f"{name} is not one of the side-effect-free transforms a config may name "
                "(it may read or write files, call code, or be random)",
                f"Without --trust, use one of {sorted(SAFE_TRANSFORMS)} (medcam3d.preprocess.SAFE_TRANSFORMS).",
            )
        parameters: Mapping[str, inspect.Parameter]
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            parameters = {}
        if name == "Orientation" and "labels" in parameters:
            arguments.setdefault("labels", None)  # axis labels from the MetaTensor's space (RAS)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [key for key in arguments if key not in parameters] if not accepts_any else []
        if unknown:
            valid = [p for p in parameters if p not in ("self", "args", "kwargs")]
            message = f"{where}{item} ({name}): unknown argument(s) {_short(unknown)}; {name} takes {valid}."
            raise PreprocessingError(message)
        if not trust:
            for key in arguments:
                parameter = parameters.get(key)
                if parameter is not None and _is_routine(parameter.default):
                    raise _refuse(
                        where, f"{item}.{key}", f"{name}'s {key} takes a function",
                        f"Without --trust, leave {key} out to use the default.",
                    )
        for key in _SIZE_ARGUMENTS:  # a list names the size; an int's meaning (every axis?) is checked when run
            voxels = _voxels(arguments.get(key)) if isinstance(arguments.get(key), (list, tuple)) else None
            if max_voxels is not None and voxels is not None and voxels > max_voxels:
                message = (
                    f"{where}{item}.{key}: {_short(arguments[key])} asks for {voxels:,} voxels, more than the "
                    f"{max_voxels:,} allowed. Give the size the model was trained on, {_VOXELS_HINT}."
                )
                raise PreprocessingError(message)
        if "device" in arguments:
            _check_device(arguments["device"], where, f"{item}.device", name)
        if "dtype" in parameters and "dtype" not in arguments and name.rsplit(".", 1)[-1] in _FLOAT64_BY_DEFAULT:
            arguments = {**arguments, "dtype": "float32"}  # MONAI computes these in float64: twice the memory, no gain
        try:
            transforms.append(cls(**arguments))
        except Exception as error:  # TypeError, ValueError, IndexError, ... from the constructor
            message = f"{where}{item} ({name}): invalid arguments {_short(arguments)}: {_one_line(error)}"
            raise PreprocessingError(message) from error
        labels.append(f"{item} ({name})")
    try:
        return _compose_class()(transforms, labels, max_voxels=max_voxels, where=where)
    except Exception as error:
        raise PreprocessingError(f"{where}preprocessing: cannot compose the transforms: {_one_line(error)}") from error


def load_image(image: str | Path | Sequence[str | Path] | tuple[np.ndarray, Space], *, volume: int | None = None,
               trust: bool = False):
    """Read an image into a channel-first ``MetaTensor`` ``(C, *shape)`` with its RAS affine.

    Parameters
    ----------
    image : path, list of paths, or (array, Space)
        A file or DICOM folder readable by :func:`medcam3d.io.read` (one channel); a list of them,
        one per channel (MR sequences), stacked in order on the first one's grid by
        :func:`medcam3d.io.read_channels`; or an array with its grid, ``(*shape)`` (one channel) or
        ``(C, *shape)`` (channels first).
    volume : int, optional
        Volume index of a 4D file (of every channel).
    trust : bool
        As for :func:`medcam3d.io.read`, for a list of channel paths.

    Returns
    -------
    (MetaTensor, Space)
        The image and its scanner space (the first channel's grid).
    """
    from monai.data import MetaTensor

    from . import io

    channels = io.as_channel_paths(image)
    if channels is not None:
        array, scanner_space = io.read_channels(channels, volume=volume, trust=trust)
    elif isinstance(image, tuple):
        array, scanner_space = image
        scanner_space = Space.of(scanner_space)
    else:
        array, scanner_space = io.read(image, volume=volume)  # type: ignore[arg-type]
    array = np.asarray(array, dtype=np.float32)
    spatial = tuple(scanner_space.shape)
    if tuple(array.shape) == spatial:
        array = array[None]
    elif array.ndim != len(spatial) + 1 or tuple(array.shape[1:]) != spatial:
        message = (f"The array has shape {array.shape} but its space has shape {scanner_space.shape}; give (*shape) or "
                   "(C, *shape) with the channels first.")
        raise PreprocessingError(message)
    tensor = MetaTensor(torch.from_numpy(np.array(array, dtype=np.float32, copy=True)),
                        affine=torch.tensor(np.array(scanner_space.affine)))
    return tensor, scanner_space


def preprocess(image, transforms=None, *, volume: int | None = None, trust: bool = False, source: str | Path | None = None,
               max_voxels: Any = _DEFAULT, check_input: Callable[[tuple[int, ...]], None] | None = None):
    """Read (if needed) and preprocess one image.

    Parameters
    ----------
    image : path, list of paths, (array, Space) or MetaTensor
        A list of paths is one scan per channel (MR sequences), stacked in order on the first
        one's grid (:func:`medcam3d.io.read_channels`: a channel on another grid is resampled onto
        it, with a warning). A channel-first MetaTensor is used as is (its affine must be set).
    transforms : config list, ``monai.transforms.Compose`` or None
        ``None`` uses :data:`DEFAULT_TRANSFORMS`. A Compose of your own runs one transform at a
        time under the same size limit (one built with ``lazy=True`` runs as it is, checked once
        it ran).
    volume : int, optional
        Volume index of a 4D file.
    trust, source
        Passed to :func:`build_transforms` when ``transforms`` is a config list.
    max_voxels : int or None, optional
        The largest grid a transform may make (see :func:`build_transforms`); None: no limit.
        Default: the limit ``transforms`` was built with, else :data:`MAX_VOXELS`.
    check_input : callable, optional
        Called with the shape ``(C, *input_shape)`` the preprocessing will give, before any
        transform runs, when that shape can be told from metadata (:func:`predict_shape`); it may
        raise to refuse the input before it is made (e.g. the model's activation limit:
        :func:`medcam3d.models.check_activations`).

    Returns
    -------
    (MetaTensor, Space)
        The model's input ``(C, *input_shape)`` (add the batch axis with ``x[None]``), whose
        ``.affine`` is the input grid's affine, and the scan's own ``scanner_space``.

    Raises
    ------
    PreprocessingError
        A transform that fails (named, with the root cause), would make a grid over ``max_voxels``,
        or a result that is not a MetaTensor holding data.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    if isinstance(image, MetaTensor):
        tensor = image
        scanner_space = Space(tuple(tensor.shape[1:]), np.asarray(tensor.affine, dtype=np.float64))
    else:
        tensor, scanner_space = load_image(image, volume=volume, trust=trust)
    checked = _compose_class()
    where_source = source or getattr(transforms, "source", None)
    where = f"{where_source}: " if where_source else ""
    if isinstance(transforms, checked):
        limit = transforms.max_voxels if max_voxels is _DEFAULT else max_voxels
        result = _run_steps(transforms.transforms, transforms.labels, tensor, max_voxels=limit, where=transforms.where,
                            check_input=check_input)
    elif isinstance(transforms, Compose):
        limit = MAX_VOXELS if max_voxels is _DEFAULT else max_voxels
        if getattr(transforms, "lazy", False):  # lazy resampling fuses steps: run it as it is, check the result
            result = _run_steps([transforms], ["the preprocessing (a lazy Compose)"], tensor, max_voxels=limit, where=where)
        else:
            steps = transforms.flatten().transforms
            result = _run_steps(steps, [f"transform {i} ({type(t).__name__})" for i, t in enumerate(steps)], tensor,
                                max_voxels=limit, where=where, check_input=check_input)
    else:
        pipeline = build_transforms(transforms, trust=trust, source=source, max_voxels=max_voxels)
        result = _run_steps(pipeline.transforms, pipeline.labels, tensor, max_voxels=pipeline.max_voxels,
                            where=pipeline.where, check_input=check_input)
    if not isinstance(result, MetaTensor):
        message = (
            f"{where}the preprocessing returned a {type(result).__name__}, not a MONAI MetaTensor with an affine, so the "
            "maps could not be placed; use MONAI array transforms that keep the metadata (no EnsureType data_type: "
            "numpy or track_meta: false)."
        )
        raise PreprocessingError(message)
    if result.is_meta:
        message = (
            f"{where}the preprocessing moved the image to PyTorch's 'meta' device, which holds no data; remove the "
            "device argument (medcam3d moves the input to the model's device)."
        )
        raise PreprocessingError(message)
    return result.float(), scanner_space


# ----------------------------------------------------------------------------- a MONAI bundle's own chain

class BundlePreprocessing:
    """A MONAI bundle's ``preprocessing`` chain, applied to one image file.

    The chain is the bundle's own, built by MONAI's ``ConfigParser`` (usually ``LoadImaged``,
    ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, intensity scaling, cropping). It is
    given ``{key: path}`` and its result under ``key`` is the model input. Before the bundle's
    reader opens the file, :func:`medcam3d.io.describe` checks its header as
    :func:`medcam3d.io.read` would (data files stay in the header's folder, the header claims no
    more data than the file holds); afterwards the grid the bundle's reader saw is compared with
    the one medcam3d reads, so that maps go back to the right place in the scan.

    Attributes
    ----------
    transform : callable
        The chain (usually a ``monai.transforms.Compose``).
    key : str
        The dictionary key of the image (``image`` in most bundles): the first key of the chain's
        ``LoadImaged`` that the metadata lists as a network input, else ``image``, else its first
        key.
    config_file : Path
        The bundle config it came from (named in errors).
    max_voxels : int or None
        The largest grid (voxels) a step of the chain may make unless its input is already larger
        (default :data:`medcam3d.preprocess.MAX_VOXELS`; None: no limit). The steps of a
        ``Compose`` run one at a time, as MONAI's ``Compose`` runs them, and each step's output
        grid is computed from metadata before it runs (see :mod:`medcam3d.preprocess`).
    """

    def __init__(self, transform, key: str, config_file: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
        self.transform, self.key, self.config_file = transform, key, Path(config_file)
        self.max_voxels = max_voxels

    def _apply(self, data: Any, where: str) -> Any:
        """The chain on ``data``, step by step (as MONAI's Compose runs it), refusing a grid over ``max_voxels``."""
        from monai.transforms import Compose, apply_transform

        chain = self.transform
        if not isinstance(chain, Compose) or chain.lazy:
            return chain(data)
        scan_voxels: int | None = None  # the image as the chain's loading step read it
        for index, step in enumerate(chain.flatten().transforms):
            image = data.get(self.key) if isinstance(data, Mapping) else None
            if image is not None:
                if scan_voxels is None and getattr(image, "ndim", 0) >= 2:
                    scan_voxels = int(np.prod(image.shape))  # all its values: with or without a channel axis
                label = f"step {index} ({type(step).__name__})"
                working = _working_shape(getattr(step, "zoomer", step), image)  # Zoomd zooms with a Zoom
                for shape in (working, _lazy_shape(step, data, self.key)):
                    if shape is not None:
                        _check_grid(shape, image, label, where + " ", self.max_voxels, made=False, scan_voxels=scan_voxels)
            data = apply_transform(step, data, chain.map_items, chain.unpack_items, lazy=chain.lazy,
                                   overrides=chain.overrides, log_stats=chain.log_stats)
        return data

    def __repr__(self) -> str:
        return f"BundlePreprocessing(key={self.key!r}, config_file={str(self.config_file)!r})"

    def __call__(self, image: str | Path, *, trust: bool = False):
        """Read and preprocess one image as the bundle does.

        Parameters
        ----------
        image : str or Path, or a list of them
            An image file or a folder holding one DICOM series; or one per channel (MR sequences),
            which the bundle's ``LoadImaged`` stacks in order (a channel not on the first one's grid
            is first resampled onto it, with a :class:`~medcam3d.errors.ChannelGridWarning`); the
            scanner space is the first channel's.
        trust : bool
            As for :func:`medcam3d.io.read`: allow headers whose data files lie elsewhere.

        Returns
        -------
        (MetaTensor, Space)
            The model input ``(C, *input_shape)`` (add the batch axis with ``x[None]``), whose
            ``.affine`` is the input grid's voxel -> RAS mm affine, and the scan's own
            ``scanner_space``, as :func:`medcam3d.preprocess.preprocess` returns them.

        Raises
        ------
        ImageReadError
            The file's header is refused (see :func:`medcam3d.io.describe`), a folder holds
            several DICOM series (a bundle's reader takes one series per folder), or a series'
            slices cannot be placed (:class:`~medcam3d.errors.GeometryError`, as
            :func:`medcam3d.io.read` would raise).
        PreprocessingError
            The chain fails, returns several samples or no MetaTensor, or its reader placed the scan
            elsewhere than medcam3d's reader does.
        """
        import tempfile

        from monai.data import MetaTensor

        from . import io

        channels = io.as_channel_paths(image)
        if channels is None and not isinstance(image, (str, os.PathLike)):
            raise PreprocessingError(f"A bundle's preprocessing reads an image file or DICOM folder (or a list of them, "
                                     f"one per channel); got a {type(image).__name__}.")
        paths = [Path(p) for p in (channels or [image])]
        infos = [self._checked_info(p, trust) for p in paths]
        path, info = paths[0], infos[0]
        where = f"{self.config_file}: preprocessing"
        with tempfile.TemporaryDirectory(prefix="medcam3d-channels-") as folder:
            given: Any = str(path)
            if len(paths) > 1:  # the bundle's LoadImaged stacks a list of files as channels (original_channel_dim 0)
                given = [str(p) for p in self._on_first_grid(paths, infos, Path(folder), trust)]
            return self._run(given, path, info, where)

    @staticmethod
    def _checked_info(path: Path, trust: bool):
        """:func:`medcam3d.io.describe` of one file, refusing what :func:`medcam3d.io.read` refuses."""
        from . import io
        from .errors import GeometryError, ImageReadError

        info = io.describe(path, trust=trust)
        if len(info.series) > 1:
            uids = ", ".join(series.uid for series in info.series)
            message = (
                f"'{path}' holds {len(info.series)} DICOM series ({uids}); the bundle's reader takes one series per "
                "folder. Copy the series to explain into a folder of its own."
            )
            raise ImageReadError(message)
        if info.series and info.series[0].problem:  # what medcam3d.io.read refuses, the bundle's reader may not
            raise GeometryError(f"'{path}' (series {info.series[0].uid}): {info.series[0].problem}")
        if info.affine is None:
            raise GeometryError(f"'{path}': the headers do not say where the voxels are, so the maps could not be placed.")
        return info

    @staticmethod
    def _on_first_grid(paths: list[Path], infos: list, folder: Path, trust: bool) -> list[Path]:
        """The channel files, those not on the first one's grid replaced by a resampled copy in ``folder``
        (NIfTI on the first channel's grid, as :func:`medcam3d.io.read_channels` resamples them, with its
        :class:`~medcam3d.errors.ChannelGridWarning`)."""
        from . import io
        from .io.channels import CHANNEL_ATOL_MM

        first = Space(infos[0].spatial_shape, infos[0].affine)
        given = [paths[0]]
        for index, (path, info) in enumerate(zip(paths[1:], infos[1:]), 1):
            if Space(info.spatial_shape, info.affine).isclose(first, atol=CHANNEL_ATOL_MM, rtol=1e-5):
                given.append(path)
                continue
            from .errors import ChannelGridWarning
            from .space import resample

            values, grid = io.read(path, trust=trust)
            warnings.warn(f"channel {index} ('{path}', {grid}) is not on the grid of channel 0 ('{paths[0]}', {first}); "
                          "it was resampled onto channel 0's grid (linear, 0 outside its field of view)",
                          ChannelGridWarning, stacklevel=3)
            copy = folder / f"channel_{index:04d}.nii.gz"
            io.write(copy, resample(values, grid, first, mode="linear"), first)
            given.append(copy)
        return given

    def _run(self, given: Any, path: Path, info: Any, where: str):
        """The chain on ``{key: given}`` (a path, or a list of channel paths) and the checks of its result."""
        from monai.data import MetaTensor

        from .errors import SpaceError

        try:
            data = self._apply({self.key: given}, where)
        except PreprocessingError:
            raise
        except Exception as error:  # MONAI wraps errors in RuntimeError with the transform's name
            raise PreprocessingError(f"{where} failed on '{path}': {_one_line(error)}") from error
        if isinstance(data, (list, tuple)):
            message = (
                f"{where} returned {len(data)} samples for '{path}' (a random or patch crop?); medcam3d explains one "
                "input per scan. Remove the cropping transform (large scans: use sliding_window)."
            )
            raise PreprocessingError(message)
        result = data.get(self.key) if isinstance(data, Mapping) else data
        if not isinstance(result, MetaTensor):
            message = (
                f"{where} gave a {type(result).__name__} under {self.key!r}, not a MONAI MetaTensor with an affine; "
                "medcam3d needs the input grid to place the maps."
            )
            raise PreprocessingError(message)
        assert info.spatial_shape is not None  # a single image or series (several series were refused above)
        scanner_space = Space(info.spatial_shape, info.affine)
        seen = result.meta.get("original_affine")  # the file's grid as the bundle's reader saw it
        if seen is not None:
            seen = np.asarray(seen.cpu() if isinstance(seen, torch.Tensor) else seen, dtype=np.float64)
            try:
                same = scanner_space.isclose(Space(scanner_space.shape, seen), atol=1e-3, rtol=1e-5)
            except SpaceError:  # not a 4x4 voxel -> world matrix
                same = False
            if not same:
                message = (
                    f"{where}: the bundle's reader placed '{path}' with the voxel -> world affine "
                    f"{np.array2string(seen, precision=4)}, but medcam3d reads it as {scanner_space}; the maps could not "
                    "be placed reliably. Check the reader arguments of LoadImaged (e.g. ITKReader's affine_lps_to_ras "
                    "must stay true)."
                )
                raise PreprocessingError(message)
        return result.float(), scanner_space
