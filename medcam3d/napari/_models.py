"""The Explain service's models: the model cache, the model's input, and the target-layer listings.

- :func:`load_configured_model`: a config's model read by :func:`medcam3d.models.load_configured`
  (as the CLI and :meth:`medcam3d.Explainer.from_config` read it), kept until the config or its
  weights change (one model in memory); :data:`MODEL_LOCK`: one use of the model at a time;
- :func:`model_input`: a scan preprocessed as the CLI preprocesses it (the config's list, or a
  MONAI bundle's own chain on the scan's file, :func:`medcam3d.jobs.case_loading.load_case`'s rule);
- :func:`candidate_layers`, :func:`cached_layers`, :func:`any_listing`, :func:`listing_steps`: the
  model's target layers, listed once per model and input shape.

No Qt: run by :class:`._widget.ExplainWidget` in worker threads and by :mod:`._service`.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..space import Space
from ._lazy import shape_of, source_of
from ._shared import Step, file_stamp, grid_space

__all__ = ["load_configured_model", "model_input", "input_channels", "stack_channels", "candidate_layers", "cached_layers", "any_listing", "listing_steps",
           "layer_listing", "remember_input_shape", "config_key", "grid_key", "scan_file", "MODEL_LOCK"]

#: One model use at a time: explaining and probing layers both hook the (cached) model.
MODEL_LOCK = threading.RLock()
_MODEL_CACHE: dict[tuple, Any] = {}
# Target-layer listings: (config key, model input shape) -> layer names; and which input shape a
# scan grid gives: (config key, scan grid key) -> input shape.
_LISTINGS: dict[tuple, list[str]] = {}
_INPUT_SHAPES: dict[tuple, tuple[int, ...]] = {}



def _stamp(path: Path | None) -> int | None:
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


def config_key(config_path: str | Path, trust: bool) -> tuple:
    """What identifies a config's network for the listing cache: the file, its version, trust."""
    path = Path(config_path).expanduser().resolve()
    return str(path), _stamp(path), bool(trust)


def load_configured_model(config_path: str | Path, *, trust: bool = False):
    """A config and its model as :func:`medcam3d.models.load_configured` reads them (the CLI's loader).

    Cached until the config or its weights change (one model in memory).

    Parameters
    ----------
    config_path : path
        A medcam3d YAML config (see ``configs/``).
    trust : bool
        Allow models that execute code (MONAI bundles, TorchScript, classes outside MONAI/torch).

    Returns
    -------
    medcam3d.models.ConfiguredModel
        ``config`` (with a bundle's class names), ``model``, and ``preprocessing``: a MONAI
        bundle's own chain when the config gives no ``preprocessing`` list (else None).

    Raises
    ------
    medcam3d.errors.ConfigError, medcam3d.errors.ModelLoadError, medcam3d.errors.UntrustedModelError
    """
    from ..config import load_config
    from ..models import load_configured

    path = Path(config_path).expanduser().resolve()
    config = load_config(path)
    spec = config.model
    source = spec.weights or spec.bundle or spec.torchscript
    key = (str(path), _stamp(path), None if source is None else str(source), _stamp(source), bool(trust))
    with MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # keep one model in memory
            _MODEL_CACHE[key] = load_configured(config, trust=trust)
        return _MODEL_CACHE[key]


def grid_key(shape: Sequence[int], affine: Any) -> tuple:
    """What identifies a scan grid in the caches: its shape and its affine to 1e-4 mm."""
    return tuple(int(n) for n in shape), tuple(np.round(np.asarray(affine, dtype=np.float64), 4).ravel().tolist())


def _model_input(data: Any, space: Space):
    """A float32 channel-first MetaTensor of ``data`` (one copy) for :func:`medcam3d.preprocess.preprocess`.

    ``data`` is ``(*space.shape)`` (one channel) or ``(C, *space.shape)`` (:func:`stack_channels`).
    """
    import torch
    from monai.data import MetaTensor

    voxels = torch.from_numpy(np.array(data, dtype=np.float32, order="C"))
    if voxels.ndim == len(space.shape):
        voxels = voxels[None]
    return MetaTensor(voxels, affine=torch.as_tensor(np.array(space.affine)))


