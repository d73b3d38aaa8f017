"""Targets: which scalar score of the model's output each map explains.

A resolved :class:`Target` turns the model's output into scores of shape
``(B, T)``: one score per sample and per explained target. Classifiers score a
class by its raw logit (before softmax); single-logit (binary) models score
class 1 by the logit and class 0 by its negation; segmentation networks score a
class by the sum of its logits inside a region (a given mask, or the region the
model itself predicts for that class).

User-facing target specifications, resolved by :func:`resolve_target`:

========================  ===============================================
``3``                     class 3, for every sample (T = 1)
``"nodule"``              a class name (needs ``class_names``)
``[1, 3]``                classes 1 and 3, for every sample (T = 2)
``"all"``                 every class (T = C; C = 2 for a binary model)
``"predicted"``           each sample's top class (per sample, T = 1)
``tensor([3, 5])``        per-sample classes: a tensor/array of shape (B,)
                          or (B, T)
``Region(2, mask=m)``     segmentation: class 2 inside mask ``m``
========================  ===============================================
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import TargetError, TargetIndexError

__all__ = ["TASKS", "Target", "ClassTarget", "Region", "RegionTarget", "probabilities", "resolve_target"]

#: How probabilities come from logits (see :func:`probabilities`).
TASKS = ("multiclass", "multilabel", "binary", "segmentation")


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities from logits, by task.

    Parameters
    ----------
    logits : (B, C) or (B, C, *spatial) Tensor
    task : {"multiclass", "multilabel", "binary", "segmentation"}
        ``multilabel``: a sigmoid per class. ``binary``, or any single-logit output: two
        columns ``[1 − σ(y), σ(y)]`` (class 0 negative, class 1 positive). Otherwise
        (``multiclass``, ``segmentation``): softmax over the class axis.

    Returns
    -------
    (B, C) or (B, C, *spatial) Tensor
        ``C = 2`` for a single-logit output.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}.")
    if task == "multilabel":
        return torch.sigmoid(logits)
    if task == "binary" or logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, :1])
        return torch.cat([1 - positive, positive], dim=1)
    return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class Target:
    """A resolved target for one batch.

    Attributes
    ----------
    class_indices : (B, T) LongTensor
        The class each score refers to.
    signs : (B, T) Tensor
        +1, or −1 for the negative class of a single-logit model.
    """

    class_indices: torch.Tensor
    signs: torch.Tensor

    @property
    def num_targets(self) -> int:
        """T, the number of maps per sample."""
        return int(self.class_indices.shape[1])

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """Differentiable scores ``(B, T)`` from the model's outputs."""
        raise NotImplementedError

    def labels(self) -> list[int] | list[list[int]]:
        """The explained class indices: ``[c_1 … c_T]`` when every sample shares
        them, else one list per sample."""
        rows = self.class_indices.tolist()
        return rows[0] if all(row == rows[0] for row in rows) else rows


@dataclass(frozen=True)
class ClassTarget(Target):
    """Scores of a classifier, ``outputs`` of shape ``(B, C)``: the gathered logits."""

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        if outputs.shape[1] == 1:
            return outputs[:, :1].expand(-1, self.num_targets) * self.signs.to(outputs.dtype)
        return outputs.gather(1, self.class_indices)


@dataclass(frozen=True)
class RegionTarget(Target):
    """Scores of a segmentation network: class logits summed inside a region.

    Attributes
    ----------
    regions : (B, T, *spatial) Tensor
        0/1 (or soft) weights over the output grid.
    """

    regions: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        if outputs.shape[1] == 1:
            logits = outputs.expand(-1, self.num_targets, *outputs.shape[2:]) * self._spatial(self.signs, outputs)
        else:
            index = self.class_indices.reshape(*self.class_indices.shape, *([1] * (outputs.ndim - 2)))
            logits = outputs.gather(1, index.expand(-1, -1, *outputs.shape[2:]))
        return (logits * self.regions.to(outputs.dtype)).flatten(start_dim=2).sum(dim=2)

    @staticmethod
    def _spatial(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).reshape(*values.shape, *([1] * (like.ndim - 2)))


