"""Grad-CAM (Selvaraju et al., 2017)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext, spatial_axes


class GradCAM(Method):
    r"""Grad-CAM: ``α_k = mean_{d,v,u} ∂y^c/∂A_k``, ``map = Σ_k α_k A_k``.

    The spatial averaging of the gradients can move credit to regions the
    model did not use; prefer :class:`~medcam3d.methods.hires_cam.HiResCAM`.

    References
    ----------
    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, arXiv:1610.02391.
    """

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert gradients is not None
        return gradients.mean(dim=spatial_axes(gradients), keepdim=True)
