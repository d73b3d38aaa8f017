"""The methods beyond one layer: gradient × input, SmoothGrad, Integrated Gradients, occlusion,
Score-CAM and multi-layer fusion. Exact identities against independent references, all classes vs
one by one, per-sample targets, budgets, the scanner-space path, the randomization check, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import nn

import medcam3d
from medcam3d.errors import MethodBudgetError, UsageError
from medcam3d.methods import (
    FusedCAM,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    ScoreCAM,
    SmoothGrad,
    get_method,
    split_methods,
)
from medcam3d.methods.fused import stage_outputs
from medcam3d.methods.passes import gaussian_blur
from _models import reference_activations_and_gradients, resnet18_3d

NEW = ["fused", "gradxinput", "smoothgrad", "integrated_gradients", "occlusion", "scorecam"]


def fast(name: str):
    """Each new method with settings small enough for unit tests (defaults otherwise)."""
    return {
        "smoothgrad": SmoothGrad(samples=3, batch_size=2),
        "integrated_gradients": IntegratedGradients(steps=4, batch_size=3, tolerance=math.inf),
        "occlusion": Occlusion(patch=4, stride=4, batch_size=16),
        "scorecam": ScoreCAM(channels=5, batch_size=4),
    }.get(name, name)


def small_cnn(classes: int = 3, seed: int = 0, smooth: bool = False) -> nn.Sequential:
    """Conv → act → Conv(stride 2) → act → GAP → Linear; layers "1" (full grid) and "3" (half grid)."""
    torch.manual_seed(seed)
    act = nn.Softplus if smooth else nn.ReLU
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), act(), nn.Conv3d(4, 6, 3, stride=2, padding=1), act(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, classes),
    ).eval()


def inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ baselines
@pytest.mark.parametrize("sigma", [1.0, 2.5, (0.0, 1.5, 3.0)])
def test_gaussian_blur_matches_scipy(sigma):
    x = inputs(2, 3, 11, 9, 14)
    ours = gaussian_blur(x, sigma).numpy()
    sigmas = (0.0, 0.0, *sigma) if isinstance(sigma, tuple) else (0.0, 0.0, sigma, sigma, sigma)
    expected = ndi.gaussian_filter(x.numpy().astype(np.float64), sigmas, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, expected, atol=2e-3)  # scipy truncates at ⌊3σ + 0.5⌋, we at ⌈3σ⌉
    if not isinstance(sigma, tuple):
        assert np.abs(ours - x.numpy()).max() > 0.1  # it blurs


# ---------------------------------------------------------------------- exact identities
class Linear3d(nn.Module):
    """``logits = W · flatten(x) + b`` for inputs (B, 2, 5, 6, 4): the gradient is W everywhere."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(2 * 5 * 6 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(start_dim=1))


@pytest.mark.parametrize("baseline", ["zero", "blur", "mean", 0.25])
def test_gradxinput_on_linear_model_is_weight_times_contrast(baseline):
    model = Linear3d()
    x = inputs(2, 2, 5, 6, 4)
    result = medcam3d.Explainer(model, GradientXInput(baseline=baseline, sigma=1.5))(x, "all", relu=False)
    weight = model.linear.weight.detach().reshape(3, 2, 5, 6, 4)
    if baseline == "zero":
        reference = torch.zeros_like(x)
    elif baseline == "blur":
        reference = torch.from_numpy(ndi.gaussian_filter(x.numpy().astype(np.float64), (0, 0, 1.5, 1.5, 1.5),
                                                         mode="nearest", truncate=3.0)).float()
    elif baseline == "mean":
        reference = x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
    else:
        reference = torch.full_like(x, 0.25)
    expected = (weight.unsqueeze(0) * (x - reference).unsqueeze(1)).sum(dim=2)  # Σ over input channels
    assert result.layer == "input" and result.maps.shape == (2, 3, 5, 6, 4)
    torch.testing.assert_close(result.maps, expected, rtol=1e-4, atol=2e-3 if baseline == "blur" else 1e-5)
    # the linear model's logit change is exactly the map's sum
    change = result.logits - model(reference).detach()
    torch.testing.assert_close(result.maps.flatten(start_dim=2).sum(dim=2), change, rtol=1e-4,
                               atol=2e-2 if baseline == "blur" else 1e-4)


