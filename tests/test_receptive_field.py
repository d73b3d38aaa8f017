"""Receptive-field placement (issue 20, part 1): medcam3d.layers.receptive_field, feature_space with a
receptive field, and the Explainer's placement carried to scanner space, summary.json and descrip.

The reference is independent of the library: the gradient of one cell's sum over channels with
respect to a seeded noise input, computed here with a plain forward hook; its support's midpoint
(exact where the support lies inside the input) and its ``|gradient|``-weighted mean position.
"""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medcam3d import Explainer
from medcam3d.layers import ReceptiveField, receptive_field
from medcam3d.receptive_field import clear_cache
from medcam3d.space import Space, feature_space


# ------------------------------------------------------------------------------ the reference
def _gradient(model: nn.Module, layer: str, shape: tuple[int, ...], cell: tuple[int, ...]) -> np.ndarray:
    """|d sum_k A[0, k, cell] / d x| summed over input channels, on seeded noise: (*spatial) float64."""
    module = dict(model.named_modules())[layer]
    kept: dict[str, torch.Tensor] = {}

    def hook(_m, _i, output):
        kept["a"] = output

    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    handle = module.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(kept["a"][(0, slice(None), *cell)].sum(), x)
    return g.abs().sum(dim=(0, 1)).double().numpy()


def _feature_shape(model: nn.Module, layer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    module = dict(model.named_modules())[layer]
    kept: dict[str, tuple] = {}

    def hook(_m, _i, output) -> None:  # returns None: the output stays the module's
        kept.setdefault("s", tuple(output.shape[2:]))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    finally:
        handle.remove()
    return kept["s"]


def _profiles(weight: np.ndarray) -> list[np.ndarray]:
    axes = range(weight.ndim)
    return [weight.sum(axis=tuple(b for b in axes if b != a)) for a in axes]


def _support(line: np.ndarray) -> tuple[int, int]:
    found = np.flatnonzero(line > 0)
    return int(found[0]), int(found[-1])


def _centroid(line: np.ndarray) -> float:
    return float((line * np.arange(line.size)).sum() / line.sum())


# ------------------------------------------------------------------------------ analytic cases
def test_conv_stack_matches_hand_computed_values():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),              # step 1, offset 0, size 3
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1),    # step 2, offset 0, size 5
        nn.MaxPool3d(2),                            # step 4, offset 0 + 2 * 0.5 = 1, size 7
        nn.Conv3d(4, 4, 3, stride=2, dilation=2),   # reach 5: step 8, offset 1 + 4 * 2 = 9, size 7 + 4 * 4 = 23
    ).eval()
    field = receptive_field(model, "4", (1, 64, 64, 64))
    assert field == ReceptiveField((8.0,) * 3, (9.0,) * 3, (23.0,) * 3, "graph")
    # The gradient's support is exactly that box, for every cell inside the input.
    grid = _feature_shape(model, "4", (1, 1, 64, 64, 64))
    for cell in [(1, 1, 1), (2, 3, 1), tuple(n - 2 for n in grid)]:
        for axis, line in enumerate(_profiles(_gradient(model, "4", (1, 1, 64, 64, 64), cell))):
            lo, hi = _support(line)
            assert 0 < lo and hi < 63  # inside the input
            assert (lo + hi) / 2 == field.offset[axis] + field.step[axis] * cell[axis]
            assert hi - lo + 1 == field.size[axis]
    # The probe finds the same, and the align_corners convention does not (step 8, offset 3.5).
    assert receptive_field(model, "4", (1, 64, 64, 64), method="probe") == ReceptiveField(
        (8.0,) * 3, (9.0,) * 3, (23.0,) * 3, "probe")