def input_channels(config: Any) -> int | None:
    """The input channels a config's network takes (its ``in_channels`` argument), or None when not stated."""
    args = getattr(getattr(config, "model", None), "args", None) or {}
    value = args.get("in_channels") if isinstance(args, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def stack_channels(first: Any, space: Space, others: Sequence[tuple[Any, Space, str]], *, first_name: str = "channel 0"
                   ) -> tuple[np.ndarray, list[str]]:
    """Several scans of one case as the channels of one float32 array on the first one's grid (the CLI's rule).

    As :func:`medcam3d.io.read_channels` stacks files: a channel on another grid (another shape,
    or an affine more than :data:`medcam3d.io.channels.CHANNEL_ATOL_MM` mm away) is resampled onto
    the first channel's grid (:func:`medcam3d.space.resample`, linear, 0 outside its field of
    view) with a :class:`medcam3d.errors.ChannelGridWarning` naming it.

    Parameters
    ----------
    first : (*space.shape) array_like
        Channel 0's voxels.
    space : Space
        Channel 0's grid: the maps land there.
    others : sequence of (voxels, Space, name)
        Channels 1, 2, ... in order, each on its own grid.
    first_name : str
        Channel 0's name, for the warning.

    Returns
    -------
    stacked : (C, *space.shape) float32 ndarray
    notes : list of str
        The warnings' texts (one per resampled channel), for the widget to show.
    """
    import warnings

    from ..errors import ChannelGridWarning
    from ..io.channels import CHANNEL_ATOL_MM
    from ..space import resample

    stacked = np.empty((1 + len(others), *space.shape), dtype=np.float32)
    stacked[0] = np.asarray(first, dtype=np.float32)
    notes: list[str] = []
    for index, (voxels, grid, name) in enumerate(others, 1):
        if len(grid.shape) != len(space.shape):
            raise ValueError(f"channel {index} ({name}) is {len(grid.shape)}D but channel 0 ({first_name}) is "
                             f"{len(space.shape)}D; every channel of a case must be a scan of the same dimensionality.")
        if grid.isclose(space, atol=CHANNEL_ATOL_MM, rtol=1e-5):
            stacked[index] = np.asarray(voxels, dtype=np.float32)
            continue
        note = (f"channel {index} ({name}, {grid}) is not on the grid of channel 0 ({first_name}, {space}); it was "
                "resampled onto channel 0's grid (linear, 0 outside its field of view)")
        warnings.warn(note, ChannelGridWarning, stacklevel=2)
        notes.append(note)
        stacked[index] = resample(np.asarray(voxels), grid, space, mode="linear")
    return stacked, notes


def model_input(configured: Any, voxels: Any, space: Space, *, path: str | Path | None = None, trust: bool = False,
                check_input: Any = None):
    """A scan preprocessed for the model as the CLI preprocesses it (:func:`medcam3d.jobs.case_loading.load_case`).

    The config's ``preprocessing`` list (built with ``trust`` and named by the config file in
    errors), or, for a MONAI bundle whose config gives none, the bundle's own chain
    (``configured.preprocessing``, as :meth:`medcam3d.Explainer.preprocess` uses it), which reads
    the scan's file itself.

    Parameters
    ----------
    configured : medcam3d.models.ConfiguredModel
        :func:`load_configured_model`.
    voxels : (I, J, K) array_like
        The scan's voxels on ``space``.
    space : Space
    path : path, optional
        The scan's file, unchanged since it was read (needed by a bundle's own chain).
    trust : bool
    check_input : callable, optional
        Refuses an input shape before the preprocessing makes it (:attr:`medcam3d.jobs.runner.Runner.input_check`).

    Returns
    -------
    MetaTensor
        ``(C, *input_shape)``.

    Raises
    ------
    medcam3d.errors.InputError
        A bundle's own chain without a file to read.
    """
    from ..preprocess import build_transforms, preprocess

    config = configured.config
    if configured.preprocessing is not None:  # a MONAI bundle's own chain reads the file, as the CLI does
        if path is None:
            from ..errors import InputError

            raise InputError("this model is a MONAI bundle whose own preprocessing reads the scan's file, and this layer "
                             "has none (or its file changed since it was opened): open the file with the medcam3d reader, "
                             "or give the config a preprocessing list.")
        x, _ = configured.preprocessing(path, trust=trust)
        return x
    transforms = build_transforms(config.preprocessing, trust=trust, source=config.source)
    x, _ = preprocess(_model_input(voxels, space), transforms, check_input=check_input)
    return x


def scan_file(metadata: dict) -> str | None:
    """The scan's file when the layer shows it unchanged and whole (a bundle's own chain reads it), else None."""
    path = metadata.get("path")
    if not path or metadata.get("volume") is not None or metadata.get("medcam3d") not in (None, "scan"):
        return None
    stamp = metadata.get("stamp")
    if stamp is not None and file_stamp(path) != tuple(stamp):
        return None
    return str(path) if Path(path).is_file() else None


def layer_listing(key: tuple, input_shape: tuple[int, ...], model) -> list[str]:
    """The model's candidate target layers for an input shape, listed once per (config key, input shape)."""
    from ..layers import list_layers

    if (key, input_shape) not in _LISTINGS:
        with MODEL_LOCK:
            _LISTINGS[key, input_shape] = [info.name for info in list_layers(model, input_shape)]
    return list(_LISTINGS[key, input_shape])


def cached_layers(shape: Sequence[int], affine: Any, config_path: str | Path, *, trust: bool = False) -> list[str] | None:
    """The target-layer names already listed for a scan grid and config, without any work (or None).

    Parameters
    ----------
    shape : (3,) ints
        The scan layer's data shape.
    affine : (4, 4) array_like
    config_path : path
    trust : bool

    Returns
    -------
    list of str or None
        None when neither an explanation nor :func:`candidate_layers` has run on that grid yet.
    """
    key = config_key(config_path, trust)
    input_shape = _INPUT_SHAPES.get((key, grid_key(shape, affine)))
    return None if input_shape is None else list(_LISTINGS.get((key, input_shape), [])) or None


def any_listing(config_path: str | Path, trust: bool) -> list[str] | None:
    """The most recent listing for this config on any input shape (layer names rarely depend on it)."""
    key = config_key(config_path, trust)
    found = [names for (listed, _), names in _LISTINGS.items() if listed == key]
    return list(found[-1]) if found else None


def candidate_layers(data: Any, affine: Any, config_path: str | Path, *, trust: bool = False,
                     metadata: dict | None = None) -> list[str]:
    """Names of the model's candidate target layers for this scan (the last is what "auto" picks).

    The scan is preprocessed once per grid (shape and affine) to learn the model's input shape;
    the listing is cached per (model, input shape).

    Parameters
    ----------
    data : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel -> RAS mm of ``data``.
    config_path : path
    trust : bool
    metadata : dict, optional
        The scan layer's metadata (its file, for a MONAI bundle's own preprocessing).

    Returns
    -------
    list of str
    """
    configured = load_configured_model(config_path, trust=trust)
    key = config_key(config_path, trust)
    grid = grid_key(shape_of(data), affine)
    if (key, grid) not in _INPUT_SHAPES:
        voxels, space = source_of(data) or (data, grid_space(shape_of(data), affine))  # a lazy scan: its own voxels
        x = model_input(configured, voxels, space, path=scan_file(metadata or {}), trust=trust)
        _INPUT_SHAPES[key, grid] = tuple(int(n) for n in x.shape)
        del x
    return layer_listing(key, _INPUT_SHAPES[key, grid], configured.model)


def remember_input_shape(key: tuple, shape: Sequence[int], affine: Any, input_shape: tuple[int, ...]) -> None:
    """Note the model input shape that a scan grid gives (after an explanation), for :func:`cached_layers`."""
    _INPUT_SHAPES[key, grid_key(shape, affine)] = tuple(int(n) for n in input_shape)


def listing_steps(data: Any, affine: Any, config_path: str | Path, trust: bool = False,
                  metadata: dict | None = None) -> Generator[Step, None, list[str]]:
    """Load the model, then list its candidate target layers for this scan (:func:`candidate_layers`), in steps."""
    yield Step(0, 2, "loading the model")
    load_configured_model(config_path, trust=trust)
    yield Step(1, 2, "listing the model's layers")
    return candidate_layers(data, affine, config_path, trust=trust, metadata=metadata)