def test_integrated_gradients_equals_gradxinput_on_linear_model():
    model = Linear3d()
    x = inputs(2, 2, 5, 6, 4, seed=1)
    integrated = medcam3d.Explainer(model, IntegratedGradients(steps=3))(x, "all", relu=False)
    plain = medcam3d.Explainer(model, GradientXInput())(x, "all", relu=False)
    torch.testing.assert_close(integrated.maps, plain.maps, rtol=1e-5, atol=1e-6)
    assert float(integrated.diagnostics["relative_completeness_error"].max()) < 1e-5


def test_integrated_gradients_is_complete_on_a_smooth_model():
    model = small_cnn(smooth=True)
    x = inputs(2, 1, 10, 8, 12, seed=2) * 3
    method = IntegratedGradients(steps=32, baseline="zero")
    result = medcam3d.Explainer(model, method)(x, "all", relu=False)
    # independent: the logits at the input and at the baseline, straight from the model
    with torch.no_grad():
        change = model(x) - model(torch.zeros_like(x))
    sums = result.maps.flatten(start_dim=2).sum(dim=2)
    assert float((sums - change).abs().max() / change.abs().max()) < 1e-3
    torch.testing.assert_close(result.diagnostics["score_change"], change, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.diagnostics["completeness_error"], sums - change, rtol=1e-4, atol=1e-6)
    # too few steps on a curved path: the error is measured and reported
    with pytest.warns(UserWarning, match="use more steps"):
        coarse = medcam3d.Explainer(model, IntegratedGradients(steps=1, baseline="zero", tolerance=1e-4))(x, "all")
    assert float(coarse.diagnostics["relative_completeness_error"].max()) > 1e-4


