"""Bad inputs get clear errors of builtin subclasses."""

from __future__ import annotations

import pytest
import torch

import medcam3d
from _models import gap_linear_cnn


@pytest.fixture
def explainer():
    return medcam3d.Explainer(gap_linear_cnn(), layer="3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(explainer, bad):
    x = torch.randn(1, 1, 8, 8, 8)
    x[0, 0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"1 NaN/Inf value.*nan_to_num"):
        explainer(x, target=0)


def test_missing_batch_axis(explainer):
    with pytest.raises(ValueError, match=r"x\[None\]"):
        explainer(torch.randn(1, 8, 8, 8), target=0)


def test_not_a_tensor(explainer):
    with pytest.raises(ValueError, match="torch.Tensor"):
        explainer([[1.0]], target=0)


def test_integer_input_is_converted(explainer):
    x = torch.randint(0, 255, (1, 1, 8, 8, 8), dtype=torch.uint8)
    assert explainer(x, target=0).maps.dtype == torch.float32


def test_inference_mode_is_refused(explainer):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        explainer(torch.randn(1, 1, 8, 8, 8), target=0)


def test_nan_model_output_is_reported():
    model = gap_linear_cnn()
    with torch.no_grad():
        model[-1].bias[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf outputs"):
        medcam3d.Explainer(model, layer="3")(torch.randn(1, 1, 8, 8, 8), target=1)
