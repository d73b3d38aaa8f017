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
:func:`medcam3d.config.plain_data_problem`) and output sizes of at most :data:`MAX_VOXELS`. Every
spatial MONAI transform updates the MetaTensor's affine, so the result's affine is the input grid's
affine and heatmaps go back to the scan without replaying the transforms.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from .config import _short, plain_data_problem
from .errors import PreprocessingError, UntrustedTransformError  # noqa: F401  (re-exported)
from .space import Space

__all__ = [
    "DEFAULT_TRANSFORMS",
    "SAFE_TRANSFORMS",
    "MAX_VOXELS",
    "PreprocessingError",
    "UntrustedTransformError",
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

#: Without trust, the largest output a size argument (``spatial_size``, ``roi_size``) may ask for.
MAX_VOXELS = 1 << 30

_SIZE_ARGUMENTS = ("spatial_size", "roi_size")
_TRUST_HINT = "If you trust the config's author, pass --trust (Python: trust=True)"


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


def build_transforms(config: Sequence[Mapping] | None = None, *, trust: bool = False, source: str | Path | None = None):
    """Build a ``monai.transforms.Compose`` from a config list.

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

    Returns
    -------
    monai.transforms.Compose

    Raises
    ------
    UntrustedTransformError
        Without ``trust``: a transform outside :data:`SAFE_TRANSFORMS`, an argument that is not plain
        data or takes a callable, a size over :data:`MAX_VOXELS`. Subclasses :class:`PreprocessingError`.
    PreprocessingError
        Unknown transform (with the closest names), dictionary transforms, unknown or invalid
        arguments; the message names the file and the entry.
    """
    import monai.transforms as mt

    if source is None:
        source = getattr(config, "source", None)
    where = f"{source}: " if source else ""
    if config is None:
        config = DEFAULT_TRANSFORMS
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        message = f"{where}preprocessing must be a list of transforms (mappings with a 'name'), not {type(config).__name__}."
        raise PreprocessingError(message)
    transforms = []
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
            for key in _SIZE_ARGUMENTS:
                voxels = _voxels(arguments.get(key))
                if voxels is not None and voxels > MAX_VOXELS:
                    message = (
                        f"{where}{item}.{key}: {_short(arguments[key])} asks for {voxels:,} voxels, more than the "
                        f"{MAX_VOXELS:,} allowed. Give the size the model was trained on. {_TRUST_HINT}."
                    )
                    raise PreprocessingError(message)
        if "dtype" in parameters and "dtype" not in arguments and name.rsplit(".", 1)[-1] in _FLOAT64_BY_DEFAULT:
            arguments = {**arguments, "dtype": "float32"}  # MONAI computes these in float64: twice the memory, no gain
        try:
            transforms.append(cls(**arguments))
        except Exception as error:  # TypeError, ValueError, IndexError, ... from the constructor
            message = f"{where}{item} ({name}): invalid arguments {_short(arguments)}: {type(error).__name__}: {error}"
            raise PreprocessingError(message) from error
    try:
        return mt.Compose(transforms)
    except Exception as error:
        raise PreprocessingError(f"{where}preprocessing: cannot compose the transforms: {error}") from error


def load_image(image: str | Path | tuple[np.ndarray, Space], *, volume: int | None = None):
    """Read an image into a channel-first ``MetaTensor`` ``(1, *shape)`` with its RAS affine.

    Parameters
    ----------
    image : path or (array, Space)
        A file or DICOM folder readable by :func:`medcam3d.io.read`, or an array with its grid.
    volume : int, optional
        Volume index of a 4D file.

    Returns
    -------
    (MetaTensor, Space)
        The image and its scanner space.
    """
    from monai.data import MetaTensor

    from . import io

    if isinstance(image, tuple):
        array, scanner_space = image
        scanner_space = Space.of(scanner_space)
    else:
        array, scanner_space = io.read(image, volume=volume)
    array = np.asarray(array, dtype=np.float32)
    if tuple(array.shape) != tuple(scanner_space.shape):
        message = f"The array has shape {array.shape} but its space has shape {scanner_space.shape}."
        raise PreprocessingError(message)
    tensor = MetaTensor(torch.from_numpy(np.array(array, dtype=np.float32, copy=True))[None], affine=torch.tensor(np.array(scanner_space.affine)))
    return tensor, scanner_space


def preprocess(image, transforms=None, *, volume: int | None = None, trust: bool = False, source: str | Path | None = None):
    """Read (if needed) and preprocess one image.

    Parameters
    ----------
    image : path, (array, Space) or MetaTensor
        A channel-first MetaTensor is used as is (its affine must be set).
    transforms : config list, ``monai.transforms.Compose`` or None
        ``None`` uses :data:`DEFAULT_TRANSFORMS`.
    volume : int, optional
        Volume index of a 4D file.
    trust, source
        Passed to :func:`build_transforms` when ``transforms`` is a config list.

    Returns
    -------
    (MetaTensor, Space)
        The model's input ``(C, *input_shape)`` (add the batch axis with ``x[None]``), whose
        ``.affine`` is the input grid's affine, and the scan's own ``scanner_space``.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    if isinstance(image, MetaTensor):
        tensor = image
        scanner_space = Space(tuple(tensor.shape[1:]), np.asarray(tensor.affine, dtype=np.float64))
    else:
        tensor, scanner_space = load_image(image, volume=volume)
    pipeline = transforms if isinstance(transforms, Compose) else build_transforms(transforms, trust=trust, source=source)
    try:
        result = pipeline(tensor)
    except Exception as error:  # MONAI wraps errors in RuntimeError with the transform's name
        where = source or getattr(transforms, "source", None)
        message = f"{f'{where}: ' if where else ''}Preprocessing failed on an image of shape {tuple(tensor.shape)}: {error}"
        raise PreprocessingError(message) from error
    if not isinstance(result, MetaTensor):
        message = "The preprocessing returned a plain tensor without an affine; use MONAI array transforms only."
        raise PreprocessingError(message)
    return result.float(), scanner_space
