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
``Region(2, mask=m)``     segmentation: class 2 inside mask ``m`` (on the
                          model's output grid)
``Region(2, mask=m,       segmentation: class 2 inside a mask ``m`` on
space=scan_space)``       another grid (e.g. the scan's), resampled with
                          nearest neighbour onto the output grid
                          (:func:`region_from_scan_mask`)
========================  ===============================================
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError, SpaceError, TargetError, TargetIndexError
from .output_grids import nearest_resample, output_grid

__all__ = ["TASKS", "Target", "ClassTarget", "Region", "RegionTarget", "probabilities", "resolve_target",
           "check_target_spec", "check_region_mask", "check_class_names", "region_from_scan_mask",
           "channel_argmax", "scan_regions"]

#: How probabilities come from logits (see :func:`probabilities`).
TASKS = ("multiclass", "multilabel", "binary", "segmentation")


#: From this many channels on, :func:`channel_argmax` moves the channels last and takes the first largest
#: there (one pass over a channel-last copy) instead of comparing channel by channel (a pass per channel):
#: 1.6x faster at 8, 14 and 40 channels, 1.3x at 105, no faster at 3 (one thread, 48^3 voxels, CPU time;
#: benchmarks/bench_channel_argmax.py).
VECTOR_CHANNELS = 8
#: Values per channel-last copy of :func:`channel_argmax` (bounds its extra memory: 16 MB of float32).
_CHUNK_VALUES = 1 << 22


def channel_argmax(values: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The index of the largest value along the channel axis ``dim`` (the first one on ties), as
    ``values.argmax(dim)`` gives it, without its cost on volumes.

    PyTorch's CPU ``argmax`` along a short axis that is not the last is slow: about 2 s for a
    ``(1, 3, 96, 96, 96)`` segmentation output on one thread, more than the network's forward
    pass over that window. A running comparison over the channels reads each value once; from
    :data:`VECTOR_CHANNELS` channels on, the first largest along the last axis of channel-last
    copies (slabs of at most 4 Mi values) gives the same indices in fewer passes.

    Parameters
    ----------
    values : (..., C, ...) Tensor
        NaN is never the largest (``argmax`` would pick it; the engine refuses non-finite outputs).
    dim : int
        The channel axis.

    Returns
    -------
    Tensor of int64, ``values``' shape without ``dim``
    """
    channels = values.shape[dim]
    if channels == 0:
        raise TargetError("cannot take the largest of zero channels.")
    if channels < VECTOR_CHANNELS or values.ndim < 2:
        return _running_argmax(values, dim)
    moved = values.movedim(dim, -1)  # (..., C): a view
    axis = max(range(moved.ndim - 1), key=lambda a: moved.shape[a])  # slabs along the longest other axis
    per_slab = max(1, moved.numel() // max(1, moved.shape[axis]))
    step = max(1, _CHUNK_VALUES // per_slab)
    parts = []
    for slab in moved.split(step, dim=axis):
        largest, index = slab.contiguous().max(-1)  # the first index of the largest, as argmax; NaN propagates
        # max and argmax would pick a NaN; the running comparison never does: its answer where a row holds one
        parts.append(_running_argmax(slab, -1) if bool(largest.isnan().any()) else index)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def _running_argmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`channel_argmax` by a running comparison over the channels (a pass per channel)."""
    best = values.select(dim, 0)
    index = torch.zeros(best.shape, dtype=torch.long, device=values.device)
    for c in range(1, values.shape[dim]):
        candidate = values.select(dim, c)
        better = candidate > best
        best = torch.where(better, candidate, best)
        index.masked_fill_(better, c)
    return index


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
    space : Space, (shape, affine) or nibabel image, optional
        The grid ``mask`` is given on, when it is not the output grid: typically the scan's
        (``medcam3d.io.read`` returns it). ``mask`` must then be one 0/1 volume of that grid's
        shape, and ``x`` a MONAI ``MetaTensor`` whose affine places the model's input (what
        :func:`medcam3d.preprocess.preprocess` returns); the mask is resampled with nearest
        neighbour onto the output grid (:func:`region_from_scan_mask`).

    Examples
    --------
    >>> target = Region(1, mask=lesion_mask)          # doctest: +SKIP
    >>> explainer(x, target=target)                   # doctest: +SKIP
    >>> scan, scan_space = medcam3d.io.read("scan.nii.gz")              # doctest: +SKIP
    >>> x, _ = medcam3d.preprocess.preprocess((scan, scan_space), transforms)  # doctest: +SKIP
    >>> explainer(x[None], Region(1, mask=lesion_on_scan, space=scan_space))  # doctest: +SKIP
    """

    classes: int | str | Sequence[int | str] = "all"
    mask: object = None
    space: object = None


def resolve_target(
    spec: object,
    outputs: torch.Tensor,
    class_names: Sequence[str] | None = None,
    *,
    input_space: object = None,
    output_field: object = None,
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
    input_space : Space, optional
        The grid of the model's input; needed only for a ``Region`` whose mask is given on
        another grid (``Region(..., space=...)``).
    output_field : ReceptiveField, optional
        Where the output's voxels sit on the input grid when the output is at a lower resolution
        than the input (the receptive field of the model's output,
        :func:`medcam3d.layers.receptive_field`); None: the ``align_corners=False`` convention
        (see :func:`medcam3d.output_grids.output_grid`).

    Raises
    ------
    TargetIndexError
        A class index outside ``[0, C)`` (``{0, 1}`` for a single-logit model).
    TargetError
        Anything else that does not fit the output.
    ConfigError
        ``class_names`` that do not name every class of the output, one name each (see
        :func:`check_class_names`).
    """
    if outputs.ndim >= 2:
        check_class_names(class_names, int(outputs.shape[1]))
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
        if not segmentation:
            message = (
                f"Region targets need a segmentation output (B, C, *spatial); this model returns "
                f"{tuple(outputs.shape)}. Use a class index instead."
            )
            raise TargetError(message)
        mask = spec.mask
        if spec.space is not None and mask is not None:
            if input_space is None:
                message = (
                    "Region(..., space=...) gives the mask on another grid (e.g. the scan's), but the input's grid "
                    "is unknown: pass x as a MONAI MetaTensor with its affine (medcam3d.preprocess.preprocess returns "
                    "one), or resample the mask yourself with medcam3d.targets.region_from_scan_mask(mask, "
                    "scan_space, input_space, output_shape) and pass Region(classes, mask=that)."
                )
                raise TargetError(message)
            mask = region_from_scan_mask(mask, spec.space, input_space, tuple(outputs.shape[2:]),
                                            receptive_field=output_field)
        spec = spec.classes
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


def check_target_spec(spec: object, class_names: Sequence[str] | None, *, task: str | None = None) -> None:
    """Refuse a target specification that cannot fit, before any model runs (the CLI's ``--target``).

    Checks what needs no output: class names against ``class_names``, negative indices, indices
    beyond the named classes, ``"predicted"`` for a segmentation network. :func:`resolve_target`
    checks the rest on the model's output (indices beyond its classes when no names are given).

    Parameters
    ----------
    spec : int, str or sequence of them
        As given to :func:`resolve_target` (``None``: ``"predicted"``); tensors, regions and resolved
        targets are not checked here.
    class_names : sequence of str or None
    task : str, optional
        The config's task (``"segmentation"`` refuses ``"predicted"``).

    Raises
    ------
    TargetError, TargetIndexError
        With the same messages :func:`resolve_target` gives.
    """
    if spec is None or isinstance(spec, (Target, Region, torch.Tensor, np.ndarray)):
        return
    if isinstance(spec, str) and spec.lower() in ("all", "predicted"):
        if spec.lower() == "predicted" and task == "segmentation":
            raise TargetError("target='predicted' is ambiguous for a segmentation output; give a class index, a list of "
                              "classes or 'all' (each class is scored inside its predicted region).")
        return
    items = [spec] if isinstance(spec, (int, np.integer, str)) else spec
    if not isinstance(items, Sequence) or len(items) == 0:
        return  # resolve_target says what is supported
    for item in items:
        index = _class_index(item, class_names)
        if index < 0 or (class_names is not None and len(class_names) > 1 and index >= len(class_names)):
            count = len(class_names) if class_names is not None else 0
            valid = f"0..{count - 1} ({', '.join(class_names)})" if class_names is not None else "0 or more"
            message = (f"Class index {index} is out of range: valid indices are {valid}. Pick a valid class or use "
                       "target='all'.")
            raise TargetIndexError(message)


def check_class_names(class_names: Sequence[str] | None, channels: int) -> None:
    """Refuse class names that do not name the model's classes one to one.

    Parameters
    ----------
    class_names : sequence of str or None
        ``None``: no names (classes are shown by index); nothing to check.
    channels : int
        The model's output channels ``C`` (logits ``(B, C)`` or ``(B, C, *spatial)``); a single
        logit (``C = 1``) has two classes, 0 (negative) and 1 (positive).

    Raises
    ------
    ConfigError
        Not one name per class: with fewer, some classes would be shown as numbers; with more,
        some names belong to no output.
    """
    if class_names is None:
        return
    expected = 2 if channels == 1 else channels
    if len(class_names) != expected:
        output = ("a single logit, i.e. 2 classes (0: negative, 1: positive)" if channels == 1
                  else f"{channels} output channels, i.e. {channels} classes")
        raise ConfigError(
            f"class_names has {len(class_names)} names but the model gives {output}; give exactly {expected} names, "
            "one per class in the model's output order (config 'class_names', or class_names=[...]), or none.")


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
                labels = channel_argmax(outputs).unsqueeze(1)  # (B, 1, *spatial)
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
            f"give a mask of shape {spatial}, (B, *spatial) or (B, T, *spatial) on the output grid. A mask on the "
            "scan's grid is resampled for you: pass Region(classes, mask=m, space=scan_space) with x a MONAI "
            "MetaTensor (as medcam3d.preprocess.preprocess returns), or m_out = "
            "medcam3d.targets.region_from_scan_mask(m, scan_space, input_space, output_shape)."
        )
        raise TargetError(message)
    if not bool(torch.isfinite(regions).all()):
        raise TargetError("The region mask contains NaN or Inf; give a 0/1 mask.")
    while regions.ndim < len(spatial) + 2:
        regions = regions.unsqueeze(0 if regions.ndim == len(spatial) else 1)
    return regions.expand(batch, targets, *spatial).contiguous()


# ---------------------------------------------------------------------------------- regions on other grids
def check_region_mask(mask: object, where: str = "The region mask") -> np.ndarray:
    """A region mask as a boolean array, if it is one finite 0/1 volume with at least one voxel set.

    Parameters
    ----------
    mask : array or Tensor
    where : str
        How messages name the mask (e.g. its file).

    Raises
    ------
    TargetError
        NaN/Inf values, values other than 0 and 1 (a label map: pick one label, ``labels == L``), or
        no voxel set.
    """
    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if values.dtype == bool:
        binary = values
    else:
        if values.dtype.kind not in "biuf":
            raise TargetError(f"{where} has values of type {values.dtype}; give a 0/1 mask.")
        if values.dtype.kind == "f" and not bool(np.isfinite(values).all()):
            raise TargetError(f"{where} contains NaN or Inf; give a 0/1 mask.")
        found = np.unique(values)
        if not np.isin(found, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in found[:6].tolist()) + (", ..." if found.size > 6 else "")
            raise TargetError(
                f"{where} is not a binary mask: its values are {shown}. Give a mask of 0 (outside) and 1 (inside); "
                "from a label map keep one label, e.g. (labels == 2).astype('uint8')."
            )
        binary = values.astype(bool)
    if not binary.any():
        raise TargetError(f"{where} is empty (no voxel is 1); give the region to explain.")
    return binary


def region_from_scan_mask(mask: object, scan_space: object, input_space: object,
                          output_shape: Sequence[int] | None = None, *, receptive_field: object = None) -> np.ndarray:
    """A 0/1 region mask given on the scan's grid, on the model's output grid.

    The output grid is the input grid (``input_space``: the affine of the preprocessed
    ``MetaTensor``), or, when ``output_shape`` differs from the input's shape, the grid whose cells
    tile it (:func:`~medcam3d.output_grids.output_grid`). Each output voxel's centre is placed in
    world mm by that grid's affine and takes the value of the nearest scan voxel
    (:func:`~medcam3d.output_grids.nearest_resample`). This uses the
    same geometry that places the heatmaps back on the scan (the input affine, which MONAI's
    spatial transforms update exactly), and is exact: a mask stays binary, an output voxel is
    inside the region exactly when the scan voxel nearest to its centre is; voxels outside the
    scan's field of view (padding) are outside the region.

    Parameters
    ----------
    mask : (*scan_space.shape) array or Tensor
        0/1 (or bool) region on the scan's grid, at least one voxel set.
    scan_space, input_space : Space or anything :meth:`medcam3d.space.Space.of` accepts
        A MetaTensor works for ``input_space`` (channel-first ``(C, *spatial)``).
    output_shape : sequence of int, optional
        The output's spatial shape (default: the input's).
    receptive_field : ReceptiveField, optional
        The model output's receptive field, for an output at a lower resolution than the input
        (:func:`~medcam3d.output_grids.output_grid`); None: the ``align_corners=False`` convention.

    Returns
    -------
    (*output_shape) bool ndarray

    Raises
    ------
    TargetError
        The mask is not on the scan's grid, not binary, empty, or lies wholly outside what the
        model sees (e.g. cropped away by the preprocessing).
    """
    from .space import Space

    scan = Space.of(scan_space)
    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if tuple(values.shape) != scan.shape:
        raise TargetError(
            f"The region mask has shape {tuple(values.shape)}, but its grid (the scan's) is {scan.shape}: give one "
            "0/1 volume on that grid (the same shape and affine as the scan)."
        )
    binary = check_region_mask(values)
    grid = output_grid(input_space, output_shape, receptive_field)
    region = nearest_resample(binary, scan, grid, fill=False)
    if not region.any():
        raise TargetError(
            f"The region mask has {int(binary.sum())} voxel(s) on the scan, but none of them is in the part of the scan "
            "the model sees (the preprocessing crops it away, or the region is smaller than one output voxel); give a "
            "region inside the model's field of view."
        )
    return region


def scan_regions(explanation, scanner_space, region: np.ndarray | None) -> dict[int, tuple[str, np.ndarray | None]]:
    """The explained region of each class of a segmentation explanation, on the scan's grid.

    The given region (boolean, scan grid) for every class, or where the model predicts each class
    (argmax over channels; logit > 0, or <= 0 for class 0, of a single-channel output), taken from
    the explanation's logits on the output grid to the scan's grid with nearest neighbour. ``None``
    for a class when the input grid is unknown (a plain tensor).

    Parameters
    ----------
    explanation : Explanation
        Of one sample, logits ``(1, K, *O)``.
    scanner_space : Space
        The scan's grid ``(*S)``.
    region : (*S) bool ndarray or None

    Returns
    -------
    dict of int to (str, (*S) bool ndarray or None)
        ``{class index: ("given" | "predicted", region)}``.
    """
    from .heatmap import input_space_of
    from .space import Space

    indices = [int(i) for i in explanation.class_indices[0].tolist()]
    if region is not None:
        return {c: ("given", region) for c in indices}
    try:
        grid = output_grid(input_space_of(explanation), tuple(explanation.logits.shape[2:]),
                           explanation.output_field)
    except SpaceError:
        return {c: ("predicted", None) for c in indices}
    logits = explanation.logits[0].detach().float().cpu()
    scan = Space.of(scanner_space)
    regions: dict[int, tuple[str, np.ndarray | None]] = {}
    labels = None if logits.shape[0] == 1 else channel_argmax(logits, dim=0).numpy()
    for c in indices:
        if labels is None:
            predicted = (logits[0] > 0).numpy() if c == 1 else (logits[0] <= 0).numpy()
        else:
            predicted = labels == c
        regions[c] = ("predicted", nearest_resample(predicted, grid, scan, fill=False))
    return regions
