"""MONAI bundles (:func:`load_bundle`, behind trust), read with MONAI's own
``monai.bundle.ConfigParser``: the network is the bundle's ``network_def`` with the weights of
``models/model.pt`` (or of ``models/model.ts``), and the preprocessing is the bundle's
``preprocessing`` chain (:class:`medcam3d.preprocess_bundle.BundlePreprocessing`), which returns the model
input as a MetaTensor with its affine, so maps go back to scanner space as with a medcam3d config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_MAX_VOXELS
from ..errors import ConfigError, ModelLoadError, PreprocessingError, UntrustedModelError, cause_line
from ..preprocess_bundle import BundlePreprocessing
from .activations import MAX_ACTIVATION_BYTES, limit_activations
from .build import seeded
from .rules import TRUST_HINT, where
from .weights import load_state, read_state

logger = logging.getLogger(__name__)

__all__ = ["BUNDLE_CONFIGS", "Bundle", "load_bundle", "bundle_preprocessing", "bundle_input_shape", "bundle_has_weights"]

#: Where a MONAI bundle keeps its inference config, in ``configs/`` (the first that exists is read).
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")

_BUNDLE_LAYOUT = (
    "A MONAI bundle is a folder with configs/metadata.json, configs/inference.json (or .yaml) defining "
    "network_def and preprocessing, and models/model.pt (a state_dict) and/or models/model.ts (TorchScript)."
)
_BUNDLE_WEIGHTS_HINT = "Check that models/model.pt was saved from the bundle's network_def (torch.save(net.state_dict(), path))."


def _refuse_bundle(directory: Path, source) -> UntrustedModelError:
    message = (
        f"{where(source)}model.bundle: {directory} is a MONAI bundle; its configs can run Python expressions. "
        f"Give model.network, model.args and a state_dict as model.weights instead, or: {TRUST_HINT}."
    )
    return UntrustedModelError(message)


def _bundle_parser(directory: str | Path, *, source=None, device: str | torch.device = "cpu"):
    """MONAI's ``ConfigParser`` holding the bundle's metadata and inference config.

    ``bundle_root`` is set to ``directory``, and ``device`` (when the config has one) to ``device``,
    so that nothing in the bundle goes to another GPU than the one medcam3d was given.

    Returns
    -------
    (monai.bundle.ConfigParser, Path, dict)
        The parser, the inference config file, and the metadata (``{}`` without metadata.json).
    """
    from monai.bundle import ConfigParser

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{where(source)}model.bundle: {str(directory)!r} is not a directory. {_BUNDLE_LAYOUT}")
    config_file = next((directory / "configs" / name for name in BUNDLE_CONFIGS if (directory / "configs" / name).is_file()), None)
    if config_file is None:
        raise ModelLoadError(f"{where(source)}model.bundle: {directory} has no configs/inference.json or .yaml, so it is not a MONAI bundle. {_BUNDLE_LAYOUT}")
    parser = ConfigParser()
    meta_file = directory / "configs" / "metadata.json"
    try:
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser.read_config(str(config_file))
    except Exception as error:  # JSON/YAML syntax, unreadable files
        raise ModelLoadError(f"{where(source)}model.bundle: cannot read {config_file} or {meta_file.name}: {cause_line(error)}") from None
    parser["bundle_root"] = str(directory)
    if "device" in parser:
        parser["device"] = torch.device(device)
    metadata = parser.get("_meta_") or {}
    return parser, config_file, dict(metadata) if isinstance(metadata, Mapping) else {}


def _class_names(metadata: Mapping) -> tuple[str, ...] | None:
    """Class names from the metadata's ``network_data_format.outputs.<first>.channel_def``, if complete."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not isinstance(outputs, Mapping) or not outputs:
        return None
    first = next(iter(outputs.values()))
    channels = first.get("channel_def") if isinstance(first, Mapping) else None
    if not isinstance(channels, Mapping) or not channels:
        return None
    try:
        named = {int(index): str(name) for index, name in channels.items()}
    except (TypeError, ValueError):
        return None
    if sorted(named) != list(range(len(named))):
        return None
    return tuple(named[index] for index in range(len(named)))


