"""Build and load models safely.

Weights are read with ``torch.load(weights_only=True)``: a state_dict cannot run code. Anything
that executes code from a file (a MONAI bundle's config expressions, TorchScript, a weights file
that is a full pickle) needs ``trust=True`` (CLI ``--trust``).

A config is code unless constrained. Without trust, ``model.network`` must name a class that
subclasses ``torch.nn.Module`` and is defined in :data:`NETWORK_NAMESPACES` (MONAI's
``monai.networks.nets``, ``torch.nn``, medcam3d's demo networks), or one of MONAI's plain network
factories (:data:`NETWORK_FACTORIES`, e.g. ``monai.networks.nets.resnet50``). Its arguments must be
plain data (:func:`medcam3d.config.plain_data_problem`), may not make it download or read files
(:data:`ARGUMENTS_NEEDING_TRUST`), and it may have at most :data:`MAX_PARAMETERS` parameters
(counted on the ``meta`` device before anything is allocated). A constructor argument the config
leaves out whose default would download or read weights (``EfficientNetBN``'s and
``ResNetFeatures``' ``pretrained=True`` ...; found from the constructor's signature, see
:func:`download_defaults`) is set to false/None. With trust, any importable callable that returns an
``nn.Module`` is built, as before.

Activation limit (with or without trust): a network built from a config (or a bundle's
``network_def``) refuses an input whose layer outputs would need more than
:data:`MAX_ACTIVATION_BYTES` (4 GiB) at once, estimated before the first forward pass of each
input shape by a forward pass on PyTorch's meta device (:func:`estimate_activation_bytes`,
:func:`limit_activations`; ``max_activation_bytes=``, CLI ``--max-activation-memory``): a
``Conv3d`` with ``padding: 600`` has a few parameters and would need 7 GiB.

No silent random weights: a network without a weights file is refused unless the config says
``weights: none`` or the caller passes ``random_weights=True`` (:func:`load_model`).

MONAI bundles (:func:`load_bundle`, behind trust) are read with MONAI's own
``monai.bundle.ConfigParser``: the network is the bundle's ``network_def`` with the weights of
``models/model.pt`` (or of ``models/model.ts``), and the preprocessing is the bundle's
``preprocessing`` chain (:class:`medcam3d.preprocess_bundle.BundlePreprocessing`), which returns the model input as a
MetaTensor with its affine, so maps go back to scanner space as with a medcam3d config.

:func:`check_input_rank` refuses a 2D image for a 3D model (and the reverse) before preprocessing.

One concept per module; this package gives their public names:

* :mod:`~medcam3d.models.rules`: what a config may build without trust (allow-lists, arguments);
* :mod:`~medcam3d.models.budget`: the build budget (parameters, submodules, seconds) and its torch hooks;
* :mod:`~medcam3d.models.activations`: the activation limit (meta-device estimate per input shape);
* :mod:`~medcam3d.models.build`: :func:`build_network`;
* :mod:`~medcam3d.models.weights`: :func:`load_weights` (``weights_only=True``);
* :mod:`~medcam3d.models.bundles`: MONAI bundles;
* :mod:`~medcam3d.models.nnunet`: nnU-Net v2 model folders (:func:`load_nnunet`, extra ``[nnunet]``);
* :mod:`~medcam3d.models.loading`: :func:`load_model` and :func:`load_configured` (a config's model),
  :func:`load_preprocessing` (its preprocessing alone);
* :mod:`~medcam3d.models.rank`: :func:`check_input_rank`, :func:`check_input_channels`.
"""

from __future__ import annotations

from ..errors import ModelLoadError, UntrustedModelError, UntrustedNetworkError
from .activations import MAX_ACTIVATION_BYTES, check_activations, estimate_activation_bytes, limit_activations
from .budget import MAX_BUILD_SECONDS, MAX_MODULES, MAX_PARAMETERS
from .build import build_network
from .bundles import BUNDLE_CONFIGS, Bundle, bundle_has_weights, bundle_input_shape, bundle_preprocessing, load_bundle
from .loading import ConfiguredModel, load_configured, load_model, load_preprocessing
from .nnunet import NNUNET_ARCHITECTURES, FoldEnsemble, NnunetModel, load_nnunet
from .rank import check_input_channels, check_input_rank
from .rules import (ARGUMENTS_NEEDING_TRUST, MAX_ARGUMENT_INT, NETWORK_FACTORIES, NETWORK_NAMESPACES, NETWORKS_NEEDING_TRUST,
                    download_defaults)
from .weights import load_weights

__all__ = [
    "ModelLoadError",
    "UntrustedModelError",
    "UntrustedNetworkError",
    "NETWORK_NAMESPACES",
    "NETWORK_FACTORIES",
    "NETWORKS_NEEDING_TRUST",
    "ARGUMENTS_NEEDING_TRUST",
    "MAX_PARAMETERS",
    "MAX_MODULES",
    "MAX_BUILD_SECONDS",
    "MAX_ARGUMENT_INT",
    "MAX_ACTIVATION_BYTES",
    "BUNDLE_CONFIGS",
    "Bundle",
    "ConfiguredModel",
    "build_network",
    "download_defaults",
    "estimate_activation_bytes",
    "limit_activations",
    "check_activations",
    "load_weights",
    "load_model",
    "load_configured",
    "load_preprocessing",
    "load_bundle",
    "bundle_preprocessing",
    "bundle_input_shape",
    "bundle_has_weights",
    "check_input_rank",
    "check_input_channels",
    "NNUNET_ARCHITECTURES",
    "FoldEnsemble",
    "NnunetModel",
    "load_nnunet",
]
