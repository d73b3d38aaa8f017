"""Sanity checks: similarity measures, Guided Backprop's rule, and the cascading model-parameter
randomization test (HiResCAM passes, Guided Backprop fails; the user's model is untouched)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medcam3d.metrics import guided_backprop, guided_gradcam, randomization_test, spearman, ssim
from medcam3d.metrics.sanity import method_maps
from _models import gap_linear_cnn

SIZE = 20


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5], [1, 2, 3, 4])[0, 1])
    assert spearman(np.zeros(5), np.zeros(5)) == 1.0  # constant maps: defined, no NaN
    assert spearman(np.zeros(5), np.arange(5)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        spearman(np.zeros(3), np.zeros(4))


def test_ssim_3d():
    rng = np.random.default_rng(0)
    a = rng.random((12, 12, 12))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(np.zeros((6, 6, 6)), np.zeros((6, 6, 6))) == pytest.approx(1.0)
    assert ssim(a, 1 - a, data_range=1.0) < 0
    noisy = ssim(a, np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1), data_range=1.0)
    assert 0 < noisy < 0.9
    assert ssim(a[:, :, 0], a[:, :, 0]) == pytest.approx(1.0)  # 2D too


def reference_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """SSIM written out in float64: Gaussian window (scipy, mirrored edges) over every voxel."""
    from scipy.ndimage import gaussian_filter

    def smooth(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, sigma=sigma, mode="reflect", truncate=3.5)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = smooth(a), smooth(b)
    var_a, var_b, cov = smooth(a * a) - mu_a**2, smooth(b * b) - mu_b**2, smooth(a * b) - mu_a * mu_b
    return float((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean())


@pytest.mark.parametrize("shape, sigma", [((12, 12, 12), 1.5), ((3, 4, 5), 1.5), ((16, 9, 11), 0.8), ((14, 10), 1.5)])
def test_ssim_matches_the_formula_on_maps_smaller_and_larger_than_the_window(shape, sigma):
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(0.6 * a + 0.4 * rng.random(shape), 0, 1)
    expected = reference_ssim(a, b, sigma=sigma)
    assert ssim(a, b, sigma=sigma, data_range=1.0) == pytest.approx(expected, abs=1e-5)
    assert ssim(1000 * a, 1000 * b, sigma=sigma, data_range=1000.0) == pytest.approx(expected, abs=1e-5)  # scale-free
    with pytest.raises(ValueError, match="2D or 3D"):
        ssim(a.ravel(), b.ravel())


def test_randomization_leaves_the_callers_random_state_alone():
    model = gap_linear_cnn(classes=3)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = randomization_test(model, x, 0, methods=("hirescam",), layer="3")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another caller state: the same report (the test's seed decides)
    second = randomization_test(model, x, 0, methods=("hirescam",), layer="3")
    np.testing.assert_array_equal(first.spearman["hirescam"], second.spearman["hirescam"])
    different = randomization_test(model, x, 0, methods=("hirescam",), layer="3", seed=1)
    assert not np.array_equal(first.spearman["hirescam"], different.spearman["hirescam"])


def test_guided_backprop_applies_the_guided_rule_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).eval()
    x = torch.randn(1, 1, 2, 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="fails the model-parameter randomization test"):
        result = guided_backprop(model, x, 1)
    w1, b1, w2 = model[1].weight.detach(), model[1].bias.detach(), model[3].weight.detach()
    hidden = x.flatten() @ w1.T + b1
    expected = w1.T @ ((hidden > 0).float() * w2[1].clamp_min(0))  # positive gradients through open units
    torch.testing.assert_close(result.flatten(), expected)
    # the user's model is untouched: weights, inplace flag, no gradients
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[2].inplace is True and all(p.grad is None for p in model.parameters())
    assert not model[2]._backward_hooks and not model[2]._forward_hooks


def test_guided_gradcam_warns_and_lives_on_the_input_grid():
    model = gap_linear_cnn(classes=3)
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="inherits Guided Backprop.s failure of the model-parameter randomization test"):
        result = guided_gradcam(model, x, 2, layer="3")
    assert result.shape == (2, 8, 8, 8) and torch.isfinite(result).all()


def wide_model(seed: int = 0) -> nn.Sequential:
    """Conv(1→32) → ReLU → Conv(stride 2) → ReLU → Conv → ReLU → GAP → Linear(32, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv3d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 3),
    ).eval()


def structured_volume(seed: int = 1) -> torch.Tensor:
    """Noise plus three blobs (bright, dark, bright): (1, 1, 20, 20, 20)."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(1, 1, SIZE, SIZE, SIZE, generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(SIZE))] * 3, indexing="ij"))
    for centre, radius, value in (((6, 11, 9), 4, 1.0), ((14, 6, 12), 3, -0.7), ((13, 14, 5), 2.5, 0.8)):
        inside = ((grid - torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2
        x[0, 0][inside] += value
    return x


def test_randomization_hirescam_passes_guided_backprop_fails_model_untouched():
    model = wide_model(0)
    x = structured_volume()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = randomization_test(model, x, 1, methods=("hirescam", "gradcam", "guided_backprop"), seed=0)
    assert sum("Guided Backprop fails" in str(w.message) for w in caught) == 1  # once, not per step
    bound = 0.5
    assert abs(report.final_spearman("hirescam")) < bound
    assert abs(report.final_spearman("gradcam")) < bound
    assert report.final_spearman("guided_backprop") > bound
    assert report.ssim["guided_backprop"][-1] > report.ssim["hirescam"][-1]
    assert report.passes("hirescam") and report.passes("gradcam") and not report.passes("guided_backprop")
    # cascade: output first, cumulative, every parameterized module randomized at the end
    assert report.steps == ["8", "4", "2", "0"]
    assert report.randomized[0] == ["8"] and report.randomized[-1] == ["8", "4", "2", "0"]
    assert report.layer == "5" and report.grid_shape == (10, 10, 10)  # guided maps compared on the CAM grid
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    table = report.to_markdown()
    assert "| guided_backprop |" in table and "**FAILS**" in table and table.count("passes") == 2
    assert len(report.rows()) == 3 * 4


def test_randomization_steps_can_be_grouped():
    model = wide_model(1)
    x = structured_volume()
    report = randomization_test(model, x, 0, methods=("hirescam",), max_steps=2, relu=True)
    assert len(report.steps) == 2 and report.randomized[0] == ["8", "4"] and report.relu is True
    assert report.spearman["hirescam"].shape == (2,) and np.all(np.isfinite(report.ssim["hirescam"]))


def test_method_maps_shapes():
    model = gap_linear_cnn(classes=3)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    assert method_maps(model, "hirescam", x, 0, layer="3").shape == (1, 4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        magnitude = method_maps(model, "guided_backprop", x, 0)
        assert magnitude.shape == (1, 8, 8, 8) and magnitude.min() >= 0
        pooled = method_maps(model, "guided_backprop", x, 0, grid_shape=(4, 4, 4))
        np.testing.assert_allclose(pooled[0, 1, 2, 3], magnitude[0, 2:4, 4:6, 6:8].mean(), rtol=1e-5)
