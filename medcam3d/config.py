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

A network without trained weights is refused when it is loaded, so that a forgotten ``weights``
never explains random parameters silently; ``weights: none`` says that this is intended (a
template, a sanity check), and :attr:`ModelConfig.random_weights` records it.

Instead of ``network``/``args``/``weights`` the model may be a MONAI bundle directory
(``bundle: path``) or a TorchScript file (``torchscript: path``); both execute code from the
file and need ``--trust``. Every error names the file and the key.

What a config may name without ``--trust`` (see ``README.md``, "Security and data safety"): a
``torch.nn.Module`` class from the network namespaces (:data:`medcam3d.models.NETWORK_NAMESPACES`)
with plain-data arguments (:func:`plain_data_problem`), and transforms from
:data:`medcam3d.preprocess.SAFE_TRANSFORMS` with plain-data arguments. The YAML is read with
PyYAML's safe loader (no Python tags), at most :data:`MAX_CONFIG_BYTES` bytes and
:data:`MAX_CONFIG_NODES` nodes once aliases are expanded (no "billion laughs").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from .errors import ConfigError

__all__ = [
    "Config",
    "ModelConfig",
    "OutputConfig",
    "SlidingWindowConfig",
    "PreprocessingSteps",
    "load_config",
    "parse_config",
    "plain_data_problem",
    "TASKS",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_NODES",
    "MAX_CONFIG_DEPTH",
    "NO_WEIGHTS",
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_MAX_ACTIVATION_BYTES",
    "with_limits",
    "parse_count",
    "parse_size",
]

TASKS = ("multilabel", "multiclass", "binary", "segmentation")

#: A config file larger than this is refused before it is parsed (configs are a few kB; PyYAML's
#: pure-Python parser reads about 50 kB a second).
MAX_CONFIG_BYTES = 128 * 1024
#: Most YAML nodes a config may hold once anchors/aliases are expanded ("billion laughs").
MAX_CONFIG_NODES = 100_000
#: Deepest nesting of lists and mappings in a config.
MAX_CONFIG_DEPTH = 50
#: ``model.weights: none``: the network is explained with its random initial weights, on purpose
#: (a template, a sanity check); without it a network without weights is refused.
NO_WEIGHTS = "none"
#: Default of the largest grid (voxels) preprocessing may make (:data:`medcam3d.preprocess.MAX_VOXELS`;
#: CLI ``--max-voxels``): 2^30 voxels, 4 GiB in float32 per channel.
DEFAULT_MAX_VOXELS = 1 << 30
#: Default of the most memory the outputs of a network's layers may need at once during one forward
#: pass (:data:`medcam3d.models.MAX_ACTIVATION_BYTES`; CLI ``--max-activation-memory``): 4 GiB.
DEFAULT_MAX_ACTIVATION_BYTES = 4 << 30

#: Leading characters that MONAI's ConfigParser evaluates: ``$`` Python expression, ``@`` reference,
#: ``%`` macro (another file's content).
_EXPRESSION_PREFIXES = ("$", "@", "%")
_PLAIN_SCALARS = (str, int, float, bool, type(None))
_SHORT = reprlib.Repr()
_SHORT.maxstring = 80
_SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def _short(value: object) -> str:
    """A bounded repr for error messages (a config may hold megabytes in one value)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # a hostile __repr__ from a Python caller
        return f"<{type(value).__name__}>"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TRACEBACK = "Traceback (most recent call last):"


def _one_line(error: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` of the root cause of ``error``, on one line, for an error message.

    The chain of causes (``raise ... from``, or the exception being handled) is followed to its
    end, so a wrapper such as MONAI's ``RuntimeError("applying transform <...object at 0x...>")``
    gives way to what went wrong. Terminal colour codes are removed; a message that embeds a
    traceback (MONAI's ``LoadImage`` does) keeps its first line and the traceback's last line (the
    exception); other line breaks become spaces. At most ``limit`` characters.
    """
    root, seen = error, {id(error)}
    while True:
        cause = root.__cause__ if root.__cause__ is not None else (None if root.__suppress_context__ else root.__context__)
        if cause is None or id(cause) in seen:
            break
        seen.add(id(cause))
        root = cause
    try:
        text = _ANSI.sub("", str(root))
    except Exception:  # a hostile __str__
        text = ""
    if _TRACEBACK in text:
        head = text.split(_TRACEBACK, 1)[0].strip().splitlines()
        tail = [line.strip() for line in text.splitlines() if line.strip()]
        text = f"{head[0].strip() if head else ''} ... {tail[-1]}".strip(" .") if tail else (head[0] if head else "")
    text = " ".join(text.split())
    if not text:
        text = "(no message)"
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(root).__name__}: {text}"


