"""The records of a validated run configuration: :class:`Config` and its sections (model,
preprocessing, output, sliding window), their defaults, and :func:`with_limits`, the resource
limits that whoever runs a config sets (never its YAML)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, short_repr

__all__ = ["Config", "ModelConfig", "OutputConfig", "SlidingWindowConfig", "PreprocessingSteps", "with_limits", "TASKS",
           "NO_WEIGHTS", "DEFAULT_MAX_VOXELS", "DEFAULT_MAX_ACTIVATION_BYTES"]

TASKS = ("multilabel", "multiclass", "binary", "segmentation")

#: ``model.weights: none``: the network is explained with its random initial weights, on purpose
#: (a template, a sanity check); without it a network without weights is refused.
NO_WEIGHTS = "none"
#: Default of the largest grid (voxels) preprocessing may make (:data:`medcam3d.preprocess_grid.MAX_VOXELS`;
#: CLI ``--max-voxels``): 2^30 voxels, 4 GiB in float32 per channel.
DEFAULT_MAX_VOXELS = 1 << 30
#: Default of the most memory the outputs of a network's layers may need at once during one forward
#: pass (:data:`medcam3d.models.MAX_ACTIVATION_BYTES`; CLI ``--max-activation-memory``): 4 GiB.
DEFAULT_MAX_ACTIVATION_BYTES = 4 << 30


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
                              f"{self.mask_method}), not {short_repr(value)}.")
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
            raise ConfigError(f"{name} must be a positive int or None (no limit), not {short_repr(value)}.")
    model, steps = config.model, config.preprocessing
    if max_activation_bytes is not _UNCHANGED:
        model = dataclasses.replace(model, max_activation_bytes=max_activation_bytes)
    if max_voxels is not _UNCHANGED and steps is not None:
        steps = PreprocessingSteps(steps, source=getattr(steps, "source", config.source), max_voxels=max_voxels)
    return dataclasses.replace(config, model=model, preprocessing=steps)