@dataclass(frozen=True)
class Region:
    """Segmentation target specification: class(es) inside a mask.

    Parameters
    ----------
    classes : int, str, sequence or "all"
        The output channel(s) to explain.
    mask : (*spatial), (B, *spatial) or (B, T, *spatial) array or Tensor, optional
        Region on the model's output grid. Default: the region the model
        predicts for each class (argmax over channels; logit > 0 for a
        single-channel output).

    Examples
    --------
    >>> target = Region(1, mask=lesion_mask)          # doctest: +SKIP
    >>> explainer(x, target=target)                   # doctest: +SKIP
    """

    classes: int | str | Sequence[int | str] = "all"
    mask: object = None


def resolve_target(
    spec: object,
    outputs: torch.Tensor,
    class_names: Sequence[str] | None = None,
) -> Target:
    """Turn a user's target specification into a :class:`Target` for ``outputs``.

    Parameters
    ----------
    spec : int, str, sequence, Tensor, ndarray, Region or Target
        See the module docstring. ``None`` means ``"predicted"``.
    outputs : (B, C) or (B, C, *spatial) Tensor
        The model's output for this batch (classification or segmentation).
    class_names : sequence of str, optional
        Names that string targets refer to.

    Raises
    ------
    TargetIndexError
        A class index outside ``[0, C)`` (``{0, 1}`` for a single-logit model).
    TargetError
        Anything else that does not fit the output.
    """
    if isinstance(spec, Target):
        return spec
    if outputs.ndim < 2:
        message = (
            f"The model's output has shape {tuple(outputs.shape)}; expected (B, C) logits or "
            "(B, C, *spatial) segmentation logits. Wrap the model so that it returns such a tensor."
        )
        raise TargetError(message)
    batch, channels = outputs.shape[:2]
    segmentation = outputs.ndim > 2
    mask = None
    if isinstance(spec, Region):
        mask = spec.mask
        spec = spec.classes
        if not segmentation:
            message = (
                f"Region targets need a segmentation output (B, C, *spatial); this model returns "
                f"{tuple(outputs.shape)}. Use a class index instead."
            )
            raise TargetError(message)
    num_classes = 2 if channels == 1 else channels
    if spec is None:
        spec = "predicted"

    if isinstance(spec, str) and spec.lower() == "all":
        indices = torch.arange(num_classes).expand(batch, -1)
    elif isinstance(spec, str) and spec.lower() == "predicted":
        if segmentation:
            message = (
                "target='predicted' is ambiguous for a segmentation output; give a class index, "
                "a list of classes or 'all' (each class is scored inside its predicted region)."
            )
            raise TargetError(message)
        with torch.no_grad():
            top = (outputs[:, 0] > 0).long() if channels == 1 else outputs.argmax(dim=1)
        indices = top.reshape(batch, 1)
    elif isinstance(spec, (torch.Tensor, np.ndarray)):
        indices = torch.as_tensor(spec)
        if indices.ndim == 0:
            indices = indices.reshape(1, 1).expand(batch, 1)
        elif indices.ndim in (1, 2) and indices.shape[0] == batch:
            indices = indices.reshape(batch, -1)
        else:
            message = (
                f"A tensor target gives per-sample classes and must have shape (B,) or (B, T) with "
                f"B = {batch}, not {tuple(indices.shape)}. For the same classes on every sample pass a list."
            )
            raise TargetError(message)
        if indices.is_floating_point() or indices.dtype == torch.bool:
            message = f"Class indices must be integers, not {indices.dtype}."
            raise TargetError(message)
    else:
        items = [spec] if isinstance(spec, (int, np.integer, str)) else spec
        if not isinstance(items, Sequence) or len(items) == 0:
            message = (
                f"Unsupported target {spec!r}: give a class index, a class name, a list of them, "
                "'all', 'predicted', a per-sample tensor of shape (B,) or (B, T), or a Region."
            )
            raise TargetError(message)
        row = [_class_index(item, class_names) for item in items]
        indices = torch.tensor(row).expand(batch, -1)

    indices = indices.to(device=outputs.device, dtype=torch.long).contiguous()
    _check_range(indices, num_classes, channels)
    if channels == 1:
        signs = torch.where(indices == 1, 1.0, -1.0)
        indices_into_output = torch.zeros_like(indices)
    else:
        signs = torch.ones(indices.shape, device=outputs.device)
        indices_into_output = indices
    if not segmentation:
        return ClassTarget(indices, signs)
    regions = _regions(mask, outputs, indices, indices_into_output)
    return RegionTarget(indices, signs, regions)


