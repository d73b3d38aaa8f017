"""Mixed precision: bf16 autocast on CPU agrees with fp32 on the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medcam3d
from medcam3d.config import load_config
from medcam3d.models import load_model
from medcam3d.preprocess import preprocess

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "cam"])
def test_bf16_maps_agree_with_fp32_on_the_demo_model(method):
    config = load_config(ROOT / "configs" / "demo.yaml")
    model = load_model(config)
    x, _ = preprocess(ROOT / "data_samples" / "case_01.nii.gz", config.preprocessing)
    full = medcam3d.Explainer(model, method)(x[None], "all", relu=False)
    half = medcam3d.Explainer(model, method, amp="bf16")(x[None], "all", relu=False)
    assert half.maps.dtype == torch.float32
    assert not torch.equal(full.logits, half.logits)  # autocast really ran in bf16
    for c in range(full.maps.shape[1]):
        pair = torch.stack([full.maps[0, c].flatten(), half.maps[0, c].flatten()])
        assert torch.corrcoef(pair)[0, 1] >= 0.99


def test_unknown_amp_is_refused():
    with pytest.raises(ValueError, match="amp must be one of"):
        medcam3d.Explainer(torch.nn.Conv3d(1, 1, 1), amp="int8")
