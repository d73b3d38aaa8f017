"""Target layers: names, modules, auto selection, listing, and their errors."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import DenseNet121, SegResNet, UNet, resnet18
from torch import nn

import medcam3d
from medcam3d.errors import InputError
from medcam3d.cam_head import find_cam_head
from medcam3d.input_rank import check_spatial_rank, expected_spatial_dims
from medcam3d.layers import auto_layer, resolve_layer
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


# ------------------------------------------------------------------------------- input rank
def test_expected_spatial_dims_from_the_first_convolution_or_pooling():
    assert expected_spatial_dims(gap_linear_cnn(3)) == 3
    assert expected_spatial_dims(gap_linear_cnn(2)) == 2
    assert expected_spatial_dims(nn.Sequential(nn.MaxPool2d(2), nn.Flatten())) == 2
    assert expected_spatial_dims(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None


@pytest.mark.parametrize("dims, shape, text", [
    (3, (1, 1, 32, 32), r"batch of 2D images \(B, C_in, H, W\), give 3D images"),
    (2, (1, 1, 8, 32, 32), r"a batch of 3D images \(B, C_in, D, H, W\), but the model takes 2D inputs"),
])
def test_rank_mismatch_is_refused_before_any_forward(dims, shape, text):
    counting = Counting(gap_linear_cnn(dims))
    with pytest.raises(InputError, match=text):
        medcam3d.Explainer(counting)(torch.randn(*shape), target=0)
    assert counting.shapes == []  # no probe, no forward


def test_check_spatial_rank_for_the_job_layer():
    with pytest.raises(InputError, match=r"This is a 2D image \(H, W\) of shape \(256, 256\), but the model takes 3D inputs "
                                         r"\(C, D, H, W\)"):
        check_spatial_rank(gap_linear_cnn(3), (256, 256))
    with pytest.raises(InputError, match=r"This is a 3D image \(D, H, W\).*takes 2D inputs \(C, H, W\)"):
        check_spatial_rank(gap_linear_cnn(2), (8, 256, 256))
    check_spatial_rank(gap_linear_cnn(3), (9, 8, 7))
    check_spatial_rank(nn.Sequential(nn.Flatten()), (9, 8))  # rank unknown: nothing to check


# ------------------------------------------------------------------------------- auto layer
class Counting(nn.Module):
    """Records the shape of every forward call of the model it wraps."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":  # the receptive-field trace runs on meta tensors: no computation
            self.shapes.append(tuple(x.shape))
        return self.inner(x)


def test_auto_layer_runs_one_forward_per_explanation_once_cached():
    model = Counting(gap_linear_cnn(3))
    x = torch.randn(2, 1, 64, 48, 40)
    first = medcam3d.Explainer(model)
    assert first(x, 0).layer == "inner.3"
    probes, full = model.shapes[:-1], model.shapes[-1]
    assert full == tuple(x.shape) and probes and all(max(s[2:]) <= 32 and s[0] == 1 for s in probes)
    model.shapes.clear()
    first(x, 1)
    first(x[:1], "all")
    assert model.shapes == [tuple(x.shape), (1, *x.shape[1:])]  # exactly one forward per call
    model.shapes.clear()
    second = medcam3d.Explainer(model, "gradcam")  # another explainer: the cache is the model's
    second(x, 0)
    assert model.shapes == [tuple(x.shape)]
    assert auto_layer(model, x.shape[1:]).name == "inner.3"
    assert [info.name for info in medcam3d.list_layers(model, x.shape[1:]) if info.auto] == ["inner.3"]


def test_auto_layer_cache_is_weak():
    """The caches (auto choice, TorchScript probes and splits) keep no model alive."""
    import gc
    import weakref

    from medcam3d.layers import _AUTO_CACHE

    for scripted in (False, True):
        model = gap_linear_cnn(3)
        model = torch.jit.script(model) if scripted else model
        medcam3d.Explainer(model)(torch.randn(1, 1, 8, 8, 8), 0)
        assert model in _AUTO_CACHE
        alive = weakref.ref(model)
        del model
        gc.collect()
        assert alive() is None


