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

The package, one concept per module, each importing only those before it: :mod:`.values` (counts,
memory sizes, plain data), :mod:`.yaml_reader` (the safe, bounded YAML reader), :mod:`.records`
(:class:`Config` and its sections, :func:`with_limits`), :mod:`.parsing` (:func:`load_config`,
:func:`parse_config`). Everything public is imported from ``medcam3d.config``.
"""

from __future__ import annotations

from .parsing import load_config, parse_config
from .records import (DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_VOXELS, NO_WEIGHTS, TASKS, Config, ModelConfig, OutputConfig,
                      PreprocessingSteps, SlidingWindowConfig, with_limits)
from .values import MAX_CONFIG_DEPTH, parse_count, parse_size, plain_data_problem
from .yaml_reader import MAX_CONFIG_BYTES, MAX_CONFIG_NODES

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
