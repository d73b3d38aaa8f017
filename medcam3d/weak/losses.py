"""The three losses of SEC (seed, expand, constrain) and the size prior, with the pooling they share (:func:`gwrp`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError, UsageError

__all__ = ["constrain_loss", "expand_loss", "gwrp", "seed_loss", "size_loss"]

_EPS = 1e-6


def gwrp(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Global weighted rank pooling over the last axis (Kolesnikov & Lampert 2016).

    ``G = sum_j d^j v_(j) / sum_j d^j`` with ``v_(0) >= v_(1) >= ...`` the values sorted in
    decreasing order: ``d = 0`` is max pooling, ``d = 1`` average pooling, and values between set
    how many of the top values count (about ``1 / (1 - d)``).

    Parameters
    ----------
    values : (..., N) Tensor
    decay : float in [0, 1]

    Returns
    -------
    (...) Tensor
        Differentiable.
    """
    if not 0.0 <= decay <= 1.0:
        raise UsageError(f"the GWRP decay must lie in [0, 1] (0: max, 1: mean), not {decay!r}.")
    n = values.shape[-1]
    if decay == 0.0:
        return values.max(dim=-1).values
    if decay == 1.0:
        return values.mean(dim=-1)
    # weights below 1e-8 of the first are dropped from the sum (their share of the total is smaller still)
    k = n if decay < 1e-8 else min(n, int(math.ceil(math.log(1e-8) / math.log(decay))) + 1)
    top = torch.topk(values, k, dim=-1, sorted=True).values
    weights = decay ** torch.arange(k, dtype=values.dtype, device=values.device)
    return (top * weights).sum(-1) / weights.sum()


def seed_loss(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the seed voxels only, each seeded class weighing the same.

    The mean over seed voxels is taken per class (background and each class) and then averaged
    over the classes that have seeds in the batch, so a few foreground seeds are not drowned by
    the many background ones. Unlabelled voxels (:data:`IGNORE`) do not count.

    Parameters
    ----------
    logits : (B, K, *S) Tensor
        ``K`` = classes + 1 (channel 0 background).
    seeds : (B, *S) integer Tensor
        0 .. K - 1, or :data:`IGNORE`.

    Returns
    -------
    () Tensor
        0 when there is no seed.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    seeds = seeds.long()
    total = logits.new_zeros(())
    count = 0
    for k in range(logits.shape[1]):
        where = seeds == k
        if bool(where.any()):
            total = total - log_p[:, k][where].mean()
            count += 1
    return total / count if count else logits.sum() * 0.0


def expand_loss(probabilities: torch.Tensor, labels: torch.Tensor, decay: float = 0.98,
                background_decay: float = 0.9999) -> torch.Tensor:
    """SEC's expand loss: GWRP of each class's probability against the image labels.

    ``-log G_c`` for each present class (decay ``decay``), ``-log (1 - max p_c)`` for each absent
    class (pushed to zero everywhere), and ``-log G_bg`` for the background (always present,
    decay ``background_decay``); the three parts are averaged over their classes and added.

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background.
    labels : (B, K - 1) Tensor
        1 where the class is present in the image, 0 where it is absent.
    decay, background_decay : float in [0, 1]

    Returns
    -------
    () Tensor
    """
    if labels.shape != (probabilities.shape[0], probabilities.shape[1] - 1):
        raise InputError(f"expand_loss needs labels of shape (B, K - 1) = {(probabilities.shape[0], probabilities.shape[1] - 1)}, "
                         f"got {tuple(labels.shape)}.")
    flat = probabilities.float().flatten(2)
    classes = flat[:, 1:]
    present = labels.to(classes.dtype) > 0.5
    pooled = gwrp(classes, decay)
    highest = classes.max(dim=-1).values
    loss_present = -torch.log(pooled.clamp_min(_EPS))
    loss_absent = -torch.log((1.0 - highest).clamp_min(_EPS))
    zero = flat.new_zeros(())
    n_present, n_absent = present.sum(), (~present).sum()
    term_present = (loss_present * present).sum() / n_present if n_present > 0 else zero
    term_absent = (loss_absent * ~present).sum() / n_absent if n_absent > 0 else zero
    term_background = -torch.log(gwrp(flat[:, 0], background_decay).clamp_min(_EPS)).mean()
    return term_present + term_absent + term_background


def size_loss(probabilities: torch.Tensor, labels: torch.Tensor, bounds: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A size prior: a present class may not cover more of the scan than its bound.

    ``log(mean_voxels p_c / bound_c)`` where the mean probability of a present class exceeds its
    bound, 0 below it, averaged over the (scan, present class) pairs. The expand loss only asks
    that a present class's *top* voxels be high; this term keeps the rest low, so a present class
    cannot grow over the body. Absent classes are not counted (the expand loss pushes them to 0).

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
        Softmax output, channel 0 background.
    labels : (B, K - 1) Tensor
        1 where the class is present in the image.
    bounds : (K - 1,) floats in (0, 1]
        The largest mean probability (share of the scan's voxels) of each class where present.

    Returns
    -------
    () Tensor
        0 when no class is present or every present class is within its bound.
    """
    bounds = torch.as_tensor(bounds, dtype=torch.float32, device=probabilities.device).flatten()
    if labels.shape != (probabilities.shape[0], probabilities.shape[1] - 1) or bounds.numel() != probabilities.shape[1] - 1:
        raise InputError(f"size_loss needs labels (B, K - 1) = {(probabilities.shape[0], probabilities.shape[1] - 1)} and "
                         f"K - 1 bounds; got labels {tuple(labels.shape)} and {bounds.numel()} bounds.")
    if not bool(((bounds > 0) & (bounds <= 1)).all()):
        raise InputError(f"size_loss bounds must lie in (0, 1], not {bounds.tolist()}.")
    mean = probabilities.float().flatten(2)[:, 1:].mean(-1)
    excess = torch.relu(torch.log(mean.clamp_min(1e-12)) - torch.log(bounds))
    present = labels.to(mean.dtype) > 0.5
    if not bool(present.any()):
        return probabilities.sum() * 0.0
    return (excess * present).sum() / present.sum()


def constrain_loss(probabilities: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """SEC's constrain loss: ``mean_voxels sum_k Q log(Q / p)``, the KL divergence from the refinement Q to p.

    Zero exactly when the output equals its refinement (an output already consistent with the
    image); the gradient flows into ``probabilities`` only (``refined`` is a target).

    Parameters
    ----------
    probabilities : (B, K, *S) Tensor
    refined : (B, K, *S) Tensor
        :func:`refine` of ``probabilities`` (detached).

    Returns
    -------
    () Tensor
    """
    if probabilities.shape != refined.shape:
        raise InputError(f"constrain_loss needs two tensors of one shape; got {tuple(probabilities.shape)} and "
                         f"{tuple(refined.shape)}.")
    q = refined.detach().float()
    log_q = torch.log(q.clamp_min(1e-12))
    log_p = torch.log(probabilities.float().clamp_min(1e-12))
    return (torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))).sum(1).mean()