def bundle_input_shape(metadata: Mapping) -> tuple[int, ...] | None:
    """The network's input shape ``(C_in, *spatial)`` from a bundle's ``metadata.json``, if it gives one.

    Read from ``network_data_format.inputs.<first>``: ``num_channels`` (default 1) and
    ``spatial_shape``, when every entry of the latter is a whole number (a size such as ``"16*n"``,
    which only says what the network accepts, gives None).
    """
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    first = next(iter(inputs.values()), None) if isinstance(inputs, Mapping) else None
    if not isinstance(first, Mapping):
        return None
    spatial, channels = first.get("spatial_shape"), first.get("num_channels", 1)
    if not isinstance(spatial, (list, tuple)) or not spatial:
        return None
    try:
        shape = tuple(int(str(n).strip()) for n in (channels, *spatial))
    except (TypeError, ValueError):
        return None
    return shape if all(n > 0 for n in shape) else None


def bundle_has_weights(directory: str | Path) -> bool:
    """Whether a bundle folder holds trained weights (``models/model.pt`` or ``models/model.ts``)."""
    models = Path(directory) / "models"
    return (models / "model.pt").is_file() or (models / "model.ts").is_file()


@contextlib.contextmanager
def _bundle_imports(directory: Path) -> Any:
    """The bundle's root first on ``sys.path`` while its configs are parsed, as MONAI's own runner does
    (``monai.bundle`` workflows add it), so that ``$import scripts`` and ``scripts.net.Net`` in a
    bundle's configs find the bundle's own ``scripts/`` package.

    A ``scripts`` package already imported from elsewhere (another bundle, or a folder of that name
    on the path) is set aside for the load, so that the bundle gets its own; the modules the bundle
    imports stay loaded (its network and transforms need them), and the path entry is removed again.
    Only called for a trusted bundle (parsing its configs runs code anyway).
    """
    import sys

    root = str(directory.resolve())
    own = (directory / "scripts").is_dir()
    clashing = {}
    if own:
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            where = getattr(sys.modules[name], "__file__", None) or ""
            if not os.path.realpath(where).startswith(root + os.sep):
                clashing[name] = sys.modules.pop(name)
    sys.path.insert(0, root)
    try:
        yield
    finally:
        try:
            sys.path.remove(root)
        except ValueError:  # the bundle's code removed it itself
            pass
        for name, module in clashing.items():
            sys.modules.setdefault(name, module)


def _bundle_network(parser, directory: Path, config_file: Path, *, source, random_weights: bool) -> tuple[nn.Module, Path | None, bool]:
    """The bundle's network and where its weights came from.

    ``network_def`` (or ``network``) is built by MONAI's parser. Its weights come from
    ``models/model.pt`` (a state_dict); without one, from the parameters of ``models/model.ts``
    (MONAI exports it from ``network_def``), and if those do not fit ``network_def`` (or there is
    none) the TorchScript module itself is the network.

    Returns
    -------
    (nn.Module, Path or None, bool)
        The network, its weights file (None with ``random_weights``), and whether the network is
        the TorchScript module.
    """
    key = "network_def" if "network_def" in parser else "network" if "network" in parser else None
    network = None
    if key is not None:
        try:
            network = parser.get_parsed_content(key)
        except Exception as error:
            raise ModelLoadError(f"{where(source)}model.bundle: cannot build {key!r} from {config_file}: {cause_line(error)}") from error
        if not isinstance(network, nn.Module):
            raise ModelLoadError(f"{where(source)}model.bundle: {key!r} in {config_file} built a {type(network).__name__}, not a torch.nn.Module.")
    if random_weights:
        if network is None:
            raise ModelLoadError(f"{where(source)}model.bundle: {config_file} defines no network_def to initialise at random. {_BUNDLE_LAYOUT}")
        return network, None, False
    weights, scripted_file = directory / "models" / "model.pt", directory / "models" / "model.ts"
    if weights.is_file():
        if network is None:
            message = (
                f"{where(source)}model.bundle: {directory} has models/model.pt but {config_file} defines no "
                f"network_def to load it into. {_BUNDLE_LAYOUT}"
            )
            raise ModelLoadError(message)
        load_state(network, read_state(weights, trust=True), weights, hint=_BUNDLE_WEIGHTS_HINT)
        return network, weights, False
    if scripted_file.is_file():
        from monai.data import load_net_with_metadata

        try:
            scripted, _, _ = load_net_with_metadata(str(scripted_file), map_location=torch.device("cpu"))
        except Exception as error:
            raise ModelLoadError(f"{where(source)}model.bundle: cannot load the TorchScript file {scripted_file}: {cause_line(error)}") from None
        if network is not None:
            try:
                load_state(network, scripted.state_dict(), scripted_file, hint=_BUNDLE_WEIGHTS_HINT)
                return network, scripted_file, False
            except ModelLoadError as error:
                logger.warning("%s; explaining the TorchScript module itself instead of network_def.", error)
        return scripted, scripted_file, True
    message = (
        f"{where(source)}model.bundle: {directory} has no models/model.pt or models/model.ts, so its network would "
        "have random parameters. Put the trained weights there, or pass random_weights=True (CLI --random-weights) "
        "to explain a randomly initialised network on purpose."
    )
    raise ConfigError(message)


