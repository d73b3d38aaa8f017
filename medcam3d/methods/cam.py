"""CAM (Zhou et al., 2016)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext


class CAM(Method):
    r"""Class activation mapping: ``map^c = Σ_k w_k^c A_k``.

    ``w^c`` is row c of the weight of the Linear layer that follows global
    average pooling of the target layer. Valid only for that architecture
    (the explainer checks it on every call); on it, ``CAM = Grad-CAM · (d·v·u)``.

    References
    ----------
    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016,
    arXiv:1512.04150.
    """

    name = "cam"
    needs_gradients = False
    needs_head = True

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert context.head_weight is not None
        rows = context.head_weight[context.class_indices]  # (B, T, K)
        rows = rows * context.signs.unsqueeze(-1).to(rows.dtype)
        return rows.reshape(*rows.shape, *([1] * (activations.ndim - 3)))