def test_same_padding_transposed_conv_and_upsampling():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 4, padding="same"),             # even kernel: left pad 1, offset 0.5
        nn.Conv2d(2, 2, 2, stride=2),                   # step 2, offset 0.5 + 0.5 = 1
        nn.ConvTranspose2d(2, 2, 2, stride=2),          # step 1, offset 1 + 2 * (0 - 0.5) / 2 = 0.5
        nn.Conv2d(2, 2, 3, stride=2, padding=1),        # step 2, offset 0.5
        nn.Upsample(scale_factor=2, mode="bilinear"),   # step 1, offset 0.5 + 2 * (0.25 - 0.5) = 0
    ).eval()
    assert receptive_field(model, "1", (1, 16, 16)).offset == (1.0, 1.0)
    assert receptive_field(model, "2", (1, 16, 16)).step == (1.0, 1.0)
    assert receptive_field(model, "2", (1, 16, 16)).offset == (0.5, 0.5)
    field = receptive_field(model, "4", (1, 16, 16))
    assert (field.step, field.offset, field.source) == ((1.0, 1.0), (0.0, 0.0), "graph")


def test_torchscript_uses_the_probe_and_agrees():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 5, padding=1), nn.ReLU(), nn.Conv3d(3, 3, 3, stride=2), nn.ReLU(),
                          nn.Conv3d(3, 3, 3, stride=2, padding=2)).eval()
    plain = receptive_field(model, "4", (1, 40, 40, 40))
    scripted = torch.jit.script(model)
    probed = receptive_field(scripted, "4", (1, 40, 40, 40))
    assert plain.source == "graph" and probed.source == "probe"
    assert probed.step == plain.step
    assert np.allclose(probed.offset, plain.offset, atol=1e-9) and probed.size == plain.size


def test_branches_that_disagree_fall_back_to_the_probe():
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv3d(1, 2, 3, stride=2, padding=1)   # cells at 2u
            self.b = nn.Conv3d(1, 2, 2, stride=2)              # cells at 2u + 0.5
            self.out = nn.Conv3d(2, 2, 1)

        def forward(self, x):
            return self.out(self.a(x) + self.b(x))

    torch.manual_seed(0)
    field = receptive_field(Shifted().eval(), "out", (1, 16, 16, 16))
    assert field.source == "probe" and field.step == (2.0, 2.0, 2.0)
    assert all(0 <= o <= 0.5 for o in field.offset)  # between the two paths (the union of their supports)


# ------------------------------------------------------------------------------ MONAI networks
def _networks():
    from monai.networks import nets

    return {
        # name: (constructor, an earlier layer whose receptive field fits in the input)
        "DenseNet121": (lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                                                 growth_rate=4, bn_size=2), "features.denseblock1.denselayer1"),
        "resnet18": (lambda: nets.ResNet("basic", [2, 2, 2, 2], [4, 8, 16, 32], spatial_dims=3, n_input_channels=1,
                                         num_classes=2), "layer1"),
        "resnet50": (lambda: nets.ResNet("bottleneck", [3, 4, 6, 3], [4, 8, 16, 32], spatial_dims=3,
                                         n_input_channels=1, num_classes=2), "layer1.0"),
        "SEResNet50": (lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2), "layer0"),
        "EfficientNetBN-b0": (lambda: nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1,
                                                          num_classes=2, pretrained=False), "_blocks.1.1"),
        "UNet": (lambda: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), "model.0"),
        "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), "conv_0"),
        "SegResNet": (lambda: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2,
                                             norm=("GROUP", {"num_groups": 2})), "down_layers.1"),
        "DynUNet": (lambda: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                         upsample_kernel_size=[2, 2]), "downsamples.0"),
        "AttentionUnet": (lambda: nets.AttentionUnet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), "model.0"),
        "VNet": (lambda: nets.VNet(3, 1, 2), "down_tr32"),
        "UNETR": (lambda: nets.UNETR(1, 2, img_size=32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2),
                  "encoder1"),
        "SwinUNETR": (lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3),
                      "encoder1"),
    }


_SIZES = {"UNETR": (32, 32), "VNet": (32, 48), "SwinUNETR": (32, 64)}  # sizes these networks take
_NAMES = list(_networks())


