"""Sliding-window explanation: equality with the direct path, world placement, bounded memory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import resnet18
from torch import nn

import medcam3d
import medcam3d.errors
from medcam3d.cli.demo import planted_lesion_case
from medcam3d.sliding import explain_sliding_window
from medcam3d.space import Space
from medcam3d.targets import region_from_scan_mask
from _images import oblique_lpi_affine, planted_scan
from _models import small_segresnet, small_unet


def test_one_roi_covering_the_volume_equals_direct_classifier():
    torch.manual_seed(0)
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 48, 48, generator=torch.Generator().manual_seed(1))
    explainer = medcam3d.Explainer(model, "hirescam")
    direct = explainer(x, "all")
    windowed = explain_sliding_window(explainer, x, "all", roi_size=(64, 48, 48))
    torch.testing.assert_close(windowed.maps, direct.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(windowed.logits, direct.logits)
    assert windowed.targets == [0, 1, 2] and windowed.feature_shape == direct.feature_shape


def test_one_roi_covering_the_volume_equals_direct_segmentation_region():
    model = small_unet()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(32, 32, 32)
    mask[4:20, 8:16, 10:30] = 1
    explainer = medcam3d.Explainer(model, "gradcam")
    direct = explainer(x, medcam3d.Region(1, mask=mask))
    windowed = explain_sliding_window(explainer, x, medcam3d.Region(1, mask=mask), roi_size=32)
    torch.testing.assert_close(windowed.maps, direct.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(windowed.logits, direct.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(windowed.scores, direct.scores, rtol=1e-5, atol=1e-4)


def test_overlapping_windows_find_the_planted_lesion_in_world_mm():
    _, model, _ = planted_lesion_case(32, seed=0)
    shape = (90, 75, 66)
    affine = oblique_lpi_affine(spacing=(1.0, 1.2, 1.5))
    centre_voxel = np.array([61.0, 18.0, 40.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    image = 0.3 * np.random.default_rng(0).normal(size=shape)
    image[np.linalg.norm(grid - centre_voxel, axis=-1) <= 5] += 2.0
    x = MetaTensor(torch.from_numpy(image).float()[None, None], affine=torch.as_tensor(affine))
    explainer = medcam3d.Explainer(model, "hirescam", class_names=["background", "lesion"])
    result = explain_sliding_window(explainer, x, "lesion", roi_size=32, overlap=0.5)
    assert result.input_shape == (92, 76, 68) and result.feature_shape == (23, 19, 17)
    heat = result.to_scanner_space(Space(shape, affine))["lesion"]
    assert heat.data.shape == shape
    _, peak_mm = heat.peak()
    centre_mm = (affine @ np.append(centre_voxel, 1))[:3]
    assert np.linalg.norm(peak_mm - centre_mm) <= 4 * 1.5  # within one feature cell (stride 4)


def test_predicted_target_is_refused():
    _, model, _ = planted_lesion_case(32, seed=0)
    with pytest.raises(ValueError, match="differs between patches"):
        explain_sliding_window(medcam3d.Explainer(model), torch.zeros(1, 1, 40, 40, 40), "predicted", roi_size=32)


def test_roi_must_be_a_multiple_of_the_stride():
    _, model, _ = planted_lesion_case(32, seed=0)
    with pytest.raises(ValueError, match="multiple of the feature stride"):
        explain_sliding_window(medcam3d.Explainer(model), torch.zeros(1, 1, 40, 40, 40), 1, roi_size=30)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    import medcam3d
    from medcam3d.sliding import explain_sliding_window
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool3d(4), nn.Conv3d(32, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 1, 128, 128, 128)
    explainer = medcam3d.Explainer(model, "hirescam")
    def rss(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) // 1024
    run = (lambda: explain_sliding_window(explainer, x, "all", roi_size=32, sw_batch_size=2)) if sys.argv[1] == "window" else (lambda: explainer(x, "all"))
    from monai.inferers import sliding_window_inference  # imports and first-use costs are not the workload's
    explain_sliding_window(explainer, torch.randn(1, 1, 64, 32, 32), "all", roi_size=32)
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    run()
    print(json.dumps({"peak_mib": rss("VmHWM") - base}))
    """
)


def peak_growth(mode: str) -> int:
    output = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.slow
def test_sliding_window_memory_is_bounded_by_the_patch_batch():
    """A 128³ volume with 32 full-resolution channels: ~256 MiB per activation when explained directly."""
    bound = 150  # MiB
    direct, windowed = peak_growth("direct"), peak_growth("window")
    assert direct > 2 * bound, direct
    assert windowed < bound, windowed