def _input_key(transform, metadata: Mapping, config_file: Path) -> str:
    from monai.transforms import Compose, LoadImaged


    steps = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    loader = next((step for step in steps if isinstance(step, LoadImaged)), None)
    if loader is None:
        message = (
            f"{config_file}: preprocessing has no LoadImaged, so medcam3d cannot hand it a file. Add "
            "{\"_target_\": \"LoadImaged\", \"keys\": \"image\"} at its start, or give preprocessing in the medcam3d config."
        )
        raise PreprocessingError(message)
    keys = [str(key) for key in loader.keys]
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    for candidate in [*(inputs if isinstance(inputs, Mapping) else ()), "image"]:
        if candidate in keys:
            return candidate
    return keys[0]


def _bundle_preprocessing(parser, config_file: Path, metadata: Mapping, max_voxels: int | None) -> BundlePreprocessing | None:

    if "preprocessing" not in parser:
        return None
    try:
        transform = parser.get_parsed_content("preprocessing")
    except Exception as error:
        raise PreprocessingError(f"{config_file}: cannot build 'preprocessing': {cause_line(error)}") from error
    if not callable(transform):
        raise PreprocessingError(f"{config_file}: 'preprocessing' built a {type(transform).__name__}, not a transform.")
    return BundlePreprocessing(transform, _input_key(transform, metadata, config_file), config_file, max_voxels)


@dataclass(frozen=True, eq=False)
class Bundle:
    """A MONAI bundle loaded for explanation (:func:`load_bundle`).

    Attributes
    ----------
    directory : Path
        The bundle folder.
    network : torch.nn.Module
        Its network, with its trained weights, on the requested device, in eval mode.
    weights : Path or None
        ``models/model.pt``, or ``models/model.ts`` when the weights came from TorchScript; None
        with ``random_weights``.
    torchscript : bool
        ``network`` is the TorchScript module itself (its parameters did not fit ``network_def``,
        or the bundle defines none).
    random_weights : bool
        ``network`` has its random initial parameters, on purpose.
    preprocessing : BundlePreprocessing or None
        The bundle's ``preprocessing`` chain, None if it defines none.
    class_names : tuple of str or None
        From the metadata's ``channel_def`` of the first output, if it names every channel.
    metadata : dict
        ``configs/metadata.json`` (``{}`` without one).
    config_file : Path
        The inference config that was read.
    """

    directory: Path
    network: nn.Module
    weights: Path | None
    torchscript: bool
    random_weights: bool
    preprocessing: BundlePreprocessing | None
    class_names: tuple[str, ...] | None
    metadata: dict
    config_file: Path


