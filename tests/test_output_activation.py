"""Outputs that are not logits: trailing softmax/sigmoid modules are undone, probabilities are recognised,
and an activation applied functionally can be inverted (exactly for sigmoid, up to a per-sample constant
for softmax)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medcam3d
from medcam3d.errors import ProbabilityOutputWarning
from medcam3d.model_io import logits_from_probabilities, looks_like_probabilities
from _models import flatten_linear_cnn, gap_linear_cnn, small_unet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated

ACTIVATIONS = {"softmax": lambda: nn.Softmax(dim=1), "sigmoid": nn.Sigmoid, "log_softmax": lambda: nn.LogSoftmax(dim=1)}


def explain(model, layer, x, target="all", method="hirescam", **options):
    """The explanation and the ProbabilityOutputWarnings raised while making it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = medcam3d.Explainer(model, method, layer=layer, **options)(x, target, relu=False)
    return result, [str(w.message) for w in caught if issubclass(w.category, ProbabilityOutputWarning)]


def assert_maps_equal(result, expected):
    scale = float(expected.maps.abs().max())
    assert scale > 0
    torch.testing.assert_close(result.maps, expected.maps, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("scripted", [False, True])
def test_auto_explains_the_input_of_a_trailing_activation_module(kind, scripted):
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(0))
    expected = medcam3d.Explainer(base, "hirescam", layer="3")(x, "all", relu=False)
    model = nn.Sequential(base, ACTIVATIONS[kind]()).eval()
    model = torch.jit.script(model) if scripted else model
    result, messages = explain(model, "0.3", x)
    assert_maps_equal(result, expected)
    torch.testing.assert_close(result.logits, expected.logits)
    torch.testing.assert_close(result.scores, expected.scores)
    assert result.output_activation == kind
    assert len(messages) == 1 and f"comes from a {kind} ('1')" in messages[0] and "output_activation='none'" in messages[0]
    # "none": the probabilities themselves, which give other maps
    plain, messages = explain(model, "0.3", x, output_activation="none")
    assert not messages and plain.output_activation == "none"
    assert not torch.allclose(plain.maps, expected.maps, atol=1e-3 * float(expected.maps.abs().max()))
    # naming the activation explains the module's input too, without a warning
    named, messages = explain(model, "0.3", x, output_activation="sigmoid" if kind == "sigmoid" else "softmax")
    assert not messages
    assert_maps_equal(named, expected)


def test_hirescam_completeness_holds_for_the_logits_of_a_softmax_model():
    base = flatten_linear_cnn((5, 6, 4), classes=3)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(1))
    result, _ = explain(nn.Sequential(base, nn.Softmax(dim=1)).eval(), "0.2", x)
    completeness = result.maps.flatten(start_dim=2).sum(dim=2)
    torch.testing.assert_close(completeness, result.logits - base[-1].bias.detach(), rtol=1e-4, atol=1e-5)


class Functional(nn.Module):
    """A network that applies its activation with a function: no module shows it."""

    def __init__(self, net: nn.Module, kind: str, scale: float = 1.0, call: str = "torch") -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.scale = scale
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x) * self.scale
        if self.call == "method":
            return logits.sigmoid() if self.kind == "sigmoid" else logits.softmax(1)
        if self.call == "F":
            return F.sigmoid(logits) if self.kind == "sigmoid" else F.softmax(logits, dim=1)
        return torch.sigmoid(logits) if self.kind == "sigmoid" else torch.softmax(logits, dim=1)


class WrittenOut(nn.Module):
    """A network whose activation is written out in arithmetic: no softmax/sigmoid call shows it."""

    def __init__(self, net: nn.Module, kind: str, scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x) * self.scale
        if self.kind == "sigmoid":
            return 1 / (1 + torch.exp(-logits))
        e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        return e / e.sum(dim=1, keepdim=True)


def test_functional_activation_in_a_scripted_graph_is_found():
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(2))
    expected = medcam3d.Explainer(base, "hirescam", layer="3")(x, "all", relu=False)
    for kind in ("softmax", "sigmoid"):
        result, messages = explain(torch.jit.script(Functional(base, kind).eval()), "net.3", x)
        assert_maps_equal(result, expected)
        assert result.output_activation == kind and f"aten::{kind}" in messages[0]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("method", ["hirescam", "gradxinput"])
