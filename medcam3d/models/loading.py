"""Load a config's model: :func:`load_model` (a network with its weights, a bundle's network, or
TorchScript; no silent random weights) and :func:`load_configured` (what the CLI, the Explainer and
napari read: also a bundle's class names and own preprocessing)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_MAX_VOXELS, Config, ModelConfig
from ..errors import ConfigError, ModelLoadError, UntrustedModelError
from ..preprocess_bundle import BundlePreprocessing
from ..preprocess_nnunet import NnunetPreprocessing
from .build import build_network, seeded
from .bundles import bundle_preprocessing, load_bundle
from .nnunet import NnunetModel, load_nnunet, read_json
from .rules import TRUST_HINT, where
from .weights import load_weights

logger = logging.getLogger(__name__)

__all__ = ["load_model", "ConfiguredModel", "load_configured", "load_preprocessing"]

_NO_WEIGHTS_MESSAGE = (
    "model.weights is missing: a network without weights has random parameters; give the trained weights, or "
    "`weights: none` to explain a randomly initialised network on purpose (e.g. for a sanity check)"
)


def load_model(
    config: Config | ModelConfig,
    *,
    trust: bool = False,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
    max_activation_bytes: Any = "config",
) -> nn.Module:
    """Build the configured model, load its weights, move it to ``device``, in eval mode.

    A network without weights has random parameters, and its maps mean nothing; so a
    ``model.network`` without ``model.weights`` is refused unless the config says
    ``weights: none`` (:attr:`ModelConfig.random_weights`) or ``random_weights=True`` (CLI
    ``--random-weights``) is passed. Random parameters are drawn with a fixed seed, so the same
    network explains the same way on every run.

    Parameters
    ----------
    config : Config or ModelConfig
        From :func:`medcam3d.config.load_config`.
    trust : bool
        Allow what runs code: MONAI bundles, TorchScript, weights files that are full pickles, and
        any importable class with any arguments as ``model.network`` (see :func:`build_network` for
        the rule without it).
    device : str or torch.device
        Where to put the model.
    random_weights : bool
        Explain the network with its random initial parameters, on purpose (a template, a
        sanity check): a missing ``model.weights`` is accepted and a given one (or a bundle's) is
        not loaded. Label what is made with it as such.
    max_activation_bytes : int, None or "config"
        The model refuses inputs whose layer outputs would need more memory at once
        (:func:`limit_activations`; TorchScript models are not limited); None: no limit. Default:
        the config's ``model.max_activation_bytes`` (:data:`MAX_ACTIVATION_BYTES` unless changed
        with :func:`medcam3d.config.with_limits`).

    Returns
    -------
    torch.nn.Module
        In eval mode.

    Raises
    ------
    UntrustedModelError
        Without ``trust``: a bundle, TorchScript, or a network outside the rule
        (:class:`UntrustedNetworkError`).
    ModelLoadError
        A network that cannot be built, or weights that cannot be read or do not fit.
    ConfigError
        A network without weights, without ``weights: none`` or ``random_weights``.
    """
    spec = config.model if isinstance(config, Config) else config
    random_weights = bool(random_weights or spec.random_weights)
    limit = spec.max_activation_bytes if isinstance(max_activation_bytes, str) and max_activation_bytes == "config" else max_activation_bytes
    if spec.bundle is not None:
        return load_bundle(spec.bundle, trust=trust, device=device, random_weights=random_weights, source=spec.source,
                           max_activation_bytes=limit).network
    if spec.nnunet is not None:
        return _nnunet(spec, trust=trust, device=device, random_weights=random_weights, max_activation_bytes=limit).network
    if spec.torchscript is not None:
        if not trust:
            message = (
                f"{where(spec.source)}model.torchscript: {spec.torchscript} is TorchScript, which runs code when "
                f"loaded. Give model.network, model.args and a state_dict as model.weights instead, or: {TRUST_HINT}."
            )
            raise UntrustedModelError(message)
        if random_weights:
            raise ConfigError(f"{where(spec.source)}model.torchscript: a TorchScript file cannot be re-initialised at random; give model.network and model.args instead.")
        model = torch.jit.load(str(spec.torchscript), map_location="cpu")
    else:
        if spec.network is None:
            raise ModelLoadError("The model config names no network, bundle or torchscript file.")
        with seeded(random_weights):
            model = build_network(spec.network, spec.args, trust=trust, source=spec.source, max_activation_bytes=limit)
        if random_weights:
            if spec.weights is not None:
                logger.warning("random weights requested: %s is not loaded; %s keeps its random initial parameters.", spec.weights, spec.network)
        elif spec.weights is None:
            raise ConfigError(f"{spec.source or 'config'}: {_NO_WEIGHTS_MESSAGE}.")
        else:
            load_weights(model, spec.weights, trust=trust)
    return model.to(device).eval()


def _nnunet(spec: ModelConfig, *, trust: bool, device: str | torch.device, random_weights: bool,
            max_activation_bytes: int | None) -> NnunetModel:
    assert spec.nnunet is not None
    return load_nnunet(spec.nnunet, spec.configuration, spec.folds, spec.checkpoint, trust=trust, device=device,
                       random_weights=random_weights, max_activation_bytes=max_activation_bytes, mirror=spec.mirror)


@dataclass(frozen=True, eq=False)
class ConfiguredModel:
    """A config's model, loaded (:func:`load_configured`).

    Attributes
    ----------
    config : Config
        The config, with ``class_names`` from a MONAI bundle's metadata when it gives none.
    model : torch.nn.Module
        In eval mode.
    random_weights : bool
        The model has random parameters on purpose (asked for, ``weights: none``, or a bundle
        loaded with ``random_weights``): what is made with it must say so.
    preprocessing : BundlePreprocessing, NnunetPreprocessing or None
        A MONAI bundle's own ``preprocessing`` chain, or an nnU-Net folder's preprocessing, when
        the config gives no ``preprocessing`` list (that list overrides them); None otherwise (then the config's list, or
        :data:`medcam3d.preprocess.DEFAULT_TRANSFORMS`, applies).
    """

    config: Config
    model: nn.Module
    random_weights: bool
    preprocessing: BundlePreprocessing | NnunetPreprocessing | None


def load_configured(
    config: Config,
    *,
    trust: bool = False,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> ConfiguredModel:
    """Load a config's model as the CLI, :meth:`medcam3d.Explainer.from_config` and napari do.

    A MONAI bundle (:func:`load_bundle`) gives its network, its class names (when the config gives
    none) and its own preprocessing (when the config gives no ``preprocessing`` list); any other
    model comes from :func:`load_model`.

    Parameters
    ----------
    config : Config
        From :func:`medcam3d.config.load_config` (its limits from :func:`medcam3d.config.with_limits`).
    trust, random_weights, device
        As for :func:`load_model`.
    max_voxels : int or None
        The largest grid a step of a bundle's own preprocessing may make (:func:`load_bundle`).

    Returns
    -------
    ConfiguredModel

    Raises
    ------
    UntrustedModelError, ModelLoadError, ConfigError, PreprocessingError
        As :func:`load_model` and :func:`load_bundle` raise them.
    """
    spec = config.model
    if spec.nnunet is not None:
        return _configured_nnunet(config, trust=trust, random_weights=random_weights, device=device)
    if spec.bundle is None:
        model = load_model(config, trust=trust, device=device, random_weights=random_weights)
        return ConfiguredModel(config, model, bool(random_weights or spec.random_weights), None)
    bundle = load_bundle(spec.bundle, trust=trust, device=device, random_weights=random_weights, source=config.source,
                         max_activation_bytes=spec.max_activation_bytes, max_voxels=max_voxels)
    if config.class_names is None and bundle.class_names:
        config = dataclasses.replace(config, class_names=list(bundle.class_names))
    preprocessing = None
    if config.preprocessing is None:  # the config's own preprocessing list overrides the bundle's
        preprocessing = bundle.preprocessing
        if preprocessing is not None:
            logger.info("preprocessing: the bundle's own (%s)", bundle.config_file)
    return ConfiguredModel(config, bundle.network, bool(random_weights or bundle.random_weights), preprocessing)


def _configured_nnunet(config: Config, *, trust: bool, random_weights: bool, device: str | torch.device) -> ConfiguredModel:
    """An nnU-Net folder as the CLI reads it: its folds (a :class:`~medcam3d.models.nnunet.FoldEnsemble`), its class
    names (dataset.json's labels) and nnU-Net's own preprocessing, explained through windows of the plans' patch size
    with Gaussian weights (as nnU-Net predicts) unless the config sets ``sliding_window``."""
    from ..config import SlidingWindowConfig

    spec = config.model
    loaded = _nnunet(spec, trust=trust, device=device, random_weights=bool(random_weights or spec.random_weights),
                     max_activation_bytes=spec.max_activation_bytes)
    changes: dict[str, Any] = {}
    if config.class_names is None:
        changes["class_names"] = list(loaded.class_names)
    if config.sliding_window is None:
        changes["sliding_window"] = SlidingWindowConfig(loaded.patch_size, overlap=0.5, mode="gaussian")
    if changes:
        config = dataclasses.replace(config, **changes)
    preprocessing = None
    if config.preprocessing is None:  # a config's own list overrides nnU-Net's preprocessing
        preprocessing = NnunetPreprocessing(loaded.plans, loaded.dataset, loaded.configuration, loaded.directory)
    return ConfiguredModel(config, loaded.network, loaded.random_weights, preprocessing)


def load_preprocessing(config: Config, *, trust: bool = False,
                       max_voxels: int | None = DEFAULT_MAX_VOXELS) -> BundlePreprocessing | NnunetPreprocessing | None:
    """The preprocessing :func:`load_configured` gives a config's model (its ``preprocessing``), without loading
    the network: for a model given some other way (``Explainer.from_config(config, model)``).

    Parameters
    ----------
    config : Config
        From :func:`medcam3d.config.load_config`.
    trust : bool
        A MONAI bundle's configs run code: as for :func:`medcam3d.models.bundle_preprocessing`.
    max_voxels : int or None
        The largest grid a step of a bundle's own preprocessing may make.

    Returns
    -------
    BundlePreprocessing, NnunetPreprocessing or None
        A MONAI bundle's own chain (its configs read once), an nnU-Net folder's preprocessing (its
        ``plans.json`` and ``dataset.json`` read once); None when the config gives a ``preprocessing``
        list or names another kind of model.
    """
    spec = config.model
    if config.preprocessing is not None:
        return None
    if spec.bundle is not None:
        return bundle_preprocessing(spec.bundle, trust=trust, max_voxels=max_voxels)
    if spec.nnunet is not None:
        folder = spec.nnunet
        return NnunetPreprocessing(read_json(folder / "plans.json", "plans"),
                                   read_json(folder / "dataset.json", "dataset description"), spec.configuration, folder)
    return None
