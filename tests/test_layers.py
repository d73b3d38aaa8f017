"""Target layers: names, modules, auto selection, listing, and their errors."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import DenseNet121, resnet18
from torch import nn

import medcam3d
from medcam3d.layers import find_cam_head, resolve_layer
from _models import gap_linear_cnn


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return resnet18(spatial_dims=3, n_input_channels=1, num_classes=4).eval()


def test_resolve_by_name_and_module(resnet):
    assert resolve_layer(resnet, "layer4") == ("layer4", resnet.layer4)
    assert resolve_layer(resnet, resnet.layer3) == ("layer3", resnet.layer3)


def test_unknown_layer_suggests_closest(resnet):
    with pytest.raises(medcam3d.LayerNotFoundError, match="Did you mean 'layer4'") as info:
        medcam3d.Explainer(resnet, layer="layer5")
    assert isinstance(info.value, ValueError) and "list_layers" in str(info.value)
    with pytest.raises(medcam3d.LayerNotFoundError, match="not a submodule"):
        medcam3d.Explainer(resnet, layer=nn.Conv3d(1, 1, 1))


def test_auto_layer_is_logged_and_last_spatial(resnet, caplog):
    with caplog.at_level(logging.INFO, logger="medcam3d"):
        result = medcam3d.Explainer(resnet)(torch.randn(1, 1, 37, 45, 29), target=0)
    assert result.layer == "layer4"
    assert "layer4" in caplog.text


def test_list_layers_shapes_and_auto_choice():
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=14)
    layers = medcam3d.list_layers(model, (1, 64, 64, 64))
    names = [info.name for info in layers]
    assert "features.norm5" in names and "features.denseblock4" in names
    by_name = {info.name: info for info in layers}
    assert by_name["features.norm5"].output_shape == (1, 1024, 2, 2, 2)
    assert by_name["features.conv0"].output_shape == (1, 64, 32, 32, 32)
    assert layers[-1].name == "class_layers.relu"
    assert "Linear" not in {info.type for info in layers}  # non-spatial outputs are not candidates
    assert medcam3d.list_layers(model, (2, 1, 64, 64, 64)) == layers  # batched shape accepted
    assert model.training  # restored


def test_non_spatial_layer_is_refused(resnet):
    with pytest.raises(medcam3d.LayerError, match="not a spatial feature map"):
        medcam3d.Explainer(resnet, layer="fc")(torch.randn(1, 1, 37, 45, 29), target=0)


def test_single_voxel_layer_is_refused():
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(medcam3d.LayerError, match="one voxel"):
        medcam3d.Explainer(model, layer="1")(torch.randn(1, 1, 6, 6, 6), target=0)


def test_auto_without_conv_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    with pytest.raises(medcam3d.LayerError, match="no module .* with a spatial output"):
        medcam3d.Explainer(model)(torch.randn(1, 1, 6, 6, 6), target=0)


class WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = gap_linear_cnn()
        self.unused = nn.Conv3d(1, 1, 1)

    def forward(self, x):
        return self.net(x)


def test_unused_layer_is_refused():
    with pytest.raises(medcam3d.LayerError, match="did not run"):
        medcam3d.Explainer(WithSpare(), layer="unused")(torch.randn(1, 1, 8, 8, 8), target=0)


def test_cam_needs_a_gap_linear_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
    with pytest.raises(medcam3d.LayerError, match="hirescam"):
        medcam3d.Explainer(model, "cam", layer="1")(torch.randn(1, 1, 4, 4, 4), target=0)
    assert find_cam_head(gap_linear_cnn(), 8).out_features == 4


class SharedActivation(nn.Module):
    """One ReLU module used twice (like EfficientNet's shared swish)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3, 4)))


def test_auto_skips_shared_modules_and_explicit_shared_layer_is_refused():
    model = SharedActivation()
    result = medcam3d.Explainer(model)(torch.randn(1, 1, 6, 6, 6), target=0)
    assert result.layer == "conv2"
    assert "act" not in [info.name for info in medcam3d.list_layers(model, (1, 6, 6, 6))]
    with pytest.raises(medcam3d.LayerError, match="more than once"):
        medcam3d.Explainer(model, layer="act")(torch.randn(1, 1, 6, 6, 6), target=0)


def test_auto_layer_is_chosen_again_when_a_smaller_input_makes_it_a_single_voxel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(4), nn.Conv3d(4, 4, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    explainer = medcam3d.Explainer(model)
    assert explainer(torch.randn(1, 1, 16, 16, 16), target=0).layer == "4"  # 4x4x4 after pooling
    assert explainer(torch.randn(1, 1, 4, 4, 4), target=0).layer == "1"  # "4" would be one voxel here
