"""TorchScript models: scripted, traced, saved and loaded networks explained exactly like the eager model.

Every map is compared with the eager model's map for the same weights and input; layers are listed and
auto-selected the same way; the user's scripted model is never changed.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import pytest
import torch
from torch import nn

import medcam3d
from _models import densenet121_3d, resnet18_3d, small_segresnet, small_unet
from medcam3d.errors import InputError
from medcam3d.input_rank import expected_spatial_dims
from medcam3d.torchscript import ScriptSplit, is_scripted, module_type_name, script_layer_names

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/trace are deprecated






def to_torchscript(model: nn.Module, how: str, x: torch.Tensor, path) -> torch.jit.ScriptModule:
    """Script or trace, save with torch.jit.save and load back, as a user ships a model."""
    with torch.no_grad():
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    assert is_scripted(loaded)
    return loaded


def region_mask(shape):
    mask = torch.zeros(shape)
    mask[2:14, 6:20, 3:12] = 1
    return mask


SEG_SHAPE = (1, 1, 24, 28, 20)
NETWORKS = {
    # name: (factory, input shape, [(method, layer, target)])
    "resnet18": (resnet18_3d, (1, 1, 32, 40, 36), [
        ("hirescam", "auto", "all"), ("gradcam", "layer3.1.bn2", [1, 3]), ("cam", "layer4", "all"),
        ("hirescam", "maxpool", 2),  # inside `if not self.no_max_pool:` in the scripted graph
    ]),
    "densenet121": (densenet121_3d, (1, 1, 64, 64, 64), [  # slow: see the parametrization
        ("hirescam", "auto", "all"),
        ("gradcam", "features.norm5", "all"),  # followed by an in-place ReLU
    ]),
    "unet": (small_unet, SEG_SHAPE, [
        ("hirescam", "auto", medcam3d.Region(2, mask=region_mask(SEG_SHAPE[2:]))),
        ("gradcam", "model.1.submodule.1", medcam3d.Region("all")),
    ]),
    "segresnet": (small_segresnet, SEG_SHAPE, [
        ("hirescam", "down_layers.2", medcam3d.Region(1, mask=region_mask(SEG_SHAPE[2:]))),
        ("hirescam", "up_layers.0", medcam3d.Region("all")),
        ("gradcam", "conv_final.0", 2),  # inside `if self.use_conv_final:` in the scripted graph
    ]),
}


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("network", [pytest.param(n, marks=pytest.mark.slow) if n == "densenet121" else n for n in NETWORKS])
def test_torchscript_maps_equal_the_eager_maps(network, how, tmp_path):
    factory, shape, cases = NETWORKS[network]
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    loaded = to_torchscript(model, how, x, tmp_path / "model.pt")
    for method, layer, target in cases:
        expected = medcam3d.Explainer(model, method, layer=layer)(x, target, relu=False)
        result = medcam3d.Explainer(loaded, method, layer=layer)(x, target, relu=False)
        assert result.layer == expected.layer, (method, layer)
        assert result.maps.abs().max() > 0
        torch.testing.assert_close(result.maps, expected.maps, rtol=1e-4, atol=1e-5 * float(expected.maps.abs().max()))
        torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-4, atol=1e-3)
        assert torch.isfinite(result.scores).all()
        assert result.targets == expected.targets


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("network", ["resnet18", "unet"])
def test_list_layers_and_auto_on_torchscript_match_the_eager_model(network, how, tmp_path):
    factory, shape, _ = NETWORKS[network]
    model = factory()
    x = torch.randn(*shape)
    loaded = to_torchscript(model, how, x, tmp_path / "model.pt")
    eager = medcam3d.list_layers(model, shape[1:])
    listed = medcam3d.list_layers(loaded, shape[1:])
    strip = [(i.name, i.type, i.output_shape, i.auto) for i in eager if i.type != "Identity"]  # tracing drops Identity
    assert [(i.name, i.type, i.output_shape, i.auto) for i in listed if i.type != "Identity"] == strip
    chosen = [i.name for i in listed if i.auto]
    assert len(chosen) == 1
    assert chosen[0] == medcam3d.Explainer(loaded)(x[:1], "all" if network == "resnet18" else 1).layer
    assert set(script_layer_names(loaded)) >= {i.name for i in listed}


class Wrapper(nn.Module):
    """A plain model whose backbone is a scripted module (pool and head stay eager)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.backbone(x)), 1))


