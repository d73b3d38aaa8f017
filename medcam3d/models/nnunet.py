"""nnU-Net v2 model folders: :func:`load_nnunet`.

A trained nnU-Net v2 model is a folder (``nnUNetTrainer__nnUNetPlans__3d_fullres/``) with
``plans.json``, ``dataset.json`` and one ``fold_<k>/checkpoint_final.pth`` per fold. The network
is built from the plans' ``architecture`` entry of the chosen configuration
(``network_class_name``, ``arch_kwargs``, ``_kw_requires_import``), as nnU-Net builds it, with
``deep_supervision=False`` (the inference network), and each fold's ``network_weights`` are read
with ``torch.load(weights_only=True)`` (NumPy scalars allowed: nnU-Net's training log holds them).

What needs trust: only the code the plans name. Without trust the network class must be one of
:data:`NNUNET_ARCHITECTURES` (the U-Nets of ``dynamic_network_architectures`` that nnU-Net's
planners write) and every ``_kw_requires_import`` entry a ``torch.nn.Module`` class under
``torch.nn`` (``Conv3d``, ``InstanceNorm3d``, ``LeakyReLU`` ...); the network's size is counted on
the meta device before it is built, as for a config's network (:data:`MAX_PARAMETERS`). Any other
class (a custom architecture) is imported only with ``trust=True`` (CLI ``--trust``).

Needs the optional extra ``medcam3d[nnunet]`` (``nnunetv2``, which brings
``dynamic_network_architectures``; see the README's "nnU-Net v2 models" for an install that keeps
your torch build). Its preprocessing is :class:`medcam3d.preprocess_nnunet.NnunetPreprocessing`.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelLoadError, UntrustedNetworkError, cause_line, short_repr
from .activations import MAX_ACTIVATION_BYTES, limit_activations
from .budget import MAX_PARAMETERS, OverBudget, build_budget, count_parameters, over_budget
from .build import seeded
from .rules import TRUST_HINT
from .weights import load_state

logger = logging.getLogger(__name__)

__all__ = ["NNUNET_ARCHITECTURES", "NNUNET_INSTALL", "MAX_JSON_BYTES", "FoldEnsemble", "NnunetModel", "load_nnunet",
           "nnunet_folds"]

#: Network classes the plans may name without trust (nnU-Net's own planners write these).
NNUNET_ARCHITECTURES = frozenset({
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
})

#: How to install what this module needs without replacing the installed torch.
NNUNET_INSTALL = (
    "pip install 'medcam3d[nnunet]' -c <(python -c \"import torch; print('torch==' + torch.__version__.split('+')[0])\") "
    "(the constraint keeps your torch build; see the README, 'nnU-Net v2 models')"
)

#: Largest plans.json / dataset.json read (real ones are a few tens of KiB).
MAX_JSON_BYTES = 8 << 20

_FOLD = re.compile(r"fold_(\d+|all)")


def _require_nnunetv2(what: str) -> None:
    try:
        importlib.import_module("nnunetv2.utilities.plans_handling.plans_handler")
        importlib.import_module("dynamic_network_architectures")
    except ImportError as error:
        raise ModelLoadError(f"{what} needs nnunetv2 ({cause_line(error)}): {NNUNET_INSTALL}.") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, at most :data:`MAX_JSON_BYTES`, or a one-line :class:`ModelLoadError`."""
    try:
        size = path.stat().st_size
    except OSError:
        raise ModelLoadError(f"{path.parent} is not an nnU-Net v2 model folder: it has no {path.name} ({what}).") from None
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file ({what}).")
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} an nnU-Net {what} can need.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({what}): {cause_line(error)}.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object ({what}), not a {type(data).__name__}.")
    return data


def nnunet_folds(directory: str | Path) -> list[str]:
    """The folds a model folder holds (``fold_0`` ... ``fold_all``), as ``["0", "1", ..., "all"]``."""
    found = [m.group(1) for p in Path(directory).iterdir() if p.is_dir() and (m := _FOLD.fullmatch(p.name))]
    return sorted(found, key=lambda f: (f == "all", int(f) if f.isdigit() else 0))