def load_bundle(
    directory: str | Path,
    *,
    trust: bool = False,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
    source: str | Path | None = None,
    max_activation_bytes: int | None = MAX_ACTIVATION_BYTES,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> Bundle:
    """Load a MONAI bundle: its network with its weights, and its preprocessing.

    Everything comes from MONAI's own ``monai.bundle.ConfigParser`` reading
    ``configs/metadata.json`` and ``configs/inference.json`` (or ``.yaml``): the network is
    ``network_def`` (else ``network``), filled from ``models/model.pt`` (a state_dict, read with
    ``weights_only=True`` first) or, without one, from the parameters of ``models/model.ts``; the
    preprocessing is ``preprocessing`` (:class:`BundlePreprocessing`). Parsing the configs runs
    their Python expressions, so it needs ``trust``.

    Parameters
    ----------
    directory : str or Path
        The bundle folder.
    trust : bool
        Required: a bundle's configs run code.
    device : str or torch.device
        Where to put the network; also given to the config's ``device``.
    random_weights : bool
        Explain ``network_def`` with its random initial parameters (ignoring the bundle's weights),
        on purpose, e.g. for a sanity check.
    source : str or Path, optional
        The medcam3d config naming the bundle (named in errors).
    max_activation_bytes : int or None
        The network (unless it is TorchScript) refuses inputs whose layer outputs would need more
        memory at once (:func:`limit_activations`). None: no limit.
    max_voxels : int or None
        The largest grid a step of the bundle's preprocessing may make (see
        :class:`BundlePreprocessing`). None: no limit.

    Returns
    -------
    Bundle

    Raises
    ------
    UntrustedModelError
        Without ``trust``.
    ModelLoadError
        Not a bundle, a config that cannot be read or built, weights that do not fit.
    ConfigError
        No weights in ``models/`` and no ``random_weights``.
    PreprocessingError
        A ``preprocessing`` that cannot be built or has no ``LoadImaged``.
    """
    directory = Path(directory)
    if not trust:
        raise _refuse_bundle(directory, source)
    parser, config_file, metadata = _bundle_parser(directory, source=source, device=device)
    with _bundle_imports(directory):
        with seeded(random_weights):
            network, weights, scripted = _bundle_network(parser, directory, config_file, source=source,
                                                         random_weights=random_weights)
        preprocessing = _bundle_preprocessing(parser, config_file, metadata, max_voxels)
    if not scripted:
        limit_activations(network, max_activation_bytes, source=source or directory)
    return Bundle(
        directory=directory, network=network.to(device).eval(), weights=weights, torchscript=scripted,
        random_weights=random_weights, preprocessing=preprocessing, class_names=_class_names(metadata),
        metadata=metadata, config_file=config_file,
    )


def bundle_preprocessing(directory: str | Path, *, trust: bool = False, device: str | torch.device = "cpu",
                         max_voxels: int | None = DEFAULT_MAX_VOXELS) -> BundlePreprocessing:
    """The ``preprocessing`` chain of a MONAI bundle, without loading its network.

    ``directory``, ``trust`` and ``max_voxels`` are as for :func:`load_bundle`; ``device`` is given
    to the config's ``device`` (transforms such as ``EnsureTyped`` may use it).

    Returns
    -------
    BundlePreprocessing
        Call it with a file: ``x, scanner_space = bundle_preprocessing(d, trust=True)(path)``.

    Raises
    ------
    UntrustedModelError
        Without ``trust``.
    ModelLoadError
        Not a bundle.
    PreprocessingError
        The bundle defines no ``preprocessing``, or it cannot be built or has no ``LoadImaged``.
    """

    directory = Path(directory)
    if not trust:
        raise _refuse_bundle(directory, None)
    parser, config_file, metadata = _bundle_parser(directory, device=device)
    with _bundle_imports(directory):
        preprocessing = _bundle_preprocessing(parser, config_file, metadata, max_voxels)
    if preprocessing is None:
        raise PreprocessingError(f"{config_file} defines no 'preprocessing'; give preprocessing in the medcam3d config.")
    return preprocessing
