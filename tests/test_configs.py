"""Every shipped config parses, builds its network, and explains an input of its preprocessed size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medcam3d
from medcam3d.config import load_config
from medcam3d.models import load_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


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