class FoldEnsemble(nn.Module):
    """The folds of an nnU-Net model as one module: its output is the mean of the folds' logits.

    Explaining it as one model gives the gradient of the mean; :func:`medcam3d.folds.explain_folds`
    explains each fold on its own (one map per fold) and averages the maps.

    Parameters
    ----------
    folds : sequence of nn.Module
        One network per fold, same architecture.
    names : sequence of str
        The fold names (``"0"``, ``"1"``, ``"all"`` ...).
    mirror_axes : sequence of int
        The spatial axes of mirror test-time augmentation (:mod:`medcam3d.mirror`) that explaining
        it applies (the CLI, :class:`medcam3d.jobs.runner.Runner`); empty: none. The forward itself
        does not mirror.
    """

    def __init__(self, folds: Sequence[nn.Module], names: Sequence[str], mirror_axes: Sequence[int] = ()) -> None:
        super().__init__()
        if not folds or len(folds) != len(names):
            raise ValueError("FoldEnsemble needs one name per fold and at least one fold.")
        self.folds = nn.ModuleList(folds)
        self.names = [str(n) for n in names]
        self.mirror_axes = tuple(int(a) for a in mirror_axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S)`` -> the mean of the folds' ``(B, K, *S)`` logits."""
        total = None
        for fold in self.folds:
            y = fold(x)
            total = y if total is None else total + y
        assert total is not None
        return total / len(self.folds)


@dataclass(frozen=True, eq=False)
class NnunetModel:
    """An nnU-Net v2 model folder, loaded (:func:`load_nnunet`).

    Attributes
    ----------
    network : FoldEnsemble
        In eval mode; ``network.folds[i]`` is fold ``folds[i]``.
    directory : Path
    configuration : str
    folds : list of str
    plans, dataset : dict
        ``plans.json`` and ``dataset.json``.
    class_names : list of str
        One per output channel: the label names by value (or the regions' names).
    patch_size : tuple of int
        The configuration's patch size (in the plans' transposed axis order, as the network sees it).
    input_channels : int
    random_weights : bool
    mirror_axes : tuple of int
        The spatial axes mirrored at test time (``network.mirror_axes``): the checkpoint's
        ``inference_allowed_mirroring_axes`` with ``mirror=True``, else empty.
    """

    network: FoldEnsemble
    directory: Path
    configuration: str
    folds: list[str]
    plans: dict
    dataset: dict
    class_names: list[str]
    patch_size: tuple[int, ...]
    input_channels: int
    random_weights: bool = False
    mirror_axes: tuple[int, ...] = ()


def _locate(dotted: str) -> Any:
    """The object named by a dotted path (``torch.nn.modules.conv.Conv3d``, ``torch.nn.LeakyReLU``)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def _architecture(configuration: Any, where: str) -> tuple[str, dict, list[str]]:
    entry = configuration.configuration.get("architecture")
    if not isinstance(entry, dict) or not isinstance(entry.get("network_class_name"), str):
        message = (f"{where}: the configuration has no 'architecture' entry with a network_class_name (plans written by "
                   "nnU-Net v2.4 or later have one); re-plan the dataset with a current nnU-Net, or build the network "
                   "yourself and give it as model.network with a state_dict.")
        raise ModelLoadError(message)
    kwargs = entry.get("arch_kwargs", {})
    imports = entry.get("_kw_requires_import", [])
    if not isinstance(kwargs, dict) or not isinstance(imports, (list, tuple)) or not all(isinstance(k, str) for k in imports):
        raise ModelLoadError(f"{where}: architecture.arch_kwargs must be a mapping and _kw_requires_import a list of names.")
    return entry["network_class_name"], dict(kwargs), list(imports)


def _resolve_class(name: str, *, trust: bool, where: str) -> Any:
    if not trust and name not in NNUNET_ARCHITECTURES:
        message = (f"{where}: architecture.network_class_name {name!r} is not one of nnU-Net's own U-Nets "
                   f"({', '.join(sorted(NNUNET_ARCHITECTURES))}); building it imports and runs its code. {TRUST_HINT}.")
        raise UntrustedNetworkError(message)
    factory = _locate(name)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{where}: architecture.network_class_name {name!r} cannot be imported.")
    return factory


def _resolve_imports(kwargs: dict, imports: list[str], *, trust: bool, where: str) -> dict:
    resolved = dict(kwargs)
    for key in imports:
        if key not in resolved:
            raise ModelLoadError(f"{where}: architecture._kw_requires_import names {key!r}, which arch_kwargs does not give.")
        value = resolved[key]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ModelLoadError(f"{where}: architecture.arch_kwargs.{key} must be a dotted class name, not {short_repr(value)}.")
        if not trust and not (value == "torch.nn" or value.startswith("torch.nn.")):
            message = (f"{where}: architecture.arch_kwargs.{key} names {value!r}, outside torch.nn; importing it runs its "
                       f"code. {TRUST_HINT}.")
            raise UntrustedNetworkError(message)
        obj = _locate(value)
        if obj is None:
            raise ModelLoadError(f"{where}: architecture.arch_kwargs.{key}: {value!r} cannot be imported.")
        if not trust and not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise UntrustedNetworkError(f"{where}: architecture.arch_kwargs.{key}: {value!r} is not a torch.nn.Module class. {TRUST_HINT}.")
        resolved[key] = obj
    return resolved


def _build(factory: Any, kwargs: dict, *, trust: bool, name: str, where: str, max_parameters: int | None) -> nn.Module:
    if not trust and max_parameters is not None:
        try:
            count = count_parameters(factory, kwargs, max_parameters)
        except OverBudget as error:
            raise over_budget(name, error, where, max_parameters) from None
        if count is not None and count > max_parameters:
            raise ModelLoadError(f"{where}: {name} with these arch_kwargs has {count:,} or more parameters, more than the "
                                 f"{max_parameters:,} allowed without trust. {TRUST_HINT}.")
    limits = None
    try:
        if not trust and max_parameters is not None:
            with build_budget(max_parameters) as limits:
                model = factory(**kwargs)
            if limits.exceeded:
                raise OverBudget(limits.exceeded)
        else:
            model = factory(**kwargs)
    except OverBudget as error:
        raise over_budget(name, error, where, max_parameters) from None
    except Exception as error:
        raise ModelLoadError(f"{where}: cannot build {name} from the plans' arch_kwargs: {cause_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{where}: {name} did not build a torch.nn.Module (got {type(model).__name__}).")
    return model


def _numpy_scalar_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow to read nnU-Net's training log (NumPy scalars)."""
    core = getattr(np, "_core", None) or np.core
    found: list = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
                  if hasattr(dtypes, n)]
    return found


