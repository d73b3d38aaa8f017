"""Receptive-field placement (issue 20, part 1): medcam3d.layers.receptive_field, feature_space with a
receptive field, and the Explainer's placement carried to scanner space, summary.json and descrip.

The reference is independent of the library: the gradient of one cell's sum over channels with
respect to a seeded noise input, computed here with a plain forward hook; its support's midpoint
(exact where the support lies inside the input) and its ``|gradient|``-weighted mean position.
"""

from __future__ import annotations

import copy
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


class _TokenNet(nn.Module):
    """Patches of 4 voxels (step 4, offset 1.5), a token sequence with self-attention and an MLP, each
    added back to its tokens, then the tokens as a map again, channel-last in between."""

    def __init__(self, attention: bool = True) -> None:
        super().__init__()
        self.embed = nn.Conv3d(1, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.attention = attention
        self.out = nn.Conv3d(8, 2, 3, padding=1)

    def forward(self, x):
        features = self.embed(x)                                  # (B, 8, d, h, w)
        b, c, *grid = features.shape
        tokens = features.flatten(2).transpose(-1, -2)            # (B, N, 8)
        if self.attention:
            q, k, v = self.qkv(self.norm(tokens)).reshape(b, -1, 3, c).permute(2, 0, 1, 3)
            tokens = tokens + torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        tokens = tokens + self.mlp(tokens)
        last = tokens.view(b, *grid, c)                           # channel-last map
        last = last + self.mlp(self.norm(last))
        return self.out(last.permute(0, 4, 1, 2, 3))


def test_token_sequences_and_channel_last_maps_are_read_from_the_graph():
    torch.manual_seed(0)
    for attention in (False, True):
        model = _TokenNet(attention).eval()
        field = receptive_field(model, "out", (1, 32, 32, 32))
        assert field == ReceptiveField((4.0,) * 3, (1.5,) * 3, (12.0,) * 3, "graph"), (attention, field)
    # without attention every cell's gradient support lies in its 3x3x3 patches: the probe agrees
    probed = receptive_field(_TokenNet(False).eval(), "out", (1, 32, 32, 32), method="probe")
    assert probed.step == (4.0,) * 3 and np.allclose(probed.offset, 1.5)


def test_patch_merging_is_a_two_voxel_window_and_a_roll_is_not_read():
    class Merge(nn.Module):  # Swin's patch merging on a channel-last map: 8 strided slices, joined along channels
        def __init__(self, roll: bool = False) -> None:
            super().__init__()
            self.embed = nn.Conv3d(1, 4, 3, padding=1)
            self.reduce = nn.Linear(32, 4)
            self.out = nn.Conv3d(4, 2, 1)
            self.roll = roll

        def forward(self, x):
            x = self.embed(x).permute(0, 2, 3, 4, 1)
            if self.roll:
                x = torch.roll(x, shifts=(1, 1, 1), dims=(1, 2, 3))
            x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in itertools.product(range(2), repeat=3)], -1)
            return self.out(self.reduce(x).permute(0, 4, 1, 2, 3))

    torch.manual_seed(0)
    # a 3-voxel conv, then a 2-voxel window of stride 2: step 2, offset 0.5, size 4
    field = receptive_field(Merge().eval(), "out", (1, 16, 16, 16))
    assert field == ReceptiveField((2.0,) * 3, (0.5,) * 3, (4.0,) * 3, "graph")
    probed = receptive_field(Merge().eval(), "out", (1, 16, 16, 16), method="probe")
    assert probed.step == field.step and np.allclose(probed.offset, field.offset)
    assert receptive_field(Merge(roll=True).eval(), "out", (1, 16, 16, 16)).source == "probe"  # a cyclic shift