def test_segmentation_scores_are_finite_with_and_without_windows():
    """They were NaN through sliding windows: now the target's score on the assembled logits."""
    model = small_segresnet()
    x = torch.randn(1, 1, 40, 36, 28, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(40, 36, 28)
    mask[5:30, 10:30, 4:20] = 1
    explainer = medcam3d.Explainer(model, "hirescam")
    for target in (medcam3d.Region(1, mask=mask), medcam3d.Region("all"), 2):
        direct = explainer(x, target)
        windowed = explain_sliding_window(explainer, x, target, roi_size=(24, 24, 16), overlap=0.5)
        assert torch.isfinite(direct.scores).all() and torch.isfinite(windowed.scores).all()
        assert windowed.scores.shape == direct.scores.shape and windowed.targets == direct.targets
    # the score is the assembled class logits summed inside the region, padding excluded
    x, mask = x[..., :26], mask[..., :26]  # padded to 28 for the stride-4 layer
    strided = medcam3d.Explainer(model, "hirescam", layer="down_layers.2")
    for target in (medcam3d.Region(1, mask=mask), medcam3d.Region(1)):
        windowed = explain_sliding_window(strided, x, target, roi_size=(24, 24, 16), overlap=0.5)
        assert windowed.logits.shape[2:] == (40, 36, 28)
        logits = windowed.logits[:, :, :40, :36, :26]
        region = mask if target.mask is not None else (logits.argmax(1) == 1).float()
        torch.testing.assert_close(windowed.scores[:, 0], (logits[:, 1] * region).flatten(1).sum(1), rtol=1e-5, atol=1e-3)


def test_one_window_scores_equal_the_direct_scores():
    model = small_segresnet()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    explainer = medcam3d.Explainer(model, "gradcam")
    for target in (medcam3d.Region(2), 1):
        direct = explainer(x, target)
        windowed = explain_sliding_window(explainer, x, target, roi_size=32)
        torch.testing.assert_close(windowed.scores, direct.scores, rtol=1e-4, atol=1e-3)
    torch.manual_seed(0)
    single = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1))
    explainer = medcam3d.Explainer(single.eval())
    direct = explainer(x, "all")
    windowed = explain_sliding_window(explainer, x, "all", roi_size=32)  # single-logit classifier: NaN before
    torch.testing.assert_close(windowed.scores, direct.scores)


def test_rank_mismatch_is_refused_before_the_windows():
    _, model, _ = planted_lesion_case(32, seed=0)
    with pytest.raises(medcam3d.errors.InputError, match="batch of 2D images"):
        explain_sliding_window(medcam3d.Explainer(model), torch.zeros(1, 1, 40, 40), 1, roi_size=32)


def test_a_scan_grid_region_mask_equals_the_input_grid_mask_without_the_probe_warning(caplog, capsys):
    """Region(..., space=scan_space): the mask is resampled onto the input grid first, then cropped per patch
    as an input-grid mask; the stride's probe (the first window, without the mask) is not reported when a mask is given."""
    scan_shape, scan_affine = (31, 27, 13), oblique_lpi_affine()  # oblique, anisotropic, stored L-P-I
    scan_space = Space(scan_shape, scan_affine)
    centre_mm = (scan_affine @ np.array([15.0, 13.0, 6.0, 1.0]))[:3]
    _, inside = planted_scan(scan_shape, scan_affine, centre_mm=centre_mm, radius_mm=6.0)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in scan_shape], indexing="ij")).reshape(3, -1).T
    input_affine = np.diag([1.0, 1.0, 1.5, 1.0])  # RAS, another spacing, cropping part of the scan
    input_affine[:3, 3] = (corners @ scan_affine[:3, :3].T + scan_affine[:3, 3]).min(0)
    x = MetaTensor(torch.randn(1, 1, 32, 32, 24, generator=torch.Generator().manual_seed(5)),
                   affine=torch.as_tensor(input_affine))
    on_input = region_from_scan_mask(inside, scan_space, Space.of(x, batch=True))
    assert 100 < on_input.sum() < on_input.size // 10
    explainer = medcam3d.Explainer(small_segresnet(), "hirescam")
    options = {"roi_size": (24, 24, 16), "overlap": 0.5}
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_scan = explain_sliding_window(explainer, x, medcam3d.Region([1, 2], mask=inside, space=scan_space), **options)
        given = explain_sliding_window(explainer, x, medcam3d.Region([1, 2], mask=on_input), **options)
    torch.testing.assert_close(from_scan.maps, given.maps, rtol=0, atol=0)
    torch.testing.assert_close(from_scan.logits, given.logits, rtol=0, atol=0)
    torch.testing.assert_close(from_scan.scores, given.scores, rtol=0, atol=0)
    assert from_scan.maps.abs().sum() > 0 and from_scan.targets == [1, 2]
    expected = (given.logits[0, 1:3] * torch.from_numpy(on_input)).flatten(1).sum(1)
    torch.testing.assert_close(from_scan.scores[0], expected, rtol=1e-5, atol=1e-3)
    out, err = capsys.readouterr()
    reported = [str(w.message) for w in caught] + [caplog.text, out, err]
    assert not any("predicts no voxel" in text for text in reported), reported
    # without a mask, a window that predicts no voxel of a class says so (every window of an all-zero input,
    # the stride's probe included: it is the first window, explained once)
    with pytest.warns(UserWarning, match="predicts no voxel"):
        explain_sliding_window(explainer, torch.zeros_like(x.as_tensor()), medcam3d.Region([1, 2]), **options)
    # a plain tensor has no affine: the mask's grid cannot be related to the input's
    with pytest.raises(medcam3d.errors.TargetError, match="MetaTensor"):
        explain_sliding_window(explainer, x.as_tensor(), medcam3d.Region(1, mask=inside, space=scan_space), **options)


def test_the_first_window_finds_the_stride_without_an_extra_pass(monkeypatch):
    """The stride comes from the first window, whose explanation is reused: one explainer call per window."""
    import torch

    from medcam3d import Explainer
    from medcam3d.sliding import explain_sliding_window

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Upsample(scale_factor=2), torch.nn.Conv3d(4, 3, 1))
    explainer = Explainer(net, "hirescam", layer="2")
    x = torch.randn((1, 1, 24, 24, 24), generator=torch.Generator().manual_seed(0))
    whole = explainer(x, "all")
    calls = []
    original = Explainer.__call__

    def counted(self, batch, *args, **kwargs):
        calls.append(tuple(batch.shape))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(Explainer, "__call__", counted)
    found = explain_sliding_window(explainer, x, "all", roi_size=16, overlap=0.5, mode="constant")
    assert calls == [(1, 1, 16, 16, 16)] * 8  # windows at 0 and 8 on each axis, each explained once
    assert found.maps.shape == whole.maps.shape == (1, 3, 12, 12, 12)
