"""Preprocessing from a config: MONAI array transforms -> a MetaTensor that knows its grid.

A config is a list of transforms, each a mapping with the MONAI class name under ``name`` (or
``_target_``, MONAI-bundle style) and its keyword arguments::

    - {name: Orientation, axcodes: RAS}
    - {name: Spacing, pixdim: [1.5, 1.5, 1.5], mode: bilinear}
    - {name: ScaleIntensityRange, a_min: -1000, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}
    - {name: ResizeWithPadOrCrop, spatial_size: [96, 96, 96]}

Images are read by :mod:`medcam3d.io` (the only place that converts LPS to RAS); ``LoadImage`` and
``EnsureChannelFirst`` entries are accepted for MONAI familiarity and mean exactly that step.
Only classes from ``monai.transforms`` are built (no imports, no expressions: a config cannot run
code). Every spatial MONAI transform updates the MetaTensor's affine, so the result's affine is
the input grid's affine and heatmaps go back to the scan without replaying the transforms.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import PreprocessingError  # noqa: F401  (re-exported)
from .space import Space

__all__ = ["DEFAULT_TRANSFORMS", "PreprocessingError", "build_transforms", "load_image", "preprocess"]

#: Used when a config gives no transforms: the model sees the scan in RAS orientation whatever
#: orientation the file was stored in.
DEFAULT_TRANSFORMS: list[dict] = [{"name": "Orientation", "axcodes": "RAS"}]

_LOADING_STEPS = {"LoadImage", "EnsureChannelFirst"}


def build_transforms(config: Sequence[Mapping] | None = None):
    """Build a ``monai.transforms.Compose`` from a config list.

    Parameters
    ----------
    config : sequence of mappings, optional
        See the module docstring. ``None`` uses :data:`DEFAULT_TRANSFORMS`.

    Raises
    ------
    PreprocessingError
        Unknown transform (with the closest names), dictionary transforms, unknown or invalid
        arguments; the message names the entry.
    """
    import monai.transforms as mt

    if config is None:
        config = DEFAULT_TRANSFORMS
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        message = f"preprocessing must be a list of transforms (mappings with a 'name'), not {type(config).__name__}."
        raise PreprocessingError(message)
    transforms = []
    for position, entry in enumerate(config):
        if not isinstance(entry, Mapping):
            message = f"preprocessing[{position}] must be a mapping like {{name: Orientation, axcodes: RAS}}, not {entry!r}."
            raise PreprocessingError(message)
        arguments = dict(entry)
        name = arguments.pop("name", None) or arguments.pop("_target_", None)
        if not isinstance(name, str):
            message = f"preprocessing[{position}] has no transform 'name' (e.g. name: Spacing): {dict(entry)!r}."
            raise PreprocessingError(message)
        name = name.rsplit(".", 1)[-1]
        if name in _LOADING_STEPS:
            continue
        cls = getattr(mt, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, mt.Transform)):
            names = [n for n in dir(mt) if inspect.isclass(getattr(mt, n)) and issubclass(getattr(mt, n), mt.Transform)]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            message = f"preprocessing[{position}]: {name!r} is not a MONAI transform.{hint}"
            raise PreprocessingError(message)
        if issubclass(cls, mt.MapTransform):
            message = (
                f"preprocessing[{position}]: {name} is a dictionary transform; use the array version "
                f"{name[:-1] if name.endswith('d') else name} (medcam3d passes the image itself)."
            )
            raise PreprocessingError(message)
        parameters = inspect.signature(cls.__init__).parameters
        if name == "Orientation" and "labels" in parameters:
            arguments.setdefault("labels", None)  # axis labels from the MetaTensor's space (RAS)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [key for key in arguments if key not in parameters] if not accepts_any else []
        if unknown:
            valid = [p for p in parameters if p not in ("self", "args", "kwargs")]
            message = f"preprocessing[{position}] ({name}): unknown argument(s) {unknown}; {name} takes {valid}."
            raise PreprocessingError(message)
        try:
            transforms.append(cls(**arguments))
        except (TypeError, ValueError) as error:
            message = f"preprocessing[{position}] ({name}): invalid arguments {arguments}: {error}"
            raise PreprocessingError(message) from error
    return mt.Compose(transforms)


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


def preprocess(image, transforms=None, *, volume: int | None = None):
    """Read (if needed) and preprocess one image.

    Parameters
    ----------
    image : path, (array, Space) or MetaTensor
        A channel-first MetaTensor is used as is (its affine must be set).
    transforms : config list, ``monai.transforms.Compose`` or None
        ``None`` uses :data:`DEFAULT_TRANSFORMS`.
    volume : int, optional
        Volume index of a 4D file.

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
    pipeline = transforms if isinstance(transforms, Compose) else build_transforms(transforms)
    try:
        result = pipeline(tensor)
    except Exception as error:  # MONAI wraps errors in RuntimeError with the transform's name
        message = f"Preprocessing failed on an image of shape {tuple(tensor.shape)}: {error}"
        raise PreprocessingError(message) from error
    if not isinstance(result, MetaTensor):
        message = "The preprocessing returned a plain tensor without an affine; use MONAI array transforms only."
        raise PreprocessingError(message)
    return result.float(), scanner_space