def test_one_model_gives_one_map_in_every_format(kind, method):
    """The same weights with the activation as a module, as a function call (three spellings), scripted
    and traced: the default explains the logits in every format, and so does naming the activation."""
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(8))
    expected = medcam3d.Explainer(base, method, layer="3")(x, "all", relu=False)
    module = ACTIVATIONS[kind]()
    formats = {
        "eager module": (nn.Sequential(base, module).eval(), "0.3", "'1'"),
        "scripted module": (torch.jit.script(nn.Sequential(base, module).eval()), "0.3", "'1'"),
        "traced module": (torch.jit.trace(nn.Sequential(base, module).eval(), x), "0.3", "'1'"),
        "torch function": (Functional(base, kind).eval(), "net.3", f"'torch.{kind}'"),
        # F.sigmoid calls Tensor.sigmoid, F.softmax is a torch function of its own
        "F function": (Functional(base, kind, call="F").eval(), "net.3",
                       "'Tensor.sigmoid'" if kind == "sigmoid" else "'torch.nn.functional.softmax'"),
        "tensor method": (Functional(base, kind, call="method").eval(), "net.3", f"'Tensor.{kind}'"),
        "scripted function": (torch.jit.script(Functional(base, kind).eval()), "net.3", f"'aten::{kind}'"),
        "traced function": (torch.jit.trace(Functional(base, kind).eval(), x), "net.3", f"'aten::{kind}'"),
    }
    for name, (model, layer, shown) in formats.items():
        for option in ("auto", kind):
            result, messages = explain(model, layer, x, method=method, output_activation=option)
            assert result.output_activation == kind, (name, option)
            assert_maps_equal(result, expected)
            torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(result.scores, expected.scores, rtol=1e-4, atol=1e-5)
            if option == "auto":
                assert len(messages) == 1 and f"comes from a {kind} ({shown}" in messages[0], (name, messages)
            else:
                assert not messages, (name, messages)
        plain, _ = explain(model, layer, x, method=method, output_activation="none")  # the probabilities, as they are
        assert plain.output_activation == "none"
        assert not torch.allclose(plain.maps, expected.maps, atol=1e-3 * float(expected.maps.abs().max()))


class AttentionHead(nn.Module):
    """Logits computed through a softmax (attention pooling over the feature cells), returned as logits."""

    def __init__(self, classes: int = 3, then: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, stride=2, padding=1))
        self.score = nn.Conv3d(6, 1, 1)
        self.fc = nn.Linear(6, classes)
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)  # (B, 6, N)
        weights = torch.softmax(self.score(self.features(x)).flatten(2), dim=-1)  # (B, 1, N): attention
        logits = self.fc((f * weights).sum(-1))
        if self.then == "scaled softmax":  # post-processed probabilities are not the logits' activation
            return 0.5 * torch.softmax(logits, dim=1)
        return logits


def test_a_softmax_inside_the_network_is_not_the_output_activation():
    x = torch.randn(2, 1, 8, 10, 6, generator=torch.Generator().manual_seed(9))
    model = AttentionHead().eval()
    result, messages = explain(model, "score", x)
    assert result.output_activation == "none" and not messages
    torch.testing.assert_close(result.logits, model(x))
    post = AttentionHead(then="scaled softmax").eval()
    result, _ = explain(post, "score", x)
    assert result.output_activation == "none"
    torch.testing.assert_close(result.logits, post(x))


def test_sigmoid_is_inverted_exactly_when_no_activation_call_shows_it():
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(3))
    expected = medcam3d.Explainer(base, "hirescam", layer="3")(x, "all", relu=False)
    model = WrittenOut(base, "sigmoid").eval()
    result, messages = explain(model, "net.3", x, output_activation="sigmoid")
    torch.testing.assert_close(result.maps, expected.maps, rtol=1e-3, atol=1e-4 * float(expected.maps.abs().max()))
    torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert result.output_activation == "sigmoid" and "inverted (logit(p))" in messages[0]
    assert "saturated" not in messages[0]
    # a saturated sigmoid is clamped before the inverse, and the warning says so
    _, messages = explain(WrittenOut(base, "sigmoid", scale=1e4).eval(), "net.3", x, output_activation="sigmoid")
    assert "saturated" in messages[0]


def test_softmax_inverse_keeps_class_differences_and_says_what_single_maps_mean():
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(4))
    expected = medcam3d.Explainer(base, "hirescam", layer="3")(x, "all", relu=False)
    model = WrittenOut(base, "softmax").eval()
    result, messages = explain(model, "net.3", x, output_activation="softmax")
    assert result.output_activation == "softmax" and "relative to the other classes" in messages[0]
    scale = float(expected.maps.abs().max())
    # log p_c − log p_d = z_c − z_d: maps of class differences are those of the logits ...
    torch.testing.assert_close(result.maps[:, 1] - result.maps[:, 3], expected.maps[:, 1] - expected.maps[:, 3],
                               rtol=1e-3, atol=1e-4 * scale)
    # ... and each class map is its logit's map minus the probability-weighted mean of all maps.
    p = torch.softmax(expected.logits, dim=1).reshape(2, 4, 1, 1, 1)
    mean = (p * expected.maps).sum(dim=1, keepdim=True)
    torch.testing.assert_close(result.maps, expected.maps - mean, rtol=1e-3, atol=1e-4 * scale)
    assert not torch.allclose(result.maps, expected.maps, atol=1e-2 * scale)


