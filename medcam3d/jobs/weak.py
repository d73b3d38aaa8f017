"""The jobs of the learned weakly-supervised segmenter (:mod:`medcam3d.weak`): ``medcam3d weak-train``
and ``medcam3d segment``, with the output rules of every medcam3d job.

``weak-train`` writes three files into ``--out`` (``<name>.yaml``, ``<name>.pt``, ``<name>.json``),
replacing them only where medcam3d wrote them (the folder's manifest); ``segment`` writes one case
folder per scan, ``OUT/<case>/<case>_learned_segmentation.nii.gz`` (the label map on the scan's
grid: 0 background, ``c + 1`` class ``c``) and ``<case>_learned_lesions.json`` (each lesion's box in
voxels and RAS mm), published as :class:`~medcam3d.jobs.runner.Runner` publishes its folders
(staged, then renamed; a folder medcam3d did not write is never replaced). Both hold the lock on
``--out`` and refuse an ``--out`` that holds or lies inside an input.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .cases import check_case_id, collect_cases
from .lock import output_lock
from .outputs import (
    MARKER,
    check_output_location,
    check_own_files,
    publish_case_folder,
    record_own_files,
    remove_stale_staging,
    staging_folder,
)

__all__ = ["segment_cases", "weak_train"]

logger = logging.getLogger(__name__)


def weak_train(config_path: str | Path, out: str | Path, *, inputs: str | Path | None = None,
               demo_cases: int | None = None, train_cases: int | None = None, seed_method: str | None = None,
               layer: str | None = None, network: str = "unet", channels: Sequence[int] | None = None,
               epochs: int = 6, batch_size: int = 4, lr: float = 3e-3, decay: float = 0.98,
               constrain_weight: float = 1.0, size_weight: float | None = None, size_factor: float | None = None,
               seed: int = 0, name: str = "weak_segmenter", trust: bool = False,
               seed_settings: dict | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, Path, Path]:
    """Train a segmenter from a classifier and image-labelled scans; write its config, weights and record.

    Parameters
    ----------
    config_path : path
        The classifier's config (network, weights, class names, preprocessing).
    out : path
        Folder for ``<name>.yaml``, ``<name>.pt`` and ``<name>.json``.
    inputs : path, optional
        A CSV (with a ``labels`` column: the class names present, ``;``-separated) or a folder of
        scans; or None with ``demo_cases``.
    demo_cases : int, optional
        Instead of ``inputs``: this many scans of the demo generator (image labels only), for the
        demo classifier (``configs/demo.yaml``).
    train_cases : int, optional
        Use only the first ``train_cases`` of ``inputs``.
    seed_method : str, optional
        Any ``method=`` of the Explainer (default :data:`medcam3d.weak.DEFAULT_SEED_METHOD`).
    layer : str, optional
        The classifier's layer for layer-level seed methods (default: the config's).
    network : {"unet", "segresnet"}
    channels : sequence of int, optional
        UNet ``channels`` (one stride-2 level fewer than channels); SegResNet ``init_filters`` (the first).
    epochs, batch_size, lr, decay, constrain_weight, seed
        :class:`medcam3d.weak.TrainSettings`.
    size_weight, size_factor : float, optional
        The size prior (:class:`medcam3d.weak.TrainSettings`; default: its defaults).
    name : str
        File stem of the outputs.
    seed_settings : dict, optional
        Fields of :class:`medcam3d.weak.SeedSettings` to change from its defaults.

    Returns
    -------
    (config, weights, record) paths
    """
    from .. import weak
    from ..config import load_config
    from ..models import load_model

    if (inputs is None) == (demo_cases is None):
        raise UsageError("give the training scans: --inputs CSV|FOLDER (image labels in a 'labels' column), or "
                         "--demo-cases N for the demo generator; not both.")
    check_case_id(name, "--name")
    say = log or (lambda text: logger.info(text))
    config = load_config(config_path)
    if config.task == "segmentation":
        raise UsageError(f"{config_path} is a segmentation config; weak-train needs the classifier whose maps give "
                         "the seeds (e.g. configs/demo.yaml).")
    cases = collect_cases(inputs) if inputs is not None else []
    if train_cases is not None and inputs is not None:
        cases = cases[:train_cases]
    read = [config_path, inputs, config.model.weights, *(c.image for c in cases)]
    out = check_output_location(out, read)
    names = [f"{name}.yaml", f"{name}.pt", f"{name}.json"]
    network_options: dict[str, Any] = {}
    if channels:
        if network == "unet":
            network_options = {"channels": list(channels), "strides": [2] * (len(channels) - 1)}
        else:
            network_options = {"init_filters": int(channels[0])}
    size: dict[str, Any] = {key: value for key, value in (("size_weight", size_weight), ("size_factor", size_factor))
                            if value is not None}
    settings = weak.TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, decay=decay,
                                  constrain_weight=constrain_weight, seed=seed, **size)
    weak.network_args(network, 1)  # an unknown network: a usage error before any work
    seeding = weak.SeedSettings(**(seed_settings or {}))
    with output_lock(out, "weak-train", check=lambda: check_own_files(out, names)):
        classifier = load_model(config, trust=trust)
        started = time.perf_counter()
        if inputs is not None:
            data = weak.cohort_training_set(cases, config, trust=trust)
            source = {"inputs": str(inputs), "cases": len(cases)}
        else:
            assert demo_cases is not None
            data = weak.demo_training_set(demo_cases)
            source = {"demo_generator": {"cases": demo_cases, "seeds": [0, demo_cases - 1]}}
        say(f"{len(data)} training scans on the grid {data.space.shape} ({time.perf_counter() - started:.0f} s)")
        segmenter = weak.train_segmenter(data, classifier, method=seed_method or weak.DEFAULT_SEED_METHOD,
                                         layer=layer or config.layer, seed_settings=seeding, settings=settings,
                                         network=network,
                                         network_options=network_options or None, placement=config.placement, log=say)
        segmenter.provenance.update({"classifier_config": str(Path(config_path).resolve()), **source,
                                     "wall_time_s": round(time.perf_counter() - started, 1),
                                     "threads": torch.get_num_threads()})
        written = weak.save_segmenter(segmenter, out / names[0], preprocessing=config.preprocessing)
        record_own_files(out, names, "weak-train")
    return written


def segment_cases(config_path: str | Path, out: str | Path, *, image: str | Path | list | None = None,
                  inputs: str | Path | None = None, device: str = "auto", trust: bool = False,
                  min_volume_mm3: float = 20.0, threshold: float | None = None) -> list[dict]:
    """Segment scans with a trained segmenter and write one case folder each.

    Parameters
    ----------
    config_path : path
        A segmenter config (``task: segmentation``), e.g. written by :func:`weak_train`.
    out : path
    image, inputs : path
        One scan (or a list of scans of one case, one per input channel, on the first one's grid),
        or a folder/CSV of scans (exactly one of them).
    device : str
        ``auto``, ``cpu``, ``cuda[:i]``.
    min_volume_mm3 : float
        Smaller components are dropped.
    threshold : float, optional
        A foreground probability in (0, 1): a voxel takes its most probable class where that class's
        probability reaches it (default: the most probable label, background included).

    Returns
    -------
    list of dict
        Per case: id, files, lesions.
    """
    from .. import weak
    from ..preprocess import build_transforms
    from .case_loading import load_case
    from .runner import resolve_device

    if (image is None) == (inputs is None):
        raise UsageError("give --image SCAN or --inputs CSV|FOLDER (one of them).")
    if not min_volume_mm3 >= 0:
        raise UsageError(f"--min-volume must be >= 0 mm³, not {min_volume_mm3}.")
    if threshold is not None and not (0.0 < threshold < 1.0):
        raise UsageError(f"--threshold must be a probability strictly between 0 and 1, not {threshold} "
                         "(leave it out for the most probable label).")
    if inputs is not None:
        cases = collect_cases(inputs)
    else:
        given: list = list(image) if isinstance(image, (list, tuple)) else [image]
        channels = [Path(p) for p in given]
        cases = collect_cases(channels[:1])
        missing = [str(p) for p in channels[1:] if not p.exists()]
        if missing:
            raise UsageError(f"--image {', '.join(map(repr, missing))} does not exist; give one scan per channel.")
        cases[0].channels = channels if len(channels) > 1 else []
    config, model = weak.load_segmenter(config_path, trust=trust)
    out = check_output_location(out, [config_path, config.model.weights, inputs,
                                      *(p for c in cases for p in (*c.inputs, c.mask))])
    target = resolve_device(device)
    model = model.to(target)
    names = list(config.class_names or [])[1:]
    settings = weak.SegmenterSettings(network=config.model.network or "", min_volume_mm3=float(min_volume_mm3),
                                      threshold=threshold)
    transforms = build_transforms(config.preprocessing, trust=trust, source=config.source)
    results = []
    with output_lock(out, "segment"):
        for case in cases:
            loaded = load_case(case.scan, transforms, trust=trust, volume=case.volume, series=case.series, model=model)
            segmentation = weak.segment_scan(model, loaded.x.to(target), loaded.scanner_space, names, settings=settings)
            like = case.image if str(case.image).lower().endswith((".nii", ".nii.gz")) else None
            remove_stale_staging(out, case.id)
            staging = staging_folder(out, case.id)
            try:
                labels_name, lesions_name = f"{case.id}_learned_segmentation.nii.gz", f"{case.id}_learned_lesions.json"
                segmentation.save(staging / labels_name, staging / lesions_name, like=like)
                record = {"case_id": case.id, "image": str(case.image), "status": "ok",
                          **({"channels": [str(p) for p in case.channels]} if case.channels else {}),
                          "files": [str(out / case.id / labels_name), str(out / case.id / lesions_name)],
                          "segmentation": {"method": "learned", "config": str(Path(config_path).resolve()),
                                           "classes": names, "lesions": [l.to_dict() for l in segmentation.lesions]}}
                summary = {MARKER: {"kind": "case", "version": _version()}, **record}
                (staging / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
                publish_case_folder(staging, out / case.id)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            results.append({"case": case.id, "files": record["files"], "lesions": len(segmentation.lesions),
                            "classes": sorted({l.class_name or str(l.class_index) for l in segmentation.lesions})})
    return results


def _version() -> str:
    from .. import __version__

    return __version__
