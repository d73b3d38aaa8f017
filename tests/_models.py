"""Tiny seeded models (hand-made and MONAI networks) and the independent reference used by the explainer tests."""

from __future__ import annotations

import torch
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def gap_linear_cnn(dims: int = 3, classes: int = 4, seed: int = 0) -> nn.Sequential:
    """Conv → ReLU → Conv → ReLU → GAP → Linear. Target layer: index "3" (last ReLU)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        CONV[dims](1, 6, 3, padding=1),
        nn.ReLU(),
        CONV[dims](6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        POOL[dims](1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def flatten_linear_cnn(feature_shape: tuple[int, ...], classes: int = 4, seed: int = 0) -> nn.Sequential:
    """Conv → ReLU → Conv(stride 2) → Flatten → Linear: the HiResCAM paper's setting.

    Target layer "2"; ``feature_shape`` is the output grid of layer "2".
    """
    torch.manual_seed(seed)
    dims = len(feature_shape)
    numel = 1
    for s in feature_shape:
        numel *= s
    return nn.Sequential(
        CONV[dims](1, 5, 3, padding=1),
        nn.ReLU(),
        CONV[dims](5, 7, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(7 * numel, classes),
    ).eval()


def resnet18_3d(classes: int = 4) -> nn.Module:
    """MONAI's 3D resnet18 (1 input channel), seeded."""
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    return resnet18(spatial_dims=3, n_input_channels=1, num_classes=classes).eval()


def densenet121_3d(classes: int = 3) -> nn.Module:
    """MONAI's 3D DenseNet121 (1 input channel), seeded."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes).eval()


def small_unet() -> nn.Module:
    """A small MONAI UNet segmenting 3 classes, seeded."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def small_segresnet() -> nn.Module:
    """A small MONAI SegResNet segmenting 3 classes, seeded."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 1, 2), blocks_up=(1, 1)).eval()


class Failing(nn.Module):
    """Wraps a model; raises inside forward (after the target layer ran) when ``fail`` is set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.fail:
            raise RuntimeError("planned failure inside forward")
        return out


def reference_activations_and_gradients(model: nn.Module, layer: str, x: torch.Tensor, score_fn):
    """A and ∂score/∂A with a full autograd graph, independent of medcam3d.

    The hook stores the layer's own output and passes on ``output * 1`` so that a
    later in-place op cannot change the stored tensor.
    """
    stored = {}
    module = dict(model.named_modules())[layer]

    def hook(mod, inputs, output):
        stored["A"] = output
        return output * 1

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = model(x)
            score = score_fn(out)
            (gradients,) = torch.autograd.grad(score, stored["A"])
    finally:
        handle.remove()
    return stored["A"].detach(), gradients.detach()