def _class_index(item: object, class_names: Sequence[str] | None) -> int:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        return int(item)
    if isinstance(item, str):
        if class_names is None:
            message = (
                f"Target {item!r} is a name, but no class names are known. Pass class_names=[...] to "
                "the Explainer, or give the class index."
            )
            raise TargetError(message)
        names = list(class_names)
        if item in names:
            return names.index(item)
        close = difflib.get_close_matches(item, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        message = f"Unknown class name {item!r}.{hint} Known classes: {', '.join(names)}."
        raise TargetError(message)
    message = f"A class must be an int index or a str name, not {type(item).__name__} ({item!r})."
    raise TargetError(message)


def _check_range(indices: torch.Tensor, num_classes: int, channels: int) -> None:
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        value = int(indices[bad][0])
        kind = "a single-logit (binary) model has classes 0 (negative) and 1 (positive)"
        if channels > 1:
            kind = f"the model has {channels} output classes"
        message = (
            f"Class index {value} is out of range: {kind}, so valid indices are 0..{num_classes - 1}. "
            "Pick a valid class or use target='all'."
        )
        raise TargetIndexError(message)


def _regions(mask: object, outputs: torch.Tensor, indices: torch.Tensor, channel_indices: torch.Tensor) -> torch.Tensor:
    """Region weights ``(B, T, *spatial)`` on the output grid."""
    batch, targets = indices.shape
    spatial = tuple(outputs.shape[2:])
    if mask is None:
        with torch.no_grad():
            if outputs.shape[1] == 1:
                foreground = outputs[:, 0] > 0
                predicted = torch.where(indices.reshape(batch, targets, *([1] * len(spatial))) == 1,
                                        foreground.unsqueeze(1), ~foreground.unsqueeze(1))
            else:
                labels = outputs.argmax(dim=1, keepdim=True)  # (B, 1, *spatial)
                predicted = labels == channel_indices.reshape(batch, targets, *([1] * len(spatial)))
        empty = ~predicted.flatten(start_dim=2).any(dim=2)
        if bool(empty.any()):
            pairs = [(b, int(indices[b, t])) for b, t in empty.nonzero().tolist()]
            warnings.warn(
                f"The model predicts no voxel for (sample, class) {pairs[:5]}: those region scores are 0 "
                "and their maps are all zero. Pass Region(classes, mask=...) to explain a given region.",
                stacklevel=4,
            )
        return predicted.float()
    regions = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    regions = regions.to(device=outputs.device, dtype=torch.float32)
    if tuple(regions.shape[-len(spatial):]) != spatial or regions.ndim > len(spatial) + 2:
        message = (
            f"The region mask has shape {tuple(regions.shape)}, but the model's output grid is {spatial}: "
            f"give a mask of shape {spatial}, (B, *spatial) or (B, T, *spatial) on the output grid."
        )
        raise TargetError(message)
    if not bool(torch.isfinite(regions).all()):
        raise TargetError("The region mask contains NaN or Inf; give a 0/1 mask.")
    while regions.ndim < len(spatial) + 2:
        regions = regions.unsqueeze(0 if regions.ndim == len(spatial) else 1)
    return regions.expand(batch, targets, *spatial).contiguous()
