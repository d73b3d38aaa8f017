"""Bad inputs get clear errors of builtin subclasses."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import medcam3d
from medcam3d.errors import InputError, Medcam3dError
from medcam3d.metrics import deletion_curve
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


# ------------------------------------------------------------------------ sizes, dtypes, devices
def test_empty_batch_is_refused(explainer):
    with pytest.raises(InputError, match="batch of size 0"):
        explainer(torch.randn(0, 1, 8, 8, 8), target=0)
    with pytest.raises(InputError, match="empty tensor"):
        explainer(torch.randn(1, 1, 0, 8, 8), target=0)


def test_float64_input_is_cast_to_the_model_dtype(explainer, caplog):
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = explainer(x, target="all")
    with caplog.at_level(logging.DEBUG, logger="medcam3d.model_io"):
        result = explainer(x.double(), target="all")
    assert "float64 cast to the model's torch.float32" in caplog.text
    torch.testing.assert_close(result.maps, expected.maps, rtol=0, atol=0)
    assert result.logits.dtype == torch.float32


def test_float32_input_runs_a_float64_model():
    model = gap_linear_cnn().double()
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    result = medcam3d.Explainer(model, layer="3")(x, target="all")
    reference = medcam3d.Explainer(gap_linear_cnn(), layer="3")(x, target="all")
    torch.testing.assert_close(result.maps, reference.maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_input_with_exact_values_is_cast(explainer, dtype):
    x = torch.randint(-1024 if dtype != torch.uint8 else 0, 255, (1, 1, 8, 8, 8),
                      generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = explainer(x.float(), target="all").maps
    torch.testing.assert_close(explainer(x, target="all").maps, expected, rtol=0, atol=0)


def test_integer_values_the_model_dtype_cannot_hold_are_refused(explainer):
    x = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int32)
    x[0, 0, 0, 0, 0] = 2**24 + 1  # not a float32
    with pytest.raises(InputError, match=r"int32 values in \[0, 16777217\].*float32"):
        explainer(x, target=0)
    ct = torch.full((1, 1, 8, 8, 8), 3000, dtype=torch.int16)  # CT: fine in float32, not in bfloat16
    explainer(ct, target=0)
    with pytest.raises(InputError, match="bfloat16"):
        medcam3d.Explainer(gap_linear_cnn().bfloat16(), layer="3")(ct, target=0)


@pytest.mark.parametrize("x", [torch.ones(1, 1, 8, 8, 8, dtype=torch.bool), torch.ones(1, 1, 8, 8, 8, dtype=torch.complex64)])
def test_bool_and_complex_inputs_are_refused(explainer, x):
    with pytest.raises(InputError, match=f"{x.dtype}.*no meaningful conversion"):
        explainer(x, target=0)


def test_input_errors_are_medcam3d_and_builtin_errors(explainer):
    with pytest.raises(InputError) as caught:
        explainer(torch.randn(0, 1, 8, 8, 8), target=0)
    assert isinstance(caught.value, Medcam3dError) and isinstance(caught.value, ValueError)


def test_metrics_check_inputs_the_same_way():
    model = gap_linear_cnn()
    heat = torch.rand(4, 4, 4)
    with pytest.raises(InputError, match="batch of size 0"):
        deletion_curve(model, torch.randn(0, 1, 8, 8, 8), heat, 0)
    curve = deletion_curve(model, torch.rand(1, 1, 8, 8, 8, dtype=torch.float64), heat, 0, steps=2)
    assert np.isfinite(curve.scores).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_input_on_another_device_is_moved_to_the_model():
    model = gap_linear_cnn().cuda()
    x = torch.randn(1, 1, 8, 8, 8)
    result = medcam3d.Explainer(model, layer="3")(x, target="all")  # CPU input, CUDA model
    assert result.maps.device.type == "cuda"
    reference = medcam3d.Explainer(gap_linear_cnn(), layer="3")(x, target="all")
    torch.testing.assert_close(result.maps.cpu(), reference.maps, rtol=1e-4, atol=1e-5)
    on_gpu = medcam3d.Explainer(gap_linear_cnn(), layer="3")(x.cuda(), target="all")  # CUDA input, CPU model
    assert on_gpu.maps.device.type == "cpu"


class _FixedSize(torch.nn.Module):
    """Takes 16³ inputs only (its Linear is sized for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], 4 * 8 * 8 * 8))


@pytest.mark.parametrize("scripted", [False, True])
def test_a_model_that_refuses_the_input_size_is_a_one_line_input_error(scripted, tmp_path, capsys):
    from medcam3d.cli import main
    from medcam3d.errors import InputError, ModelForwardError

    torch.manual_seed(0)
    model = _FixedSize().eval()
    model = torch.jit.script(model) if scripted else model
    explainer = medcam3d.Explainer(model, layer="conv")
    assert explainer(torch.rand(1, 1, 16, 16, 16), target=0).maps.shape[-3:] == (8, 8, 8)
    with pytest.raises(ModelForwardError, match=r"input of shape \(1, 1, 24, 24, 24\).*shape '\[1, 2048\]' is invalid") as caught:
        explainer(torch.rand(1, 1, 24, 24, 24), target=0)
    assert isinstance(caught.value, InputError) and isinstance(caught.value, RuntimeError)
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)
    if scripted:  # the CLI: exit 2, one line that says what to check
        torch.jit.save(model, tmp_path / "net.pt")
        (tmp_path / "net.yaml").write_text(
            "model: {torchscript: net.pt}\ntask: multilabel\nclass_names: [a, b]\nlayer: conv\n"
            "preprocessing:\n  - {name: ResizeWithPadOrCrop, spatial_size: [24, 24, 24]}\n")
        from medcam3d import io
        from medcam3d.space import Space

        io.write(tmp_path / "scan.nii.gz", np.zeros((20, 20, 20), np.float32), Space((20, 20, 20), np.eye(4)))
        code = main(["explain", "--trust", "--config", str(tmp_path / "net.yaml"), "--image",
                     str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "spatial_size" in err[0] and "2048" in err[0], err
        assert not (tmp_path / "out" / "scan").exists()
