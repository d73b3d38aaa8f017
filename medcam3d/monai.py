"""Class activation maps as a by-product of MONAI inference: an inferer and a post-transform.

An existing MONAI workflow (a ``SupervisedEvaluator``, a bundle's ``inference.json``, or a plain
loop over an inferer) gets heatmaps in the original scan's space by swapping one component and
adding one post-transform:

* :class:`HeatmapInferer` replaces ``SimpleInferer`` (or, with ``roi_size``,
  ``SlidingWindowInferer``). It returns the network's output, as the inferer it replaces does, and
  attaches the class maps of the same forward pass to it: every requested class in one batched
  backward through the head (:class:`medcam3d.explainer.Explainer`; windows through
  :func:`medcam3d.sliding.explain_sliding_window`). The maps travel in the output's MONAI
  metadata (``pred.meta["medcam3d"]``, one entry per sample), so MONAI's own decollation hands
  every post-transform the maps of its sample.
* :class:`SaveHeatmapsd` (a ``MapTransform`` for the ``postprocessing`` chain) places each
  sample's maps on the grid of the file it was loaded from and writes them with ``SaveImage``'s
  naming conventions (``output_dir``, ``output_postfix``, ``separate_folder``, ``data_root_dir``,
  ``output_ext``), next to the predictions.

This module holds integration only: the maps come from the engine, their placement on the scan
from :func:`medcam3d.heatmap.to_scanner_space` / :class:`medcam3d.scan_maps.ScanGridMap`, the files
from :func:`medcam3d.scan_maps.save_scan_maps` and :mod:`medcam3d.io` (see docs/architecture.md
§3-§5 and docs/monai.md).

Bundle example (``inference.json``; the complete bundle is written by
``python -m medcam3d.monai_example OUT``)::

    "inferer": {"_target_": "medcam3d.monai.HeatmapInferer", "target": "all",
                "class_names": ["bright_round", "dark_elongated"]},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "medcam3d.monai.SaveHeatmapsd", "keys": "pred", "output_dir": "@output_dir"},
        ...]}

Grad mode: MONAI evaluators run the inferer under ``torch.no_grad()`` (``mode="eval"``), which
is fine: the engine builds no graph before the target layer and re-enables autograd from there
on. ``torch.inference_mode()`` cannot be left from inside, so it is refused with a message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.folder_layout import FolderLayout, default_name_formatter
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from ._files import is_inside, written_by_medcam3d
from .errors import InferenceModeError, Medcam3dError, SpaceError
from .explainer import Explainer
from .explanation import Explanation
from .heatmap import Heatmap, heatmaps_of
from .receptive_field import ReceptiveField
from .scan_maps import ScanGridMap, save_scan_maps
from .hooks import forward_hooks, model_lock
from .model_io import first_tensor
from .orientation import lps_to_ras
from .space import Space

__all__ = [
    "HEATMAP_KEY",
    "HeatmapInferer",
    "InferenceModeError",
    "MissingHeatmapsError",
    "SaveHeatmapsd",
    "explanation_of",
    "original_space",
]

logger = logging.getLogger(__name__)

#: Key of the maps in the prediction's MONAI metadata (``pred.meta[HEATMAP_KEY]``).
HEATMAP_KEY = "medcam3d"

_AMP_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class MissingHeatmapsError(Medcam3dError, KeyError):
    """A prediction carries no maps (it was not made by :class:`HeatmapInferer`)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# The inferer
# --------------------------------------------------------------------------------------------