def resnet_parts():
    net = resnet18_3d()
    body = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc


def test_model_with_a_scripted_submodule():
    body, head = resnet_parts()
    eager = Wrapper(body, head).eval()
    mixed = Wrapper(torch.jit.script(copy.deepcopy(body)), copy.deepcopy(head)).eval()
    x = torch.randn(2, 1, 32, 40, 36, generator=torch.Generator().manual_seed(2))
    listed = medcam3d.list_layers(mixed, x.shape[1:])  # failed before: hooks on a ScriptModule
    assert [(i.name, i.output_shape, i.auto) for i in listed] == [
        (i.name, i.output_shape, i.auto) for i in medcam3d.list_layers(eager, x.shape[1:])
    ]
    assert "backbone.6.1.bn2" in [i.name for i in listed]
    for method, layer in [("hirescam", "auto"), ("cam", "auto"), ("gradcam", "backbone.6"), ("hirescam", "backbone.7.1.bn2"),
                          ("eigencam", "backbone.5")]:
        expected = medcam3d.Explainer(eager, method, layer=layer)(x, "all", relu=False)
        result = medcam3d.Explainer(mixed, method, layer=layer)(x, "all", relu=False)
        assert result.layer == expected.layer
        torch.testing.assert_close(result.maps, expected.maps, rtol=1e-4, atol=1e-5 * float(expected.maps.abs().max()))
    assert not nn.modules.module._global_forward_hooks  # the global hooks that stood in for module hooks are gone


