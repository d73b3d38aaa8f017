"""HiResCAM (Draelos & Carin, 2020): the default method."""

from __future__ import annotations

import torch

from .base import Method, MethodContext


class HiResCAM(Method):
    r"""HiResCAM: ``map = Σ_k (∂y^c/∂A_k) ⊙ A_k`` (element-wise, no averaging).

    For a CNN that ends in one fully connected layer (flatten + Linear) the
    signed map sums over voxels to exactly ``y^c − b^c``: it shows only the
    locations the model used. On a GAP + Linear head it equals Grad-CAM.

    References
    ----------
    Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations
    of convolutional neural networks", arXiv:2011.08891.
    """

    name = "hirescam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        assert gradients is not None
        return gradients