def test_auto_probe_grows_until_no_later_layer_collapses():
    """Pooling by 64 along the first axis: a 32 or 64 probe would make the last conv one voxel."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d((4, 1, 1)), nn.Conv3d(4, 4, 1), nn.ReLU(),
                          nn.MaxPool3d((4, 2, 2)), nn.Conv3d(4, 4, 1), nn.ReLU(), nn.MaxPool3d((4, 1, 1)), nn.Conv3d(4, 4, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    model = Counting(inner)
    shape = (1, 256, 2, 2)
    chosen = auto_layer(model, shape)
    assert chosen.name == "inner.10" and chosen.auto
    assert [s[2:] for s in model.shapes] == [(32, 2, 2), (64, 2, 2), (128, 2, 2)]  # never the full 256
    listed = medcam3d.list_layers(inner, shape)  # at full size: the exact answer
    assert listed[-1].name == "10" and [i.name for i in listed if i.auto] == ["10"]


@pytest.mark.parametrize("factory", [
    lambda: UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
    lambda: SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 1, 2), blocks_up=(1, 1)),
])
def test_list_layers_marks_the_layer_auto_uses_for_segmentation_networks(factory):
    torch.manual_seed(0)
    model = factory().eval()
    shape = (1, 24, 28, 20)
    layers = medcam3d.list_layers(model, shape)
    marked = [info for info in layers if info.auto]
    assert len(marked) == 1
    used = medcam3d.Explainer(model)(torch.randn(1, *shape), target=1).layer
    assert marked[0].name == used == auto_layer(model, shape).name
    assert layers[-1].name != used  # the last listed layer produces the logits: not what auto uses
    assert "<- auto" in str(marked[0]) and "<- auto" not in str(layers[-1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_auto_on_a_freshly_scripted_network_with_instance_norm():
    """The 32-voxel probe collapses to one voxel before an InstanceNorm: TorchScript raises torch.jit.Error
    (not a RuntimeError), which the probe retries with a larger input like an eager failure."""

    def network():
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU()]
        for _ in range(5):
            layers += [nn.Conv3d(4, 4, 3, stride=2, padding=1), nn.InstanceNorm3d(4), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)).eval()

    eager, scripted = network(), torch.jit.script(network())
    shape = (1, 64, 64, 64)
    assert auto_layer(scripted, shape).name == auto_layer(eager, shape).name == "17"
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(medcam3d.Explainer(scripted)(x, "all").maps, medcam3d.Explainer(eager)(x, "all").maps)
    # a size the network cannot take at all: one line, the graph's own reason
    with pytest.raises(RuntimeError, match=r"failed in TorchScript on an input of shape \(1, 1, 8, 8, 8\): "
                                           r"ValueError: Expected more than 1 spatial element") as info:
        medcam3d.list_layers(scripted, (1, 8, 8, 8))
    assert "\n" not in str(info.value)


def test_transformer_token_layers_are_never_target_layers():
    """MONAI's ViT: `auto` took blocks.1.attn.input_rearrange, a (qkv, B, heads, tokens, dims) tensor, and placed
    it in the scan as if it were a grid; token layers are not candidates and are refused by name."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
              num_heads=4, classification=True, num_classes=3).eval()
    listed = medcam3d.list_layers(vit, (1, 32, 32, 32))
    assert [(info.name, info.auto) for info in listed] == [("patch_embedding.patch_embeddings", True)]
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    result = medcam3d.Explainer(vit)(x, "all")
    assert result.layer == "patch_embedding.patch_embeddings" and result.maps.shape == (2, 3, 4, 4, 4)
    for name in ("blocks.1.attn.input_rearrange", "blocks.0.attn.drop_weights", "blocks.1"):
        with pytest.raises(medcam3d.LayerError, match="inside the transformer block 'blocks.[01]'.*holds tokens.*"
                                                     "'patch_embedding.patch_embeddings'"):
            medcam3d.Explainer(vit, layer=name)
    # 2D: the attention weights (B, heads, tokens, tokens) have the input's rank and batch axis, and are refused too
    vit2d = ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
                num_heads=4, classification=True, num_classes=3, spatial_dims=2).eval()
    assert [info.name for info in medcam3d.list_layers(vit2d, (1, 32, 32))] == ["patch_embedding.patch_embeddings"]
