"""Run configurations (YAML): model, classes, method, layer, target, preprocessing, output.

Example (``configs/demo.yaml``)::

    model:
      network: monai.networks.nets.DenseNet   # importable class; `_target_` also accepted
      args: {spatial_dims: 3, in_channels: 1, out_channels: 2}
      weights: ../data_samples/demo_model.pt  # relative to the config file
    task: multilabel          # multilabel | multiclass | binary | segmentation
    class_names: [bright_round, dark_elongated]
    layer: auto
    method: hirescam
    target: all
    preprocessing:
      - {name: Orientation, axcodes: RAS}
    output: {normalized: true, four_d: false, fill: 0.0}

Instead of ``network``/``args``/``weights`` the model may be a MONAI bundle directory
(``bundle: path``) or a TorchScript file (``torchscript: path``); both execute code from the
file and need ``--trust``. Every error names the file and the key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from .errors import ConfigError  # noqa: F401  (re-exported)

__all__ = ["Config", "ModelConfig", "OutputConfig", "SlidingWindowConfig", "ConfigError", "load_config", "parse_config", "TASKS"]

TASKS = ("multilabel", "multiclass", "binary", "segmentation")


@dataclass(frozen=True)
class ModelConfig:
    """How to build and load the model. Exactly one of network/bundle/torchscript is set."""

    network: str | None = None
    args: dict = field(default_factory=dict)
    weights: Path | None = None
    bundle: Path | None = None
    torchscript: Path | None = None


@dataclass(frozen=True)
class OutputConfig:
    """What to write next to each scan's heatmaps."""

    normalized: bool = True
    four_d: bool = False
    fill: float = 0.0
    pictures: bool = True
    masks: bool = True
    mask_method: str = "fraction"
    mask_value: float = 0.5


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Explain through overlapping patches (see :func:`medcam3d.sliding.explain_sliding_window`)."""

    roi: tuple[int, ...]
    overlap: float = 0.25
    sw_batch: int = 1
    mode: str = "gaussian"


@dataclass(frozen=True)
class Config:
    """A validated run configuration."""

    model: ModelConfig
    task: str = "multiclass"
    class_names: list[str] | None = None
    layer: str = "auto"
    method: str = "hirescam"
    target: Any = "all"
    preprocessing: list[dict] | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    sliding_window: SlidingWindowConfig | None = None
    amp: str | None = None
    source: Path | None = None


_TOP_KEYS = {"model", "task", "class_names", "layer", "method", "target", "preprocessing", "output", "sliding_window", "amp"}
_MODEL_KEYS = {"network", "_target_", "args", "weights", "bundle", "torchscript"}


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config.

    Raises
    ------
    ConfigError
        Missing file, YAML syntax error, unknown key (with did-you-mean), wrong type, missing
        weights file; the message names the file and the key.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist (give the path to a .yaml file, e.g. configs/demo.yaml).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, source=path)


def parse_config(data: object, *, source: Path | None = None) -> Config:
    """Validate a config given as a mapping (paths are relative to ``source``'s folder)."""
    where = str(source) if source else "config"
    base = source.parent if source else Path.cwd()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping with keys {sorted(_TOP_KEYS)}, not {type(data).__name__}.")
    _check_keys(data, _TOP_KEYS, where, "")
    if "model" not in data:
        raise ConfigError(f"{where}: missing key 'model' (network, args, weights).")
    model = _model(data["model"], where, base)
    task = _typed(data, "task", str, where, "multiclass")
    if task not in TASKS:
        raise ConfigError(f"{where}: task must be one of {TASKS}, not {task!r}.")
    names = data.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}: class_names must be a list of strings, not {names!r}.")
    preprocessing = data.get("preprocessing")
    if preprocessing is not None and not isinstance(preprocessing, list):
        raise ConfigError(f"{where}: preprocessing must be a list of transforms, not {type(preprocessing).__name__}.")
    target = data.get("target", "all")
    if not isinstance(target, (str, int, list)) or isinstance(target, bool):
        raise ConfigError(f"{where}: target must be 'all', 'predicted', a class index or name, or a list, not {target!r}.")
    output = _output(data.get("output") or {}, where)
    amp = data.get("amp")
    if amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"{where}: amp must be bf16, fp16 or null, not {amp!r}.")
    return Config(
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
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix}{key!r}.{hint} Allowed: {sorted(allowed)}.")


def _typed(data: Mapping, key: str, kind: type, where: str, default: Any, prefix: str = "") -> Any:
    value = data.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {prefix}{key} must be a {kind.__name__}, not {type(value).__name__} ({value!r}).")
    return value


def _existing(value: object, where: str, key: str, base: Path, directory: bool = False) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a path (str), not {type(value).__name__}.")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (base / path)
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        kind = "directory" if directory else "file"
        raise ConfigError(f"{where}: {key} {kind} {str(path)!r} does not exist (paths are relative to the config file).")
    return path


def _model(section: object, where: str, base: Path) -> ModelConfig:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: model must be a mapping (network, args, weights), not {type(section).__name__}.")
    _check_keys(section, _MODEL_KEYS, where, "model.")
    network = section.get("network", section.get("_target_"))
    sources = [k for k in ("bundle", "torchscript") if k in section] + (["network"] if network is not None else [])
    if len(sources) != 1:
        raise ConfigError(f"{where}: model needs exactly one of network, bundle, torchscript; got {sources or 'none'}.")
    if "bundle" in section:
        return ModelConfig(bundle=_existing(section["bundle"], where, "model.bundle", base, directory=True))
    if "torchscript" in section:
        return ModelConfig(torchscript=_existing(section["torchscript"], where, "model.torchscript", base))
    if not isinstance(network, str) or "." not in network:
        raise ConfigError(f"{where}: model.network must be a dotted class path like 'monai.networks.nets.DenseNet121', not {network!r}.")
    args = section.get("args", {})
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}: model.args must be a mapping of constructor arguments, not {type(args).__name__}.")
    weights = _existing(section["weights"], where, "model.weights", base) if section.get("weights") is not None else None
    return ModelConfig(network=network, args=dict(args), weights=weights)


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
    return OutputConfig(**values)


def _sliding_window(section: object, where: str) -> SlidingWindowConfig | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: sliding_window must be a mapping (roi, overlap, sw_batch, mode).")
    _check_keys(section, {"roi", "overlap", "sw_batch", "mode"}, where, "sliding_window.")
    roi = section.get("roi")
    if not isinstance(roi, list) or not roi or not all(isinstance(r, int) and r > 0 for r in roi):
        raise ConfigError(f"{where}: sliding_window.roi must be a list of positive ints (the patch size), not {roi!r}.")
    overlap = _typed(section, "overlap", float, where, 0.25, prefix="sliding_window.")
    if not 0 <= overlap < 1:
        raise ConfigError(f"{where}: sliding_window.overlap must be in [0, 1), not {overlap}.")
    mode = _typed(section, "mode", str, where, "gaussian", prefix="sliding_window.")
    if mode not in ("gaussian", "constant"):
        raise ConfigError(f"{where}: sliding_window.mode must be gaussian or constant, not {mode!r}.")
    return SlidingWindowConfig(tuple(roi), overlap, _typed(section, "sw_batch", int, where, 1, prefix="sliding_window."), mode)