def read_checkpoint(path: Path) -> dict:
    """A fold's ``network_weights``, read with ``weights_only=True``."""
    return _read_checkpoint(path)["network_weights"]


def _read_checkpoint(path: Path) -> dict:
    """A fold's checkpoint (``network_weights`` checked to be a mapping), read with ``weights_only=True``."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist (the fold's checkpoint); train the fold or choose other folds.")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (objects that could run code), corrupt zip, ...
        message = (f"Cannot read {path} with torch.load(weights_only=True) (only tensors and plain data): "
                   f"{cause_line(error)}. nnU-Net's own checkpoints hold tensors, plain data and NumPy scalars only.")
        raise ModelLoadError(message) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("network_weights"), dict):
        return loaded
    raise ModelLoadError(f"{path} is not an nnU-Net checkpoint: it has no 'network_weights' state_dict.")


def _mirror_axes(checkpoint: dict, path: Path, dims: int) -> tuple[int, ...]:
    """The checkpoint's ``inference_allowed_mirroring_axes`` (spatial axes); empty when it allows none."""
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is None:
        logger.warning("%s allows no mirroring (no inference_allowed_mirroring_axes): mirror is not applied.", path)
        return ()
    if (not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
            or not all(0 <= a < dims for a in axes) or len(set(axes)) != len(axes)):
        raise ModelLoadError(f"{path}: inference_allowed_mirroring_axes must list distinct spatial axes (0 to {dims - 1}), "
                             f"not {short_repr(axes)}.")
    return tuple(int(a) for a in axes)


def _class_names(label_manager: Any, dataset: dict) -> list[str]:
    labels = dataset.get("labels", {})
    if label_manager.has_regions:
        names = [str(k) for k, v in labels.items() if isinstance(v, (list, tuple))]
        return names if len(names) == label_manager.num_segmentation_heads else [str(i) for i in range(label_manager.num_segmentation_heads)]
    by_value = {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool) and k != "ignore"}
    return [by_value.get(i, str(i)) for i in range(label_manager.num_segmentation_heads)]


