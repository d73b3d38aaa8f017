"""The commands ``info``, ``explain``, ``batch``, ``layers``, ``weak-train``, ``segment`` and ``evaluate``:
each checks what needs no model first, then hands the work to ``medcam3d.jobs``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError, one_line
from .arguments import NO_REACH
from .runner import build_runner, check_exists, image_paths, with_limits
from .tables import peak_text, print_table

logger = logging.getLogger("medcam3d")


def cmd_info(args: argparse.Namespace) -> int:
    if getattr(args, "image", None):
        import json

        from ..io import describe

        info = describe(args.image, trust=args.trust)
        print(json.dumps(info.to_dict(), indent=2, default=str) if args.json else info)
        return 0
    import platform

    import monai
    import nibabel
    import numpy
    import scipy
    import SimpleITK
    import torch

    import medcam3d

    rows = {
        "medcam3d": medcam3d.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "methods": ", ".join(medcam3d.METHODS),
    }
    for key, value in rows.items():
        print(f"{key:<16} {value}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..jobs.cases import case_id_of, check_case_id
    from ..jobs.lock import output_lock
    from ..jobs.outputs import check_case_slot, check_output_location

    # everything that needs no model first: a mistake is reported in seconds, not after the model ran
    images = image_paths(args)
    if not images:
        raise UsageError("give the scan with --image PATH (one per input channel: --image t1.nii.gz --image "
                         "t1c.nii.gz ...) or --channels PATH [PATH ...].")
    for path in images:
        check_exists("--image", path, "an image file (NIfTI, NRRD, MHA/MHD) or a DICOM folder")
    if len(images) > 1 and args.series is not None:
        raise UsageError(f"--series names one DICOM series, but {len(images)} scans (channels) were given; copy each "
                         "channel's series into a folder of its own and give the folders.")
    check_exists("--mask", args.mask, "a label map on the scan's grid")
    check_output_location(args.out, [*images, args.mask, args.region_mask])
    if args.region_mask is not None and not Path(args.region_mask).exists():
        raise UsageError(f"--region-mask {args.region_mask!r} does not exist; give a 0/1 mask file on the scan's grid.")
    image = images[0] if len(images) == 1 else images
    case_id = check_case_id(args.id if args.id is not None else case_id_of(images[0]), "--id")
    check_case_slot(args.out, case_id, images[0], volume=args.volume, series=args.series)
    runner = build_runner(args, channels=len(images))
    runner.check_channels(len(images), f"--image ({len(images)} given)")  # before any scan is read
    if args.region_mask is not None:
        runner.check_region_task()  # a classifier: a usage error before any work
    with output_lock(args.out, "explain"):  # one medcam3d job at a time in --out
        check_case_slot(args.out, case_id, images[0], volume=args.volume, series=args.series)  # written meanwhile?
        result = runner.run_case(image, args.out, case_id=case_id, mask=args.mask, volume=args.volume,
                                 series=args.series, region_mask=args.region_mask)
    print(f"{result.case_id}: wrote {len(result.files)} files to {Path(args.out) / result.case_id}")
    if result.probabilities:
        print("probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in result.probabilities.items()))
    rows = [{"method": f["method"], "class": f["class"], "score": f"{f['score']:.3f}",
             "peak (RAS mm)": peak_text(f["peak_mm"]),
             **({"peak in lesion": f["peak_in_lesion"]} if "peak_in_lesion" in f else {})} for f in result.findings]
    print_table(rows)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import torch

    from ..jobs.cases import collect_cases
    from ..jobs.cohort import distributed_context, run_cohort
    from ..jobs.outputs import check_output_location

    cases = collect_cases(args.inputs, max_cases=args.max_cases)
    for case in cases:  # --volume/--series apply where the CSV gives none
        case.volume = case.volume if case.volume is not None else args.volume
        case.series = case.series or args.series
    # the folder or CSV of --inputs is an input too: --out may not hold it or lie inside it
    check_output_location(args.out, [args.inputs, *(p for case in cases for p in (*case.inputs, case.mask, case.region_mask))])
    context = distributed_context(args.device)
    if context.distributed and args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{context.local_rank}"
    counts = sorted({len(case.inputs) for case in cases})
    runner = build_runner(args, channels=counts[-1] if len(counts) == 1 else None)
    runner.check_cases_channels(cases)  # every case's scans against the model's input channels, before any is read
    regions = {case.id: case.region_mask for case in cases if case.region_mask is not None}
    if regions:
        runner.check_region_task()  # a classifier: a usage error before any case is explained
        runner.region_masks.update(regions)
    out = Path(args.out)
    rows, failures, skipped = run_cohort(runner, cases, out, resume=args.resume, workers=args.workers,
                                         progress=not args.quiet, context=context)
    if context.rank == 0:
        print(f"{len(cases)} cases: {len(cases) - failures - skipped} explained, {skipped} already done, "
              f"{failures} failed. Summary: {out / 'summary.csv'}", file=sys.stderr)
    if context.distributed:
        torch.distributed.destroy_process_group()
    return 1 if failures else 0


def _input_shape(args: argparse.Namespace, config, model, bundle=None) -> tuple[int, ...]:
    """``layers``: the model's input shape ``(C_in, *spatial)``, from --image (preprocessed as the model's
    inputs are), --shape, the config's last sized preprocessing step, or a bundle's metadata.json."""
    if args.image:
        if bundle is not None and config.preprocessing is None and bundle.preprocessing is not None:
            x, _ = bundle.preprocessing(args.image, trust=args.trust)
        else:
            import functools

            from ..jobs.case_loading import check_model_input
            from ..preprocess import preprocess

            x, _ = preprocess(args.image, config.preprocessing, trust=args.trust, source=config.source,
                              check_input=functools.partial(check_model_input, model))  # refused before it is made
        return tuple(x.shape)
    if args.shape:
        return tuple(args.shape)
    for step in reversed(config.preprocessing or []):
        size = step.get("spatial_size") or step.get("roi_size")
        if size is not None:
            return (int(config.model.args.get("in_channels", 1)), *[int(s) for s in size])
    if bundle is not None:
        from ..models import bundle_input_shape

        shape = bundle_input_shape(bundle.metadata)
        if shape is not None:
            logger.info("input shape %s from %s", shape, bundle.directory / "configs" / "metadata.json")
            return shape
        raise UsageError("Cannot tell the model's input size: the bundle's configs/metadata.json gives no whole-number "
                         "network_data_format.inputs spatial_shape; pass --image PATH or --shape C D H W.")
    raise UsageError("Cannot tell the model's input size: pass --image PATH or --shape C D H W.")


def _check_shape_option(given: Sequence[int], shape: tuple[int, ...], model, config) -> None:
    """``layers --shape``: the rank the model takes and a grid under the voxel limit, before any tensor is made."""
    from ..config import DEFAULT_MAX_VOXELS
    from ..input_rank import expected_spatial_dims

    text = " ".join(map(str, given))
    dims = expected_spatial_dims(model)
    if dims is not None and len(shape) != dims + 1:
        axes = " ".join("DHW"[-dims:]) if dims <= 3 else " ".join(f"S{i}" for i in range(dims))
        message = (f"--shape {text} has {len(shape)} numbers, but this model takes {dims}D inputs: give C {axes} "
                   f"({dims + 1} numbers: the input channels, then the spatial size).")
        raise UsageError(message)
    limit = getattr(config.preprocessing, "max_voxels", DEFAULT_MAX_VOXELS)
    voxels = 1
    for n in shape:
        voxels *= int(n)
    if limit is not None and voxels > limit:
        message = (f"--shape {text} makes an input of {voxels:,} voxels, more than the {limit:,} allowed; give the size "
                   "the model takes (e.g. the preprocessing's spatial_size), or raise the limit with --max-voxels N "
                   "(none: no limit).")
        raise UsageError(message)


def cmd_layers(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..layers import list_layers
    from ..models import load_model

    config = with_limits(load_config(args.config), args)
    spec = config.model
    bundle = None
    # the layers do not depend on the weights: a template without weights (a network with weights: none,
    # a bundle without models/) is listed with random ones; TorchScript always comes with its own
    if spec.bundle is not None:
        from ..models import bundle_has_weights, load_bundle

        bundle = load_bundle(spec.bundle, trust=args.trust, source=config.source,
                             random_weights=args.random_weights or not bundle_has_weights(spec.bundle),
                             max_activation_bytes=spec.max_activation_bytes,
                             **({"max_voxels": args.max_voxels} if hasattr(args, "max_voxels") else {}))
        model = bundle.network
    elif spec.nnunet is not None:  # one fold's network (the layer names a config gives), the plans' patch size
        from ..models import load_nnunet

        folder = load_nnunet(spec.nnunet, spec.configuration, spec.folds, spec.checkpoint, trust=args.trust,
                             random_weights=True, max_activation_bytes=spec.max_activation_bytes)
        model = folder.network.folds[0]
        if not args.shape:  # the network sees windows of the patch size, whatever the scan
            logger.info("input shape: the plans' patch size %s (nnU-Net explains through windows of it)", folder.patch_size)
            args.shape, args.image = [folder.input_channels, *folder.patch_size], None
    else:
        random_weights = args.random_weights or (spec.network is not None and spec.weights is None)
        model = load_model(config, trust=args.trust, random_weights=random_weights)
    shape = _input_shape(args, config, model, bundle)
    if args.shape and not args.image:
        _check_shape_option(args.shape, shape, model, config)
    try:
        layers = list_layers(model, shape)
    except RuntimeError as error:  # the network refuses this shape (channels, a size below its kernels ...)
        if not args.shape or args.image:
            raise
        text = " ".join(map(str, args.shape))
        message = (
            f"--shape {text}: the model cannot run on an input of shape {(1, *shape)} ({one_line(str(error), 300)}). "
            "Give the number of input channels the model takes, then a spatial size its layers accept (e.g. the "
            "preprocessing's spatial_size), or pass --image to use a scan's preprocessed size."
        )
        raise UsageError(message) from None
    print(f"Candidate target layers of {type(model).__name__} for input {shape} (execution order):")
    for info in layers:
        print(f"  {info}{'   <- auto' if getattr(info, 'auto', False) else ''}")
    chosen = [info for info in layers if getattr(info, "auto", False)]
    if chosen:
        print(f"layer='auto' selects: {chosen[0].name}")
    return 0


def cmd_weak_train(args: argparse.Namespace) -> int:
    import torch

    from ..jobs.weak import weak_train

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = {key: value for key, value in (("smooth", args.seed_smooth), ("quantile", args.seed_quantile),
                                           ("max_peaks", args.max_peaks), ("background_reach", args.background_reach),
                                           ("region_radius", args.seed_radius))
             if value is not None}
    seeds.update({"background_reach": None} if args.background_reach == NO_REACH else {})
    size = {key: value for key, value in (("size_weight", args.size_weight), ("size_factor", args.size_factor))
            if value is not None}
    paths = weak_train(args.config, args.out, inputs=args.inputs, demo_cases=args.demo_cases,
                       train_cases=args.train_cases, seed_method=args.seed_method, layer=args.layer,
                       network=args.network, channels=args.channels, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, decay=args.decay, constrain_weight=args.constrain_weight, seed=args.seed,
                       name=args.name, trust=args.trust, seed_settings=seeds, **size,
                       log=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"segmenter: {paths[0]} (weights {paths[1].name}, record {paths[2].name}); use it with: "
          f"medcam3d segment --config {paths[0]} --image SCAN --out OUT")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from ..jobs.weak import segment_cases

    image = None if not args.image else args.image[0] if len(args.image) == 1 else list(args.image)
    rows = segment_cases(args.config, args.out, image=image, inputs=args.inputs, device=args.device,
                         trust=args.trust, min_volume_mm3=args.min_volume,
                         threshold=args.threshold)
    print_table([{"case": r["case"], "lesions": r["lesions"], "classes": ", ".join(r["classes"]) or "-"} for r in rows])
    print(f"{len(rows)} case(s) segmented: label maps and lesion boxes in {Path(args.out)}/<case>/")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..jobs.evaluate import run

    if hasattr(args, "max_voxels") or hasattr(args, "max_activation_memory"):
        from ..config import load_config

        args.config = with_limits(load_config(args.config), args)
    return run(args)
