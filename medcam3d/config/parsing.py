"""A config's YAML checked key by key into a :class:`~medcam3d.config.records.Config`: every error names
the file and the key, an unknown key gets a did-you-mean."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, short_repr
from .records import NO_WEIGHTS, TASKS, Config, ModelConfig, OutputConfig, PreprocessingSteps, SlidingWindowConfig
from .yaml_reader import read_yaml

__all__ = ["load_config", "parse_config"]

_TOP_KEYS = {"model", "task", "class_names", "layer", "method", "target", "preprocessing", "output", "sliding_window", "amp",
             "output_activation", "placement"}
_MODEL_KEYS = {"network", "_target_", "args", "weights", "bundle", "torchscript", "nnunet", "configuration", "folds", "checkpoint",
               "mirror"}
_NNUNET_KEYS = ("configuration", "folds", "checkpoint", "mirror")


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config.

    The file is read with PyYAML's safe loader, so tags such as ``!!python/object/apply`` are
    refused; files over :data:`MAX_CONFIG_BYTES`, or that expand (through anchors and aliases) to
    more than :data:`MAX_CONFIG_NODES` nodes or nest deeper than :data:`MAX_CONFIG_DEPTH`, are
    refused before anything is built. Whether the named network and transforms may be built without
    trust is decided when they are built (:func:`medcam3d.models.load_model`,
    :func:`medcam3d.preprocess.build_transforms`).

    Parameters
    ----------
    path : str or Path
        The ``.yaml`` file. Relative paths inside it are relative to its folder.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        Missing or unreadable file, not UTF-8, too large, YAML syntax error or Python tag, unknown
        key (with did-you-mean), wrong type, missing weights file; the message names the file and
        the key.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"The config path must be a str or Path, not {type(path).__name__} ({short_repr(path)}).")
    path = Path(path)
    data = read_yaml(path)
    return parse_config(data, source=path)


def parse_config(data: object, *, source: Path | None = None) -> Config:
    """Validate a config given as a mapping (paths are relative to ``source``'s folder).

    ``data`` is the parsed YAML (or an equivalent dict); ``source``, the file it came from, is
    named in errors and is the base of relative paths. Returns a :class:`Config`; raises
    :class:`ConfigError` for an unknown key (with did-you-mean), a wrong type or value or a missing
    file, with a message that names the file and the key.
    """
    if source is not None and not isinstance(source, Path):
        source = Path(source)
    where = str(source) if source else "config"
    base = source.parent if source else Path.cwd()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping with keys {sorted(_TOP_KEYS)}, not {type(data).__name__}.")
    _check_keys(data, _TOP_KEYS, where, "")
    if "model" not in data:
        raise ConfigError(f"{where}: missing key 'model' (network, args, weights).")
    model = _model(data["model"], where, base, source)
    task = _typed(data, "task", str, where, "multiclass")
    if task not in TASKS:
        raise ConfigError(f"{where}: task must be one of {TASKS}, not {task!r}.")
    names = data.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}: class_names must be a list of strings, not {short_repr(names)}.")
    preprocessing = _preprocessing(data.get("preprocessing"), where, source)
    target = data.get("target", "all")
    if not isinstance(target, (str, int, list)) or isinstance(target, bool):
        raise ConfigError(f"{where}: target must be 'all', 'predicted', a class index or name, or a list, not {short_repr(target)}.")
    output = _output(data.get("output") or {}, where)
    amp = data.get("amp")
    if amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"{where}: amp must be bf16, fp16 or null, not {short_repr(amp)}.")
    activation = data.get("output_activation", "auto")
    from ..model_io import OUTPUT_ACTIVATIONS  # its one definition, with the engine that applies it

    if activation not in OUTPUT_ACTIVATIONS:
        raise ConfigError(f"{where}: output_activation must be one of {OUTPUT_ACTIVATIONS} (what the network applies to "
                          f"its logits; auto detects a trailing Softmax/Sigmoid), not {short_repr(activation)}.")
    placement = data.get("placement", "receptive_field")
    from ..receptive_field import PLACEMENTS  # its one definition, with the geometry that places the cells

    if placement not in PLACEMENTS:
        raise ConfigError(f"{where}: placement must be one of {PLACEMENTS} (where the maps' cells sit: the centres of their "
                          f"receptive fields, or the align_corners=False convention), not {short_repr(placement)}.")
    return Config(
        placement=placement,
        output_activation=activation,
        sliding_window=_sliding_window(data.get("sliding_window"), where),
        amp=amp,
        model=model,
        task=task,
        class_names=names,
        layer=_typed(data, "layer", str, where, "auto"),
        method=_typed(data, "method", str, where, "hirescam"),
        target=target,
        preprocessing=preprocessing,
        output=output,
        source=source,
    )


def _check_keys(data: Mapping, allowed: set[str], where: str, prefix: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key)[:100], sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix}{short_repr(key)}.{hint} Allowed: {sorted(allowed)}.")


def _typed(data: Mapping, key: str, kind: type, where: str, default: Any, prefix: str = "") -> Any:
    value = data.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {prefix}{key} is too large for a float ({short_repr(value)}).") from None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {prefix}{key} must be a {kind.__name__}, not {type(value).__name__} ({short_repr(value)}).")
    return value


def _existing(value: object, where: str, key: str, base: Path, directory: bool = False) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path (a non-empty str), not {type(value).__name__} ({short_repr(value)}).")
    try:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base / path)
        ok = path.is_dir() if directory else path.is_file()
    except (OSError, RuntimeError, ValueError) as error:  # ~unknownuser, a name too long, a NUL byte
        raise ConfigError(f"{where}: {key} {short_repr(value)} is not a usable path: {error}.") from None
    if not ok:
        kind = "directory" if directory else "file"
        try:
            exists = path.exists()
        except (OSError, ValueError):
            exists = False
        if exists:  # a folder, FIFO or device (/dev/zero): never opened
            expected = "a directory" if directory else "a regular file (not a folder, FIFO or device)"
            raise ConfigError(f"{where}: {key} {str(path)!r} is not {expected}.")
        raise ConfigError(f"{where}: {key} {kind} {str(path)!r} does not exist (paths are relative to the config file).")
    return path


def _nnunet_model(section: Mapping, where: str, base: Path, source: Path | None) -> ModelConfig:
    unused = [key for key in ("args", "weights") if key in section]
    if unused:
        raise ConfigError(f"{where}: model.{unused[0]} is not used with model.nnunet: the network comes from plans.json and "
                          f"the weights from fold_<k>/ of the folder. Remove model.{unused[0]}.")
    folder = _existing(section["nnunet"], where, "model.nnunet", base, directory=True)
    configuration = section.get("configuration", "3d_fullres")
    if not isinstance(configuration, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", configuration):
        raise ConfigError(f"{where}: model.configuration must be the name of an nnU-Net configuration like 3d_fullres, not {short_repr(configuration)}.")
    folds = section.get("folds")
    if folds is not None:
        if isinstance(folds, (int, str)) and not isinstance(folds, bool):
            folds = [folds]
        if (not isinstance(folds, list) or not folds or len(folds) > 100
                or not all((isinstance(f, int) and not isinstance(f, bool) and 0 <= f < 1000) or f == "all" for f in folds)):
            raise ConfigError(f"{where}: model.folds must be a list of fold numbers (or 'all'), e.g. [0, 1, 2, 3, 4], not {short_repr(folds)}.")
        if len(set(map(str, folds))) != len(folds):
            raise ConfigError(f"{where}: model.folds lists a fold twice: {short_repr(folds)}.")
        folds = tuple(folds)
    checkpoint = section.get("checkpoint", "checkpoint_final.pth")
    if not isinstance(checkpoint, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", checkpoint) or checkpoint.startswith("."):
        raise ConfigError(f"{where}: model.checkpoint must be a file name in each fold folder like checkpoint_final.pth, not {short_repr(checkpoint)}.")
    mirror = section.get("mirror", False)
    if not isinstance(mirror, bool):
        raise ConfigError(f"{where}: model.mirror must be true or false (mirror test-time augmentation), not {short_repr(mirror)}.")
    return ModelConfig(nnunet=folder, configuration=configuration, folds=folds, checkpoint=checkpoint, mirror=mirror,
                       source=source)


def _model(section: object, where: str, base: Path, source: Path | None) -> ModelConfig:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: model must be a mapping (network, args, weights), not {type(section).__name__}.")
    _check_keys(section, _MODEL_KEYS, where, "model.")
    network = section.get("network", section.get("_target_"))
    sources = [k for k in ("bundle", "torchscript", "nnunet") if k in section] + (["network"] if network is not None else [])
    if len(sources) != 1:
        raise ConfigError(f"{where}: model needs exactly one of network, bundle, torchscript, nnunet; got {sources or 'none'}.")
    if sources[0] != "nnunet":
        stray = [key for key in _NNUNET_KEYS if key in section]
        if stray:
            raise ConfigError(f"{where}: model.{stray[0]} is only used with model.nnunet (an nnU-Net v2 model folder).")
    else:
        return _nnunet_model(section, where, base, source)
    if sources[0] != "network":
        unused = [key for key in ("args", "weights") if key in section]
        if unused:
            message = (
                f"{where}: model.{unused[0]} is not used with model.{sources[0]}: the "
                + {"bundle": "bundle's network and weights come from its configs and models/ folder.",
                   "torchscript": "TorchScript file holds its network and weights."}[sources[0]]
                + f" Remove model.{unused[0]}."
            )
            raise ConfigError(message)
    if "bundle" in section:
        return ModelConfig(bundle=_existing(section["bundle"], where, "model.bundle", base, directory=True), source=source)
    if "torchscript" in section:
        return ModelConfig(torchscript=_existing(section["torchscript"], where, "model.torchscript", base), source=source)
    if not isinstance(network, str) or "." not in network or network.startswith(".") or network.endswith("."):
        raise ConfigError(f"{where}: model.network must be a dotted class path like 'monai.networks.nets.DenseNet121', not {short_repr(network)}.")
    args = section.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}: model.args must be a mapping of constructor arguments, not {type(args).__name__}.")
    for name in args:
        if not isinstance(name, str) or not name.isidentifier():
            message = (
                f"{where}: model.args has the key {short_repr(name)}, which is not an argument name; keys are the "
                "network's constructor arguments, e.g. {spatial_dims: 3, in_channels: 1, out_channels: 2}."
            )
            raise ConfigError(message)
    weights = section.get("weights")
    if isinstance(weights, str) and weights.strip().lower() == NO_WEIGHTS:
        return ModelConfig(network=network, args=dict(args), random_weights=True, source=source)
    weights = _existing(weights, where, "model.weights", base) if weights is not None else None
    return ModelConfig(network=network, args=dict(args), weights=weights, source=source)


def _preprocessing(section: object, where: str, source: Path | None) -> PreprocessingSteps | None:
    """Check the shape of the preprocessing list; which transforms may be built is decided later."""
    if section is None:
        return None
    if not isinstance(section, list):
        raise ConfigError(f"{where}: preprocessing must be a list of transforms, not {type(section).__name__}.")
    for position, entry in enumerate(section):
        if not isinstance(entry, Mapping):
            message = (
                f"{where}: preprocessing[{position}] must be a mapping like {{name: Orientation, axcodes: RAS}}, "
                f"not {short_repr(entry)}."
            )
            raise ConfigError(message)
        name = entry.get("name", entry.get("_target_"))
        if not isinstance(name, str) or not name:
            message = (
                f"{where}: preprocessing[{position}].name must be a MONAI transform name like Spacing, not "
                f"{short_repr(name)}."
            )
            raise ConfigError(message)
        for key in entry:
            if not isinstance(key, str) or not key.isidentifier():
                message = (
                    f"{where}: preprocessing[{position}] has the key {short_repr(key)}, which is not an argument name "
                    f"of {short_repr(name)}."
                )
                raise ConfigError(message)
    return PreprocessingSteps(section, source=source)


def _output(section: object, where: str) -> OutputConfig:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: output must be a mapping, not {type(section).__name__}.")
    defaults = OutputConfig()
    allowed = set(defaults.__dataclass_fields__)
    _check_keys(section, allowed, where, "output.")
    values = {}
    for key in allowed:
        default = getattr(defaults, key)
        values[key] = _typed(section, key, type(default), where, default, prefix="output.")
    try:
        return OutputConfig(**values)
    except ConfigError as error:  # name the file, as every other config error does
        raise ConfigError(f"{where}: {error}") from None


def _sliding_window(section: object, where: str) -> SlidingWindowConfig | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: sliding_window must be a mapping (roi, overlap, sw_batch, mode).")
    _check_keys(section, {"roi", "overlap", "sw_batch", "mode"}, where, "sliding_window.")
    roi = section.get("roi")
    if not isinstance(roi, list) or not roi or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in roi):
        raise ConfigError(f"{where}: sliding_window.roi must be a list of positive ints (the patch size), not {short_repr(roi)}.")
    overlap = _typed(section, "overlap", float, where, 0.25, prefix="sliding_window.")
    if not 0 <= overlap < 1:  # also refuses nan
        raise ConfigError(f"{where}: sliding_window.overlap must be in [0, 1), not {overlap}.")
    mode = _typed(section, "mode", str, where, "gaussian", prefix="sliding_window.")
    if mode not in ("gaussian", "constant"):
        raise ConfigError(f"{where}: sliding_window.mode must be gaussian or constant, not {short_repr(mode)}.")
    sw_batch = _typed(section, "sw_batch", int, where, 1, prefix="sliding_window.")
    if sw_batch < 1:
        raise ConfigError(f"{where}: sliding_window.sw_batch must be a positive int (patches per forward pass), not {sw_batch}.")
    return SlidingWindowConfig(tuple(roi), overlap, sw_batch, mode)
