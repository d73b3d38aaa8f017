"""Sliding-window explanation: volumes larger than the network's input, in bounded memory.

Overlapping patches (MONAI's sliding-window machinery) are explained one small batch at a time;
each patch's class maps, on its feature grid, are blended (Gaussian or constant weights) into one
map per class on the feature grid of the whole (padded) input. Peak memory is that of the patch
batch plus the small assembled maps, not of the volume.

Geometry: the input is padded at its far end to a multiple of the feature stride (and at least one
ROI), and window starts are placed on multiples of the stride, so every patch's feature cells land
exactly on cells of the assembled grid; the result's ``input_shape`` is the padded shape (same
origin and affine as the input), so :func:`medcam3d.heatmap.to_scanner_space` places it as usual.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import numpy as np
import torch

from .errors import InputError, TargetError
from .explainer import Explainer
from .explanation import Explanation
from .input_rank import expected_spatial_dims, rank_mismatch_message
from .model_io import to_model_input
from .targets import Region, RegionTarget, Target, region_from_scan_mask, resolve_target

__all__ = ["explain_sliding_window", "region_on_input_grid"]


def explain_sliding_window(
    explainer: Explainer,
    x: torch.Tensor,
    target: object = "all",
    *,
    roi_size: Sequence[int] | int,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    relu: bool = True,
    progress: bool = False,
) -> Explanation:
    """Explain ``x`` patch by patch and assemble the maps.

    Parameters
    ----------
    explainer : Explainer
    x : (B, C_in, *spatial) Tensor or MetaTensor
        Checked, moved and cast as by :func:`medcam3d.model_io.to_model_input`.
    target : int, str, list, "all" or Region
        The same targets for every patch (``"predicted"`` is refused: it differs between
        patches). For a segmentation network a ``Region`` mask is given on the whole input grid
        and cropped per patch; a mask on another grid (``Region(..., space=scan_space)``, ``x``
        a MONAI ``MetaTensor`` with its affine) is first resampled onto the input grid with
        nearest neighbour (:func:`medcam3d.targets.region_from_scan_mask`). Without a mask each
        patch uses its own predicted region.
    roi_size : int or sequence of int
        Patch size; each entry a multiple of the network's feature stride.
    overlap : float
        Fraction of overlap between neighbouring patches (rounded so that window starts fall on
        the feature stride).
    sw_batch_size : int
        Patches explained together: the peak memory knob.
    mode : {"gaussian", "constant"}
        Blending weights of overlapping patches.
    relu : bool

    Returns
    -------
    Explanation
        ``maps`` of shape ``(B, T, *assembled_shape)`` on the feature grid of the padded input;
        ``logits``: the mean of the patch logits per sample for a classifier, the assembled output
        for a segmentation network. ``scores``: the target's score on those logits — for a
        classifier the (mean) logit of each class; for a segmentation network the sum of the
        assembled class logits inside the region (the given mask, or the region the assembled
        output predicts), over the input's own voxels (the padding is left out). Always finite.
    """
    from monai.inferers import sliding_window_inference

    if isinstance(target, str) and target.lower() == "predicted":
        message = "target='predicted' differs between patches; give a class, a list of classes or 'all' for sliding windows."
        raise TargetError(message)
    affine = getattr(x, "affine", None)
    dims = expected_spatial_dims(explainer.model)
    if dims is not None and isinstance(x, (torch.Tensor, np.ndarray)):
        mismatch = rank_mismatch_message(dims, tuple(x.shape), batched=True)
        if mismatch is not None:
            raise InputError(mismatch)
    inputs = to_model_input(x, explainer.model)  # checked, on the model's device and dtype, once
    if inputs.ndim < 3:
        raise InputError(f"x must have shape (B, C_in, *spatial), not {tuple(inputs.shape)}.")
    spatial = tuple(inputs.shape[2:])
    roi = (int(roi_size),) * len(spatial) if isinstance(roi_size, (int, np.integer)) else tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial) or min(roi) < 1:
        raise InputError(f"roi_size must give {len(spatial)} positive sizes, not {roi_size!r}.")
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be in [0, 1), not {overlap}.")

    # The first window (first sample, at the origin) gives the feature stride of the target layer at this
    # ROI. Without a region mask its explanation is the window's own, reused when MONAI's loop reaches it
    # (one window at a time), so finding the stride costs no extra pass. With a mask it is explained
    # without the mask: it may predict no voxel of a class, which says nothing about the given region.
    masked = isinstance(target, Region) and target.mask is not None
    origin = inputs[(slice(0, 1), slice(None), *(slice(0, r) for r in roi))]
    origin = torch.nn.functional.pad(origin, [p for n, r in zip(reversed(origin.shape[2:]), reversed(roi)) for p in (0, r - n)])
    with warnings.catch_warnings():
        if masked:
            warnings.filterwarnings("ignore", message="The model predicts no voxel", category=UserWarning)
        probe = explainer(origin, target=_probe_target(target), relu=relu)
    reusable = {"origin": probe} if not masked and sw_batch_size == 1 else {}
    ratios = [r / f for r, f in zip(roi, probe.feature_shape)]
    if any(abs(s - round(s)) > 1e-9 for s in ratios):
        message = f"roi_size {roi} is not a multiple of the feature stride (feature grid {probe.feature_shape}); pick a multiple."
        raise InputError(message)
    strides = [int(round(s)) for s in ratios]
    padded = tuple(max(r, math.ceil(n / s) * s) for n, r, s in zip(spatial, roi, strides))
    pad = [p for n, q in zip(reversed(spatial), reversed(padded)) for p in (0, q - n)]
    inputs = torch.nn.functional.pad(inputs, pad)
    # Window starts on multiples of the stride: MONAI steps by int(roi * (1 - overlap)).
    steps = [max(s, (int(r * (1 - overlap)) // s) * s) for r, s in zip(roi, strides)]
    overlaps = [1 - step / r for step, r in zip(steps, roi)]

    segmentation = probe.logits.ndim > 2
    if segmentation:
        target = region_on_input_grid(target, x, spatial)
    region_mask = _padded_mask(target, padded, spatial) if segmentation else None
    patch_logits: dict[int, list[torch.Tensor]] = {}
    record: dict = {}

    def predictor(patch: torch.Tensor, coords: list) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if "origin" in reusable and len(coords) == 1 and all(c.start in (0, None) for c in (coords[0][0], *coords[0][2:])):
            result = reusable.pop("origin")  # the first window, explained above
        else:
            patch_target = target
            if region_mask is not None and isinstance(target, Region):  # a mask comes from a Region only
                crops = [region_mask[(min(c[0].start, len(region_mask) - 1),) + tuple(c[2:])] for c in coords]
                patch_target = Region(target.classes, mask=torch.stack(crops))
            result = explainer(patch, target=patch_target, relu=relu)
        record["result"] = result
        if segmentation:
            return result.logits, result.maps
        for c, logits in zip(coords, result.logits):
            patch_logits.setdefault(c[0].start, []).append(logits)
        return result.maps

    assembled = sliding_window_inference(
        inputs, roi, sw_batch_size, predictor, overlap=overlaps, mode=mode, with_coord=True, progress=progress
    )
    # MONAI returns what the predictor returns: (logits, maps) for a segmentation network, else the maps
    logits: torch.Tensor | None
    if segmentation:
        logits, maps = cast("tuple[torch.Tensor, torch.Tensor]", assembled)
    else:
        logits, maps = None, cast(torch.Tensor, assembled)
    last: Explanation = record["result"]
    if logits is None:
        logits = torch.stack([torch.stack(patch_logits[b]).mean(0) for b in range(inputs.shape[0])])
    resolved = _whole_target(target, logits, region_mask, spatial, explainer.class_names)
    class_indices = resolved.class_indices
    with torch.no_grad():
        scores = resolved.scores(logits.detach())
    return replace(
        last,
        maps=maps.float(),
        logits=logits.detach().float(),
        scores=scores.float(),
        class_indices=class_indices,
        targets=class_indices[0].tolist(),
        input_shape=padded,
        feature_shape=tuple(maps.shape[2:]),
        input_affine=None if affine is None else np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64),
    )


def _whole_target(target: object, logits: torch.Tensor, region_mask: torch.Tensor | None, spatial: tuple[int, ...],
                  class_names) -> Target:
    """The target resolved on the assembled logits; regions limited to the unpadded input."""
    if logits.ndim == 2:
        return resolve_target(target, logits, class_names)
    valid = torch.zeros(logits.shape[2:], device=logits.device)
    valid[tuple(slice(0, n) for n in spatial)] = 1
    if region_mask is not None and isinstance(target, Region):  # a mask comes from a Region only
        spec = Region(target.classes, mask=region_mask.to(logits.device) * valid)
        return resolve_target(spec, logits, class_names)
    resolved = resolve_target(target, logits, class_names)
    if isinstance(resolved, RegionTarget):
        resolved = RegionTarget(resolved.class_indices, resolved.signs, resolved.regions * valid)
    return resolved


def region_on_input_grid(target: object, x: object, spatial: tuple[int, ...]) -> object:
    """A ``Region`` whose mask is given on another grid (``space=``), with that mask resampled onto the
    input grid (nearest neighbour); any other target as it is."""
    if not isinstance(target, Region) or target.space is None or target.mask is None:
        return target
    from .space import Space, SpaceError

    input_space = None
    if getattr(x, "affine", None) is not None:
        try:
            input_space = Space.of(x, batch=True)
        except SpaceError:  # an affine that does not describe the grid: said below
            input_space = None
    if input_space is None or input_space.shape != spatial:
        message = (
            "Region(..., space=...) gives the mask on another grid (e.g. the scan's), but the input's grid is "
            "unknown: pass x as a MONAI MetaTensor with its affine (medcam3d.preprocess.preprocess returns one), "
            "or resample the mask yourself with medcam3d.targets.region_from_scan_mask(mask, scan_space, "
            "input_space) and pass Region(classes, mask=that)."
        )
        raise TargetError(message)
    region = region_from_scan_mask(target.mask, target.space, input_space)
    return Region(target.classes, mask=torch.from_numpy(region))


def _probe_target(target: object) -> object:
    """A target valid on an all-zero patch (a mask-free region for segmentation)."""
    if isinstance(target, Region):
        return Region(target.classes)
    return target


def _padded_mask(target: object, padded: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor | None:
    """A Region's mask as (B, *padded) on the padded input grid, or None."""
    if not isinstance(target, Region) or target.mask is None:
        return None
    mask = torch.as_tensor(np.asarray(target.mask) if not isinstance(target.mask, torch.Tensor) else target.mask).float()
    if tuple(mask.shape[-len(spatial):]) != spatial:
        raise TargetError(f"The region mask has shape {tuple(mask.shape)}; expected the input grid {spatial}.")
    mask = mask.reshape(-1, *spatial)
    pad = [p for n, q in zip(reversed(spatial), reversed(padded)) for p in (0, q - n)]
    return torch.nn.functional.pad(mask, pad)