# ------------------------------------------------------------------------------ MONAI networks
def _networks():
    from monai.networks import nets

    return {
        # name: (constructor of the input size, an earlier layer whose receptive field fits in the input)
        "DenseNet121": (lambda n: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                                                   growth_rate=4, bn_size=2), "features.denseblock1.denselayer1"),
        "resnet18": (lambda n: nets.ResNet("basic", [2, 2, 2, 2], [4, 8, 16, 32], spatial_dims=3, n_input_channels=1,
                                           num_classes=2), "layer1"),
        "resnet50": (lambda n: nets.ResNet("bottleneck", [3, 4, 6, 3], [4, 8, 16, 32], spatial_dims=3,
                                           n_input_channels=1, num_classes=2), "layer1.0"),
        "SEResNet50": (lambda n: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2), "layer0"),
        "EfficientNetBN-b0": (lambda n: nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1,
                                                            num_classes=2, pretrained=False), "_blocks.1.1"),
        "UNet": (lambda n: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), "model.0"),
        "BasicUNet": (lambda n: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), "conv_0"),
        "SegResNet": (lambda n: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2,
                                               norm=("GROUP", {"num_groups": 2})), "down_layers.1"),
        "DynUNet": (lambda n: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                           upsample_kernel_size=[2, 2]), "downsamples.0"),
        "AttentionUnet": (lambda n: nets.AttentionUnet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), "model.0"),
        "VNet": (lambda n: nets.VNet(3, 1, 2), "down_tr32"),
        "UNETR": (lambda n: nets.UNETR(1, 2, img_size=n, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2),
                  "encoder1"),
        "SwinUNETR": (lambda n: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3,
                                               depths=(2, 2, 1, 1), num_heads=(1, 1, 1, 1)), "encoder1"),
    }


# Sizes these networks take, the second not a multiple of the total stride where the network allows it.
# The classifiers' second size centres their deep layer's middle cell in every feature map (see the
# test): ResNets (stride 16, offset 0): 33; DenseNet121's transition3 (stride 16, offset 6): 45;
# SEResNet50's layer4 (stride 32, offset 2): 69. U-Nets need a multiple of their stride, VNet of
# 16, SwinUNETR of 32 (and more than one voxel at its bottleneck), UNETR its img_size (a multiple
# of its 16-voxel patches). EfficientNet at 32 voxels has one cell left at its last stage.
_SIZES = {"DenseNet121": (32, 45), "resnet18": (32, 33), "resnet50": (32, 33), "SEResNet50": (32, 69),
          "EfficientNetBN-b0": (64, 72), "VNet": (32, 48), "UNETR": (48, 80), "SwinUNETR": (64, 96)}
_NAMES = list(_networks())
#: Weight seeds, and noise inputs per model, that the reference gradients are averaged over.
_SEEDS, _BATCH = 4, 2


