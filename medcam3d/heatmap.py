"""Heatmaps: normalization (explicit, separate from the raw maps)."""

from __future__ import annotations

import torch

__all__ = ["normalize"]


def normalize(maps: torch.Tensor, *, spatial_dims: int | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Min–max normalize each map to [0, 1].

    Never inverts (the minimum maps to 0, the maximum to 1) and never returns NaN:
    a flat map (max − min ≤ ``eps``) becomes all zeros.

    Parameters
    ----------
    maps : (..., *spatial) Tensor
        Raw maps, e.g. ``Explanation.maps`` of shape ``(B, T, D, V, U)``.
    spatial_dims : int, optional
        How many trailing axes form one map. Defaults to ``maps.ndim - 2``
        (``(B, T, *spatial)`` layout) and to ``maps.ndim`` for 1- or 2-axis input.
    eps : float
        Range below which a map counts as flat.

    Returns
    -------
    (..., *spatial) Tensor
        float32, values in [0, 1].
    """
    maps = torch.as_tensor(maps)
    if spatial_dims is None:
        spatial_dims = maps.ndim - 2 if maps.ndim > 2 else maps.ndim
    if not 1 <= spatial_dims <= maps.ndim:
        message = f"spatial_dims must be in [1, {maps.ndim}] for a {maps.ndim}-D tensor, not {spatial_dims}."
        raise ValueError(message)
    maps = maps.float()
    flat = maps.flatten(start_dim=maps.ndim - spatial_dims)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    scaled = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return scaled.view_as(maps)
