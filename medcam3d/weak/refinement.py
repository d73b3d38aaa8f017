"""The boundary-aware refinement of a soft segmentation (:func:`refine`): a local mean-field CRF on the image.

The dense CRF's mean-field update (Krähenbühl & Koltun) with its Gaussian appearance and
smoothness kernels restricted to a window of neighbours, written in torch; why not a packaged
dense CRF is in :mod:`medcam3d.weak`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["refine"]


def _offsets(radius: int) -> list[tuple[int, int, int]]:
    r = range(-radius, radius + 1)
    return [(a, b, c) for a in r for b in r for c in r if (a, b, c) != (0, 0, 0)]


def _shifted(padded: torch.Tensor, offset: Sequence[int], radius: int, shape: Sequence[int]) -> torch.Tensor:
    """``padded[..., i + o]`` for every voxel ``i`` of ``shape`` (``padded`` has ``radius`` more on each side)."""
    index: tuple[Any, ...] = (Ellipsis, *(slice(radius + o, radius + o + n) for o, n in zip(offset, shape)))
    return padded[index]


@torch.no_grad()
def refine(probabilities: torch.Tensor, image: torch.Tensor, *, iterations: int = 3, radius: int = 1,
           spatial_sigma: float = 1.0, intensity_sigma: float = 0.05, appearance_weight: float = 3.0,
           smoothness_weight: float = 1.0, candidate: float | None = 0.3, margin: int = 3) -> torch.Tensor:
    """A boundary-aware refinement of a soft segmentation: local mean-field CRF on the image.

    The mean-field update of the dense CRF (Potts compatibility) with its two Gaussian kernels,
    restricted to the neighbours within ``radius`` voxels (a cube)::

        k(i, j) = w_a exp(-|i - j|² / 2 s² - |I_i - I_j|² / 2 t²) + w_s exp(-|i - j|² / 2 s²)
        Q_i(l) ∝ p_i(l) exp(sum_j k(i, j) Q_j(l))        (``iterations`` times, from Q = p)

    The appearance kernel lets a label spread between neighbours of similar intensity and not
    across an edge; the smoothness kernel removes isolated voxels. A hard (0/1) output is left as
    it is (its zeros stay zeros). Where every foreground channel (1 ..) is below ``candidate``,
    plus ``margin`` voxels, nothing is refined (Q = p): the work is proportional to the candidate
    region, not to the scan.

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background (the unary is its log).
    image : (B, C_in, *S) Tensor
        The network's input (intensity differences summed over channels).
    iterations : int
    radius : int
        Neighbourhood half-width in voxels.
    spatial_sigma : float
        ``s``, voxels.
    intensity_sigma : float
        ``t``, in the image's units (the demo's window maps 500 HU to 1, so 0.05 is 25 HU).
    appearance_weight, smoothness_weight : float
        ``w_a``, ``w_s``.
    candidate : float or None
        Refine only the box of the voxels where a foreground channel reaches this (None: everywhere).
    margin : int
        Voxels added around that box.

    Returns
    -------
    (B, K, *S) Tensor
        Q, float32, summing to 1 over K.
    """
    if probabilities.ndim < 3 or image.shape[0] != probabilities.shape[0] or image.shape[2:] != probabilities.shape[2:]:
        raise InputError(f"refine needs probabilities (B, K, *S) and an image (B, C, *S) on the same grid; got "
                         f"{tuple(probabilities.shape)} and {tuple(image.shape)}.")
    p = probabilities.float()
    out = p.clone()
    for b in range(p.shape[0]):
        if candidate is None or p.shape[1] < 2:
            box = tuple(slice(0, n) for n in p.shape[2:])
        else:
            where = torch.nonzero((p[b, 1:] >= candidate).any(0))
            if where.numel() == 0:
                continue
            low = (where.min(0).values - margin).clamp_min(0).tolist()
            high = (where.max(0).values + margin + 1).tolist()
            box = tuple(slice(int(lo), min(int(hi), n)) for lo, hi, n in zip(low, high, p.shape[2:]))
        where_box: tuple[Any, ...] = (b, slice(None), *box)
        out[where_box] = _mean_field(p[where_box][None], image[where_box][None].float(), iterations, radius,
                                     spatial_sigma, intensity_sigma, appearance_weight, smoothness_weight)[0]
    return out


def _mean_field(p: torch.Tensor, image: torch.Tensor, iterations: int, radius: int, spatial_sigma: float,
                intensity_sigma: float, appearance_weight: float, smoothness_weight: float) -> torch.Tensor:
    """:func:`refine` on one box ``(1, K, *s)``."""
    shape = p.shape[2:]
    unary = torch.log(p.clamp_min(0.0))  # -inf where p is exactly 0: such a label stays impossible
    pad = [radius] * (2 * len(shape))
    padded_image = F.pad(image, pad)
    inside = F.pad(torch.ones_like(image[:, :1]), pad)
    offsets = _offsets(radius)
    kernels = []
    for offset in offsets:
        spatial = math.exp(-float(sum(o * o for o in offset)) / (2.0 * spatial_sigma**2))
        difference2 = (image - _shifted(padded_image, offset, radius, shape)).square().sum(1, keepdim=True)
        weight = torch.exp(difference2.mul_(-1.0 / (2.0 * intensity_sigma**2))).mul_(appearance_weight * spatial)
        weight.add_(smoothness_weight * spatial).mul_(_shifted(inside, offset, radius, shape))
        kernels.append(weight)
    q = p
    for _ in range(iterations):
        padded = F.pad(q, pad)
        message = unary.clone()
        for offset, weight in zip(offsets, kernels):
            message.addcmul_(weight, _shifted(padded, offset, radius, shape))
        q = torch.softmax(message, dim=1)
    return q
