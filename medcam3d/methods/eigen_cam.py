"""Eigen-CAM (Muhammad & Yeasin, 2020)."""

from __future__ import annotations

import torch

from .base import Method, MethodContext


class EigenCAM(Method):
    r"""Eigen-CAM: the projection of ``A`` on its first principal direction.

    With ``A`` reshaped to ``(K, N)`` (channels × voxels) and ``v_1`` its first
    left singular vector, ``map = Σ_k v_{1,k} A_k``. The sign of a singular
    vector is arbitrary; it is chosen so that the map sums to a non-negative
    value. Class-agnostic: every target gets the same map; no gradients needed.

    References
    ----------
    Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020, arXiv:2008.00299.
    """

    name = "eigencam"
    needs_gradients = False
    class_specific = False

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MethodContext) -> torch.Tensor:
        flat = activations[:, 0].flatten(start_dim=2).double()  # (B, K, N)
        left, _, _ = torch.linalg.svd(flat, full_matrices=False)
        direction = left[..., 0]  # (B, K)
        total = torch.einsum("bk,bkn->b", direction, flat)
        direction = direction * torch.where(total < 0, -1.0, 1.0).unsqueeze(-1).to(direction.dtype)
        direction = direction.to(activations.dtype)
        return direction.reshape(direction.shape[0], 1, direction.shape[1], *([1] * (activations.ndim - 3)))
