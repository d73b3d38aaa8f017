"""Every shipped config parses, builds its network, and explains an input of its preprocessed size;
none of them runs a randomly initialised network without saying ``weights: none``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medcam3d
from medcam3d.config import load_config, parse_config
from medcam3d.errors import ConfigError
from medcam3d.models import load_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
#: Configs that name a weights file shipped in data_samples/.
SHIPPED_WEIGHTS = {"demo", "demo_weak"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_explains(path):
    config = load_config(path)
    model = load_model(config)
    size = [64, 64, 48]
    for step in config.preprocessing or []:
        size = step.get("spatial_size", size)
    if config.sliding_window is not None:
        size = list(config.sliding_window.roi)
    size = [min(s, 64) if config.sliding_window is None else s for s in size]
    size = [max(32, (s // 32) * 32) for s in size]
    channels = config.model.args.get("in_channels", config.model.args.get("n_input_channels", 1)) if config.model.args else 1
    x = torch.randn(1, channels, *size)
    result = medcam3d.Explainer(model, config.method, config.layer, class_names=config.class_names)(x, config.target)
    assert result.maps.ndim == 5 and torch.isfinite(result.maps).all()
    if config.class_names:
        assert all(i < len(config.class_names) for i in result.class_indices.flatten().tolist())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_name_their_weights_or_say_none(path):
    """No shipped config runs random parameters silently: a weights file, or ``weights: none`` on purpose."""
    import yaml

    config = load_config(path)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))["model"].get("weights")
    if path.stem in SHIPPED_WEIGHTS:  # the demo models, whose weights the repository ships
        assert config.model.weights is not None and config.model.weights.is_file() and not config.model.random_weights
    else:
        assert written == "none" and config.model.random_weights and config.model.weights is None
    # the same template with its `weights` line removed is refused when it is loaded
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("  weights:"))
    stripped = parse_yaml_config(text, path)
    assert stripped.model.weights is None and not stripped.model.random_weights
    with pytest.raises(ConfigError, match=f"{path}: model.weights is missing"):
        load_model(stripped)


def parse_yaml_config(text: str, source: Path):
    """A config from YAML text, as if read from ``source`` (relative paths resolve next to it)."""
    import yaml

    return parse_config(yaml.safe_load(text), source=source)