@pytest.mark.slow
@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("which", [0, 1])
def test_monai_networks_place_cells_where_the_gradient_looks(name, which):
    """The auto layer and an earlier one, at two input sizes (the second not a multiple of the stride,
    where the network allows): each cell whose gradient support lies inside the input is placed at
    the support's midpoint (within 0.5 voxel) and within 0.5 voxel of its gradient centroid; for the
    auto layer, whose receptive field is larger than these small inputs, the cell nearest the input's
    centre is placed nearer its gradient centroid than the align_corners convention places it, or
    within 0.5 voxel of it."""
    if name == "SwinUNETR":
        pytest.importorskip("einops")
    from medcam3d.layers import auto_layer

    make, early = _networks()[name]
    size = _SIZES.get(name, (32, 40))[which]
    torch.manual_seed(0)
    model = make().eval()
    shape = (1, 1, size, size, size)
    layer = auto_layer(model, shape[1:]).name
    for target in (early, layer):
        field = receptive_field(model, target, shape[1:])
        grid = _feature_shape(model, target, shape)
        if target == early:
            cells = [c for c in itertools.product(*[sorted({0, n // 3, n // 2, n - 1}) for n in grid])][::5]
            checked = 0
            for cell in cells:
                profiles = _profiles(_gradient(model, target, shape, cell))
                placed = field.centres(cell)
                for axis, line in enumerate(profiles):
                    lo, hi = _support(line)
                    if lo == 0 or hi == size - 1:
                        continue  # clipped by the input's borders, or coupled to the whole image (normalization)
                    checked += 1
                    assert abs(placed[axis] - (lo + hi) / 2) <= 0.5, (name, target, cell, axis, field)
                    # random kernels are not symmetric: their |gradient| centroid strays from the centre (seen: 0.58)
                    assert abs(placed[axis] - _centroid(line)) <= 1.0, (name, target, cell, axis, field)
            if checked == 0:  # every support reaches the borders: global normalization; the centroid then
                cell = tuple(n // 2 for n in grid)
                profiles = _profiles(_gradient(model, target, shape, cell))
                placed = field.centres(cell)
                assert all(abs(placed[a] - _centroid(line)) <= 0.5 for a, line in enumerate(profiles)), (
                    name, target, cell, field, [_centroid(line) for line in profiles])
        else:
            centre = (size - 1) / 2
            cell = min(itertools.product(*[range(n) for n in grid]),
                       key=lambda u: float(np.abs(field.centres(u) - centre).max()))
            profiles = _profiles(_gradient(model, target, shape, cell))
            placed = field.centres(cell)
            convention = np.array([(u + 0.5) * size / n - 0.5 for u, n in zip(cell, grid)])
            for axis, line in enumerate(profiles):
                looked = _centroid(line)
                assert abs(placed[axis] - looked) <= max(0.5, abs(convention[axis] - looked)), (
                    name, target, cell, axis, field, looked, convention)


def test_resnet18_layer4_at_96_is_placed_where_the_issue_measured():
    """The issue's measurement (MONAI resnet18, random weights, 96^3): layer4 cell (3,3,3) looks at
    voxel 47.6; the convention placed it at 55.5; the receptive field places it at 48."""
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    field = receptive_field(model, "layer4", (1, 96, 96, 96))
    assert (field.step, field.offset, field.source) == ((16.0,) * 3, (0.0,) * 3, "graph")
    assert field.centres((3, 3, 3)).tolist() == [48.0] * 3
    # cached: the same object for any size (no shape-dependent operation on the path)
    assert receptive_field(model, "layer4", (1, 97, 80, 64)) is field


def test_densenet121_norm5_matches_the_issue():
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4, bn_size=2)
    field = receptive_field(model.eval(), "features.norm5", (1, 96, 96, 96))
    # the issue measured cell (1,1,1) at voxel 46.0 (the convention: 47.5)
    assert field.step == (32.0,) * 3 and field.centres((1, 1, 1)).tolist() == [46.0] * 3


# ------------------------------------------------------------------------------ feature_space
def test_feature_space_with_and_without_receptive_field():
    affine = np.array([[0.0, 0.0, 1.5, -10], [-0.8, 0.0, 0.0, 20], [0.0, 2.0, 0.0, 5], [0, 0, 0, 1]])
    space = Space((64, 64, 32), affine)
    field = ReceptiveField((16.0, 16.0, 8.0), (0.0, 1.0, 3.5), (100.0, 100.0, 50.0))
    placed = feature_space(space, (4, 4, 4), receptive_field=field)
    expected = affine @ np.array([[16, 0, 0, 0], [0, 16, 0, 1], [0, 0, 8, 3.5], [0, 0, 0, 1.0]])
    assert np.allclose(placed.affine, expected)
    assert np.allclose(placed.voxel_to_world([2, 1, 3]), space.voxel_to_world([32, 17, 27.5]))
    convention = feature_space(space, (4, 4, 4))  # today's: s = 16, 16, 8; offset (s - 1) / 2
    assert np.allclose(convention.voxel_to_world([0, 0, 0]), space.voxel_to_world([7.5, 7.5, 3.5]))
    with pytest.warns(UserWarning, match="align_corners=False convention, which can be off by up to half a cell"):
        feature_space(Space((66, 64, 32), affine), (5, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_space(Space((66, 64, 32), affine), (5, 4, 4), receptive_field=field)  # no warning: placed exactly


def test_receptive_field_round_trips_and_identity():
    field = ReceptiveField((16, 16, 16), (0, 0.5, 1), (221, 221, 221), "probe")
    assert ReceptiveField.from_dict(json.loads(json.dumps(field.to_dict()))) == field
    identity = ReceptiveField.identity(3)
    assert identity.step == (1.0,) * 3 and identity.offset == (0.0,) * 3 and identity.source == "identity"
    assert np.allclose(identity.matrix(), np.eye(4))
    with pytest.raises(ValueError, match="step must be positive"):
        ReceptiveField((0.0,), (0.0,), (1.0,))


# ------------------------------------------------------------------------------ Explainer and downstream
def _shifted_classifier() -> nn.Module:
    """Stride 4, offset 0 (padding 1 on k3 s2 twice): the convention says offset 1.5."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 2)).eval()


def test_explainer_default_placement_and_align_corners():
    from monai.data import MetaTensor

    model = _shifted_classifier()
    affine = np.diag([0.7, 1.2, 2.5, 1.0])
    x = MetaTensor(torch.randn(1, 1, 32, 32, 16), affine=torch.as_tensor(affine))
    result = Explainer(model, layer="3")(x, target=1)
    assert result.placement == "receptive_field"
    assert result.receptive_field == ReceptiveField((4.0,) * 3, (0.0,) * 3, (7.0,) * 3, "graph")
    native = result.to_scanner_space()[0]
    assert np.allclose(native.space.affine, affine @ np.diag([4.0, 4.0, 4.0, 1.0]))
    old = Explainer(model, layer="3", placement="align_corners")(x, target=1)
    assert old.placement == "align_corners" and old.receptive_field is None
    expected = feature_space(Space((32, 32, 16), affine), (8, 8, 4))  # today's convention
    assert np.allclose(old.to_scanner_space()[0].space.affine, expected.affine)
    assert native.descrip.endswith(" place=rf") and old.to_scanner_space()[0].descrip.endswith(" place=ac")
    with pytest.raises(ValueError, match="placement must be one of"):
        Explainer(model, placement="centre")


def test_scanner_space_heatmap_moves_by_the_offset_on_an_oblique_anisotropic_grid():
    """A map with one hot cell: its scanner-space peak moves by the receptive-field offset minus the
    convention's, through the input's oblique anisotropic affine, in mm."""
    from monai.data import MetaTensor

    from medcam3d.heatmap import to_scanner_space

    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.1, 2.0])
    affine[:3, 3] = [12.0, -30.0, 4.0]
    model = _shifted_classifier()
    x = MetaTensor(torch.randn(1, 1, 32, 32, 32), affine=torch.as_tensor(affine))
    result = Explainer(model, layer="3")(x, target=0)
    hot = torch.zeros_like(result.maps)
    hot[0, 0, 3, 5, 2] = 1.0
    from dataclasses import replace

    new = replace(result, maps=hot)
    old = replace(new, placement="align_corners", receptive_field=None)
    scan = Space((32, 32, 32), affine)
    centres = []
    for explanation in (new, old):
        data = to_scanner_space(explanation, scan)[0].data.astype(np.float64)  # a trilinear tent around the cell
        index = np.indices(data.shape).reshape(3, -1)
        centres.append(scan.voxel_to_world((index * data.ravel()).sum(axis=1) / data.sum()))
    # cell (3, 5, 2): the receptive field's centre is input voxel 4u = (12, 20, 8); the convention's 4u + 1.5
    assert np.allclose(scan.world_to_voxel(centres[0]), [12, 20, 8], atol=1e-6)
    shift_mm = affine[:3, :3] @ np.array([1.5, 1.5, 1.5])  # 1.5 voxels along each oblique, anisotropic axis
    assert np.allclose(centres[1] - centres[0], shift_mm, atol=1e-6)


def test_explanations_through_monai_metadata_keep_the_placement():
    from monai.data import MetaTensor

    from medcam3d.monai import HEATMAP_KEY, _meta_entry, explanation_of

    model = _shifted_classifier()
    x = MetaTensor(torch.randn(1, 1, 16, 16, 16), affine=torch.eye(4))
    result = Explainer(model, layer="3")(x, target=0)
    back = explanation_of({HEATMAP_KEY: _meta_entry(result, x)})
    assert back.placement == "receptive_field" and back.receptive_field == result.receptive_field


def test_summary_json_records_placement(tmp_path):
    from medcam3d.jobs.runner import CaseResult

    result = CaseResult(case_id="c1", image="x.nii.gz", placement={"hirescam": {
        "placement": "receptive_field", "layer": "layer4",
        "receptive_field": ReceptiveField((16.0,) * 3, (0.0,) * 3, (221.0,) * 3).to_dict()}})
    data = json.loads(json.dumps(result.to_summary()))
    assert data["placement"]["hirescam"]["receptive_field"]["offset"] == [0.0, 0.0, 0.0]
    assert CaseResult.from_summary(data).placement == result.placement


def test_probe_never_changes_the_model():
    model = _shifted_classifier().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clear_cache(model)
    receptive_field(model, "3", (1, 16, 16, 16), method="probe")
    receptive_field(model, "3", (1, 16, 16, 16), method="graph")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_trace_and_probe_never_call_the_users_hooks():
    """The meta-device trace and the gradient probe run on a view of the model without the user's
    hooks: a user's hook is never handed meta tensors or the probe's noise, and stays on the model."""
    model = _shifted_classifier()
    calls: list[str] = []
    model[2].register_forward_hook(lambda _m, _i, output: calls.append(f"forward {output.device.type}"))
    model[0].register_forward_pre_hook(lambda _m, inputs: calls.append(f"pre {inputs[0].device.type}"))
    model[2].register_full_backward_hook(lambda _m, _gi, _go: calls.append("backward"))
    for method in ("graph", "probe"):
        clear_cache(model)
        receptive_field(model, "3", (1, 16, 16, 16), method=method)
    assert calls == []
    model(torch.randn(1, 1, 8, 8, 8, requires_grad=True))[0, 0].backward()
    assert calls == ["pre cpu", "forward cpu", "backward"]  # the hooks are still the model's, and run


def test_receptive_field_leaves_flags_grads_and_hooks_and_is_cached():
    model = _shifted_classifier()
    model[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    tables = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    clear_cache(model)
    first = receptive_field(model, "3", (1, 16, 16, 16), method="probe")
    assert receptive_field(model, "3", (1, 16, 16, 16), method="probe") is first  # cached
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()] == tables
    assert all(p.grad is None for p in model.parameters())
