"""A trained segmenter's files: a plain medcam3d config, a ``state_dict`` and how it was made (:func:`save_segmenter`), and reading them back (:func:`load_segmenter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._json import json_values
from ..errors import ConfigError
from .training import WeakSegmenter

__all__ = ["load_segmenter", "save_segmenter"]


def save_segmenter(segmenter: WeakSegmenter, config_path: str | Path, *, preprocessing: list[dict] | None,
                   weights_name: str | None = None) -> tuple[Path, Path, Path]:
    """Write the segmenter as a medcam3d config, a ``state_dict`` and a JSON of how it was made.

    Parameters
    ----------
    segmenter : WeakSegmenter
    config_path : path
        ``<name>.yaml``; the weights go to ``<name>.pt`` beside it (or ``weights_name``) and the
        provenance to ``<name>.json``.
    preprocessing : list of dict or None
        The classifier's preprocessing (the segmenter sees the same grid).

    Returns
    -------
    (config, weights, provenance) paths
    """
    import yaml

    from .._files import atomic_write, atomic_write_text

    config_path = Path(config_path)
    weights_path = config_path.with_name(weights_name or config_path.stem + ".pt")
    info_path = config_path.with_suffix(".json")
    state = {k: v.detach().cpu().contiguous() for k, v in segmenter.model.state_dict().items()}
    atomic_write(weights_path, lambda temp: torch.save(state, temp))
    config = {
        "model": {"network": segmenter.network, "args": json_values(segmenter.args), "weights": weights_path.name},
        "task": "segmentation",
        "class_names": ["background", *segmenter.class_names],
        "layer": "auto",
        "method": "hirescam",
        "target": list(range(1, len(segmenter.class_names) + 1)),
        "output_activation": "none",
    }
    if preprocessing is not None:
        config["preprocessing"] = json_values(list(preprocessing))
    head = ("# A weakly-supervised segmenter trained by `medcam3d weak-train` (seed, expand, constrain; image labels\n"
            f"# only). How it was made: {info_path.name}. Use: medcam3d segment --config {config_path.name} --image SCAN --out OUT\n")
    atomic_write_text(config_path, head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120))
    info = {"network": segmenter.network, "args": json_values(segmenter.args), "class_names": segmenter.class_names,
            "input_space": {"shape": list(segmenter.input_space.shape),
                            "affine": np.asarray(segmenter.input_space.affine).round(6).tolist()},
            **json_values(segmenter.provenance), "history": segmenter.history}
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return config_path, weights_path, info_path


def load_segmenter(config_path: str | Path, *, trust: bool = False) -> tuple[Any, torch.nn.Module]:
    """A segmenter config and its network (weights loaded with ``weights_only=True``), in eval mode.

    Raises
    ------
    ConfigError
        The config's task is not ``segmentation`` or its network has not ``len(class_names)`` outputs.
    """
    from ..config import load_config
    from ..models import load_model

    config = load_config(config_path)
    if config.task != "segmentation":
        raise ConfigError(f"{config_path}: task is {config.task!r}; a segmenter config has task: segmentation (write one "
                          "with medcam3d weak-train).")
    if not config.class_names or len(config.class_names) < 2:
        raise ConfigError(f"{config_path}: a segmenter config needs class_names [background, class0, ...].")
    model = load_model(config, trust=trust)
    return config, model.eval()
