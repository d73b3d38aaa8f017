"""LayerCAM (Jiang et al., 2021)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext


class LayerCAM(Method):
    r"""LayerCAM: ``map = Σ_k ReLU(G_k) ⊙ A_k``.

    References
    ----------
    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021.
    """

    name = "layercam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert gradients is not None
        return gradients.clamp_min(0)