class Branchy(nn.Module):
    """A data-dependent branch and a module called twice: layers a split cannot reach."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.left = nn.Conv3d(4, 4, 3, padding=1)
        self.right = nn.Conv3d(4, 4, 3, padding=1)
        self.twice = nn.Conv3d(4, 4, 1)
        self.last = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if bool(x.mean() > 0):
            x = self.left(x)
        else:
            x = self.right(x)
        x = self.last(self.twice(self.twice(x)))
        return self.head(x.mean(dim=(2, 3, 4)))


def test_unreachable_layers_are_refused_with_the_layers_that_can_be_explained():
    torch.manual_seed(0)
    eager = Branchy().eval()
    model = torch.jit.script(eager)
    x = torch.randn(1, 1, 6, 6, 6)
    with pytest.raises(medcam3d.LayerError, match="inside a conditional or a loop") as caught:
        medcam3d.Explainer(model, layer="left")(x, 0)
    assert "'stem'" in str(caught.value) and "'last'" in str(caught.value) and "'left'" not in str(caught.value).split(":")[-1]
    with pytest.raises(medcam3d.LayerError, match="called 2 times"):
        medcam3d.Explainer(model, layer="twice")(x, 0)
    assert [i.name for i in medcam3d.list_layers(model, (1, 6, 6, 6))] == ["stem", "last"]
    result = medcam3d.Explainer(model, "hirescam")(x, 0)
    assert result.layer == "last"
    torch.testing.assert_close(result.maps, medcam3d.Explainer(eager, "hirescam", layer="last")(x, 0).maps)


def test_the_scripted_model_is_not_changed(tmp_path):
    model = small_segresnet()
    x = torch.randn(*SEG_SHAPE)
    loaded = to_torchscript(model, "script", x, tmp_path / "model.pt")
    loaded.train()
    dict(loaded.named_modules())["down_layers.1"].eval()  # mixed flags
    code = {name: (module.code, str(module.graph)) for name, module in loaded.named_modules() if hasattr(module, "code")}
    methods = {name: module._c._method_names() for name, module in loaded.named_modules()}
    flags = {name: module.training for name, module in loaded.named_modules()}
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    for method in ("hirescam", "gradcam"):
        medcam3d.Explainer(loaded, method, layer="down_layers.2", eval_mode=False)(x, medcam3d.Region(1))
        medcam3d.Explainer(loaded, method)(x, medcam3d.Region("all"))
    assert {name: (m.code, str(m.graph)) for name, m in loaded.named_modules() if hasattr(m, "code")} == code
    assert {name: m._c._method_names() for name, m in loaded.named_modules()} == methods
    assert {name: m.training for name, m in loaded.named_modules()} == flags
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key  # train-mode BatchNorm/InstanceNorm statistics restored
    assert all(p.grad is None and p.requires_grad for p in loaded.parameters())
    assert not nn.modules.module._global_forward_hooks


def test_the_split_keeps_no_graph_before_the_layer():
    """The prefix runs without autograd; the suffix holds nothing computed before the layer."""
    model = torch.jit.script(resnet18_3d())
    split = ScriptSplit(model, "layer3")
    x = torch.randn(1, 1, 32, 40, 36)
    with torch.no_grad():
        activations, carry = split.prefix(model, (x,))
    assert not activations.requires_grad and carry == ()
    suffix = str(split._suffix.graph)
    assert "layer4" in suffix and all(f'name="{name}"' not in suffix for name in ("conv1", "layer1", "layer2", "layer3"))
    leaf = activations.clone().requires_grad_(True)
    outputs, logits = split.suffix(model, leaf.clone(), carry, (x,))
    assert logits is None and outputs.requires_grad
    (gradient,) = torch.autograd.grad(outputs[:, 1].sum(), leaf)
    assert gradient.shape == activations.shape and gradient.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_types_and_rank_of_scripted_modules():
    model = torch.jit.script(small_unet())
    assert module_type_name(model) == "UNet"
    assert module_type_name(dict(model.named_modules())["model.0.conv.unit0.conv"]) == "Conv3d"
    assert expected_spatial_dims(model) == 3
    with pytest.raises(InputError, match=r"batch of 2D images \(B, C_in, H, W\), give 3D images"):
        medcam3d.Explainer(model)(torch.randn(1, 1, 24, 28), 1)


def test_amp_and_warnings_free_on_scripted_model():
    """bf16 autocast runs through the split, and no warning other than torch's deprecation is raised."""
    model = torch.jit.script(resnet18_3d())
    x = torch.randn(1, 1, 32, 40, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        result = medcam3d.Explainer(model, amp="bf16")(x, 1)
    expected = medcam3d.Explainer(resnet18_3d())(x, 1)
    assert result.layer == expected.layer == "layer4"
    assert torch.corrcoef(torch.stack([result.maps.flatten(), expected.maps.flatten()]))[0, 1] > 0.95


@pytest.mark.parametrize("network", ["unet", "resnet18"])
def test_a_freshly_traced_model_that_was_not_saved(network):
    """Its submodules' ``forward`` is a Python method, not a compiled one: the graphs come from the C++ side."""
    factory, shape, cases = NETWORKS[network]
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    method, layer, target = cases[0]
    expected = medcam3d.Explainer(model, method, layer=layer)(x, target, relu=False)
    result = medcam3d.Explainer(traced, method, layer=layer)(x, target, relu=False)
    assert result.layer == expected.layer
    torch.testing.assert_close(result.maps, expected.maps, rtol=1e-4, atol=1e-5 * float(expected.maps.abs().max()))


class WithOptions(nn.Module):
    """A forward with defaults, called with a keyword by a plain parent."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv3d(1, 4, 3, padding=1)
        self.second = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: float = 2.0, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.second(torch.relu(self.first(x))) * scale
        if shift is not None:
            y = y + shift
        return self.fc(y.mean(dim=(2, 3, 4)))


class CallsWithKeyword(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, scale=-3.0)


def test_forward_defaults_and_keyword_arguments():
    torch.manual_seed(0)
    eager = WithOptions().eval()
    x = torch.randn(2, 1, 8, 9, 7, generator=torch.Generator().manual_seed(6))
    scripted = torch.jit.script(eager)
    for layer in ("first", "auto"):
        expected = medcam3d.Explainer(eager, layer=layer)(x, "all", relu=False)
        torch.testing.assert_close(medcam3d.Explainer(scripted, layer=layer)(x, "all", relu=False).maps, expected.maps)
    expected = medcam3d.Explainer(CallsWithKeyword(eager), layer="inner.first")(x, "all", relu=False)
    result = medcam3d.Explainer(CallsWithKeyword(scripted), layer="inner.first")(x, "all", relu=False)
    torch.testing.assert_close(result.maps, expected.maps)  # scale=-3 reached the split halves