class HeatmapInferer(Inferer):
    """A MONAI inferer that returns the network's output with its class maps attached.

    Drop-in for ``monai.inferers.SimpleInferer`` and, with ``roi_size``, for
    ``monai.inferers.SlidingWindowInferer``: ``pred = inferer(inputs, network)`` is the
    network's output for ``inputs`` (a ``MetaTensor`` carrying the input's metadata, as MONAI's
    inferers return it for ``MetaTensor`` inputs), computed by the same forward pass that gives
    the maps. The maps of sample ``b`` are in ``pred.meta[HEATMAP_KEY]``: a dict of per-sample
    entries (``"maps"`` ``(B, T, *feature_shape)``, ``"class_indices"`` and ``"scores"`` ``(B, T)``,
    ``"input_affine"`` ``(B, 4, 4)`` RAS, ``"info"`` one JSON text per sample) that MONAI's
    ``decollate_batch`` splits with the rest of the metadata. :func:`explanation_of` turns
    them back into an :class:`~medcam3d.explanation.Explanation`; :class:`SaveHeatmapsd` writes
    them in the scan's space. The last batch's explanation is also kept in :attr:`last`.

    Parameters
    ----------
    method : str
        CAM method (``"hirescam"``, ``"gradcam"``, ``"cam"``, ...; see
        :class:`~medcam3d.explainer.Explainer`).
    layer : str
        Target layer name, or ``"auto"``.
    target : int, str, list
        What to explain: ``"all"`` (default: every class, one batched backward through the
        head), a class index or name, a list of them, or ``"predicted"`` (not with ``roi_size``).
    class_names : sequence of str, optional
        Names of the classes, for string targets and for the file names.
    relu : bool
        Apply ReLU to the maps.
    roi_size : int or sequence of int, optional
        Sliding-window patch size (each a multiple of the feature stride). ``None``: the whole
        input in one forward pass, as ``SimpleInferer``.
    sw_batch_size, overlap, mode
        As for ``SlidingWindowInferer`` (``mode`` in ``{"gaussian", "constant"}``).
    amp : {"auto", None, "bf16", "fp16"}
        Mixed precision of the forward and backward. ``"auto"`` follows the caller: inside
        ``torch.autocast`` (e.g. a ``SupervisedEvaluator`` with ``amp=True`` on a GPU) it uses the
        autocast dtype, otherwise full precision.
    eval_mode : bool
        Put the network in eval mode for the call. Default False: the network runs in the mode
        the caller set (evaluators set eval mode), exactly as with ``SimpleInferer``.
    meta_key : str
        Metadata key of the maps.
    placement : {"receptive_field", "align_corners"}
        Where the feature cells sit in the input (see :class:`~medcam3d.explainer.Explainer`):
        the centres of their receptive fields (default), or the ``align_corners=False`` convention.

    Notes
    -----
    Output differences to the replaced inferers: with ``roi_size`` the windows start on multiples
    of the feature stride and the input is zero-padded at its far end to such a multiple (so that
    every window's feature cells land on one assembled grid); a segmentation output is the blend
    of those windows cropped back to the input's size, a classifier's output the mean of the
    window logits. Without ``roi_size`` the output equals ``network(inputs)``. The network must
    take the input alone (no extra ``*args``/``**kwargs``).

    Raises
    ------
    InferenceModeError
        (RuntimeError) when called under ``torch.inference_mode()``.

    Examples
    --------
    >>> from monai.engines import SupervisedEvaluator                         # doctest: +SKIP
    >>> evaluator = SupervisedEvaluator(device, loader, network,              # doctest: +SKIP
    ...     inferer=HeatmapInferer(target="all", class_names=["a", "b"]),
    ...     postprocessing=SaveHeatmapsd(keys="pred", output_dir="out"))
    """

    def __init__(
        self,
        method: str = "hirescam",
        layer: str = "auto",
        target: Any = "all",
        *,
        class_names: Sequence[str] | None = None,
        relu: bool = True,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        mode: str = "gaussian",
        amp: str | None = "auto",
        eval_mode: bool = False,
        meta_key: str = HEATMAP_KEY,
        placement: str = "receptive_field",
    ) -> None:
        super().__init__()
        if amp not in ("auto", None, "bf16", "fp16"):
            raise ValueError(f"amp must be 'auto', None, 'bf16' or 'fp16', not {amp!r}.")
        if mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', not {mode!r}.")
        self.method = method
        self.layer = layer
        self.target = target
        self.class_names = list(class_names) if class_names is not None else None
        self.relu = bool(relu)
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.mode = mode
        self.amp = amp
        self.eval_mode = bool(eval_mode)
        self.meta_key = str(meta_key)
        self.placement = placement
        #: The explanation of the last batch (its maps on the feature grid), or None.
        self.last: Explanation | None = None
        self._explainers: dict[int, Explainer] = {}  # one per network (an EnsembleEvaluator passes several)

    def __repr__(self) -> str:
        window = f", roi_size={self.roi_size!r}" if self.roi_size is not None else ""
        return f"HeatmapInferer(method={self.method!r}, layer={self.layer!r}, target={self.target!r}{window})"

    def explainer(self, network: nn.Module) -> Explainer:
        """The :class:`~medcam3d.explainer.Explainer` used for ``network`` (one per network, kept)."""
        explainer = self._explainers.get(id(network))
        if explainer is None or explainer.model is not network:
            explainer = Explainer(network, method=self.method, layer=self.layer, class_names=self.class_names,
                                  eval_mode=self.eval_mode, placement=self.placement)
            self._explainers[id(network)] = explainer
        return explainer

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` on ``inputs``; return its output with the class maps attached.

        Parameters
        ----------
        inputs : (B, C_in, *spatial) MetaTensor or Tensor
            The preprocessed batch (its ``affine`` places the maps; a plain tensor gives maps
            that :class:`SaveHeatmapsd` cannot place).
        network : nn.Module

        Returns
        -------
        MetaTensor, or the network's tuple/list/dict with its logits replaced by one
            The output, detached, with ``meta[meta_key]`` holding the maps.
        """
        if args or kwargs:
            message = (
                "HeatmapInferer calls the network with the input alone, but the evaluator passed extra "
                f"arguments ({len(args)} positional, keys {sorted(kwargs)}). Wrap the network so that "
                "forward(x) is enough, or use prepare_batch that returns (inputs, targets)."
            )
            raise TypeError(message)
        if torch.is_inference_mode_enabled():
            message = (
                "HeatmapInferer needs autograd after the target layer, but it was called under "
                "torch.inference_mode(), which cannot be left from inside. Run the evaluator without "
                "inference_mode: MONAI's SupervisedEvaluator with mode='eval' (its default) uses "
                "torch.no_grad(), which is fine; remove any `with torch.inference_mode():` around "
                "evaluator.run() or inferer(...)."
            )
            raise InferenceModeError(message)
        if not isinstance(network, nn.Module):
            message = (
                f"HeatmapInferer needs the network as a torch.nn.Module (to hook its target layer), not "
                f"{type(network).__name__}. Pass the module itself, not a lambda or a wrapper function."
            )
            raise TypeError(message)
        explainer = self.explainer(network)
        outputs: list[Any] = []
        with model_lock(network), torch.enable_grad():
            explainer.amp = self._amp_for(inputs)  # under the lock: concurrent callers may differ
            if self.roi_size is None:
                # The network's own output of the explainer's forward pass (its last forward).
                with forward_hooks([(network, lambda module, args_, output: outputs.append(output))]):
                    result = explainer(inputs, self.target, relu=self.relu)
                output = _detached(outputs[-1])
            else:
                from .sliding import explain_sliding_window

                result = explain_sliding_window(
                    explainer, inputs, self.target, roi_size=self.roi_size, overlap=self.overlap,
                    sw_batch_size=self.sw_batch_size, mode=self.mode, relu=self.relu,
                )
                output = result.logits
                if output.ndim > 2:  # segmentation: crop the padded grid back to the input
                    output = output[(slice(None), slice(None), *(slice(0, n) for n in inputs.shape[2:]))]
        self.last = result
        logits = first_tensor(output)
        entry = _meta_entry(result, inputs)
        return _replace(output, logits, _with_maps(logits, inputs, entry, self.meta_key))

    def _amp_for(self, inputs: torch.Tensor) -> str | None:
        if self.amp != "auto":
            return self.amp
        device = inputs.device.type
        if device in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device):
            return _AMP_NAMES.get(torch.get_autocast_dtype(device))
        return None


def _detached(output: Any) -> Any:
    """``output`` (a tensor, or a tuple, list or dict of them) with every tensor detached."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(o) for o in output)
    if isinstance(output, dict):
        return type(output)({k: _detached(v) for k, v in output.items()})
    return output


def _replace(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with the tensor ``old`` (found by identity) replaced by ``new``."""
    if output is old:
        return new
    if isinstance(output, (tuple, list)):
        return type(output)(_replace(o, old, new) for o in output)
    if isinstance(output, dict):
        return type(output)({k: _replace(v, old, new) for k, v in output.items()})
    return output


def _input_affines(result: Explanation, inputs: torch.Tensor) -> torch.Tensor | None:
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


def _meta_entry(result: Explanation, inputs: torch.Tensor) -> dict[str, Any]:
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
    affines = _input_affines(result, inputs)
    if affines is not None:
        entry["input_affine"] = affines
    return entry


def _with_maps(logits: torch.Tensor, inputs: torch.Tensor, entry: dict, key: str) -> MetaTensor:
    """``logits`` as a MetaTensor with the input's metadata (as MONAI propagates it) and the maps."""
    out = MetaTensor(logits.as_tensor() if isinstance(logits, MetaTensor) else logits)
    if isinstance(inputs, MetaTensor):
        out.copy_meta_from(inputs, copy_attr=False)  # what MONAI does for a batch passing a network
        out.meta = dict(out.meta)  # an own dict: the maps do not go into the image's metadata
    else:
        out.is_batch = True
    out.meta[key] = entry
    return out


# --------------------------------------------------------------------------------------------
# From metadata back to an Explanation and a scan grid
# --------------------------------------------------------------------------------------------


def explanation_of(pred: Any, *, sample: int | None = None, meta_key: str = HEATMAP_KEY) -> Explanation:
    """The :class:`~medcam3d.explanation.Explanation` attached to a prediction by :class:`HeatmapInferer`.

    Parameters
    ----------
    pred : MetaTensor or Mapping
        A batched output of the inferer, one decollated sample of it (what post-transforms
        see), or its metadata dict.
    sample : int, optional
        For a batched prediction, the one sample to return (default: the whole batch).
    meta_key : str

    Returns
    -------
    Explanation
        ``maps`` of shape ``(B, T, *feature_shape)`` (``B = 1`` for one sample), on the feature
        grid of the input; ``input_affine`` RAS; ``logits`` the prediction as given, or empty
        for a metadata dict.

    Raises
    ------
    MissingHeatmapsError
        (KeyError) the prediction has no maps.
    """
    meta = pred if isinstance(pred, Mapping) else getattr(pred, "meta", None)
    entry = None if meta is None else meta.get(meta_key)
    if entry is None:
        message = (
            f"The prediction carries no heatmaps (no {meta_key!r} in its metadata). Make it with "
            "medcam3d.monai.HeatmapInferer, and keep the MetaTensor until SaveHeatmapsd runs (put "
            "SaveHeatmapsd before transforms that turn it into numpy or drop its metadata)."
        )
        raise MissingHeatmapsError(message)
    info_list = entry["info"]
    infos = [info_list] if isinstance(info_list, str) else list(info_list)
    info = json.loads(infos[0])
    feature_ndim = len(info["feature_shape"])
    maps = torch.as_tensor(entry["maps"])
    batched = maps.ndim == feature_ndim + 2
    class_indices = torch.as_tensor(entry["class_indices"])
    scores = torch.as_tensor(entry["scores"])
    affine = entry.get("input_affine")
    affine = None if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    logits = pred.as_tensor() if isinstance(pred, MetaTensor) else (pred if isinstance(pred, torch.Tensor) else
                                                                     torch.empty(0))
    if not batched:
        maps, class_indices, scores = maps[None], class_indices[None], scores[None]
        logits = logits[None] if logits.numel() else logits
    elif sample is not None:
        keep = slice(sample, sample + 1)
        maps, class_indices, scores = maps[keep], class_indices[keep], scores[keep]
        affine = affine[keep] if affine is not None and affine.ndim == 3 else affine
        logits = logits[keep] if logits.numel() else logits
    if affine is not None and affine.ndim == 3 and affine.shape[0] == 1:
        affine = affine[0]
    rows = class_indices.tolist()
    targets: list = rows[0] if all(r == rows[0] for r in rows) else rows
    return Explanation(
        maps=maps.float(),
        targets=targets,
        logits=logits.detach().float() if isinstance(logits, torch.Tensor) else logits,
        scores=scores.float(),
        class_indices=class_indices.long(),
        method=info["method"],
        layer=info["layer"],
        relu=bool(info["relu"]),
        input_shape=tuple(info["input_shape"]),
        feature_shape=tuple(info["feature_shape"]),
        input_affine=affine,
        class_names=info["class_names"],
        placement=info.get("placement", "align_corners"),
        receptive_field=None if info.get("receptive_field") is None else ReceptiveField.from_dict(info["receptive_field"]),
    )


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


# --------------------------------------------------------------------------------------------
# The post-transform
# --------------------------------------------------------------------------------------------


class SaveHeatmapsd(MapTransform):
    """Post-transform: write the maps attached by :class:`HeatmapInferer` in the original scan's space.

    For each sample, the maps (on the target layer's grid) are placed on the grid of the file the
    image was loaded from by one trilinear interpolation (the engine's
    :class:`~medcam3d.scan_maps.ScanGridMap`, the resampling of
    :func:`medcam3d.heatmap.to_scanner_space`, computed slab by slab while the file is written by
    :func:`medcam3d.scan_maps.save_scan_maps`), and written next to the predictions with the naming of
    MONAI's ``SaveImage``: ``output_dir/[<subject>/]<subject>_<output_postfix>_<method>_<class><ext>``
    (``separate_folder``, ``data_root_dir`` and ``output_name_formatter`` as for ``SaveImage``), or
    with ``four_d`` one file ``<subject>_<output_postfix>_<method><ext>`` with a volume per class.
    The data pass through unchanged.

    How the maps are inverted, and why not with ``Invertd``: MONAI records the input grid of the
    network in ``meta["affine"]`` and the file's grid in ``meta["original_affine"]`` and
    ``meta["spatial_shape"]`` (what ``LoadImage`` read). The feature grid's affine follows from the
    input's (:func:`medcam3d.space.feature_space`), so every file voxel's position on the feature
    grid is known exactly, and one interpolation takes the map from the small feature grid to the
    file's grid. This inverts any chain of affine-type transforms (Orientation, Spacing, crops,
    pads, Resize, Flip, Rotate90, Affine) exactly, whatever their order, and needs neither a
    full-size intermediate nor the preprocessing pipeline object. ``Invertd`` would first need the
    map upsampled to the input grid, then replay the inverse of each transform on it (a second
    interpolation of a map already interpolated, at full size), and it needs the ``preprocessing``
    pipeline and the image's ``applied_operations``, which a classifier's prediction does not
    carry. (The tests check that both land the maps in the same place.) Transforms that move
    voxels without recording it in the affine (an elastic deformation, or a ``Lambda`` that crops)
    can be inverted by neither; they do not belong in inference preprocessing.

    Parameters
    ----------
    keys : str or sequence of str
        Keys of the predictions that carry maps (usually ``"pred"``).
    output_dir : path
        Root folder of the outputs (created if needed; nothing is written outside it).
    output_postfix : str
        Appended to the subject's name, before the method and class.
    output_ext : {".nii.gz", ".nii", ".nrrd", ".mha"}
        NIfTI files are streamed from the feature grid (gzip level 1 for ``.nii.gz``); NRRD/MHA
        files are written from the whole resampled map, as float32.
    output_dtype : {"uint8", "int16", "float32"}
        NIfTI storage: quantised with the raw scale in ``scl_slope``/``scl_inter`` (read back as
        raw values to within half a step of the map's range / 255 or / 65535; the default, as the
        ``medcam3d`` command writes them) or exact float32.
    separate_folder : bool
        One folder per subject, as ``SaveImage``.
    data_root_dir : path
        As for ``SaveImage``: keep the input's folder structure below this root.
    output_name_formatter : callable, optional
        As for ``SaveImage``: ``(meta, transform) -> {"subject": ..., "idx": ...}``.
    orig_key : str, optional
        Key of the image whose metadata give the file's grid and name (``"image"`` in evaluators);
        default: the prediction's own metadata, which the inferer copied from the image.
    scanner_space : Space, optional
        The file's grid, when the metadata do not record it (then the same for every sample).
    grid : {"scan", "feature"}
        ``"scan"``: the maps on the loaded file's own grid (default). ``"feature"``: the maps on
        the target layer's grid, with its exact affine (a few kilobytes per map, written in
        float32; viewers place them in the patient by their affine, but voxel-by-voxel tools
        need ``"scan"``).
    four_d : bool
        One 4D file per subject (a volume per class) instead of one file per class (NIfTI only).
    normalized : bool
        Also write ``_norm`` copies, min-max scaled to [0, 1] (NIfTI only).
    fill : float
        Value of file voxels outside the network's field of view.
    overwrite : bool or None
        ``None`` (default): replace an existing file only when medcam3d wrote it (a NIfTI whose
        description begins with ``medcam3d``; NRRD/MHA files carry none), refuse otherwise; True:
        always; False: never.
    meta_key : str
        Metadata key of the maps.
    allow_missing_keys : bool
    background : bool
        Write in a background thread, so that the evaluator goes on with the next batch while the
        maps are resampled, quantised and compressed (gzip and numpy release the GIL). The maps are
        taken from the prediction at once, so the data may change afterwards. At most
        ``max_pending`` samples wait; an error of a background write is raised by the next call or
        by :meth:`wait`. Call :meth:`wait` after the run (for example in an ``Events.COMPLETED``
        handler) to be sure that every file is on disk; at interpreter exit pending writes are
        finished and their errors logged.
    max_pending : int
        With ``background``: how many samples may wait to be written before a call blocks.

    Attributes
    ----------
    written : list of Path
        The files written by the last call (with ``background``: by the writes finished since the
        last call or :meth:`wait`).

    Raises
    ------
    MissingHeatmapsError
        (KeyError) a prediction without maps.
    SpaceError
        The file's grid is unknown, or the input's affine is missing.
    FileExistsError
        An output file exists that medcam3d did not write (see ``overwrite``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        output_postfix: str = "heatmap",
        output_ext: str = ".nii.gz",
        output_dtype: str = "uint8",
        separate_folder: bool = True,
        data_root_dir: str | os.PathLike = "",
        output_name_formatter: Callable[[dict, Any], dict] | None = None,
        orig_key: str | None = None,
        scanner_space: Space | None = None,
        grid: str = "scan",
        four_d: bool = False,
        normalized: bool = False,
        fill: float = 0.0,
        overwrite: bool | None = None,
        meta_key: str = HEATMAP_KEY,
        allow_missing_keys: bool = False,
        background: bool = False,
        max_pending: int = 2,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending!r}.")
        ext = (output_ext if output_ext.startswith(".") else f".{output_ext}").lower()
        if ext not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            raise ValueError(f"output_ext must be .nii.gz, .nii, .nrrd or .mha, not {output_ext!r}.")
        if output_dtype not in ("uint8", "int16", "float32"):
            raise ValueError(f"output_dtype must be 'uint8', 'int16' or 'float32', not {output_dtype!r}.")
        if grid not in ("scan", "feature"):
            raise ValueError(f"grid must be 'scan' or 'feature', not {grid!r}.")
        if ext in (".nrrd", ".mha") and (four_d or normalized):
            raise ValueError(f"four_d and normalized are for NIfTI output; {ext} files hold one float32 map each.")
        self.output_dir = Path(output_dir)
        self.output_postfix = str(output_postfix)
        self.output_ext = ext
        self.output_dtype = output_dtype
        self.separate_folder = bool(separate_folder)
        self.data_root_dir = data_root_dir
        self.fname_formatter = output_name_formatter or default_name_formatter
        self.orig_key = orig_key
        self.scanner_space = None if scanner_space is None else Space.of(scanner_space)
        self.grid = grid
        self.four_d = bool(four_d)
        self.normalized = bool(normalized)
        self.fill = float(fill)
        self.overwrite = overwrite
        self.meta_key = meta_key
        self._data_index = 0  # the subject name of inputs without a file name, as SaveImage counts
        self.written: list[Path] = []
        self.background = bool(background)
        self.max_pending = int(max_pending)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []  # (subject, write) in submission order

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.written = []
        for key in self.key_iterator(d):
            pred = d[key]
            source = d[self.orig_key] if self.orig_key is not None else pred
            meta = dict(getattr(source, "meta", None) or {})
            if self.background:
                self._submit(self._plan(pred, meta))
            else:
                self.written += self.save(pred, meta)
            self._data_index += 1
        return d

    def wait(self) -> list[Path]:
        """Block until every background write has finished; return their files.

        Raises the first error of those writes (the others are logged). A no-op without ``background``.
        """
        written = self._collect(until=0)
        self.written = written
        return written

    def _submit(self, plan: _WritePlan) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcam3d-heatmaps")
            atexit.register(_report_at_exit, weakref.ref(self))  # a weak reference: savers can be collected
        self.written = self._collect(until=self.max_pending - 1)
        future = self._pool.submit(self._write, plan)
        self._pending.append((plan.subject, future))

    def _report_errors(self) -> None:
        """Log the errors of writes that nobody waited for (at exit their threads have finished)."""
        for subject, future in self._pending:
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None:
                logger.error("SaveHeatmapsd: the heatmaps of %r could not be written: %s: %s", subject,
                             type(error).__name__, error)
        self._pending = []

    def _collect(self, until: int) -> list[Path]:
        """Files of the finished writes, waiting for the oldest until at most ``until`` are pending."""
        written: list[Path] = []
        error: BaseException | None = None
        while self._pending and (len(self._pending) > until or self._pending[0][1].done()):
            subject, future = self._pending.pop(0)
            try:
                written += future.result()
            except Exception as failure:
                if error is None:
                    error = failure
                else:
                    logger.error("SaveHeatmapsd: the heatmaps of %r were not written: %s", subject, failure)
        if error is not None:
            raise error
        return written

    def views(self, pred: Any, meta: Mapping | None = None) -> list[ScanGridMap]:
        """The maps of one decollated prediction as seen on the file's grid (nothing resampled yet)."""
        result = explanation_of(pred, meta_key=self.meta_key)
        if result.maps.shape[0] != 1:
            message = (
                f"SaveHeatmapsd got a batch of {result.maps.shape[0]} predictions; it writes one sample at a time. "
                "Keep the evaluator's decollate=True (the default), or decollate_batch() the output first."
            )
            raise ValueError(message)
        if result.input_affine is None:
            message = (
                "The network's input had no affine (a plain tensor, not a MetaTensor), so the maps cannot "
                "be placed. Preprocess with MONAI transforms that keep MetaTensors (LoadImaged ...)."
            )
            raise SpaceError(message)
        native = heatmaps_of(result)  # on the feature grid, with its exact affine
        if self.grid == "feature":
            return [ScanGridMap.of_array(h) for h in native]
        meta = dict(meta if meta is not None else getattr(pred, "meta", {}))
        scanner = self.scanner_space if self.scanner_space is not None else original_space(meta)
        return [ScanGridMap(h, scanner, fill=self.fill) for h in native]

    def heatmaps(self, pred: Any, meta: Mapping | None = None) -> list[Heatmap]:
        """The maps of one decollated prediction as whole arrays on the file's grid (what is written)."""
        return [view.to_heatmap() for view in self.views(pred, meta)]

    def save(self, pred: Any, meta: Mapping) -> list[Path]:
        """Write the maps of one decollated prediction; ``meta`` names the subject and gives its grid."""
        return self._write(self._plan(pred, meta))

    def _plan(self, pred: Any, meta: Mapping) -> _WritePlan:
        """What :meth:`save` writes and where, taken from the prediction now (nothing written yet)."""
        views = self.views(pred, meta)
        names = dict(self.fname_formatter(dict(meta), self))
        subject, index = names.pop("subject", self._data_index), names.pop("idx", None)
        layout = FolderLayout(output_dir=self.output_dir, postfix=self.output_postfix, extension="",
                              parent=self.separate_folder, makedirs=False, data_root_dir=self.data_root_dir)
        stem = Path(layout.filename(subject=f"{subject}", idx=index, **names))
        folder = self._inside_output(stem.parent, subject)
        return _WritePlan(str(subject), views, folder, stem.name, _nifti_source(meta))

    def _write(self, plan: _WritePlan) -> list[Path]:
        views, folder = plan.views, plan.folder
        if not views:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        if self.output_ext in (".nrrd", ".mha"):
            return self._save_dense(views, folder, plan.stem)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".medcam3d-"))
        try:
            dtype = "float32" if self.grid == "feature" else self.output_dtype  # tiny: exact
            staged = save_scan_maps(views, staging, prefix=plan.stem, like=plan.like,
                                    normalized=self.normalized, four_d=self.four_d, dtype=dtype,
                                    compress=self.output_ext == ".nii.gz")
            targets = [folder / path.name for path in staged]
            for target in targets:
                self._check_replace(target)
            for path, target in zip(staged, targets):
                os.replace(path, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # our own staging folder (empty unless refused)
        return targets

    def _save_dense(self, views: list[ScanGridMap], folder: Path, stem: str) -> list[Path]:
        from . import io

        written = []
        for view in views:
            heatmap = view.to_heatmap()
            view.release()
            path = folder / f"{stem}_{heatmap.method}_{heatmap.file_label}{self.output_ext}"
            self._check_replace(path)
            written.append(io.write(path, heatmap.data, heatmap.space, descrip=heatmap.descrip))
        return written

    def _inside_output(self, folder: Path, subject: Any) -> Path:
        if not is_inside(folder, self.output_dir):
            message = (
                f"The heatmaps of {subject!r} would be written to {folder}, outside output_dir {self.output_dir} "
                "(data_root_dir does not contain the input?). Set data_root_dir to a folder above the inputs, "
                "or leave it empty."
            )
            raise ValueError(message)
        return folder

    def _check_replace(self, path: Path) -> None:
        if not path.exists() or self.overwrite is True:
            return
        if self.overwrite is None and written_by_medcam3d(path):
            return
        message = (
            f"{path} exists and was not written by medcam3d; it is not replaced. Choose another output_dir "
            "or output_postfix, or pass overwrite=True to replace it."
        )
        raise FileExistsError(message)


@dataclass(frozen=True)
class _WritePlan:
    """One sample's maps for :class:`SaveHeatmapsd` to write, and where."""

    subject: str
    views: list[ScanGridMap]
    folder: Path
    stem: str
    like: str | None  # the loaded NIfTI, whose header codes the maps copy


def _report_at_exit(saver: weakref.ref) -> None:
    """At interpreter exit: the unreported write errors of a :class:`SaveHeatmapsd` still alive."""
    alive = saver()
    if alive is not None:
        alive._report_errors()


def _nifti_source(meta: Mapping) -> str | None:
    """The loaded file, when it is a NIfTI (its sform/qform codes are copied to the maps)."""
    name = meta.get("filename_or_obj")
    if isinstance(name, (str, os.PathLike)) and str(name).lower().endswith((".nii", ".nii.gz")) and Path(name).is_file():
        return str(name)
    return None
