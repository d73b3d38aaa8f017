"""XGrad-CAM (Fu et al., 2020)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext, spatial_axes


class XGradCAM(Method):
    r"""XGrad-CAM: ``α_k = Σ_{d,v,u} G_k ⊙ A_k / Σ_{d,v,u} A_k``.

    Channels whose activations sum to zero get weight 0.

    References
    ----------
    Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and
    Explanation of CNNs", BMVC 2020, arXiv:2008.02312.
    """

    name = "xgradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert gradients is not None
        axes = spatial_axes(gradients)
        numerators = (gradients * activations).sum(dim=axes, keepdim=True)
        denominators = activations.sum(dim=axes, keepdim=True)
        safe = torch.where(denominators != 0, denominators, torch.ones_like(denominators))
        return torch.where(denominators != 0, numerators / safe, torch.zeros_like(numerators))
