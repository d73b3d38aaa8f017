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

Size limit (with or without trust, :mod:`medcam3d.preprocess_grid`): no transform may make a grid of more than :data:`~medcam3d.preprocess_grid.MAX_VOXELS`
voxels (2^30; ``max_voxels=``, CLI ``--max-voxels``) unless the image it is given is already that
large; nor, above :data:`~medcam3d.preprocess_grid.GROWTH_FLOOR` voxels (256^3), a grid more than ``max_voxels /
GROWTH_FLOOR`` times (64 at the default) the voxels of the scan the preprocessing was given: a
35 kB scan of 32^3 voxels of 40 mm resampled to the demo's 2 mm makes 640^3 voxels, within 2^30,
but its resampling took 7 GB and 90 s. The transforms run one at a time (:class:`CheckedCompose`), and before each runs, the grid it
would make is computed from the image's shape and voxel size and the transform's arguments (MONAI's
lazy mode: metadata only, nothing is resampled), so a 35 kB scan with 40 mm voxels resampled to
1 mm, or ``BorderPad`` of 600 voxels, is refused in milliseconds instead of allocating gigabytes.
A failing transform is named by its place and name in the config (``preprocessing[1] (Spacing)``),
with the root cause on one line.

A MONAI bundle's own ``preprocessing`` chain runs as a
:class:`medcam3d.preprocess_bundle.BundlePreprocessing`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import plain_data_problem
from .errors import PreprocessingError, UntrustedTransformError, cause_line, short_repr
from .preprocess_grid import MAX_VOXELS, MAX_VOXELS_HINT, run_steps, size_voxels
from .space import Space

__all__ = [
    "DEFAULT_TRANSFORMS",
    "SAFE_TRANSFORMS",
    "CheckedCompose",
    "build_transforms",
    "load_image",
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

_SIZE_ARGUMENTS = ("spatial_size",)
_TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"
_DEFAULT: Any = object()


#: Resampling transforms that MONAI runs in float64 unless told otherwise; medcam3d uses float32.
_FLOAT64_BY_DEFAULT = {"Spacing", "Orientation", "Rotate", "Zoom", "Resize", "Affine"}


def _is_routine(value: object) -> bool:
    import functools

    return inspect.isroutine(value) or isinstance(value, functools.partial)


def _refuse(where: str, key: str, reason: str, fix: str) -> UntrustedTransformError:
    return UntrustedTransformError(f"{where}{key}: {reason}. {fix} {_TRUST_HINT}.")


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
                return run_steps(self.transforms[start:end], self.labels[start:end], input_,
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
        message = f"{where}{key} ({name}): {short_repr(value)} is not a device; give cpu or cuda[:i], or leave device out."
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
        raise PreprocessingError(f"max_voxels must be a positive int or None (no limit), not {short_repr(max_voxels)}.")
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
            message = f"{where}{item} must be a mapping like {{name: Orientation, axcodes: RAS}}, not {short_repr(entry)}."
            raise PreprocessingError(message)
        arguments = dict(entry)
        name = arguments.pop("name", None) or arguments.pop("_target_", None)
        if not isinstance(name, str):
            message = f"{where}{item} has no transform 'name' (e.g. name: Spacing): {short_repr(dict(entry))}."
            raise PreprocessingError(message)
        module_name, _, name = name.rpartition(".")
        if module_name and not (module_name == "monai.transforms" or module_name.startswith("monai.transforms.")):
            message = (
                f"{where}{item}.name: {short_repr(module_name + '.' + name)} is not a MONAI transform; only classes of "
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
            message = f"{where}{item}: {short_repr(name)} is not a MONAI transform.{hint}"
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
            message = f"{where}{item} ({name}): unknown argument(s) {short_repr(unknown)}; {name} takes {valid}."
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
            voxels = size_voxels(arguments.get(key)) if isinstance(arguments.get(key), (list, tuple)) else None
            if max_voxels is not None and voxels is not None and voxels > max_voxels:
                message = (
                    f"{where}{item}.{key}: {short_repr(arguments[key])} asks for {voxels:,} voxels, more than the "
                    f"{max_voxels:,} allowed. Give the size the model was trained on, {MAX_VOXELS_HINT}."
                )
                raise PreprocessingError(message)
        if "device" in arguments:
            _check_device(arguments["device"], where, f"{item}.device", name)
        if "dtype" in parameters and "dtype" not in arguments and name.rsplit(".", 1)[-1] in _FLOAT64_BY_DEFAULT:
            arguments = {**arguments, "dtype": "float32"}  # MONAI computes these in float64: twice the memory, no gain
        try:
            transforms.append(cls(**arguments))
        except Exception as error:  # TypeError, ValueError, IndexError, ... from the constructor
            message = f"{where}{item} ({name}): invalid arguments {short_repr(arguments)}: {cause_line(error)}"
            raise PreprocessingError(message) from error
        labels.append(f"{item} ({name})")
    try:
        return _compose_class()(transforms, labels, max_voxels=max_voxels, where=where)
    except Exception as error:
        raise PreprocessingError(f"{where}preprocessing: cannot compose the transforms: {cause_line(error)}") from error


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
        result = run_steps(transforms.transforms, transforms.labels, tensor, max_voxels=limit, where=transforms.where,
                            check_input=check_input)
    elif isinstance(transforms, Compose):
        limit = MAX_VOXELS if max_voxels is _DEFAULT else max_voxels
        if getattr(transforms, "lazy", False):  # lazy resampling fuses steps: run it as it is, check the result
            result = run_steps([transforms], ["the preprocessing (a lazy Compose)"], tensor, max_voxels=limit, where=where)
        else:
            steps = transforms.flatten().transforms
            result = run_steps(steps, [f"transform {i} ({type(t).__name__})" for i, t in enumerate(steps)], tensor,
                                max_voxels=limit, where=where, check_input=check_input)
    else:
        pipeline = build_transforms(transforms, trust=trust, source=source, max_voxels=max_voxels)
        result = run_steps(pipeline.transforms, pipeline.labels, tensor, max_voxels=pipeline.max_voxels,
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