def parse_count(text: str | int | None) -> int | None:
    """A limit given as a count: a positive int (``1073741824``, ``1e9``, ``2**30``), or ``none``/``0`` for no limit.

    Raises
    ------
    ValueError
        Anything else (the message says what is accepted).
    """
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        value = text
    else:
        word = str(text).strip().lower().replace("_", "").replace(",", "")
        if word in ("none", "0", "off", "unlimited"):
            return None
        try:
            if word.startswith("2**"):
                value = 2 ** int(word[3:])
            else:
                number = float(word)
                value = int(number) if number == int(number) else -1
        except (ValueError, OverflowError):
            raise ValueError(f"expected a positive whole number (e.g. 1073741824, 1e9 or 2**30) or 'none', not {_short(text)}") from None
    if value is None or value == 0:
        return None
    if value < 0:
        raise ValueError(f"expected a positive whole number (e.g. 1073741824, 1e9 or 2**30) or 'none', not {_short(text)}")
    return int(value)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
               "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4}


def parse_size(text: str | int | None) -> int | None:
    """A memory limit in bytes: ``16GiB``, ``16G`` (both 2^30-based), ``16GB`` (10^9), ``512MiB``, a
    number of bytes, or ``none``/``0`` for no limit.

    Raises
    ------
    ValueError
        Anything else (the message says what is accepted).
    """
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return None if not text else _positive_size(text, text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if str(text).strip().lower() in ("none", "off", "unlimited"):
        return None
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 16GiB, 16G, 500MB or a number of bytes, or 'none', not {_short(text)}")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return None if value == 0 else _positive_size(int(value), text)


def _positive_size(value: int, text: object) -> int:
    if value < 1:
        raise ValueError(f"expected a positive size such as 16GiB, or 'none', not {_short(text)}")
    return int(value)


def plain_data_problem(value: object, key: str) -> tuple[str, str] | None:
    """Why ``value`` is not plain data a config may give without trust, or None if it is.

    Plain data is numbers, strings, booleans, None, and lists, tuples and mappings of those, with
    string keys. Refused: any other type (callables, classes, bytes, sets, dates ...); mapping keys
    that start with ``_`` (MONAI-bundle directives such as ``_target_``, ``_requires_``,
    ``_disabled_``, ``_mode_``, ``_desc_``, ``__path``) or with ``$``/``@``/``%``; strings that start
    with ``$``, ``@`` or ``%`` (expressions, references and macros that MONAI's ConfigParser
    evaluates); nesting deeper than :data:`MAX_CONFIG_DEPTH` or a structure that contains itself.

    Parameters
    ----------
    value : object
        The value from the config.
    key : str
        Its dotted key (``model.args``, ``preprocessing[2].pixdim``), used in the answer.

    Returns
    -------
    (str, str) or None
        The innermost offending key (e.g. ``model.args.act``) and the reason, or None.
    """
    return _plain_problem(value, key, 0, set())


def _plain_problem(value: object, key: str, depth: int, active: set[int]) -> tuple[str, str] | None:
    if depth > MAX_CONFIG_DEPTH:
        return key, f"nested more than {MAX_CONFIG_DEPTH} levels deep"
    if isinstance(value, str):
        if value.startswith(_EXPRESSION_PREFIXES):
            reason = (
                f"the string {_short(value)} starts with {value[0]!r}, which MONAI's ConfigParser evaluates "
                "(`$` runs a Python expression, `@` references another entry, `%` pulls in another file)"
            )
            return key, reason
        return None
    if isinstance(value, _PLAIN_SCALARS):
        return None
    if not isinstance(value, (list, tuple, Mapping)):
        return key, f"a {type(value).__name__} ({_short(value)}) is not plain data (numbers, strings, booleans, null, lists, mappings)"
    if id(value) in active:
        return key, "the value contains itself"
    active.add(id(value))
    try:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if not isinstance(name, str):
                    return key, f"the key {_short(name)} is a {type(name).__name__}; keys must be strings"
                if name.startswith("_"):
                    reason = (
                        "keys starting with '_' are directives (in MONAI bundles _target_ imports and calls a "
                        "callable, _requires_/_disabled_/_mode_/_desc_ control the call, __path names a callable)"
                    )
                    return f"{key}.{name}", reason
                if name.startswith(_EXPRESSION_PREFIXES):
                    return f"{key}.{name}", f"keys starting with {name[0]!r} are evaluated by MONAI's ConfigParser"
                problem = _plain_problem(item, f"{key}.{name}", depth + 1, active)
                if problem:
                    return problem
        else:
            for index, item in enumerate(value):
                problem = _plain_problem(item, f"{key}[{index}]", depth + 1, active)
                if problem:
                    return problem
    finally:
        active.discard(id(value))
    return None


@dataclass(frozen=True)
class ModelConfig:
    """How to build and load the model. Exactly one of network/bundle/torchscript is set.

    Attributes
    ----------
    network : str or None
        Dotted path of the network class (or factory).
    args : dict
        Its constructor arguments.
    weights : Path or None
        The state_dict file of ``network``. None with ``random_weights`` (or for a bundle or
        TorchScript file, which hold their own weights); a network without weights and without
        ``random_weights`` is refused when it is loaded (:func:`medcam3d.models.load_model`).
    random_weights : bool
        The config says ``weights: none``: explain the network as randomly initialised, on
        purpose (a template, a sanity check). Outputs made with it must say so.
    bundle : Path or None
        A MONAI bundle directory.
    torchscript : Path or None
        A TorchScript file.
    nnunet : Path or None
        An nnU-Net v2 model folder (``plans.json``, ``dataset.json``, ``fold_<k>/``; see
        :func:`medcam3d.models.load_nnunet`), with its ``configuration`` (default ``3d_fullres``),
        ``folds`` (default: every ``fold_<k>`` present), ``checkpoint`` file name (default
        ``checkpoint_final.pth``) and ``mirror`` (default false: mirror test-time augmentation over
        the checkpoint's ``inference_allowed_mirroring_axes``, :mod:`medcam3d.mirror`).
    source : Path or None
        The config file it came from (named in error messages), if any.
    max_activation_bytes : int or None
        The most memory the outputs of the network's layers may need at once during one forward
        pass, estimated on PyTorch's meta device for each input shape before the pass runs (see
        :func:`medcam3d.models.limit_activations`); None: no limit. Not a YAML key (a config may
        not lift its own limits): set by the caller, e.g. CLI ``--max-activation-memory``, through
        :func:`with_limits`.
    """

    network: str | None = None
    args: dict = field(default_factory=dict)
    weights: Path | None = None
    bundle: Path | None = None
    torchscript: Path | None = None
    nnunet: Path | None = None
    configuration: str = "3d_fullres"
    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    mirror: bool = False
    source: Path | None = None
    random_weights: bool = False
    max_activation_bytes: int | None = DEFAULT_MAX_ACTIVATION_BYTES


class PreprocessingSteps(list):
    """The ``preprocessing`` list of a config, which remembers the file it came from.

    A plain ``list`` of mappings in every other respect; :func:`medcam3d.preprocess.build_transforms`
    reads ``source`` to name the file in its errors, and ``max_voxels``, the largest grid (voxels)
    the transforms may make (None: no limit; not a YAML key: set by the caller, e.g. CLI
    ``--max-voxels``, through :func:`with_limits`).
    """

    def __init__(self, steps=(), source: Path | None = None, max_voxels: int | None = DEFAULT_MAX_VOXELS):
        super().__init__(steps)
        self.source = source
        self.max_voxels = max_voxels


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
    # which classes get maps on the scan's grid (the _feature maps are always written):
    # all | positive (probability >= 0.5) | predicted (the most probable class) | none
    scan_maps: str = "all"
    # stored type of scan-grid maps: uint8 / int16 (raw values via scl_slope/scl_inter) | float32
    scan_dtype: str = "uint8"
    compress: bool = True  # .nii.gz (gzip level 1) or .nii
    boxes: bool = True  # <case>_<method>_<class>_box.json: box of the thresholded map and its peak
    # weakly-supervised segmentation (medcam3d.segment) of the first method's maps: label map + lesion boxes
    segment: bool = False
    # segmentation (Region) targets: the mask/box is the smallest set of voxels inside the explained region
    # (the given region mask, or the region the model predicts) that holds this share of the map's mass there
    region_mass: float = 0.5

    def __post_init__(self) -> None:
        choices = {"scan_maps": ("all", "positive", "predicted", "none"), "scan_dtype": ("uint8", "int16", "float32"),
                   "mask_method": ("fraction", "percentile", "otsu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"output.{key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}.")
        if not 0.0 < self.region_mass <= 1.0:  # also refuses nan
            raise ConfigError(f"output.region_mass must be in (0, 1] (a share of the map's mass inside the region), "
                              f"not {self.region_mass!r}.")
        value = self.mask_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"output.mask_value must be a finite number (the threshold of mask_method "
                              f"{self.mask_method}), not {_short(value)}.")
        if self.mask_method == "fraction" and not 0.0 < value <= 1.0:
            raise ConfigError(f"output.mask_value must be in (0, 1] with mask_method fraction (the share of the map's "
                              f"maximum a voxel needs to be in the mask, e.g. 0.5), not {value!r}.")
        if self.mask_method == "percentile" and not 0.0 <= value <= 100.0:
            raise ConfigError(f"output.mask_value must be in [0, 100] with mask_method percentile (the percentile of "
                              f"the map's values a voxel needs to reach, e.g. 95), not {value!r}.")


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Explain through overlapping patches (see :func:`medcam3d.sliding.explain_sliding_window`)."""

    roi: tuple[int, ...]
    overlap: float = 0.25
    sw_batch: int = 1
    mode: str = "gaussian"


@dataclass(frozen=True)
class Config:
    """A validated run configuration.

    Two resource limits ride on it, set by whoever runs the config (never by the YAML, see
    :func:`with_limits`): ``preprocessing.max_voxels`` (:class:`PreprocessingSteps`) and
    ``model.max_activation_bytes`` (:class:`ModelConfig`).
    """

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
    output_activation: str = "auto"
    placement: str = "receptive_field"


_TOP_KEYS = {"model", "task", "class_names", "layer", "method", "target", "preprocessing", "output", "sliding_window", "amp",
             "output_activation", "placement"}
_MODEL_KEYS = {"network", "_target_", "args", "weights", "bundle", "torchscript", "nnunet", "configuration", "folds", "checkpoint",
               "mirror"}
_NNUNET_KEYS = ("configuration", "folds", "checkpoint", "mirror")


_UNCHANGED: Any = object()


def with_limits(config: Config, *, max_voxels: Any = _UNCHANGED, max_activation_bytes: Any = _UNCHANGED) -> Config:
    """``config`` with other resource limits (the CLI's ``--max-voxels`` and ``--max-activation-memory``).

    The limits are not YAML keys: a config, which may come from anyone, cannot lift them; whoever
    runs it can.

    Parameters
    ----------
    config : Config
    max_voxels : int or None, optional
        The largest grid (voxels, per channel) preprocessing may make, checked before each
        transform runs (:func:`medcam3d.preprocess.build_transforms`); None: no limit. Default:
        unchanged (:data:`DEFAULT_MAX_VOXELS` for a parsed config). A config without
        ``preprocessing`` keeps none: its default transform (``Orientation``) never enlarges the
        grid. A MONAI bundle's own preprocessing takes the limit from
        :func:`medcam3d.models.load_bundle` (``max_voxels=``).
    max_activation_bytes : int or None, optional
        The most memory the network's layer outputs may need at once in one forward pass
        (:func:`medcam3d.models.limit_activations`); None: no limit. Default: unchanged
        (:data:`DEFAULT_MAX_ACTIVATION_BYTES` for a parsed config).

    Returns
    -------
    Config
        A new config; ``config`` is not changed.

    Raises
    ------
    ConfigError
        A limit that is not a positive int or None.
    """
    for name, value in (("max_voxels", max_voxels), ("max_activation_bytes", max_activation_bytes)):
        if value is not _UNCHANGED and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive int or None (no limit), not {_short(value)}.")
    model, steps = config.model, config.preprocessing
    if max_activation_bytes is not _UNCHANGED:
        model = dataclasses.replace(model, max_activation_bytes=max_activation_bytes)
    if max_voxels is not _UNCHANGED and steps is not None:
        steps = PreprocessingSteps(steps, source=getattr(steps, "source", config.source), max_voxels=max_voxels)
    return dataclasses.replace(config, model=model, preprocessing=steps)


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
        raise ConfigError(f"The config path must be a str or Path, not {type(path).__name__} ({_short(path)}).")
    path = Path(path)
    data = _read_yaml(path)
    return parse_config(data, source=path)


def _read_yaml(path: Path) -> object:
    import yaml

    hint = "give the path to a .yaml file, e.g. configs/demo.yaml"
    try:
        if not path.exists():
            raise ConfigError(f"Config file {str(path)!r} does not exist ({hint}).")
        if not path.is_file():
            raise ConfigError(f"Config path {str(path)!r} is not a regular file ({hint}).")
        with path.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {error.strerror or error} ({hint}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        message = (
            f"{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes; a config is a few kB of YAML. "
            "Check that this is the config (not an image or weights file)."
        )
        raise ConfigError(message)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        message = (
            f"{path}: the config is not UTF-8 text (byte {error.start} cannot be decoded). Save it as UTF-8 "
            "(or check that this is the config, not a binary file)."
        )
        raise ConfigError(message) from None
    loader = None
    try:
        loader = _loader_class()(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path)
        return loader.construct_document(node)
    except ConfigError as error:
        if str(error).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML, no Python tags, is read): {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply (at most {MAX_CONFIG_DEPTH} levels).") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as error:  # e.g. a 5000-digit int, a bad date
        raise ConfigError(f"{path}: a value in the YAML cannot be read: {_short(str(error))}") from None
    finally:
        if loader is not None:
            loader.dispose()


_LOADER = None


def _loader_class():
    """PyYAML's SafeLoader, stopping as soon as the document nests too deep or holds too many nodes."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class _BoundedSafeLoader(yaml.SafeLoader):
            _depth = 0
            _nodes = 0

            def compose_node(self, parent, index):
                self._depth += 1
                self._nodes += 1
                try:
                    if self._depth > MAX_CONFIG_DEPTH:
                        raise ConfigError(f"the YAML is nested more than {MAX_CONFIG_DEPTH} levels deep.")
                    if self._nodes > MAX_CONFIG_NODES:
                        raise ConfigError(f"the YAML holds more than {MAX_CONFIG_NODES} values; a config is small.")
                    return super().compose_node(parent, index)
                finally:
                    self._depth -= 1

        _LOADER = _BoundedSafeLoader
    return _LOADER


def _check_nodes(root: object, path: Path) -> None:
    """Refuse YAML whose node graph, with aliases expanded, is too large, too deep or recursive."""
    import yaml

    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()

    def visit(node) -> None:  # depth-first; node graphs with aliases are DAGs (or cyclic)
        key = id(node)
        if key in sizes:
            return
        if key in active:
            raise ConfigError(f"{path}: an anchor is used inside itself (a recursive structure); a config cannot contain itself.")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            sizes[key], depths[key] = 1, 0
            return
        active.add(key)
        for child in children:
            visit(child)
        active.discard(key)
        sizes[key] = 1 + sum(sizes[id(child)] for child in children)
        depths[key] = 1 + max((depths[id(child)] for child in children), default=0)
        if sizes[key] > MAX_CONFIG_NODES:
            message = (
                f"{path}: the YAML expands to more than {MAX_CONFIG_NODES} values (anchors and aliases are "
                "expanded); a config is small. Write the values out instead of nesting aliases."
            )
            raise ConfigError(message)
        if depths[key] > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{path}: the YAML is nested more than {MAX_CONFIG_DEPTH} levels deep.")

    visit(root)


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
        raise ConfigError(f"{where}: class_names must be a list of strings, not {_short(names)}.")
    preprocessing = _preprocessing(data.get("preprocessing"), where, source)
    target = data.get("target", "all")
    if not isinstance(target, (str, int, list)) or isinstance(target, bool):
        raise ConfigError(f"{where}: target must be 'all', 'predicted', a class index or name, or a list, not {_short(target)}.")
    output = _output(data.get("output") or {}, where)
    amp = data.get("amp")
    if amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"{where}: amp must be bf16, fp16 or null, not {_short(amp)}.")
    activation = data.get("output_activation", "auto")
    from .model_io import OUTPUT_ACTIVATIONS  # its one definition, with the engine that applies it

    if activation not in OUTPUT_ACTIVATIONS:
        raise ConfigError(f"{where}: output_activation must be one of {OUTPUT_ACTIVATIONS} (what the network applies to "
                          f"its logits; auto detects a trailing Softmax/Sigmoid), not {_short(activation)}.")
    placement = data.get("placement", "receptive_field")
    from .receptive_field import PLACEMENTS  # its one definition, with the geometry that places the cells

    if placement not in PLACEMENTS:
        raise ConfigError(f"{where}: placement must be one of {PLACEMENTS} (where the maps' cells sit: the centres of their "
                          f"receptive fields, or the align_corners=False convention), not {_short(placement)}.")
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
            raise ConfigError(f"{where}: unknown key {prefix}{_short(key)}.{hint} Allowed: {sorted(allowed)}.")


def _typed(data: Mapping, key: str, kind: type, where: str, default: Any, prefix: str = "") -> Any:
    value = data.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {prefix}{key} is too large for a float ({_short(value)}).") from None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {prefix}{key} must be a {kind.__name__}, not {type(value).__name__} ({_short(value)}).")
    return value


def _existing(value: object, where: str, key: str, base: Path, directory: bool = False) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path (a non-empty str), not {type(value).__name__} ({_short(value)}).")
    try:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base / path)
        ok = path.is_dir() if directory else path.is_file()
    except (OSError, RuntimeError, ValueError) as error:  # ~unknownuser, a name too long, a NUL byte
        raise ConfigError(f"{where}: {key} {_short(value)} is not a usable path: {error}.") from None
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
        raise ConfigError(f"{where}: model.configuration must be the name of an nnU-Net configuration like 3d_fullres, not {_short(configuration)}.")
    folds = section.get("folds")
    if folds is not None:
        if isinstance(folds, (int, str)) and not isinstance(folds, bool):
            folds = [folds]
        if (not isinstance(folds, list) or not folds or len(folds) > 100
                or not all((isinstance(f, int) and not isinstance(f, bool) and 0 <= f < 1000) or f == "all" for f in folds)):
            raise ConfigError(f"{where}: model.folds must be a list of fold numbers (or 'all'), e.g. [0, 1, 2, 3, 4], not {_short(folds)}.")
        if len(set(map(str, folds))) != len(folds):
            raise ConfigError(f"{where}: model.folds lists a fold twice: {_short(folds)}.")
        folds = tuple(folds)
    checkpoint = section.get("checkpoint", "checkpoint_final.pth")
    if not isinstance(checkpoint, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", checkpoint) or checkpoint.startswith("."):
        raise ConfigError(f"{where}: model.checkpoint must be a file name in each fold folder like checkpoint_final.pth, not {_short(checkpoint)}.")
    mirror = section.get("mirror", False)
    if not isinstance(mirror, bool):
        raise ConfigError(f"{where}: model.mirror must be true or false (mirror test-time augmentation), not {_short(mirror)}.")
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
        raise ConfigError(f"{where}: model.network must be a dotted class path like 'monai.networks.nets.DenseNet121', not {_short(network)}.")
    args = section.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}: model.args must be a mapping of constructor arguments, not {type(args).__name__}.")
    for name in args:
        if not isinstance(name, str) or not name.isidentifier():
            message = (
                f"{where}: model.args has the key {_short(name)}, which is not an argument name; keys are the "
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
                f"not {_short(entry)}."
            )
            raise ConfigError(message)
        name = entry.get("name", entry.get("_target_"))
        if not isinstance(name, str) or not name:
            message = (
                f"{where}: preprocessing[{position}].name must be a MONAI transform name like Spacing, not "
                f"{_short(name)}."
            )
            raise ConfigError(message)
        for key in entry:
            if not isinstance(key, str) or not key.isidentifier():
                message = (
                    f"{where}: preprocessing[{position}] has the key {_short(key)}, which is not an argument name "
                    f"of {_short(name)}."
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
        raise ConfigError(f"{where}: sliding_window.roi must be a list of positive ints (the patch size), not {_short(roi)}.")
    overlap = _typed(section, "overlap", float, where, 0.25, prefix="sliding_window.")
    if not 0 <= overlap < 1:  # also refuses nan
        raise ConfigError(f"{where}: sliding_window.overlap must be in [0, 1), not {overlap}.")
    mode = _typed(section, "mode", str, where, "gaussian", prefix="sliding_window.")
    if mode not in ("gaussian", "constant"):
        raise ConfigError(f"{where}: sliding_window.mode must be gaussian or constant, not {_short(mode)}.")
    sw_batch = _typed(section, "sw_batch", int, where, 1, prefix="sliding_window.")
    if sw_batch < 1:
        raise ConfigError(f"{where}: sliding_window.sw_batch must be a positive int (patches per forward pass), not {sw_batch}.")
    return SlidingWindowConfig(tuple(roi), overlap, sw_batch, mode)