def test_auto_warns_about_values_that_look_like_probabilities_and_keeps_them():
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(5))
    model = WrittenOut(base, "softmax").eval()
    result, messages = explain(model, "net.3", x)
    assert result.output_activation == "none"
    assert len(messages) == 1 and "look like softmax probabilities" in messages[0]
    assert "output_activation='softmax'" in messages[0]
    torch.testing.assert_close(result.logits, model(x))
    _, messages = explain(base, "3", x)  # logits: no warning
    assert not messages


def test_segmentation_network_ending_in_softmax():
    unet = small_unet()
    x = torch.randn(1, 1, 24, 28, 20, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(24, 28, 20)
    mask[4:16, 6:20, 3:12] = 1
    target = medcam3d.Region(2, mask=mask)
    expected = medcam3d.Explainer(unet, "hirescam", layer="model.1")(x, target, relu=False)
    for model in (nn.Sequential(unet, nn.Softmax(dim=1)).eval(), torch.jit.script(nn.Sequential(unet, nn.Softmax(dim=1)).eval())):
        result, messages = explain(model, "0.model.1", x, target)
        assert_maps_equal(result, expected)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-4, atol=1e-3)
        assert messages and result.output_activation == "softmax"


def test_looks_like_probabilities_and_inverse():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]])
    assert looks_like_probabilities(logits) is None
    assert looks_like_probabilities(torch.softmax(logits, dim=1)) == "softmax"
    assert looks_like_probabilities(torch.sigmoid(torch.randn(2, 3, 4, 4))) == "sigmoid"
    assert looks_like_probabilities(torch.sigmoid(torch.randn(1, 2))) is None  # too few values to tell
    recovered, clamped = logits_from_probabilities(torch.sigmoid(logits), "sigmoid")
    torch.testing.assert_close(recovered, logits, rtol=1e-4, atol=1e-5)
    assert clamped == 0
    recovered, _ = logits_from_probabilities(torch.softmax(logits, dim=1), "softmax")
    torch.testing.assert_close(recovered - recovered[:, :1], logits - logits[:, :1], rtol=1e-4, atol=1e-5)
    _, clamped = logits_from_probabilities(torch.tensor([[0.0, 1.0]]), "sigmoid")
    assert clamped == 1.0
    with pytest.raises(ValueError, match="output_activation must be one of"):
        medcam3d.Explainer(gap_linear_cnn(), output_activation="softplus")


class Outer(nn.Module):
    """A plain model around a scripted network that ends in a softmax; ``scale`` changes what it returns."""

    def __init__(self, inner: nn.Module, scale: float | None) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if self.scale is None else out * self.scale


def test_softmax_inside_a_scripted_submodule_counts_only_when_its_output_is_returned():
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(7))
    expected = medcam3d.Explainer(base, "hirescam", layer="3")(x, "all", relu=False)
    inner = torch.jit.script(nn.Sequential(base, nn.Softmax(dim=1)).eval())
    result, messages = explain(Outer(inner, None), "inner.0.3", x)
    assert_maps_equal(result, expected)
    assert result.output_activation == "softmax" and "comes from a softmax" in messages[0]
    result, messages = explain(Outer(inner, 0.5), "inner.0.3", x)  # post-processed: not the logits' activation
    assert result.output_activation == "none"
    torch.testing.assert_close(result.logits, 0.5 * torch.softmax(expected.logits, dim=1))


def test_scripted_parts_ending_in_softmax_are_undone_for_every_kind_of_pass():
    """A scripted model explained without a split (input-level methods), and a plain model whose scripted
    head ends in a softmax while the target layer is eager: the logits, as for the eager model."""
    base = gap_linear_cnn(classes=4)
    x = torch.randn(2, 1, 9, 12, 7, generator=torch.Generator().manual_seed(10))
    scripted = torch.jit.script(nn.Sequential(base, nn.Softmax(dim=1)).eval())
    expected = medcam3d.Explainer(base, "gradxinput")(x, "all", relu=False)
    result, messages = explain(scripted, "auto", x, method="gradxinput")
    assert result.output_activation == "softmax" and "comes from a softmax ('1')" in messages[0]
    assert_maps_equal(result, expected)
    # an eager backbone (the target layer) and a scripted head ending in a softmax
    head = torch.jit.script(nn.Sequential(*list(base)[4:], nn.Softmax(dim=1)).eval())
    model = nn.Sequential(*list(base)[:4], head).eval()
    for method, layer in (("hirescam", "3"), ("gradxinput", "auto")):
        reference = medcam3d.Explainer(base, method, layer="3")(x, "all", relu=False)
        result, messages = explain(model, layer, x, method=method)
        assert result.output_activation == "softmax" and "comes from a softmax ('4: 3')" in messages[0], messages
        assert_maps_equal(result, reference)
        torch.testing.assert_close(result.logits, reference.logits, rtol=1e-4, atol=1e-5)
