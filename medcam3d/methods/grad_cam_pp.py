"""Grad-CAM++ (Chattopadhyay et al., 2018)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext, spatial_axes


class GradCAMPlusPlus(Method):
    r"""Grad-CAM++: ``w_k = Σ_{d,v,u} a_k ReLU(G_k)`` with
    ``a_k = G_k² / (2 G_k² + Σ_{d,v,u} A_k · G_k³)`` (0 where ``G_k = 0``).

    This is the usual closed form, which assumes an exponential of the score
    so that higher derivatives are powers of the first.

    References
    ----------
    Chattopadhyay et al., "Grad-CAM++: Improved Visual Explanations for Deep
    Convolutional Networks", WACV 2018, arXiv:1710.11063.
    """

    name = "gradcam++"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert gradients is not None
        axes = spatial_axes(gradients)
        squared = gradients.pow(2)
        activation_sums = activations.sum(dim=axes, keepdim=True)
        denominator = 2 * squared + activation_sums * gradients.pow(3)
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alphas = torch.where(gradients != 0, squared / safe, torch.zeros_like(gradients))
        return (alphas * gradients.clamp_min(0)).sum(dim=axes, keepdim=True)