def test_smoothgrad_without_noise_equals_gradxinput():
    model = small_cnn()
    x = inputs(2, 1, 10, 8, 12, seed=3)
    smooth = medcam3d.Explainer(model, SmoothGrad(samples=4, noise=0.0, batch_size=3))(x, "all", relu=False)
    plain = medcam3d.Explainer(model, GradientXInput())(x, "all", relu=False)
    torch.testing.assert_close(smooth.maps, plain.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(smooth.logits, plain.logits)


def test_smoothgrad_is_seeded_and_independent_of_batch_size():
    model = small_cnn()
    x = inputs(2, 1, 10, 8, 12, seed=4)
    one = medcam3d.Explainer(model, SmoothGrad(samples=5, batch_size=1))(x, "all", relu=False).maps
    many = medcam3d.Explainer(model, SmoothGrad(samples=5, batch_size=7))(x, "all", relu=False).maps
    other = medcam3d.Explainer(model, SmoothGrad(samples=5, seed=1))(x, "all", relu=False).maps
    noiseless = medcam3d.Explainer(model, SmoothGrad(samples=5, noise=0.0))(x, "all", relu=False).maps
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(one, other) and not torch.allclose(one, noiseless)


class RegionSum(nn.Module):
    """``logit_c = Σ_{v ∈ R_c} x[:, 0, v]`` for fixed regions R_c (a model whose evidence is known)."""

    def __init__(self, regions: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("regions", regions.float())  # (C, *spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] * self.regions.unsqueeze(0)).flatten(start_dim=2).sum(dim=2)


def region_model(shape=(8, 12, 10)) -> RegionSum:
    regions = torch.zeros(2, *shape)
    regions[0, 1:5, 2:9, 3:7] = 1
    regions[1, 4:8, 0:5, 5:10] = 1
    return RegionSum(regions).eval()


def test_occlusion_on_a_region_sum_model_equals_the_patch_sums():
    model = region_model()
    x = inputs(2, 1, 8, 12, 10, seed=5)
    result = medcam3d.Explainer(model, Occlusion(patch=(4, 4, 5), stride=(4, 4, 5), baseline="zero"))(x, "all", relu=False)
    expected = torch.zeros(2, 2, 8, 12, 10)
    for i in range(0, 8, 4):
        for j in range(0, 12, 4):
            for k in range(0, 10, 5):
                window = (slice(i, i + 4), slice(j, j + 4), slice(k, k + 5))
                for c in range(2):
                    expected[(slice(None), c, *window)] = (x[(slice(None), 0, *window)] * model.regions[(c, *window)]
                                                            ).flatten(start_dim=1).sum(1).reshape(2, 1, 1, 1)
    torch.testing.assert_close(result.maps, expected, rtol=1e-5, atol=1e-5)
    assert result.layer == "input" and result.diagnostics["forwards"] == 2 * 12 + 1


def test_occlusion_with_overlapping_patches_averages_the_covering_patches():
    model = region_model((6, 7, 5))
    x = inputs(1, 1, 6, 7, 5, seed=6)
    method = Occlusion(patch=(3, 3, 2), stride=(2, 2, 2), baseline=0.5)
    result = medcam3d.Explainer(model, method)(x, 1, relu=False)
    starts = [[0, 2, 3], [0, 2, 4], [0, 2, 3]]  # every stride, plus one flush with the far edge
    total, count = torch.zeros(6, 7, 5), torch.zeros(6, 7, 5)
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                window = (slice(i, i + 3), slice(j, j + 3), slice(k, k + 2))
                occluded = x.clone()
                occluded[(0, 0, *window)] = 0.5
                total[window] += float(model(x)[0, 1] - model(occluded)[0, 1])
                count[window] += 1
    torch.testing.assert_close(result.maps[0, 0], total / count, rtol=1e-5, atol=1e-5)


def test_occlusion_refuses_a_budget_overrun_before_any_work():
    calls = []
    model = small_cnn()
    model[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(MethodBudgetError, match=r"would run 3375 forward passes .* max_forwards=1000: use a larger patch"):
        medcam3d.Explainer(model, Occlusion(max_forwards=1000))(inputs(1, 1, 16, 16, 16), "all")
    assert calls == []
    medcam3d.Explainer(model, Occlusion(patch=8, stride=8, batch_size=8))(inputs(1, 1, 16, 16, 16), "all")
    assert len(calls) == 2  # the hook sees the passes: the clean one, then the 8 occluded copies in one batch


def score_cam_reference(model, layer, x, classes, channels):
    """Score-CAM with logits from its formula, one channel at a time (zero baseline)."""
    A, _ = reference_activations_and_gradients(model, layer, x, lambda out: out.sum())
    A = A[0]
    order = A.flatten(start_dim=1).std(dim=1).argsort(descending=True)[:channels]
    with torch.no_grad():
        empty = model(torch.zeros_like(x))[0]
        maps = torch.zeros(len(classes), *A.shape[1:])
        for k in order.tolist():
            mask = F.interpolate(A[k][None, None], size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
            mask = (mask - mask.min()) / (mask.max() - mask.min())
            gain = model(x * mask)[0] - empty
            for t, c in enumerate(classes):
                maps[t] += gain[c] * A[k]
    return maps


def test_scorecam_matches_its_formula_and_caps_channels():
    model = small_cnn(classes=4)
    x = inputs(1, 1, 10, 8, 12, seed=7)
    explainer = medcam3d.Explainer(model, ScoreCAM(channels=4, batch_size=3), layer="3", placement="align_corners")
    result = explainer(x, [2, 0], relu=False)
    assert result.layer == "3" and result.maps.shape == (1, 2, 5, 4, 6)
    assert result.diagnostics["channels_used"] == 4 and result.diagnostics["channels"] == 6
    torch.testing.assert_close(result.maps[0], score_cam_reference(model, "3", x, [2, 0], 4), rtol=1e-4, atol=1e-5)
    with pytest.raises(MethodBudgetError, match="6 channels of layer '3' x 1 samples"):
        medcam3d.Explainer(model, ScoreCAM(channels=None, max_forwards=5), layer="3")(x, 0)


def stage_map(A, G, cam):
    weights = G if cam == "hirescam" else torch.relu(G)
    stage = torch.relu((weights * A).sum(0))
    return stage / stage.max()


@pytest.mark.parametrize("cam, combine", [("hirescam", "product"), ("layercam", "mean")])
def test_fused_on_a_two_stage_model_equals_the_hand_combined_maps(cam, combine):
    model = small_cnn(classes=3, seed=1)
    x = inputs(1, 1, 10, 8, 12, seed=8)
    explainer = medcam3d.Explainer(model, FusedCAM(cam=cam, combine=combine), layer="3", placement="align_corners")
    result = explainer(x, [1, 2], relu=False)
    assert result.layer == "1+3" and result.maps.shape == (1, 2, 10, 8, 12)
    assert result.diagnostics["stages"] == ["1", "3"]
    for t, c in enumerate([1, 2]):
        fine = stage_map(*[v[0] for v in reference_activations_and_gradients(model, "1", x, lambda o: o[:, c].sum())], cam)
        coarse = stage_map(*[v[0] for v in reference_activations_and_gradients(model, "3", x, lambda o: o[:, c].sum())], cam)
        # the coarse grid's cells centred on the input voxels they cover, edges repeated
        coarse = F.interpolate(coarse[None, None], size=(10, 8, 12), mode="trilinear", align_corners=False)[0, 0]
        expected = torch.sqrt(fine * coarse) if combine == "product" else (fine + coarse) / 2
        torch.testing.assert_close(result.maps[0, t], expected, rtol=1e-4, atol=1e-5)


def test_fused_resamples_each_stage_from_its_receptive_field():
    from medcam3d.layers import receptive_field
    from medcam3d.space import Space, feature_space, resample

    model = small_cnn(classes=3, seed=1)
    x = inputs(1, 1, 10, 8, 12, seed=8)
    result = medcam3d.Explainer(model, FusedCAM(combine="mean"), layer="3")(x, 1, relu=False)
    field = receptive_field(model, "3", (1, 10, 8, 12))
    assert field.offset == (0.0, 0.0, 0.0) and field.step == (2.0, 2.0, 2.0)  # not the convention's 0.5
    assert result.placement == "receptive_field" and result.receptive_field.step == (1.0, 1.0, 1.0)
    fine = stage_map(*[v[0] for v in reference_activations_and_gradients(model, "1", x, lambda o: o[:, 1].sum())], "hirescam")
    coarse = stage_map(*[v[0] for v in reference_activations_and_gradients(model, "3", x, lambda o: o[:, 1].sum())], "hirescam")
    # cell u of the coarse grid sits on input voxel 2u: linear between those, the last cell repeated beyond
    grid = feature_space(Space((10, 8, 12), np.eye(4)), (5, 4, 6), receptive_field=field)
    inside = resample(coarse, grid, Space((9, 7, 11), np.eye(4)))
    torch.testing.assert_close(result.maps[0, 0, :9, :7, :11], (fine[:9, :7, :11] + inside) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.maps[0, 0, 9, 0, 0], (fine[9, 0, 0] + coarse[4, 0, 0]) / 2, rtol=1e-4, atol=1e-5)


def test_fused_finds_the_stages_of_a_resnet():
    model = resnet18_3d(classes=3)
    x = inputs(1, 1, 37, 45, 29, seed=9)
    result = medcam3d.Explainer(model, "fused")(x, 1)
    assert result.diagnostics["stages"] == ["act", "layer1", "layer2", "layer3", "layer4"]
    assert result.feature_shape == (37, 45, 29) and float(result.maps.max()) > 0
    chosen = medcam3d.Explainer(model, FusedCAM(layers=["layer3", "layer4"]))(x, 1)
    assert chosen.layer == "layer3+layer4" and chosen.feature_shape == (5, 6, 4)


def test_stage_outputs_keep_the_last_layer_of_each_resolution():
    records = [("stem", (32, 32)), ("stem.relu", (32, 32)), ("pool", (16, 16)), ("block1", (16, 16)),
               ("down", (8, 8)), ("block2", (8, 8)), ("up", (16, 16)), ("head", (16, 16)), ("after", (4, 4))]
    assert stage_outputs(records, "block2") == ["stem.relu", "block1", "block2"]
    # a decoder back at a finer size: its last layer stands for that size
    assert stage_outputs(records, "head") == ["stem.relu", "block2", "head"]
    with pytest.raises(medcam3d.LayerError, match="no spatial output"):
        stage_outputs(records, "missing")


# ------------------------------------------------------------- classes, batches, targets
@pytest.mark.parametrize("name", NEW)
def test_all_classes_equal_one_by_one(name):
    model = small_cnn(classes=3, seed=2)
    x = inputs(2, 1, 8, 8, 8, seed=10)
    explainer = medcam3d.Explainer(model, fast(name))
    together = explainer(x, target="all", relu=False)
    assert together.targets == [0, 1, 2] and together.maps.shape[:2] == (2, 3)
    assert float(together.maps.abs().max()) > 0
    for c in range(3):
        alone = explainer(x, target=c, relu=False)
        torch.testing.assert_close(together.maps[:, c], alone.maps[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.scores[:, c], alone.scores[:, 0])


@pytest.mark.parametrize("name", ["gradxinput", "integrated_gradients", "fused"])
def test_one_batched_backward_equals_the_loop_over_classes(name):
    model = small_cnn(classes=4, seed=9)
    x = inputs(2, 1, 8, 8, 8, seed=17)
    batched = medcam3d.Explainer(model, fast(name))
    looped = medcam3d.Explainer(model, fast(name))
    looped._batched_vjp = False
    torch.testing.assert_close(batched(x, "all", relu=False).maps, looped(x, "all", relu=False).maps, rtol=1e-5, atol=1e-6)
    assert batched._batched_vjp  # the batched path was taken


@pytest.mark.parametrize("name", NEW)
def test_per_sample_targets_equal_samples_one_by_one(name):
    model = small_cnn(classes=3, seed=3)
    x = inputs(3, 1, 8, 8, 8, seed=11)
    explainer = medcam3d.Explainer(model, fast(name))
    classes = torch.tensor([2, 0, 1])
    batch = explainer(x, target=classes)
    assert batch.targets == [[2], [0], [1]]
    for b in range(3):
        alone = explainer(x[b : b + 1], target=int(classes[b]))
        torch.testing.assert_close(batch.maps[b], alone.maps[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch.scores[b, 0], alone.logits[0, int(classes[b])])


@pytest.mark.parametrize("name", ["gradxinput", "integrated_gradients", "occlusion"])
def test_predicted_target_is_the_clean_prediction(name):
    model = small_cnn(classes=3, seed=4)
    x = inputs(3, 1, 8, 8, 8, seed=12)
    result = medcam3d.Explainer(model, fast(name))(x, target="predicted")
    with torch.no_grad():
        assert result.class_indices[:, 0].tolist() == model(x).argmax(1).tolist()


@pytest.mark.parametrize("name", ["gradxinput", "occlusion", "fused"])
def test_one_sliding_window_over_the_whole_input_equals_the_direct_call(name):
    from medcam3d.sliding import explain_sliding_window

    model = small_cnn(classes=3, seed=5)
    x = inputs(1, 1, 8, 8, 8, seed=13)
    explainer = medcam3d.Explainer(model, fast(name))
    direct = explainer(x, "all")
    windowed = explain_sliding_window(explainer, x, "all", roi_size=8, mode="constant")
    torch.testing.assert_close(windowed.maps, direct.maps, rtol=1e-4, atol=1e-6)


def test_input_level_maps_land_in_scanner_space_through_the_input_affine():
    from monai.data import MetaTensor

    from medcam3d.space import Space

    model = region_model((8, 12, 10))
    affine = torch.tensor([[0.0, 0.0, 2.0, -30.0], [1.5, 0.0, 0.0, 12.0], [0.0, -1.0, 0.0, 40.0], [0, 0, 0, 1]],
                          dtype=torch.float64)
    x = torch.zeros(1, 1, 8, 12, 10)
    x[0, 0, 3, 7, 6] = 1.0  # one bright voxel inside region 0 only
    result = medcam3d.Explainer(model, GradientXInput(baseline="zero"))(MetaTensor(x, affine=affine), 0)
    heat = result.feature_maps()[0]
    np.testing.assert_allclose(heat.space.affine, affine.numpy())  # the input grid itself: no shift, no scaling
    voxel, world = heat.peak()
    assert voxel == (3, 7, 6)
    np.testing.assert_allclose(world, (affine.numpy() @ [3, 7, 6, 1])[:3])
    # a scan at half the spacing: the map is resampled onto it, its peak stays at the same place
    scan = Space((16, 24, 20), affine.numpy() @ np.diag([0.5, 0.5, 0.5, 1.0]))
    on_scan = result.to_scanner_space(scan)[0]
    assert on_scan.data.shape == (16, 24, 20)
    assert on_scan.peak()[0] == (6, 14, 12) and abs(float(on_scan.data.max()) - 1.0) < 1e-6
    assert abs(float(on_scan.data[7, 14, 12]) - 0.5) < 1e-6  # half-way to the next input voxel: linear


# ---------------------------------------------------------------------- sanity check
def test_randomization_test_decorrelates_every_new_method():
    from medcam3d.metrics import randomization_test

    model = small_cnn(classes=3, seed=6)
    x = inputs(1, 1, 12, 12, 12, seed=14)
    methods = ["fused", "gradxinput", "smoothgrad(samples=3)", "integrated_gradients(steps=4, tolerance=1e9)",
               "occlusion(patch=4, stride=4)", "scorecam(channels=4)"]
    report = randomization_test(model, x, 1, methods=methods, layer="3", max_steps=3)
    assert report.methods == methods
    for method in methods:
        assert abs(report.final_spearman(method)) < 0.6, (method, report.spearman[method])
        assert report.passes(method), (method, report.spearman[method])


# ------------------------------------------------------------------------ names, errors
def test_registry_names_aliases_and_specifications():
    assert set(NEW) <= set(medcam3d.METHODS)
    assert get_method("Integrated-Gradients").name == "integrated_gradients"
    assert get_method("IG").name == "integrated_gradients"
    assert get_method("gradient x input").name == "gradxinput"
    assert get_method("Score-CAM").name == "scorecam"
    method = get_method("occlusion(patch=16, stride=(8, 8, 4))")
    assert isinstance(method, Occlusion) and method.patch == 16 and method.stride == (8, 8, 4)
    assert get_method("smoothgrad(samples=32, noise=0.05)").samples == 32
    assert split_methods("hirescam, occlusion(patch=16, stride=8),ig") == ["hirescam", "occlusion(patch=16, stride=8)", "ig"]
    with pytest.raises(UsageError, match="'occlusion' has no parameter 'size': its parameters are patch, stride"):
        get_method("occlusion(size=3)")
    with pytest.raises(UsageError, match="'hirescam' has no parameter 'x': it takes none"):
        get_method("hirescam(x=1)")
    with pytest.raises(UsageError, match="key=value pairs"):
        get_method("occlusion(16)")
    with pytest.raises(UsageError, match="not a number, string, list or None"):
        get_method("occlusion(patch=__import__('os'))")
    with pytest.raises(medcam3d.MethodNotFoundError, match="Did you mean 'smoothgrad'"):
        get_method("smothgrad")


@pytest.mark.parametrize("build, match", [
    (lambda: SmoothGrad(samples=0), "samples must be an integer >= 1"),
    (lambda: SmoothGrad(noise=-0.1), "noise must be a finite number >= 0"),
    (lambda: GradientXInput(baseline="black"), "baseline must be one of 'blur', 'zero', 'mean' or a number"),
    (lambda: IntegratedGradients(steps=2.5), "steps must be an integer >= 1"),
    (lambda: Occlusion(patch=(4, 0, 4)), "patch must be a positive int"),
    (lambda: Occlusion(stride="2"), "stride must be a positive int"),
    (lambda: ScoreCAM(channels=0), "channels must be an integer >= 1"),
    (lambda: FusedCAM(layers="layer4"), "layers must be a non-empty list"),
    (lambda: FusedCAM(combine="max"), "combine must be one of product, mean"),
])
def test_bad_parameters_say_what_is_expected(build, match):
    with pytest.raises(UsageError, match=match):
        build()


def test_occlusion_patch_of_the_wrong_rank_is_refused():
    with pytest.raises(UsageError, match="patch must be a positive int or 3 positive ints"):
        medcam3d.Explainer(small_cnn(), Occlusion(patch=(4, 4)))(inputs(1, 1, 8, 8, 8), 0)


def test_fused_refuses_an_unknown_layer():
    with pytest.raises(medcam3d.LayerNotFoundError):
        medcam3d.Explainer(small_cnn(), FusedCAM(layers=["1", "nope"]))(inputs(1, 1, 8, 8, 8), 0)


@pytest.mark.parametrize("name", ["gradxinput", "occlusion", "scorecam"])
def test_a_torchscript_model_gives_the_plain_models_maps(name):
    model = small_cnn(classes=3, seed=8)
    scripted = torch.jit.script(small_cnn(classes=3, seed=8))
    x = inputs(1, 1, 8, 8, 8, seed=16)
    plain = medcam3d.Explainer(model, fast(name))(x, "all", relu=False)
    ours = medcam3d.Explainer(scripted, fast(name))(x, "all", relu=False)
    torch.testing.assert_close(ours.maps, plain.maps, rtol=1e-5, atol=1e-6)


def test_fused_refuses_several_layers_inside_a_torchscript_graph():
    scripted = torch.jit.script(small_cnn())
    with pytest.raises(medcam3d.LayerError, match="inside a TorchScript graph.*Explain the model before it is scripted"):
        medcam3d.Explainer(scripted, "fused", layer="3")(inputs(1, 1, 8, 8, 8), 0)


def test_the_user_model_is_left_as_it_was():
    model = small_cnn(classes=3, seed=7).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs(2, 1, 8, 8, 8, seed=15)
    for name in NEW:
        medcam3d.Explainer(model, fast(name))(x, "all")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_explain_with_every_new_method_on_a_sample(tmp_path, capsys):
    from pathlib import Path

    import nibabel as nib

    from medcam3d.cli import main

    root = Path(__file__).resolve().parents[1]
    methods = ("fused,gradxinput,smoothgrad(samples=2),integrated_gradients(steps=2, tolerance=1e9),"
               "occlusion(patch=32),scorecam(channels=4)")
    code = main(["explain", "--config", str(root / "configs" / "demo.yaml"), "--image",
                 str(root / "data_samples" / "case_02.nii.gz"), "--method", methods, "--target", "bright_round",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    folder = tmp_path / "case_02"
    source = nib.load(root / "data_samples" / "case_02.nii.gz")
    for name in NEW:
        heat = nib.load(folder / f"case_02_{name}_bright_round.nii.gz")
        assert heat.shape == source.shape, name
        np.testing.assert_allclose(heat.affine, source.affine, atol=1e-5)
        assert np.asarray(heat.dataobj).max() > 0, name
    summary = json.loads((folder / "summary.json").read_text())
    assert {f["method"] for f in summary["findings"]} == set(NEW)
    # what each method reports about its run is kept in summary.json, as plain JSON values
    diagnostics = summary["diagnostics"]
    assert diagnostics["occlusion"]["patch"] == [32, 32, 32] and diagnostics["occlusion"]["forwards"] > 1
    assert diagnostics["scorecam"]["channels_used"] <= 4
    (errors,) = diagnostics["integrated_gradients"]["completeness_error"]  # one input, one class
    assert len(errors) == 1 and isinstance(errors[0], float)
    assert len(diagnostics["fused"]["stages"]) >= 2
