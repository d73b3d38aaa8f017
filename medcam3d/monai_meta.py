"""The maps of a MONAI prediction in its metadata: how :class:`medcam3d.monai.HeatmapInferer` attaches
them and where the loaded file's grid is recorded.

The maps travel in the output's MONAI metadata (``pred.meta[HEATMAP_KEY]``, one entry per sample:
``"maps"`` ``(B, T, *feature_shape)``, ``"class_indices"`` and ``"scores"`` ``(B, T)``,
``"input_affine"`` ``(B, 4, 4)`` RAS, ``"info"`` one JSON text per sample), so MONAI's own
decollation hands every post-transform the maps of its sample. Reading them back into an
:class:`~medcam3d.explanation.Explanation` is :func:`medcam3d.monai.explanation_of`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .errors import Medcam3dError, SpaceError
from .explanation import Explanation
from .orientation import lps_to_ras
from .space import Space

__all__ = [
    "HEATMAP_KEY",
    "MissingHeatmapsError",
    "detached",
    "input_affines",
    "meta_entry",
    "original_space",
    "replace_tensor",
    "with_maps",
]

#: Key of the maps in the prediction's MONAI metadata (``pred.meta[HEATMAP_KEY]``).
HEATMAP_KEY = "medcam3d"

class MissingHeatmapsError(Medcam3dError, KeyError):
    """A prediction carries no maps (it was not made by :class:`HeatmapInferer`)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


def detached(output: Any) -> Any:
    """``output`` (a tensor, or a tuple, list or dict of them) with every tensor detached."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(detached(o) for o in output)
    if isinstance(output, dict):
        return type(output)({k: detached(v) for k, v in output.items()})
    return output


def replace_tensor(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with the tensor ``old`` (found by identity) replaced by ``new``."""
    if output is old:
        return new
    if isinstance(output, (tuple, list)):
        return type(output)(replace_tensor(o, old, new) for o in output)
    if isinstance(output, dict):
        return type(output)({k: replace_tensor(v, old, new) for k, v in output.items()})
    return output


def input_affines(result: Explanation, inputs: torch.Tensor) -> torch.Tensor | None:
    """The input grid's voxel -> RAS affine per sample, ``(B, 4, 4)`` float64, or None."""
    if result.input_affine is None:
        return None
    affine = np.asarray(result.input_affine, dtype=np.float64)
    batch = result.maps.shape[0]
    affines = np.broadcast_to(affine, (batch, 4, 4)) if affine.ndim == 2 else affine
    meta = getattr(inputs, "meta", None) or {}
    space = meta.get("space", "RAS")
    spaces = list(space) if isinstance(space, (list, tuple)) else [space] * batch
    out = np.stack([lps_to_ras(a) if str(s).upper() == "LPS" else a for a, s in zip(affines, spaces)])
    return torch.from_numpy(np.ascontiguousarray(out))


def meta_entry(result: Explanation, inputs: torch.Tensor) -> dict[str, Any]:
    """The per-sample metadata entry of an explanation (every value has the batch as first axis)."""
    batch = result.maps.shape[0]
    info = {
        "method": result.method,
        "layer": result.layer,
        "relu": result.relu,
        "input_shape": list(result.input_shape),
        "feature_shape": list(result.feature_shape),
        "class_names": result.class_names,
        "placement": result.placement,
        "receptive_field": None if result.receptive_field is None else result.receptive_field.to_dict(),
    }
    entry: dict[str, Any] = {
        "maps": result.maps.detach(),
        "class_indices": result.class_indices.detach().cpu().clone(),
        "scores": result.scores.detach().cpu().clone(),
        "info": [json.dumps(info)] * batch,
    }
    affines = input_affines(result, inputs)
    if affines is not None:
        entry["input_affine"] = affines
    return entry


def with_maps(logits: torch.Tensor, inputs: torch.Tensor, entry: dict, key: str) -> MetaTensor:
    """``logits`` as a MetaTensor with the input's metadata (as MONAI propagates it) and the maps."""
    out = MetaTensor(logits.as_tensor() if isinstance(logits, MetaTensor) else logits)
    if isinstance(inputs, MetaTensor):
        out.copy_meta_from(inputs, copy_attr=False)  # what MONAI does for a batch passing a network
        out.meta = dict(out.meta)  # an own dict: the maps do not go into the image's metadata
    else:
        out.is_batch = True
    out.meta[key] = entry
    return out


def original_space(meta: Mapping) -> Space:
    """The grid of the file a MONAI image was loaded from, from its metadata.

    ``LoadImage``/``LoadImaged`` record the file's voxel -> world matrix (``original_affine``)
    and spatial shape (``spatial_shape``); the world is RAS unless the reader kept LPS
    (``meta["space"] == "LPS"``), which is converted here.

    Parameters
    ----------
    meta : Mapping
        One sample's metadata (``MetaTensor.meta`` after decollation).

    Returns
    -------
    Space

    Raises
    ------
    SpaceError
        The metadata lack ``original_affine`` or ``spatial_shape`` (the image was not loaded with
        MONAI's ``LoadImage``), or hold a batch.
    """
    affine, shape = meta.get("original_affine"), meta.get("spatial_shape")
    if affine is None or shape is None:
        message = (
            "The image metadata have no 'original_affine'/'spatial_shape', so the scan's grid is unknown. "
            "Load the images with MONAI's LoadImage(d) (which records them), or pass scanner_space= to "
            "SaveHeatmapsd."
        )
        raise SpaceError(message)
    affine = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    shape = [int(n) for n in np.asarray(torch.as_tensor(shape).cpu()).reshape(-1)]
    if affine.ndim != 2:
        raise SpaceError(f"original_affine has shape {affine.shape}: a batch. Use one decollated sample's metadata.")
    if str(meta.get("space", "RAS")).upper() == "LPS":
        affine = lps_to_ras(affine)
    return Space(tuple(shape[: min(len(shape), 3)]), affine)
