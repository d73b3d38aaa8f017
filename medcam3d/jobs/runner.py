"""The main job: a scan file in, heatmaps, masks, boxes and pictures in scanner space out.

:class:`Runner` holds a loaded model and its config; :meth:`Runner.run_case` explains one scan
with one or more methods and writes everything for that case into ``out/<case_id>/``. The case
folder is first written under a temporary name and renamed when complete, so an interrupted run
never leaves a half-written case; only folders that medcam3d wrote are ever replaced, and an
output folder over an input is refused (see :mod:`medcam3d.jobs.outputs`). Each case's
``summary.json`` records what produced it (methods, target, layer, config and weights digest) and
from what (each input's resolved path, size and modification time, the mask and region mask, the
volume and series: :func:`~medcam3d.jobs.case_identity.case_identity`), so ``batch --resume`` skips a case
only when the same settings made it from the same inputs.

Reading a case is :mod:`medcam3d.jobs.case_loading` (:func:`load_case`), its record
:mod:`medcam3d.jobs.case_result` (:class:`CaseResult`); the peaks' masks and boxes come from
:mod:`medcam3d.masks`, a segmentation class's region on the scan from :mod:`medcam3d.targets`
(:func:`~medcam3d.targets.scan_regions`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._json import json_values
from ..config import Config, SlidingWindowConfig
from ..explainer import Explainer
from ..heatmap import heatmaps_of
from ..masks import labels_present, largest_component_runs, save_box, save_runs, top_mass_runs
from ..errors import SpaceError, TargetError, UsageError
from ..heatmap import unique_file_labels
from ..preprocess import build_transforms
from ..space import Space
from ..targets import Region, probabilities, scan_regions
from .case_loading import LoadedCase, check_model_input, load_case, read_region_mask
from .case_result import CaseResult, ExplainedCase
from .case_identity import case_identity
from .case_ids import case_id_of, check_case_id, first_image, image_paths
from .cases import Case
from .outputs import check_output_location, publish_case_folder, read_case_summary, remove_stale_staging, staging_folder

__all__ = ["Runner", "resolve_device", "config_digest"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:<index>.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was requested but CUDA is not available here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"device {device} does not exist: this machine has {count} CUDA device(s); use --device "
                         f"cuda:0{f' to cuda:{count - 1}' if count > 1 else ''} (or auto).")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"device {device} is not supported; use --device auto, cpu or cuda[:<index>].")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device} was requested but MPS (Apple's GPU) is not available here; use --device cpu.")
    xpu = getattr(torch, "xpu", None)
    if device.type == "xpu" and (xpu is None or not xpu.is_available()):
        raise UsageError(f"device {device} was requested but no Intel XPU is available here; use --device cpu.")
    return device


_FILE_DIGESTS: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> sha256 of the bytes


def _file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes, remembered while its size and modification time stay the same
    (resume asks for the config's digest once per case; a weights file is read once)."""
    real = os.path.realpath(path)
    info = os.stat(real)
    key = (real, info.st_size, info.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(real, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        if len(_FILE_DIGESTS) > 64:
            _FILE_DIGESTS.clear()
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def config_digest(config: Config) -> str:
    """A short digest of everything in the config that shapes the outputs (and of the weights file)."""
    def plain(value: object) -> object:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    digest = hashlib.sha256(json.dumps(plain(config), sort_keys=True).encode())
    for path in (config.model.weights, config.model.torchscript):
        if path is not None and Path(path).is_file():
            digest.update(bytes.fromhex(_file_digest(path)))
    return digest.hexdigest()[:16]


def _on_cpu(explanation):
    """An Explanation with its tensors on the CPU (a no-op on the CPU)."""
    tensors = {name: getattr(explanation, name).cpu() for name in ("maps", "logits", "scores", "class_indices")}
    return dataclasses.replace(explanation, **tensors)


class Runner:
    """A model with its config, ready to explain scans.

    Parameters
    ----------
    config : Config
    model : nn.Module
        Loaded, in eval mode (see :func:`medcam3d.models.load_model`).
    methods : sequence of str, optional
        Default: the config's method.
    target, layer : optional
        Override the config's.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
    trust : bool
        Read scans whose headers point to data files elsewhere (see :func:`medcam3d.io.read`).
    reader : callable, optional
        Replaces the config's preprocessing (e.g. a MONAI bundle's own; see :func:`load_case`).
    random_weights : bool
        The model has random parameters on purpose; recorded in every case's summary.
    output_activation : str, optional
        Override the config's ``output_activation`` (``auto``, ``none``, ``softmax``, ``sigmoid``).
    placement : {"receptive_field", "align_corners"}, optional
        Override the config's ``placement`` of the feature grid (see :class:`~medcam3d.Explainer`).

    Attributes
    ----------
    input_check : callable or None
        Refuses a preprocessed input the model's activation limit would refuse, before the
        preprocessing makes it (see :func:`load_case`); None with a sliding window (the model
        then sees windows, not the whole input).
    region_masks : dict of str to Path
        Region masks (0/1, on each scan's grid) by case id, for segmentation networks: a case
        listed here is explained inside its region when :meth:`run_case` gets no ``region_mask``
        (``medcam3d batch`` fills it from the cohort's ``region_mask`` column).
    """

    def __init__(self, config: Config, model: torch.nn.Module, *, methods: Sequence[str] | None = None,
                 target: object = None, layer: str | None = None, device: str = "auto",
                 sliding_window: SlidingWindowConfig | None = None, amp: str | None = None,
                 trust: bool = False, reader=None, random_weights: bool = False,
                 output_activation: str | None = None, placement: str | None = None) -> None:
        self.config = config
        self.trust = trust
        self.reader = reader
        self.random_weights = random_weights or config.model.random_weights
        self.sliding_window = sliding_window or config.sliding_window
        self.amp = amp or config.amp
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.methods = list(methods) if methods else [config.method]
        self.target = config.target if target is None else target
        self.layer = layer or config.layer
        self.transforms = build_transforms(config.preprocessing, trust=trust, source=config.source)
        self.input_check = (None if self.sliding_window is not None
                            else functools.partial(check_model_input, self.model))  # picklable: DataLoader workers
        self.region_masks: dict[str, Path] = {}
        if config.class_names:
            unique_file_labels(config.class_names)  # clashing file labels are refused before any work
        options = dict(layer=self.layer, class_names=config.class_names, amp=self.amp,
                       output_activation=output_activation or config.output_activation,
                       placement=placement or config.placement)
        from ..models.nnunet import FoldEnsemble

        # an nnU-Net fold ensemble: each fold explained on its own (<method>_fold<k> maps) and their mean (<method>),
        # with layer names of one fold's network; self.explainers hold the first fold's (names, methods), and
        # explain_method explains with every fold (evaluate, napari). Mirror test-time augmentation as the model says.
        folds = list(self.model.folds) if isinstance(self.model, FoldEnsemble) else None
        self.mirror_axes: tuple[int, ...] = tuple(getattr(self.model, "mirror_axes", ()))
        self.fold_explainers = [[Explainer(fold, method, **options) for fold in folds]  # type: ignore[arg-type]
                                for method in self.methods] if folds is not None else None
        self.explainers = ([row[0] for row in self.fold_explainers] if self.fold_explainers is not None else
                           [Explainer(self.model, method, **options) for method in self.methods])  # type: ignore[arg-type]

    def run_settings(self) -> dict:
        """What shapes this runner's outputs; recorded in each case's summary and compared by resume."""
        window = self.sliding_window
        return {"methods": list(self.methods), "target": self.target, "layer": self.layer,
                "random_weights": self.random_weights,
                "output_activation": self.explainers[0].output_activation if self.explainers else None,
                "placement": self.explainers[0].placement if self.explainers else None,
                "config_digest": config_digest(self.config), "amp": self.amp,
                "sliding_window": None if window is None else dataclasses.asdict(window)}

    def is_done(self, out_dir: str | Path, case: Case) -> CaseResult | None:
        """The recorded result when ``out_dir/<case.id>`` was written by medcam3d with these run
        settings from these inputs, else ``None``.

        The inputs are compared by identity (:meth:`Case.identity
        <medcam3d.jobs.cases.Case.identity>`): a scan replaced at its path, a CSV row pointing the
        id at another scan, a mask or region mask added, removed or changed, another volume or
        series: the case is done again. The region mask is the case's own, else
        ``region_masks[case.id]``.
        """
        summary = read_case_summary(Path(out_dir) / case.id)
        result = CaseResult.from_summary(summary) if summary is not None else None
        if result is None or result.status != "ok":
            return None
        region_mask = case.region_mask if case.region_mask is not None else self.region_masks.get(case.id)
        inputs = case_identity(case.scan, case.mask, region_mask, case.volume, case.series)
        expected = CaseResult.recorded_run(self._case_settings(inputs, region_mask))
        return result if result.run == expected else None

    def _case_settings(self, inputs: dict, region_mask: str | Path | None) -> dict:
        """:meth:`run_settings`, plus the identity of the case's inputs (see
        :func:`~medcam3d.jobs.case_identity.case_identity`) and the region mask (its name and a digest of its bytes)."""
        settings = {**self.run_settings(), "inputs": inputs}
        if region_mask is not None:
            digest = hashlib.sha256()
            try:
                if not os.path.isfile(region_mask):  # a FIFO would wait for a writer: reading the case reports it
                    raise OSError(f"not a regular file: {region_mask}")
                with open(region_mask, "rb") as stream:
                    for block in iter(lambda: stream.read(1 << 22), b""):
                        digest.update(block)
            except OSError:  # reported when the case is read
                pass
            settings["region_mask"] = {"file": Path(region_mask).name, "digest": digest.hexdigest()[:16]}
        return settings

    def check_channels(self, count: int, what: str) -> None:
        """Refuse ``count`` scans per case when the model takes another number of input channels,
        before any scan is read (:func:`medcam3d.models.check_input_channels`).

        One scan is checked only where medcam3d's own preprocessing reads it (a bundle's chain may
        make several channels of one file); :func:`load_case` checks the preprocessed input again
        before the model runs.

        Raises
        ------
        InputError
        """
        if count == 1 and self.reader is not None:
            return
        from ..models import check_input_channels

        check_input_channels(count, self.model, what=what)

    def check_cases_channels(self, cases: Sequence[Case]) -> None:
        """:meth:`check_channels` for every number of scans per case of a cohort (naming a case of each)."""
        for count in sorted({len(case.inputs) for case in cases}):
            example = next(case for case in cases if len(case.inputs) == count)
            self.check_channels(count, f"case {example.id!r} ({example.source or example.image})")

    def check_region_task(self) -> None:
        """Refuse region masks for a model that is not a segmentation network (before any work).

        Raises
        ------
        UsageError
            The config's task is not ``segmentation``.
        """
        if self.config.task != "segmentation":
            raise UsageError(
                f"A region mask (--region-mask, or a region_mask column) says where to explain a segmentation network's "
                f"class, but this config's task is {self.config.task!r}: a classifier is explained per class over the "
                "whole scan (use --target). If the network segments, set task: segmentation in the config."
            )

    # ---------------------------------------------------------------- one case
    def run_case(self, image: str | Path | Sequence[str | Path], out_dir: str | Path, *, case_id: str | None = None,
                 mask: str | Path | None = None, overwrite: bool = True,
                 loaded: LoadedCase | None = None, volume: int | None = None,
                 series: str | None = None, region_mask: str | Path | None = None) -> CaseResult:
        """Explain one scan and write its outputs to ``out_dir/<case_id>/``.

        ``mask`` is an optional ground-truth label map on the scan's grid: label ``c + 1`` marks
        the lesion of class ``c``; each map's peak is checked against it. ``loaded`` is the case
        already read and preprocessed (e.g. by a DataLoader worker, see :func:`load_case`).
        ``volume`` picks one volume of a 4D file, ``series`` one series of a DICOM folder.
        ``image`` may be a list of scans, one per input channel (see :func:`load_case`): the case
        is named after (``case_id`` default), and its outputs lie on the grid of, the first one.

        ``region_mask`` (segmentation networks only; default: ``region_masks[case_id]`` if listed)
        is a 0/1 mask on the scan's grid: each class is then scored by the sum of its logits inside
        that region, and the mask is resampled onto the model's output grid with nearest neighbour
        (:func:`medcam3d.targets.region_from_scan_mask`), through the same input affine that places
        the maps. Without it each class is scored inside the region the model predicts for it.

        The two halves, :meth:`explain_case` (the engine) and :meth:`write_case` (everything
        written), can run in different processes: ``medcam3d batch`` writes one case while the
        next is explained.
        """
        return self.write_case(self.explain_case(image, out_dir, case_id=case_id, mask=mask, overwrite=overwrite,
                                                 loaded=loaded, volume=volume, series=series,
                                                 region_mask=region_mask))

    def explain_case(self, image: str | Path | Sequence[str | Path], out_dir: str | Path, *,
                     case_id: str | None = None,
                     mask: str | Path | None = None, overwrite: bool = True,
                     loaded: LoadedCase | None = None, volume: int | None = None,
                     series: str | None = None, region_mask: str | Path | None = None,
                     inputs: dict | None = None) -> ExplainedCase:
        """The first half of :meth:`run_case`: checks, reading (unless ``loaded``) and the engine.

        Nothing is written. The maps stay on the feature grid, on the CPU; :meth:`write_case`
        writes them (in this process or another one). ``inputs`` is the identity of the inputs
        that ``loaded`` was read from, taken before they were read
        (:func:`~medcam3d.jobs.case_identity.case_identity`, recorded for resume); default: taken now,
        before reading. With ``loaded``, give ``volume`` and ``series`` as it was read.
        """
        case_id = check_case_id(case_id or case_id_of(image), "case id")
        if region_mask is None:
            region_mask = self.region_masks.get(case_id)
        if region_mask is not None:
            self.check_region_task()
        if inputs is None:  # before reading: a file replaced meanwhile is done again by the next resume
            inputs = case_identity(image, mask, region_mask, volume, series)
        paths = image_paths(image)
        result = CaseResult(case_id=case_id, image=str(first_image(image)), run=self._case_settings(inputs, region_mask),
                            channels=[str(p) for p in paths] if len(paths) > 1 else [])
        out_dir = check_output_location(out_dir, [*paths, mask, region_mask])
        final = out_dir / case_id
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True or --resume to skip it.")
        if loaded is None:
            loaded = load_case(image, self.transforms, mask, trust=self.trust, volume=volume, series=series,
                               reader=self.reader, model=self.model, region_mask=region_mask,
                               input_check=self.input_check)
        elif region_mask is not None and loaded.region is None:
            loaded = dataclasses.replace(loaded, region=read_region_mask(region_mask, loaded.scanner_space,
                                                                         trust=self.trust, image=first_image(image)))
        batch = loaded.x[None].to(self.device)
        target = self.target if loaded.region is None else self._region_target(loaded.region, loaded.scanner_space,
                                                                                loaded.x)
        explanations = self._explain_all(batch, target)
        return ExplainedCase(result, image, out_dir, loaded, explanations)

    def write_case(self, case: ExplainedCase) -> CaseResult:
        """The second half of :meth:`run_case`: write a case's outputs and publish its folder.

        The folder is written under a temporary name and renamed when complete (see
        :mod:`medcam3d.jobs.outputs`); on any error nothing of it is left.
        """
        result, out_dir = case.result, case.out_dir
        final = out_dir / result.case_id
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir, result.case_id)
        staging = staging_folder(out_dir, result.case_id)
        try:
            self._write_into(case.explanations, case.loaded, staging, result, first_image(case.image))
            result.files = [str(final / Path(f).name) for f in result.files if (staging / Path(f).name).is_file()]
            text = json.dumps(result.to_summary(), indent=2, allow_nan=False, ensure_ascii=False)
            (staging / "summary.json").write_text(text, encoding="utf-8")
            publish_case_folder(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return result

    def _write_into(self, explanations: list, loaded: LoadedCase, folder: Path, result: CaseResult, image) -> None:
        """Write one case's outputs into ``folder``, doing only what is stored or shown.

        The engine's maps stay on the feature grid (``_feature`` files, exact). Everything on the
        scan's grid is sampled from them where it is needed (:class:`~medcam3d.scan_maps.ScanGridMap`):
        scan-grid maps are streamed slab by slab into quantised files, pictures sample three planes,
        peaks and boxes come from a few voxels or from runs (:func:`~medcam3d.masks.superlevel_runs`),
        and a mask is formed only when it is written. ``loaded.region`` (boolean, scan grid) is the
        region that segmentation classes were explained in (see :meth:`run_case`).
        """
        from ..scan_maps import ScanGridMap, save_scan_maps
        from ..io.nifti import like_header
        from .report import SlicePainter

        scanner_space, scan, labels, region = loaded.scanner_space, loaded.scan, loaded.labels, loaded.region
        output = self.config.output
        names = self.config.class_names
        like = like_header(image) if _is_nifti(image) else None  # read once per case
        ext = ".nii.gz" if output.compress else ".nii"
        painter = SlicePainter(scan, scanner_space) if output.pictures and scan.ndim == 3 else None  # laid out once
        present = labels_present(labels)
        for number, explanation in enumerate(explanations):
            regions = None
            if explanation.logits.ndim > 2 and (output.masks or output.boxes):  # segmentation: boxes in the region
                regions = scan_regions(explanation, scanner_space, region)
            if not result.probabilities and explanation.logits.ndim == 2:
                probs = probabilities(explanation.logits.float(), self.config.task)[0].tolist()
                result.probabilities = {(names[i] if names and i < len(names) else str(i)): p for i, p in enumerate(probs)}
            field_ = explanation.receptive_field
            result.placement[explanation.method] = {
                "placement": explanation.placement, "layer": explanation.layer,
                "receptive_field": None if field_ is None else field_.to_dict(),
                **({} if explanation.output_field is None else {"output_field": explanation.output_field.to_dict()})}
            if explanation.diagnostics:
                result.diagnostics[explanation.method] = json_values(explanation.diagnostics)
            native = heatmaps_of(explanation)  # the feature grid, exact affine
            prefix = result.case_id
            files = [heat.save(folder / f"{prefix}_{explanation.method}_{heat.file_label}_feature{ext}", like=like)
                     for heat in native]  # the source's codes and units, as the scan-grid maps
            views = [ScanGridMap(heat, scanner_space, fill=output.fill) for heat in native]
            chosen = {id(view) for view in self._scan_map_choice(views, explanation)}
            options: dict[str, Any] = dict(prefix=prefix, like=like, normalized=output.normalized, dtype=output.scan_dtype,
                           compress=output.compress)
            if output.four_d:
                files += save_scan_maps([v for v in views if id(v) in chosen], folder, four_d=True, **options)
            for view in views:
                files += self._localize(view, scan, labels, folder, prefix, result, output, like=like, painter=painter,
                                        present=present, region=None if regions is None else regions[view.class_index])
                if id(view) in chosen and not output.four_d:
                    files += save_scan_maps([view], folder, **options)
                view.release()
            if output.segment and number == 0 and scan.ndim == 3:
                files += self._segment_into(scan, scanner_space, native, explanation, folder, prefix, result,
                                            image if _is_nifti(image) else None)
            result.files += [str(f) for f in files]

    def _segment_into(self, scan, scanner_space, native, explanation, folder: Path, prefix: str, result: CaseResult,
                      like: str | Path | None) -> list[Path]:
        """Weakly-supervised segmentation from the maps (:func:`medcam3d.segment.segment`): label map and boxes.

        Classes predicted present (p >= 0.5) are segmented, or every class where there are no
        probabilities (e.g. a segmentation network's region targets).
        """
        from ..segment import segment

        indices = [heat.class_index for heat in native]
        if explanation.logits.ndim == 2 and result.probabilities:
            probs = list(result.probabilities.values())
            indices = [i for i in indices if i < len(probs) and probs[i] >= 0.5]
        method = native[0].method if native else "map"
        segmentation = segment(scan, scanner_space, native, classes=indices)
        labels_path, boxes_path = segmentation.save(folder / f"{prefix}_{method}_segmentation.nii.gz",
                                                    folder / f"{prefix}_{method}_lesions.json", like=like)
        result.segmentation = {"method": method, "classes": indices,
                               "lesions": [lesion.to_dict() for lesion in segmentation.lesions]}
        return [p for p in (labels_path, boxes_path) if p is not None]

    def _scan_map_choice(self, views: list, explanation) -> list:
        """The maps that ``output.scan_maps`` asks to write on the scan's grid."""
        mode = self.config.output.scan_maps
        if mode in ("all", "none") or explanation.logits.ndim != 2:
            if mode not in ("all", "none"):
                logger.info("output.scan_maps=%s needs class probabilities (a classifier); writing all maps", mode)
            return views if mode != "none" else []
        logits = explanation.logits.float()
        if logits.shape[1] == 1:  # one logit: its map is the positive class's
            positive = bool(torch.sigmoid(logits[0, 0]) >= 0.5)
            return views if (mode == "predicted" or positive) else []
        probs = probabilities(logits, self.config.task)[0]
        wanted = {int(torch.argmax(probs))} if mode == "predicted" else set(torch.nonzero(probs >= 0.5).flatten().tolist())
        return [view for view in views if view.class_index in wanted]

    def _explain_all(self, batch: torch.Tensor, target: object) -> list:
        """Every method's explanation of ``batch`` (on the CPU); for a fold ensemble, each method's mean over the
        folds followed by each fold's own (method ``<method>_fold<k>``)."""
        if self.fold_explainers is None:
            return [_on_cpu(self.explain(explainer, batch, target=target)) for explainer in self.explainers]
        from ..folds import explain_folds

        names = getattr(self.model, "names", [])
        found = []
        for explainers in self.fold_explainers:
            mean, folds = explain_folds(explainers, batch, target,
                                        explain=lambda explainer, x, tgt: _on_cpu(self.explain(explainer, x, target=tgt)))
            found.append(mean)
            found += [dataclasses.replace(one, method=f"{one.method}_fold{name}") for one, name in zip(folds, names)]
        return found

    def explain_method(self, index: int, batch: torch.Tensor, *, target: object = None):
        """Method ``index``'s explanation of a batch with the whole model: for a fold ensemble the mean of
        the folds' explanations (the ``<method>`` maps that ``explain`` writes), else :meth:`explain` with
        ``explainers[index]``."""
        if self.fold_explainers is None:
            return self.explain(self.explainers[index], batch, target=target)
        from ..folds import explain_folds

        mean, _ = explain_folds(self.fold_explainers[index], batch, target,
                                explain=lambda explainer, x, tgt: self.explain(explainer, x, target=tgt))
        return mean

    def explain(self, explainer: Explainer, batch: torch.Tensor, *, target: object = None):
        """One explanation of a batch: direct, or through sliding windows when configured; mirrored
        (:func:`medcam3d.mirror.explain_mirrored`) when the model has mirror axes.

        ``target`` replaces the runner's (e.g. a ``Region`` of one case); default: the runner's.
        """
        target = self.target if target is None else target
        if self.mirror_axes:
            from ..mirror import explain_mirrored

            return explain_mirrored(lambda x, tgt: self._explain_once(explainer, x, tgt), batch, target, self.mirror_axes)
        return self._explain_once(explainer, batch, target)

    def _explain_once(self, explainer: Explainer, batch: torch.Tensor, target: object):
        window = self.sliding_window
        if window is None:
            return explainer(batch, target=target)
        from ..sliding import explain_sliding_window

        return explain_sliding_window(explainer, batch, target, roi_size=window.roi, overlap=window.overlap,
                                      sw_batch_size=window.sw_batch, mode=window.mode)

    def _region_target(self, region: np.ndarray, scanner_space, x) -> Region:
        """The runner's classes inside ``region`` (boolean, scan grid).

        Direct explanations resample the mask onto the output grid when the target is resolved
        (``Region(..., space=scanner_space)``, exact for any output grid); sliding windows need it on
        the input grid, where it is resampled here (the windows' output grid is the input grid).
        """
        classes: Any = self.target.classes if isinstance(self.target, Region) else self.target
        classes = "all" if classes is None else classes
        if self.sliding_window is None:
            return Region(classes, mask=region, space=scanner_space)
        from ..targets import region_from_scan_mask

        try:
            input_space = Space.of(x)
        except SpaceError:
            raise TargetError("A region mask needs the grid of the model's input, but the preprocessing returned a "
                              "plain tensor without an affine; use medcam3d's (MONAI) preprocessing.") from None
        return Region(classes, mask=region_from_scan_mask(region, scanner_space, input_space))

    def _localize(self, heat, scan, labels, folder: Path, prefix: str, result: CaseResult, output, *, like=None,
                  painter=None, present: set | None = None, region: tuple | None = None) -> list[Path]:
        """Peak, lesion check, box (and mask), picture of one map; records the finding.

        ``heat`` is a :class:`~medcam3d.scan_maps.ScanGridMap`. The peak is the voxel of the
        scan-grid map's maximum (None for a flat map). For a class target the box is that of the
        largest connected component of the thresholded map, the mask that component. For a
        segmentation (Region) target, ``region`` is ``(source, mask)``: the explained region on the
        scan's grid (``"given"``: the region mask; ``"predicted"``: where the model predicts the
        class); the mask is then the smallest set of voxels inside it holding ``output.region_mass``
        of the map's mass there (:func:`~medcam3d.masks.top_mass_runs`), the box that set's bounding box.
        """
        stem = f"{prefix}_{heat.method}_{heat.file_label}"
        found = heat.peak()
        voxel, world = (found[0], [float(v) for v in found[1]]) if found is not None else (None, None)
        finding = {"method": heat.method, "class": heat.label, "class_index": heat.class_index,
                   "score": heat.heatmap.score, "peak_voxel": None if voxel is None else list(voxel), "peak_mm": world}
        files: list[Path] = []
        if labels is not None:
            is_present = (heat.class_index + 1) in (present or set())
            finding["lesion_present"] = is_present
            finding["peak_in_lesion"] = (bool(labels[voxel] == heat.class_index + 1) if voxel is not None else False) \
                if is_present else None
        if output.masks or output.boxes:
            if region is None or region[1] is None:  # a class target, or a region whose grid is unknown
                region = None
                runs = largest_component_runs(heat, output.mask_method, output.mask_value)
                described: dict[str, Any] = {
                    "kind": "largest_component",
                    "threshold": {"method": output.mask_method, "value": output.mask_value},
                    "comment": "The largest connected component of the map thresholded on the scan's grid.",
                }
            else:
                source, where = region
                runs = top_mass_runs(heat, where, output.region_mass)
                inside = "the given region mask" if source == "given" else "the region the model predicts for this class"
                described = {
                    "kind": "region_top_mass",
                    "region": source,
                    "threshold": {"method": "region_mass", "value": output.region_mass},
                    "comment": (f"The smallest set of voxels inside {inside} that holds {output.region_mass:.0%} of the "
                                "map's mass there (highest values first), and its bounding box; it may span several "
                                "blobs. None when the map is zero inside the region."),
                }
            box = runs.box(heat.space)
            if output.masks:
                files.append(save_runs(folder / f"{stem}_mask{'.nii.gz' if output.compress else '.nii'}", runs,
                                       heat.space, like=like, descrip=heat.descrip, compress=output.compress))
            files.append(save_box(folder / f"{stem}_box.json", box, peak_voxel=finding["peak_voxel"], peak_mm=world,
                                  **described))
            finding["box_mm"] = None if box is None else {"min": box.world_min, "max": box.world_max}
            if region is not None:
                finding["box_kind"] = described["kind"]
        if painter is not None:  # a SlicePainter of this case's scan
            probability = result.probabilities.get(heat.label)
            p_text = f" (p = {probability:.2f})" if probability is not None else ""
            title = f"{prefix} · {heat.method} · {heat.label}{p_text}"
            files.append(painter.save(folder / f"{stem}.png", heat, title=title, peak_voxel=voxel))
        result.findings.append(finding)
        return files


def _is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))
