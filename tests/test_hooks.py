"""Model hygiene: the user's model is never changed by explaining it."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DenseNet
from torch import nn

import medcam3d
from _models import Failing, gap_linear_cnn


def small_densenet() -> nn.Module:
    torch.manual_seed(0)
    return DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 2))


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attributes": {name: dict(vars(m)) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"].values())
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # BatchNorm running stats untouched
    for name, attrs in before["attributes"].items():
        plain = {k: v for k, v in attrs.items() if not k.startswith("_")}
        assert {k: v for k, v in after["attributes"][name].items() if not k.startswith("_")} == plain, name


def mixed_state(model: nn.Module) -> nn.Module:
    """Train mode overall, some modules frozen in eval, some parameters frozen."""
    model.train()
    for i, module in enumerate(model.modules()):
        if isinstance(module, nn.BatchNorm3d) and i % 2:
            module.eval()
    for i, parameter in enumerate(model.parameters()):
        if i % 3 == 0:
            parameter.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "method, layer",
    [(m, "auto") for m in ("hirescam", "gradcam", "cam", "eigencam")]
    + [(m, "features.norm5") for m in ("hirescam", "gradcam", "eigencam")],
)
def test_model_unchanged_after_call(method, layer):
    model = mixed_state(small_densenet())
    before = snapshot(model)
    result = medcam3d.Explainer(model, method, layer=layer)(torch.randn(2, 1, 24, 20, 22), target="all")
    assert result.maps.abs().sum() > 0
    assert_unchanged(model, before)


def test_model_unchanged_after_exception_in_forward():
    model = Failing(mixed_state(small_densenet()))
    before = snapshot(model)
    explainer = medcam3d.Explainer(model, layer="inner.features.norm5")
    model.fail = True
    with pytest.raises(RuntimeError, match="planned failure"):
        explainer(torch.randn(1, 1, 24, 20, 22), target=0)
    model.fail = False
    assert_unchanged(model, before)
    # and the explainer still works afterwards
    assert explainer(torch.randn(1, 1, 24, 20, 22), target=0).maps.shape[1] == 1


def test_model_unchanged_after_bad_target():
    model = mixed_state(small_densenet())
    before = snapshot(model)
    with pytest.raises(IndexError):
        medcam3d.Explainer(model)(torch.randn(1, 1, 24, 20, 22), target=7)
    assert_unchanged(model, before)


def test_grad_mode_restored():
    model = gap_linear_cnn()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        medcam3d.Explainer(model, layer="3")(x, target=0)
        assert not torch.is_grad_enabled()
    medcam3d.Explainer(model, layer="3")(x, target=0)
    assert torch.is_grad_enabled()


def test_two_explainers_on_one_model_do_not_interfere():
    model = small_densenet()
    x = torch.randn(1, 1, 24, 20, 22, generator=torch.Generator().manual_seed(0))
    first = medcam3d.Explainer(model, "gradcam", layer="features.denseblock2")
    second = medcam3d.Explainer(model, "hirescam", layer="features.norm5")
    alone_first = copy.deepcopy(first)(x, "all").maps  # deepcopy: same weights, separate model
    alone_second = medcam3d.Explainer(copy.deepcopy(model), "hirescam", layer="features.norm5")(x, "all").maps
    for _ in range(2):
        torch.testing.assert_close(first(x, "all").maps, alone_first)
        torch.testing.assert_close(second(x, "all").maps, alone_second)
    assert all(not m._forward_hooks for m in model.modules())


def test_no_graph_before_target_layer():
    """Activations of layers before the target layer are not kept for backward."""
    model = small_densenet()
    explainer = medcam3d.Explainer(model, layer="features.norm5")
    seen = []
    handle = model.features.denseblock1.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        explainer(torch.randn(1, 1, 24, 20, 22), target=0)
    finally:
        handle.remove()
    # the explanation's pass only: the receptive-field trace runs on a view of the model without the user's hooks
    assert seen == [False]


class CountingNet(nn.Module):
    """Replaces (not updates in place) a buffer on every train-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = gap_linear_cnn()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls = self.calls + 1
        return self.net(x)


@pytest.mark.parametrize("update", [False, True])
def test_train_mode_buffers_are_restored_unless_asked(update):
    model = CountingNet().train()
    original = model.calls
    x = torch.randn(1, 1, 8, 8, 8)
    medcam3d.Explainer(model, layer="net.3", eval_mode=False, update_batchnorm_stats=update)(x, target=0)
    if update:
        assert float(model.calls) == 1.0
    else:
        assert model.calls is original and float(original) == 0.0  # the same tensor, with its old value
    medcam3d.Explainer(model, layer="net.3")(x, target=0)  # eval mode: nothing runs in train mode
    assert float(model.calls) == float(update)
    assert all(m.training for m in model.modules())  # flags restored after the eval-mode call