def _mirrored(model: nn.Module) -> nn.Module:
    """The model with every convolution kernel flipped along its spatial axes: as likely a draw of
    random weights as the model itself, whose kernels lean the other way (an antithetic sample: one
    random model's gradient centroid strays by ~0.6 voxel, the pair's mean hardly at all)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                   nn.ConvTranspose3d)):
                module.weight.copy_(module.weight.flip(dims=tuple(range(2, module.weight.ndim))))
    return twin


def _model_profiles(make, size: int, target: str, cells: list, source: str) -> dict:
    """Per cell: per model, per axis, the |d sum_k A[b, k, cell] / d x| profile (summed over the other
    axes and over ``_BATCH`` seeded noise inputs; the forward pass stops at the target layer).

    ``source="graph"``: the models are ``_SEEDS`` random weight seeds (seed 0 is the model under
    test), each with its mirrored twin: the geometry does not depend on the weights. ``"probe"``:
    the model under test, 4 times, with other inputs than the probe's: the probe reports where this
    model's gradient looks, which depends on its weights where paths of different places are added.
    """

    class Stop(Exception):
        pass

    models = []
    for seed in range(_SEEDS if source == "graph" else 1):
        torch.manual_seed(seed)
        model = make(size).eval()
        models += [model, _mirrored(model)] if source == "graph" else [model] * 4
    found: dict = {cell: [] for cell in cells}
    for number, net in enumerate(models):
        kept = {}

        def hook(_m, _i, output):
            kept["a"] = output
            raise Stop

        handle = dict(net.named_modules())[target].register_forward_hook(hook)
        x = torch.randn((_BATCH, 1, size, size, size), generator=torch.Generator().manual_seed(100 + number))
        x.requires_grad_(True)
        try:
            net(x)
        except Stop:
            pass
        finally:
            handle.remove()
        for k, cell in enumerate(cells):
            (g,) = torch.autograd.grad(kept["a"][(slice(None), slice(None), *cell)].sum(), x,
                                       retain_graph=k < len(cells) - 1)
            found[cell].append(_profiles(g.abs().sum(dim=(0, 1)).double().numpy()))
    return found


def _window_centroid(line: np.ndarray, reach: float = np.inf) -> float:
    """The centroid of a profile over a window centred on it (found by iterating from the plain
    centroid): the widest one that lies inside the input, at most ``reach`` voxels either side.
    Where the borders clip a profile, its plain centroid is pulled toward the input's centre; a
    symmetric window is not. A short reach keeps a deep cell's far tails out: they reach the whole
    input and carry most of the noise of one random model (its full-window centroid strays by 1-2
    voxels on DenseNet121's transition3, the one within 8 voxels by ~0.5)."""
    index = np.arange(line.size, dtype=np.float64)
    centre = _centroid(line)
    for _ in range(500):
        half = min(centre, line.size - 1 - centre, reach)
        inside = np.abs(index - centre) <= half + 1e-9
        if not line[inside].sum() > 0:
            break
        moved = float((line[inside] * index[inside]).sum() / line[inside].sum())
        if abs(moved - centre) < 1e-9:
            break
        centre = moved
    return centre


def _looked(per_model: list, axis: int, source: str) -> float:
    """Where a clipped cell's gradient looks along ``axis``: for a graph placement the mean over the
    random models of their centroids within 8 voxels (each model counts once); for a probed one the
    centroid of this model's profile over the inputs in the widest window, as the probe measures it."""
    if source == "graph":
        return float(np.mean([_window_centroid(lines[axis], reach=8) for lines in per_model]))
    return _window_centroid(sum(lines[axis] for lines in per_model))


def _middle_cells(field: ReceptiveField, grid: tuple[int, ...], size: int) -> tuple[list, bool]:
    """The cells placed nearest the input's centre: one, or two mirror images (per axis the two cells
    equally near), and whether they are placed symmetrically about the centre."""
    middle = (size - 1) / 2
    near = []
    for axis, n in enumerate(grid):
        distance = [abs(field.offset[axis] + field.step[axis] * u - middle) for u in range(n)]
        near.append([u for u in range(n) if distance[u] <= min(distance) + 1e-9])
    cells = sorted({tuple(choice[0] for choice in near), tuple(choice[-1] for choice in near)})
    symmetric = all(abs(np.mean([field.offset[a] + field.step[a] * u for u in (c[0], c[-1])]) - middle) <= 1e-6
                    for a, c in enumerate(near))
    return cells, symmetric


@pytest.mark.slow
@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("which", [0, 1])
def test_monai_networks_place_cells_where_the_gradient_looks(name, which):
    """The auto layer and an earlier one, at two input sizes, on the model made with seed 0: each
    checked cell's placed centre is within 0.5 input voxel of where its gradient looks.

    The reference is the gradient of a cell's sum over channels with respect to seeded noise
    inputs, as ``|gradient|`` profiles along each axis. A placement read from the graph is the
    geometry, the same for any weights: it is compared with 4 random weight seeds, each with its
    mirrored twin (every kernel flipped: an antithetic sample; one random model's kernels lean and
    its centroid strays by ~0.6 voxel). A probed placement is where this model's gradient looks
    (where paths of different places are added it depends on the weights): it is compared with this
    model over other noise inputs than the probe's.

    - Every sampled cell of the earlier layer and the middle cells of the auto layer whose gradient
      support lies inside the input along an axis: within 0.5 voxel of the support's midpoint and of
      the centroid of the profiles added up.
    - The middle cells (nearest the input's centre: one, or two mirror images) whose support reaches
      the input's borders (normalization or attention couples every voxel, or the layer is deep):
      their mean placed centre within 0.5 voxel of their mean centroid over a window centred on it
      inside the input (a clipped profile's plain centroid is pulled toward the input's centre): for
      a graph placement the mean over the models of the centroid within 8 voxels (a deep cell's far
      tails carry most of the noise), for a probe the widest window, as the probe measures. Mirror
      cells also cancel the staircase of 2-voxel transposed convolutions (UNETR's and SwinUNETR's
      decoders put a cell's two halves on either side of its place).
    - Not compared: a deep cell whose receptive field is larger than the input and that is not at the
      centre of every feature map. Its gradient leans toward the larger part of the feature maps, by
      1 to 9 voxels at these sizes, whatever the placement (resnet50 layer4 at 32 voxels 1.9,
      DenseNet121 transition3 5, EfficientNet-b0's last stage at 64 voxels 7.5); so the classifiers'
      deep layers are compared at their second size, where the middle cell is at the centre of every
      feature map, except EfficientNet-b0, whose static padding (built for 224 voxels) is lopsided at
      any size.
    Cells on padding (EfficientNet's static padding) have no gradient and are skipped.
    """
    if name == "SwinUNETR":
        pytest.importorskip("einops")
    from medcam3d.layers import auto_layer

    make, early = _networks()[name]
    size = _SIZES.get(name, (32, 40))[which]
    torch.manual_seed(0)
    model = make(size).eval()
    shape = (1, 1, size, size, size)
    layer = auto_layer(model, shape[1:]).name
    compared = 0
    for target in (early, layer):
        field = receptive_field(model, target, shape[1:])
        grid = _feature_shape(model, target, shape)
        middle, symmetric = _middle_cells(field, grid, size)
        if field.source == "probe":
            # A probe centres the grid's central cell. Where a network adds paths placed differently,
            # its other cells follow the fitted step only to within a voxel or two (SegResNet's
            # full-resolution cells 16-24 at 40 voxels look 0.9 to 2.6 voxels before their index).
            middle = [tuple((n - 1) // 2 for n in grid)]
        cells = list(middle)
        if target == early:
            cells += [c for c in itertools.product(*[sorted({0, n // 3, n // 2, n - 1}) for n in grid])][::5]
        per_model = _model_profiles(make, size, target, cells, field.source)
        clipped: list[list[tuple[float, float]]] = [[], [], []]
        for cell in cells:
            placed = field.centres(cell)
            for axis in range(3):
                line = sum(lines[axis] for lines in per_model[cell])
                if not line.sum() > 0:
                    assert cell not in middle, (name, target, cell, field)
                    continue  # a padding cell
                lo, hi = _support(line)
                where = (name, size, target, field, cell, axis)
                if 0 < lo and hi < size - 1:
                    assert abs(placed[axis] - (lo + hi) / 2) <= 0.5, (*where, lo, hi)
                    assert abs(placed[axis] - _centroid(line)) <= 0.5, (*where, _centroid(line))
                    compared += 1
                elif cell in middle:
                    clipped[axis].append((float(placed[axis]), _looked(per_model[cell], axis, field.source)))
        if not symmetric and max(field.size) > size:
            continue  # a deep cell off the centre of its feature maps: see the docstring
        for axis, pairs in enumerate(clipped):
            if pairs:
                placed_mean, looked_mean = np.mean(pairs, axis=0)
                assert abs(placed_mean - looked_mean) <= 0.5, (name, size, target, field, middle, axis, pairs)
                compared += 1
    assert compared >= 3


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
    native = result.feature_maps()[1]
    assert np.allclose(native.space.affine, affine @ np.diag([4.0, 4.0, 4.0, 1.0]))
    old = Explainer(model, layer="3", placement="align_corners")(x, target=1)
    assert old.placement == "align_corners" and old.receptive_field is None
    expected = feature_space(Space((32, 32, 16), affine), (8, 8, 4))  # today's convention
    assert np.allclose(old.feature_maps()[1].space.affine, expected.affine)
    assert native.descrip.endswith(" place=rf") and old.feature_maps()[1].descrip.endswith(" place=ac")
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

    from medcam3d.monai import explanation_of
    from medcam3d.monai_meta import HEATMAP_KEY, meta_entry

    model = _shifted_classifier()
    x = MetaTensor(torch.randn(1, 1, 16, 16, 16), affine=torch.eye(4))
    result = Explainer(model, layer="3")(x, target=0)
    back = explanation_of({HEATMAP_KEY: meta_entry(result, x)})
    assert back.placement == "receptive_field" and back.receptive_field == result.receptive_field


def test_summary_json_records_placement(tmp_path):
    from medcam3d.jobs.case_result import CaseResult

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


def test_probe_skips_cells_that_a_relu_cuts_off_for_some_inputs():
    """One channel after a ReLU: a probed cell has no gradient for about half of the noise inputs.
    The probe adds up the inputs where it has one (it used to give up at the first dead cell)."""
    model = nn.Sequential(nn.Conv3d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv3d(1, 1, 3, stride=2, padding=1),
                          nn.ReLU()).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.fill_(1.0 / 27)
            conv.bias.zero_()
        model[2].bias.fill_(-0.08)  # with the probe's seeds: each cell alive for 1 to 2 of its 4 inputs
    clear_cache(model)
    field = receptive_field(model, "3", (1, 20, 20, 20), method="probe")
    assert (field.step, field.offset, field.source) == ((2.0,) * 3, (0.0,) * 3, "probe")