def load_nnunet(
    path: str | Path,
    configuration: str = "3d_fullres",
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    *,
    trust: bool = False,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
    max_parameters: int | None = MAX_PARAMETERS,
    max_activation_bytes: int | None = MAX_ACTIVATION_BYTES,
    mirror: bool = False,
) -> NnunetModel:
    """Load an nnU-Net v2 model folder: one network per fold, with its weights.

    Parameters
    ----------
    path : str or Path
        The folder with ``plans.json``, ``dataset.json`` and ``fold_<k>/``.
    configuration : str
        A configuration of the plans (``3d_fullres``, ``3d_lowres``, ``2d`` ...).
    folds : sequence of int or str, optional
        Default: every ``fold_<k>`` folder present.
    checkpoint : str
        The file in each fold folder (``checkpoint_final.pth`` or ``checkpoint_best.pth``).
    trust : bool
        Import a network class (or ``_kw_requires_import`` entry) outside the allow-list (see the
        module docstring).
    random_weights : bool
        Do not read the checkpoints: each fold keeps random initial parameters (seeded), on purpose.
    device : str or torch.device
    max_parameters : int or None
        Without trust, refuse a network with more parameters (counted before it is built).
    max_activation_bytes : int or None
        Each fold refuses inputs whose layer outputs would need more memory at once.
    mirror : bool
        Mirror test-time augmentation, as nnU-Net predicts: explanations through
        :class:`medcam3d.jobs.runner.Runner` (the CLI) explain the input flipped along every subset
        of the first fold's ``inference_allowed_mirroring_axes`` too, flip the maps back and
        average them (:func:`medcam3d.mirror.explain_mirrored`). With random weights (no
        checkpoint read) every spatial axis is mirrored.

    Returns
    -------
    NnunetModel

    Raises
    ------
    ModelLoadError
        Not a model folder, unreadable or invalid JSON, an unknown configuration (the available ones
        named), a missing fold, a checkpoint that ``weights_only=True`` refuses or that does not fit,
        or nnunetv2 not installed.
    UntrustedNetworkError
        Without trust: the plans name a class outside the allow-list.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"model.nnunet: {str(directory)!r} is not a folder (an nnU-Net v2 model folder holds plans.json, "
                             "dataset.json and fold_<k>/).")
    plans = read_json(directory / "plans.json", "plans")
    dataset = read_json(directory / "dataset.json", "dataset description")
    _require_nnunetv2("An nnU-Net v2 model")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    where = str(directory / "plans.json")
    available = plans.get("configurations")
    if not isinstance(available, dict) or not available:
        raise ModelLoadError(f"{where} has no configurations; it is not an nnU-Net v2 plans file.")
    if configuration not in available:
        raise ModelLoadError(f"{where} has no configuration {configuration!r}; it has {', '.join(map(repr, available))}.")
    try:
        manager = PlansManager(plans)
        config = manager.get_configuration(configuration)
        label_manager = manager.get_label_manager(dataset)
        patch_size = tuple(int(n) for n in config.patch_size)
    except Exception as error:  # KeyError, TypeError ... from a plans file that is not nnU-Net's
        raise ModelLoadError(f"{where}: configuration {configuration!r} cannot be read: {cause_line(error)}.") from None
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ModelLoadError(f"{directory / 'dataset.json'} has no channel_names (one name per input channel).")
    where_arch = f"{where} ({configuration})"
    class_name, kwargs, imports = _architecture(config, where_arch)
    factory = _resolve_class(class_name, trust=trust, where=where_arch)
    kwargs = _resolve_imports(kwargs, imports, trust=trust, where=where_arch)
    kwargs.update(input_channels=len(channels), num_classes=label_manager.num_segmentation_heads, deep_supervision=False)
    names = [str(f) for f in folds] if folds is not None else nnunet_folds(directory)
    if not names:
        raise ModelLoadError(f"{directory} has no fold_<k> folder; give model.folds or train a fold.")
    networks = []
    mirror_axes: tuple[int, ...] = tuple(range(len(patch_size))) if mirror and random_weights else ()
    for fold in names:
        if not (directory / f"fold_{fold}").is_dir():
            present = nnunet_folds(directory)
            raise ModelLoadError(f"{directory} has no fold_{fold}/ (folds present: {', '.join(present) or 'none'}).")
        with seeded(random_weights):
            network = _build(factory, kwargs, trust=trust, name=class_name, where=where_arch, max_parameters=max_parameters)
        if not random_weights:
            file = directory / f"fold_{fold}" / checkpoint
            loaded = _read_checkpoint(file)
            if mirror and fold == names[0]:
                mirror_axes = _mirror_axes(loaded, file, len(patch_size))
            state = {k.removeprefix("_orig_mod."): v for k, v in loaded["network_weights"].items()}
            load_state(network, state, file, hint=f"Check that {file} was trained with these plans ({configuration}).")
        networks.append(limit_activations(network, max_activation_bytes, source=str(directory)))
    ensemble = FoldEnsemble(networks, names, mirror_axes).to(device).eval()
    logger.info("nnU-Net model %s (%s): %s, folds %s, patch %s, mirror axes %s", directory, configuration,
                class_name.rpartition(".")[2], ", ".join(names), patch_size, mirror_axes or "none")
    return NnunetModel(ensemble, directory, configuration, names, plans, dataset, _class_names(label_manager, dataset),
                       patch_size, len(channels), random_weights, mirror_axes)
