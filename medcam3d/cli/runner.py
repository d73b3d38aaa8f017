"""The :class:`~medcam3d.jobs.runner.Runner` a command builds from its arguments and config, and the checks
made before the model is loaded (target, layer name, input paths)."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("medcam3d")


def parse_target(text: str | None):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    parsed = [int(t) if t.lstrip("-").isdigit() else t for t in items]
    return parsed[0] if len(parsed) == 1 else parsed


def build_runner(args: argparse.Namespace, methods=None, channels: int | None = None):
    from ..config import load_config
    from ..jobs.runner import Runner
    from ..models import load_configured

    config = with_limits(with_output_options(load_config(args.config), args), args)
    logger.info("config %s: model %s, task %s", args.config, config.model.network or config.model.bundle
                or config.model.torchscript or config.model.nnunet, config.task)
    target = parse_target(getattr(args, "target", None))
    named_later = config.model.bundle is not None or config.model.nnunet is not None  # names from the folder
    if not named_later or config.class_names is not None:  # a bundle's (nnU-Net's) names: checked once it is read
        check_target(target, config)
    check_layer_name(config, getattr(args, "layer", None) or config.layer, getattr(args, "trust", False),
                      channels=channels)
    trust = getattr(args, "trust", False)
    loaded = load_configured(config, trust=trust, random_weights=getattr(args, "random_weights", False),
                             **({"max_voxels": args.max_voxels} if hasattr(args, "max_voxels") else {}))
    config, model, random_weights, reader = loaded.config, loaded.model, loaded.random_weights, loaded.preprocessing
    if named_later:
        check_target(target, config)
    if random_weights:
        logger.warning("the model has random parameters (weights: none / --random-weights): its maps explain an "
                       "untrained network; every output is labelled so")
    if not methods and getattr(args, "method", None):
        from ..methods import split_methods

        methods = split_methods(args.method)
    window = None
    if getattr(args, "roi", None):
        from ..config import SlidingWindowConfig

        window = SlidingWindowConfig(tuple(args.roi), args.overlap, args.sw_batch)
    return Runner(config, model, methods=methods, target=target,
                  layer=getattr(args, "layer", None), device=getattr(args, "device", "auto"),
                  sliding_window=window, amp=getattr(args, "amp", None), trust=trust, reader=reader,
                  random_weights=random_weights, output_activation=getattr(args, "output_activation", None),
                  placement=getattr(args, "placement", None))


def check_target(target: object, config) -> None:
    """``--target`` (or the config's target) against the config's classes, before the model runs."""
    from ..targets import check_target_spec

    check_target_spec(config.target if target is None else target, config.class_names, task=config.task)


def check_layer_name(config, layer: str, trust: bool, channels: int | None = None) -> None:
    """A named target layer of a ``model.network`` config, checked on the network built on the meta device
    (no memory, no weights read) before the model is loaded. TorchScript files and bundles are checked once
    loaded (before any scan is read), as is a network whose constructor cannot run on the meta device.

    ``channels`` (several scans per case: their number) is checked against the network's input channels
    on the same skeleton (:func:`medcam3d.models.check_input_channels`)."""
    check_layer = bool(layer) and layer != "auto"
    if config.model.network is None or not (check_layer or (channels is not None and channels > 1)):
        return
    import torch

    from ..layers import resolve_layer
    from ..models import build_network, check_input_channels

    try:
        with torch.device("meta"):
            skeleton = build_network(config.model.network, config.model.args, trust=trust, source=config.source,
                                     max_activation_bytes=None)
    except Exception as error:  # noqa: BLE001  (the real build reports it)
        logger.debug("layer %r not checked before loading: the network cannot be built on the meta device (%s)",
                     layer, error)
        return
    if channels is not None and channels > 1:
        check_input_channels(channels, skeleton, what=f"--image ({channels} given)")
    if check_layer:
        resolve_layer(skeleton, layer)


OUTPUT_FLAGS = ("scan_maps", "scan_dtype", "pictures", "masks", "boxes", "four_d", "compress", "normalized", "segment")


def with_output_options(config, args: argparse.Namespace):
    """The config with the output flags given on the command line (``None``: the config's)."""
    import dataclasses

    chosen = {key: getattr(args, key) for key in OUTPUT_FLAGS if getattr(args, key, None) is not None}
    if not chosen:
        return config
    return dataclasses.replace(config, output=dataclasses.replace(config.output, **chosen))


def check_exists(option: str, path: str | None, what: str) -> None:
    """A missing input is a usage error at once, before the model is loaded."""
    if path is not None and not os.path.lexists(os.path.expanduser(path)):
        from ..errors import ImageNotFoundError

        raise ImageNotFoundError(f"{option} {path!r} does not exist; give {what}.")


def image_paths(args: argparse.Namespace) -> list[str]:
    """``--image`` (repeated) and ``--channels``: the case's scans, one per input channel, in order."""
    return [*(getattr(args, "image", None) or []), *(getattr(args, "channels", None) or [])]


def with_limits(config, args: argparse.Namespace):
    """The config with the resource limits given on the command line (absent: the defaults)."""
    from ..config import with_limits

    chosen = {key: getattr(args, flag) for flag, key in (("max_voxels", "max_voxels"),
                                                          ("max_activation_memory", "max_activation_bytes"))
              if hasattr(args, flag)}
    return with_limits(config, **chosen) if chosen else config
