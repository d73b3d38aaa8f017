"""Fold ensembles: one map per fold and their mean (nnU-Net's five folds, any same-architecture models).

Each fold is explained on its own (its own forward and one batched backward for all classes), with
the same method, layer name and targets; the folds share the architecture, so their maps lie on the
same feature grid with the same affine and are averaged voxel by voxel. The mean map is that of the
ensemble in the sense of "the average explanation", not the gradient of the averaged logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .errors import InputError
from .explainer import Explainer
from .explanation import Explanation

__all__ = ["explain_folds", "mean_explanation"]


def mean_explanation(explanations: Sequence[Explanation], method: str | None = None) -> Explanation:
    """The mean of the folds' explanations (maps, logits and scores), named ``method``.

    Raises
    ------
    InputError
        The folds explained different classes, or their maps differ in shape or grid.
    """
    first = explanations[0]
    for other in explanations[1:]:
        if other.targets != first.targets or other.maps.shape != first.maps.shape:
            message = (f"the folds explained different classes or grids ({first.targets} on {tuple(first.maps.shape)} vs "
                       f"{other.targets} on {tuple(other.maps.shape)}); give the classes to explain (--target 1,2).")
            raise InputError(message)
    def mean(name: str) -> torch.Tensor:
        return torch.stack([getattr(e, name).float() for e in explanations]).mean(0)

    return dataclasses.replace(first, maps=mean("maps"), logits=mean("logits"), scores=mean("scores"),
                               method=method or first.method)


def explain_folds(explainers: Sequence[Explainer], x: torch.Tensor, target: object = None, *,
                  explain: Callable[[Explainer, torch.Tensor, object], Explanation] | None = None,
                  ) -> tuple[Explanation, list[Explanation]]:
    """Explain ``x`` with each fold's explainer; return the mean and the per-fold explanations.

    Parameters
    ----------
    explainers : sequence of Explainer
        One per fold (same method and layer name).
    x : (B, C_in, *S) Tensor or MetaTensor
    target : object
        As for :class:`Explainer` (the same for every fold).
    explain : callable, optional
        ``explain(explainer, x, target) -> Explanation``, e.g. through sliding windows; default a
        direct call.

    Returns
    -------
    (Explanation, list of Explanation)
        The mean and one explanation per fold, in the order of ``explainers``.
    """
    run = explain or (lambda explainer, batch, tgt: explainer(batch, target=tgt))
    if not explainers:
        raise ValueError("explain_folds needs at least one explainer.")
    folds = [run(explainer, x, target) for explainer in explainers]
    return mean_explanation(folds), folds
