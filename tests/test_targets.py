"""Targets: resolution rules, segmentation regions, and bad targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medcam3d
from medcam3d.targets import RegionTarget, channel_argmax, resolve_target
from _models import gap_linear_cnn, reference_activations_and_gradients, small_segresnet, small_unet


def test_resolution_rules():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    assert resolve_target(1, logits).class_indices.tolist() == [[1], [1]]
    assert resolve_target([2, 0], logits).class_indices.tolist() == [[2, 0], [2, 0]]
    assert resolve_target("all", logits).class_indices.tolist() == [[0, 1, 2]] * 2
    assert resolve_target("predicted", logits).class_indices.tolist() == [[1], [0]]
    assert resolve_target(None, logits).class_indices.tolist() == [[1], [0]]
    assert resolve_target(torch.tensor([2, 1]), logits).class_indices.tolist() == [[2], [1]]
    assert resolve_target(np.array([[0, 1], [1, 2]]), logits).class_indices.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(resolve_target([2, 0], logits).scores(logits), torch.tensor([[-1.0, 0.1], [1.0, 3.0]]))
    assert resolve_target("predicted", logits).labels() == [[1], [0]]
    assert resolve_target("all", logits).labels() == [0, 1, 2]


@pytest.mark.parametrize(
    "target, error, text",
    [
        (3, IndexError, "out of range"),
        (-1, IndexError, "out of range"),
        ([0, 9], IndexError, "valid indices are 0..2"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\) or \(B, T\)"),
        (torch.tensor([0.5, 1.0]), ValueError, "integers"),
        ("nodule", ValueError, "no class names"),
        (2.5, ValueError, "Unsupported target"),
        ([], ValueError, "Unsupported target"),
    ],
)
def test_bad_targets(target, error, text):
    logits = torch.zeros(2, 3)
    with pytest.raises(error, match=text):
        resolve_target(target, logits)


def test_unknown_class_name_suggests():
    with pytest.raises(medcam3d.TargetError, match="Did you mean 'nodule'"):
        resolve_target("nodul", torch.zeros(1, 2), class_names=["nodule", "effusion"])


def test_out_of_range_through_explainer():
    model = gap_linear_cnn(classes=4)
    with pytest.raises(medcam3d.TargetIndexError, match="the model has 4 output classes"):
        medcam3d.Explainer(model, layer="3")(torch.randn(1, 1, 8, 8, 8), target=4)


# ------------------------------------------------------------- segmentation


@pytest.mark.parametrize("factory, layer", [(small_unet, "model.1"), (small_segresnet, "down_layers.2")])
def test_region_target_with_mask_matches_reference(factory, layer):
    model = factory()
    x = torch.randn(1, 1, 24, 28, 20, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(24, 28, 20)
    mask[5:12, 8:20, 4:9] = 1
    result = medcam3d.Explainer(model, "hirescam", layer=layer)(x, target=medcam3d.Region(2, mask=mask), relu=False)
    assert result.targets == [2]
    expected_score = (result.logits[:, 2] * mask).sum()
    torch.testing.assert_close(result.scores[0, 0], expected_score)
    A, G = reference_activations_and_gradients(model, layer, x, lambda out: (out[:, 2] * mask).sum())
    torch.testing.assert_close(result.maps[:, 0], (G * A).sum(1), rtol=1e-4, atol=1e-6)


def test_region_target_predicted_region_and_all_classes():
    model = small_unet()
    x = torch.randn(2, 1, 24, 28, 20, generator=torch.Generator().manual_seed(2))
    explainer = medcam3d.Explainer(model, "gradcam")
    together = explainer(x, target="all")
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(1)
    for c in range(3):
        expected = (logits[:, c] * (labels == c)).flatten(1).sum(1)
        torch.testing.assert_close(together.scores[:, c], expected, rtol=1e-5, atol=1e-3)
        alone = explainer(x, target=c)
        torch.testing.assert_close(together.maps[:, c], alone.maps[:, 0], rtol=1e-5, atol=1e-6)
    assert together.layer != "model"  # auto skips the layers that produce the logits


def test_region_target_errors():
    with pytest.raises(medcam3d.TargetError, match="output grid"):
        resolve_target(medcam3d.Region(1, mask=torch.ones(4, 4, 4)), torch.zeros(1, 2, 5, 5, 5))
    with pytest.raises(medcam3d.TargetError, match="segmentation output"):
        resolve_target(medcam3d.Region(1), torch.zeros(1, 2))
    with pytest.raises(medcam3d.TargetError, match="ambiguous"):
        resolve_target("predicted", torch.zeros(1, 2, 5, 5, 5))


def test_single_channel_segmentation_foreground_and_background():
    outputs = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]])  # (1, 1, 2, 2)
    target = resolve_target("all", outputs)
    assert isinstance(target, RegionTarget)
    assert target.scores(outputs).tolist() == [[6.0, 4.0]]  # background: −(−2 −4); foreground: 1 + 3


def test_empty_predicted_region_warns():
    outputs = torch.zeros(1, 2, 3, 3)
    outputs[:, 0] = 1  # class 1 predicted nowhere
    with pytest.warns(UserWarning, match="predicts no voxel"):
        resolve_target(1, outputs)


@pytest.mark.parametrize("shape, dim", [((2, 3, 7, 5, 4), 1), ((4, 9, 6), 0), ((3, 1, 8), 1), ((2, 5), 1)])
def test_channel_argmax_equals_argmax_first_of_ties(shape, dim):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    values = torch.round(values * 2) / 2  # many ties: the first channel of the largest value wins, as argmax
    np.testing.assert_array_equal(channel_argmax(values, dim).numpy(), values.argmax(dim).numpy())
    np.testing.assert_array_equal(channel_argmax(values.to(torch.float64), dim).numpy(), values.argmax(dim).numpy())


@pytest.mark.parametrize("shape, dim", [((1, 40, 9, 7, 5), 1), ((40, 6, 5), 0), ((2, 3, 40), 2), ((3, 40), 1)])
@pytest.mark.parametrize("slab_values", [None, 64])  # one channel-last copy, or many small slabs
def test_channel_argmax_of_many_channels_equals_argmax_first_of_ties(monkeypatch, shape, dim, slab_values):
    """From VECTOR_CHANNELS channels on the channels are compared at once: the same indices, ties included."""
    from medcam3d import targets

    assert shape[dim] >= targets.VECTOR_CHANNELS
    if slab_values is not None:
        monkeypatch.setattr(targets, "_CHUNK_VALUES", slab_values)
    values = torch.round(torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 2) / 2  # many ties
    np.testing.assert_array_equal(channel_argmax(values, dim).numpy(), values.argmax(dim).numpy())
    np.testing.assert_array_equal(channel_argmax(values.to(torch.float64), dim).numpy(), values.argmax(dim).numpy())
    last = values.movedim(dim, -1).contiguous().movedim(-1, dim)  # channels already last in memory: not changed
    copy = last.clone()
    np.testing.assert_array_equal(channel_argmax(last, dim).numpy(), values.argmax(dim).numpy())
    assert torch.equal(last, copy)


def test_channel_argmax_never_picks_nan_however_many_channels():
    for channels in (3, 40):
        values = torch.arange(channels, dtype=torch.float32).repeat(2, 4, 1).permute(0, 2, 1).contiguous()  # (2, C, 4)
        values[0, channels - 1, 1] = float("nan")  # the largest channel holds a NaN at one voxel
        values[1, 0, 2] = float("nan")  # the first channel holds one
        index = channel_argmax(values, 1)
        assert index[0].tolist() == [channels - 1, channels - 2, channels - 1, channels - 1]
        assert index[1].tolist() == [channels - 1, channels - 1, 0, channels - 1]  # a NaN first blocks, as the loop
