"""Command-line interface: ``medcam3d demo | explain | batch | layers | evaluate | info``.

This module only builds parsers: heavy imports (torch, MONAI) happen inside the commands, so
``medcam3d --help`` and usage errors are fast. Exit codes (see :func:`medcam3d.errors.exit_code`):
0 success, 1 a failure while running (a case of a cohort failed, an internal error), 2 a usage
error (bad arguments, an invalid config, an unusable input, a refused model or output folder),
130 interrupted (Ctrl-C). Messages go to stderr; ``-v`` shows what was chosen (layer, device ...),
``-vv`` also debug details and the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from ._signals import sigterm_as_interrupt
from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Medcam3dError,
    OutputPermissionError,
    Terminated,
    UsageError,
    exit_code,
    one_line,
)

logger = logging.getLogger("medcam3d")


def _cmd_info(args: argparse.Namespace) -> int:
    if getattr(args, "image", None):
        import json

        from .io import describe

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


def _planted_lesion_case(size: int, seed: int):
    """A noisy volume with one bright sphere, and a seeded CNN built to detect bright blobs.

    Returns (x, model, centre) with x of shape (1, 1, size, size, size).
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(1, 1, size, size, size, generator=generator)
    centre = torch.randint(size // 5, size - size // 5, (3,), generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"))
    inside = ((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) <= (size // 10) ** 2
    x[0, 0][inside] += 2.0

    torch.manual_seed(seed)
    blur = nn.Conv3d(1, 4, 5, padding=2)
    with torch.no_grad():  # channel 0 averages intensity (a blob detector); the rest are random
        blur.weight[0] = 1.0 / blur.weight[0].numel()
        assert blur.bias is not None  # nn.Conv3d's default bias=True
        blur.bias[0] = -0.8
    model = nn.Sequential(
        blur, nn.ReLU(), nn.AvgPool3d(4), nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    with torch.no_grad():
        conv, head = cast(nn.Conv3d, model[3]), cast(nn.Linear, model[-1])
        assert conv.bias is not None and head.bias is not None  # both built with bias=True
        conv.weight.zero_()
        conv.weight[:, 0, 1, 1, 1] = torch.linspace(0.5, 1.5, 8)  # every channel copies the blob channel
        conv.bias.zero_()
        head.weight.copy_(torch.stack([-torch.ones(8), torch.ones(8)]))  # class 1 = "lesion"
        head.bias.zero_()
    return x, model.eval(), centre


def _synthetic_demo(args: argparse.Namespace) -> int:
    import torch

    import medcam3d

    torch.manual_seed(args.seed)
    x, model, centre = _planted_lesion_case(args.size, args.seed)
    print(f"Generated volume {tuple(x.shape[2:])} with a bright lesion centred at voxel {centre.tolist()}.")
    print("Model: a seeded 3D CNN built to respond to bright blobs (class 0 'background', 1 'lesion').\n")
    errors = {}
    print(f"{'method':<11}{'layer':<7}{'map grid':<12}{'peak voxel (input grid)':<26}{'error vox':>10}{'ms':>8}")
    layer_methods = [name for name, cls in medcam3d.METHODS.items() if cls.level == "layer"]  # the CAM family
    for method in layer_methods:
        explainer = medcam3d.Explainer(model, method=method, class_names=["background", "lesion"])
        started = time.perf_counter()
        result = explainer(x, target="lesion")
        elapsed = 1000 * (time.perf_counter() - started)
        feature = result.maps[0, 0]
        peak = torch.tensor(torch.unravel_index(feature.argmax(), feature.shape))
        stride = torch.tensor(result.input_shape) / torch.tensor(result.feature_shape)
        peak_input = (peak + 0.5) * stride - 0.5  # cell centre on the input grid
        error = float((peak_input - centre).norm())
        errors[method] = error
        print(
            f"{method:<11}{result.layer:<7}{'x'.join(map(str, result.feature_shape)):<12}"
            f"{str([round(v, 1) for v in peak_input.tolist()]):<26}{error:>10.1f}{elapsed:>8.1f}"
        )
    logits = model(x).detach()[0]
    print(f"\nlogits: background {logits[0]:.3f}, lesion {logits[1]:.3f}.")
    cell = float(stride.norm())
    found = [m for m, e in errors.items() if e <= cell]
    print(f"Maps are on the feature grid (stride {stride.tolist()}); {len(found)}/{len(errors)} methods put the "
          f"lesion's peak within one feature cell ({cell:.1f} voxels) of the true centre.")
    return 0 if len(found) == len(errors) else 1



REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_CASES = REPO_ROOT / "data_samples" / "cases.csv"


def _parse_target(text: str | None):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    parsed = [int(t) if t.lstrip("-").isdigit() else t for t in items]
    return parsed[0] if len(parsed) == 1 else parsed


def _runner(args: argparse.Namespace, methods=None, channels: int | None = None):
    from .config import load_config
    from .jobs.runner import Runner
    from .models import load_configured

    config = _with_limits(_with_output_options(load_config(args.config), args), args)
    logger.info("config %s: model %s, task %s", args.config, config.model.network or config.model.bundle
                or config.model.torchscript or config.model.nnunet, config.task)
    target = _parse_target(getattr(args, "target", None))
    named_later = config.model.bundle is not None or config.model.nnunet is not None  # names from the folder
    if not named_later or config.class_names is not None:  # a bundle's (nnU-Net's) names: checked once it is read
        _check_target(target, config)
    _check_layer_name(config, getattr(args, "layer", None) or config.layer, getattr(args, "trust", False),
                      channels=channels)
    trust = getattr(args, "trust", False)
    loaded = load_configured(config, trust=trust, random_weights=getattr(args, "random_weights", False),
                             **({"max_voxels": args.max_voxels} if hasattr(args, "max_voxels") else {}))
    config, model, random_weights, reader = loaded.config, loaded.model, loaded.random_weights, loaded.preprocessing
    if named_later:
        _check_target(target, config)
    if random_weights:
        logger.warning("the model has random parameters (weights: none / --random-weights): its maps explain an "
                       "untrained network; every output is labelled so")
    if not methods and getattr(args, "method", None):
        from .methods import split_methods

        methods = split_methods(args.method)
    window = None
    if getattr(args, "roi", None):
        from .config import SlidingWindowConfig

        window = SlidingWindowConfig(tuple(args.roi), args.overlap, args.sw_batch)
    return Runner(config, model, methods=methods, target=target,
                  layer=getattr(args, "layer", None), device=getattr(args, "device", "auto"),
                  sliding_window=window, amp=getattr(args, "amp", None), trust=trust, reader=reader,
                  random_weights=random_weights, output_activation=getattr(args, "output_activation", None),
                  placement=getattr(args, "placement", None))


def _check_target(target: object, config) -> None:
    """``--target`` (or the config's target) against the config's classes, before the model runs."""
    from .targets import check_target_spec

    check_target_spec(config.target if target is None else target, config.class_names, task=config.task)


def _check_layer_name(config, layer: str, trust: bool, channels: int | None = None) -> None:
    """A named target layer of a ``model.network`` config, checked on the network built on the meta device
    (no memory, no weights read) before the model is loaded. TorchScript files and bundles are checked once
    loaded (before any scan is read), as is a network whose constructor cannot run on the meta device.

    ``channels`` (several scans per case: their number) is checked against the network's input channels
    on the same skeleton (:func:`medcam3d.models.check_input_channels`)."""
    check_layer = bool(layer) and layer != "auto"
    if config.model.network is None or not (check_layer or (channels is not None and channels > 1)):
        return
    import torch

    from .layers import resolve_layer
    from .models import build_network, check_input_channels

    try:
        with torch.device("meta"):
            skeleton = build_network(config.model.network, config.model.args, trust=trust, source=config.source,
                                     max_activation_bytes=None)
    except Exception as error:  # noqa: BLE001  (the real build reports it)
        logger.debug("layer %r not checked before loading: the network cannot be built on the meta device (%s)",
                     layer, error)
        return
    if channels is not None and channels > 1:
        check_input_channels(channels, skeleton, what=f"--image ({channels} given)")
    if check_layer:
        resolve_layer(skeleton, layer)


_OUTPUT_FLAGS = ("scan_maps", "scan_dtype", "pictures", "masks", "boxes", "four_d", "compress", "normalized", "segment")


def _with_output_options(config, args: argparse.Namespace):
    """The config with the output flags given on the command line (``None``: the config's)."""
    import dataclasses

    chosen = {key: getattr(args, key) for key in _OUTPUT_FLAGS if getattr(args, key, None) is not None}
    if not chosen:
        return config
    return dataclasses.replace(config, output=dataclasses.replace(config.output, **chosen))


def _print_table(rows: list[dict], columns: list[str] | None = None, stream=None) -> None:
    from .jobs.report import print_table

    print_table(rows, columns, stream)


def _peak_text(peak_mm) -> str:
    """A finding's peak for the tables; a flat (all-zero) map has none."""
    return "none (flat map)" if peak_mm is None else "({:.1f}, {:.1f}, {:.1f})".format(*peak_mm)


def _check_exists(option: str, path: str | None, what: str) -> None:
    """A missing input is a usage error at once, before the model is loaded."""
    if path is not None and not os.path.lexists(os.path.expanduser(path)):
        from .errors import ImageNotFoundError

        raise ImageNotFoundError(f"{option} {path!r} does not exist; give {what}.")


def _images(args: argparse.Namespace) -> list[str]:
    """``--image`` (repeated) and ``--channels``: the case's scans, one per input channel, in order."""
    return [*(getattr(args, "image", None) or []), *(getattr(args, "channels", None) or [])]


def _cmd_explain(args: argparse.Namespace) -> int:
    from .jobs.cases import case_id_of, check_case_id
    from .jobs.lock import output_lock
    from .jobs.outputs import check_case_slot, check_output_location

    # everything that needs no model first: a mistake is reported in seconds, not after the model ran
    images = _images(args)
    if not images:
        raise UsageError("give the scan with --image PATH (one per input channel: --image t1.nii.gz --image "
                         "t1c.nii.gz ...) or --channels PATH [PATH ...].")
    for path in images:
        _check_exists("--image", path, "an image file (NIfTI, NRRD, MHA/MHD) or a DICOM folder")
    if len(images) > 1 and args.series is not None:
        raise UsageError(f"--series names one DICOM series, but {len(images)} scans (channels) were given; copy each "
                         "channel's series into a folder of its own and give the folders.")
    _check_exists("--mask", args.mask, "a label map on the scan's grid")
    check_output_location(args.out, [*images, args.mask, args.region_mask])
    if args.region_mask is not None and not Path(args.region_mask).exists():
        raise UsageError(f"--region-mask {args.region_mask!r} does not exist; give a 0/1 mask file on the scan's grid.")
    image = images[0] if len(images) == 1 else images
    case_id = check_case_id(args.id if args.id is not None else case_id_of(images[0]), "--id")
    check_case_slot(args.out, case_id, images[0], volume=args.volume, series=args.series)
    runner = _runner(args, channels=len(images))
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
             "peak (RAS mm)": _peak_text(f["peak_mm"]),
             **({"peak in lesion": f["peak_in_lesion"]} if "peak_in_lesion" in f else {})} for f in result.findings]
    _print_table(rows)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    import torch

    from .jobs.cases import collect_cases
    from .jobs.cohort import distributed_context, run_cohort
    from .jobs.outputs import check_output_location

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
    runner = _runner(args, channels=counts[-1] if len(counts) == 1 else None)
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

            from .jobs.runner import check_model_input
            from .preprocess import preprocess

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
        from .models import bundle_input_shape

        shape = bundle_input_shape(bundle.metadata)
        if shape is not None:
            logger.info("input shape %s from %s", shape, bundle.directory / "configs" / "metadata.json")
            return shape
        raise UsageError("Cannot tell the model's input size: the bundle's configs/metadata.json gives no whole-number "
                         "network_data_format.inputs spatial_shape; pass --image PATH or --shape C D H W.")
    raise UsageError("Cannot tell the model's input size: pass --image PATH or --shape C D H W.")


def _check_shape_option(given: Sequence[int], shape: tuple[int, ...], model, config) -> None:
    """``layers --shape``: the rank the model takes and a grid under the voxel limit, before any tensor is made."""
    from .config import DEFAULT_MAX_VOXELS
    from .layers import expected_spatial_dims

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


def _cmd_layers(args: argparse.Namespace) -> int:
    from .config import load_config
    from .layers import list_layers
    from .models import load_model

    config = _with_limits(load_config(args.config), args)
    spec = config.model
    bundle = None
    # the layers do not depend on the weights: a template without weights (a network with weights: none,
    # a bundle without models/) is listed with random ones; TorchScript always comes with its own
    if spec.bundle is not None:
        from .models import bundle_has_weights, load_bundle

        bundle = load_bundle(spec.bundle, trust=args.trust, source=config.source,
                             random_weights=args.random_weights or not bundle_has_weights(spec.bundle),
                             max_activation_bytes=spec.max_activation_bytes,
                             **({"max_voxels": args.max_voxels} if hasattr(args, "max_voxels") else {}))
        model = bundle.network
    elif spec.nnunet is not None:  # one fold's network (the layer names a config gives), the plans' patch size
        from .models import load_nnunet

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


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        return _synthetic_demo(args)
    if not DEMO_CONFIG.is_file() or not DEMO_CASES.is_file():
        print("The shipped samples are missing; running the synthetic demo instead.", file=sys.stderr)
        return _synthetic_demo(args)
    from .config import load_config
    from .jobs.cases import collect_cases
    from .jobs.outputs import check_output_location, check_own_files, record_own_files
    from .jobs.report import write_csv
    from .jobs.runner import Runner
    from .models import load_model

    cases = collect_cases(DEMO_CASES)
    out = check_output_location(args.out, [p for case in cases for p in (case.image, case.mask)])
    check_own_files(out, ["summary.csv"])  # a summary.csv of the user's is never replaced
    config = load_config(DEMO_CONFIG)
    runner = Runner(config, load_model(config), methods=["hirescam", "gradcam"], target="all", device=args.device)
    rows, summary = [], []
    started = time.perf_counter()
    for case in cases:
        result = runner.run_case(case.image, out, case_id=case.id, mask=case.mask)
        summary.append(result.row())
        for finding in result.findings:
            rows.append({
                "case": result.case_id,
                "class": finding["class"],
                "p": f"{result.probabilities.get(finding['class'], float('nan')):.2f}",
                "present": {True: "yes", False: "no", None: "?"}[finding.get("lesion_present")],
                "method": finding["method"],
                "peak (RAS mm)": _peak_text(finding["peak_mm"]),
                "peak in lesion": {True: "yes", False: "NO", None: "-"}[finding.get("peak_in_lesion")],
            })
    write_csv(out / "summary.csv", summary)
    record_own_files(out, ["summary.csv"], "demo")
    _print_table(rows)
    hits = [r for r in rows if r["peak in lesion"] in ("yes", "NO")]
    for method in runner.methods:
        own = [r for r in hits if r["method"] == method]
        if own:
            rate = sum(r["peak in lesion"] == "yes" for r in own) / len(own)
            print(f"{method}: peak inside the true lesion for {rate:.0%} of present lesions ({len(own)})")
    print(f"\n{len(cases)} cases in {time.perf_counter() - started:.1f} s. Heatmaps (NIfTI, scanner space), masks, "
          f"boxes and pictures (PNG) in {out}/<case>/; summary table {out / 'summary.csv'}.")
    return 0


EXAMPLES = """examples:
  medcam3d demo --out out/demo
  medcam3d explain --config configs/demo.yaml --image data_samples/case_01.nii.gz --target all --out out
  medcam3d explain --config configs/demo.yaml --image scan.nii.gz --method hirescam,gradcam --target bright_round --out out
  medcam3d batch --config configs/demo.yaml --inputs data_samples/cases.csv --out out/cohort --resume
  medcam3d layers --config configs/demo.yaml
  medcam3d evaluate --config configs/demo.yaml --inputs data_samples/cases.csv --methods hirescam,gradcam --out out/evaluate
"""


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (a clear usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {minimum} or more")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def _with_limits(config, args: argparse.Namespace):
    """The config with the resource limits given on the command line (absent: the defaults)."""
    from .config import with_limits

    chosen = {key: getattr(args, flag) for flag, key in (("max_voxels", "max_voxels"),
                                                          ("max_activation_memory", "max_activation_bytes"))
              if hasattr(args, flag)}
    return with_limits(config, **chosen) if chosen else config


def _voxel_limit(text: str) -> int | None:
    from .config import parse_count

    try:
        return parse_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _memory_limit(text: str) -> int | None:
    from .config import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _expansion_limit(text: str) -> float | None:
    """A positive number, or ``none`` (no limit)."""
    if text.strip().lower() in ("none", "inf", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', not {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', not {text!r}")
    return value


def _apply_read_limits(args: argparse.Namespace) -> None:
    """The reading limits given on the command line, for this run (:func:`medcam3d.io.set_read_limits`)."""
    chosen = {name: getattr(args, name) for name in ("max_bytes", "max_expansion", "max_voxel_mm", "max_slices")
              if hasattr(args, name)}
    from .io import set_read_limits

    set_read_limits(**chosen)  # none given: the defaults (a process running main() twice starts afresh)


def _open_fraction(text: str) -> float:
    value = _fraction(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``medcam3d`` argument parser (no heavy imports)."""
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                           help="say what was chosen (layer, device, outputs); -vv: debug details")
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--max-image-bytes", dest="max_bytes", type=_memory_limit, default=argparse.SUPPRESS,
                         metavar="SIZE", help="most memory one scan's voxels may take when read (default 16GiB; none: no limit)")
    reading.add_argument("--max-expansion", type=_expansion_limit, default=argparse.SUPPRESS, metavar="X",
                         help="a compressed scan may expand to at most X times its file size beyond 1 GiB "
                              "(default 100; none: no limit)")
    reading.add_argument("--max-voxel-mm", type=_expansion_limit, default=argparse.SUPPRESS, metavar="MM",
                         help="largest voxel size accepted in a scan's header (default 100 mm; none: no limit)")
    reading.add_argument("--max-slices", type=_voxel_limit, default=argparse.SUPPRESS, metavar="N",
                         help="most files a DICOM folder may hold (default 5000; none: no limit)")
    parser = argparse.ArgumentParser(prog="medcam3d", description="Class activation maps for 3D medical CNNs, in scanner space.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[verbosity])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,batch,layers,evaluate,weak-train,segment,info}")

    def add(name: str, help: str, run, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, parents=[verbosity, reading])
        sub.set_defaults(run=run)
        return sub

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", required=True, help="YAML config (see configs/demo.yaml)")
        sub.add_argument("--random-weights", action="store_true",
                         help="explain the network with random parameters on purpose (a sanity check); outputs say so")
        sub.add_argument("--trust", action="store_true",
                         help="allow configs and model files that run code (bundles, TorchScript, any class)")
        limit_options(sub)

    def limit_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--max-voxels", type=_voxel_limit, default=argparse.SUPPRESS, metavar="N",
                         help="largest grid (voxels) a preprocessing step may make, checked before it runs "
                              "(default 2**30; above 2**24 voxels also at most N / 2**24 times the scan's voxels; "
                              "none: no limit)")
        sub.add_argument("--max-activation-memory", type=_memory_limit, default=argparse.SUPPRESS, metavar="SIZE",
                         help="most memory the network's layer outputs may need at once, estimated before each new "
                              "input size runs (default 4GiB; e.g. 16GiB; none: no limit)")

    def scan_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--volume", type=_non_negative_int,
                         help="the volume (0-based) of a 4D file to explain (see: medcam3d info --image FILE)")
        sub.add_argument("--series", help="the SeriesInstanceUID to explain in a folder holding several DICOM series")

    def compute_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
        sub.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (GPU memory / speed)")
        sub.add_argument("--roi", type=_positive_int, nargs="+", metavar="SIZE",
                         help="explain through sliding windows of this patch size (one value per spatial axis)")
        sub.add_argument("--overlap", type=_fraction, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
        sub.add_argument("--sw-batch", type=_positive_int, default=1, help="patches explained together (memory knob)")

    def output_options(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group("outputs (default: the config's output section)")
        group.add_argument("--scan-maps", choices=["all", "positive", "predicted", "none"],
                           help="classes whose maps are written on the scan's grid (the _feature maps always are)")
        group.add_argument("--scan-dtype", choices=["uint8", "int16", "float32"],
                           help="stored type of scan-grid maps (integers keep the raw scale in scl_slope/scl_inter)")
        flag = argparse.BooleanOptionalAction
        group.add_argument("--pictures", action=flag, help="PNG slices through each map's peak")
        group.add_argument("--masks", action=flag, help="mask NIfTI of each map's thresholded largest region")
        group.add_argument("--boxes", action=flag, help="box JSON of that region (with the peak)")
        group.add_argument("--normalized", action=flag, help="a _norm copy of each scan-grid map, scaled to [0, 1]")
        group.add_argument("--four-d", action=flag, help="one 4D file per method for all classes")
        group.add_argument("--segment", action=flag,
                           help="weakly-supervised segmentation of the first method's maps (seed, expand, constrain): "
                                "a label map and a box in mm per lesion")
        group.add_argument("--compress", action=flag, help=".nii.gz (gzip level 1); --no-compress: .nii")

    demo = add("demo", "run the main job on the shipped samples with the demo model", _cmd_demo)
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    demo.add_argument("--synthetic", action="store_true", help="instead: a generated volume with a planted lesion")
    demo.add_argument("--size", type=_positive_int, default=64, help="--synthetic: edge of the generated cube, voxels")
    demo.add_argument("--seed", type=int, default=0, help="--synthetic: seed")

    explain = add("explain", "explain one scan", _cmd_explain)
    model_options(explain)
    scans = explain.add_mutually_exclusive_group(required=True)
    scans.add_argument("--image", action="append", metavar="PATH",
                       help="NIfTI, NRRD, MHA/MHD file or DICOM folder; repeat it for a model of several input channels "
                            "(--image t1.nii.gz --image t1c.nii.gz, in the model's channel order): they are stacked on "
                            "the first one's grid (another grid is resampled onto it, with a warning), and the outputs "
                            "lie on that grid and are named after it")
    scans.add_argument("--channels", nargs="+", metavar="PATH",
                       help="the case's scans, one per input channel in order (the same as --image repeated)")
    explain.add_argument("--method", help="method or comma list (default: the config's), e.g. hirescam,gradcam; where "
                         "the model's evidence is: hirescam gradcam cam gradcam++ xgradcam layercam eigencam fused scorecam; "
                         "where in the patient (input voxels): gradxinput smoothgrad integrated_gradients occlusion; "
                         "parameters in parentheses, e.g. 'occlusion(patch=16, stride=8)'")
    explain.add_argument("--target", help="all | predicted | class index | class name | comma list")
    explain.add_argument("--layer", help="target layer name or 'auto' (default: the config's)")
    explain.add_argument("--output-activation", choices=["auto", "none", "softmax", "sigmoid"],
                         help="what the network applies to its logits (default: the config's, auto = detect a trailing "
                              "Softmax/Sigmoid and explain the logits before it)")
    explain.add_argument("--placement", choices=["receptive_field", "align_corners"],
                         help="where the maps' cells sit on the scan (default: the config's, receptive_field = the centre "
                              "of each cell's receptive field; align_corners = the convention, up to half a cell off)")
    explain.add_argument("--mask", help="optional ground-truth label map (label c+1 = class c) to check peaks")
    explain.add_argument("--region-mask", metavar="PATH",
                         help="segmentation networks: a 0/1 mask on the scan's grid; each class is explained by the sum "
                              "of its logits inside it (default: inside the region the model predicts for the class)")
    scan_options(explain)
    compute_options(explain)
    output_options(explain)
    explain.add_argument("--out", required=True, help="output folder; results go to OUT/<case>/")
    explain.add_argument("--id", help="the case id, i.e. the folder OUT/<id>/ (default: the scan's file name without "
                                      "its suffix); a folder written from another scan is never replaced")

    batch = add("batch", "explain a cohort (folder or CSV), resumable", _cmd_batch)
    model_options(batch)
    batch.add_argument("--inputs", required=True,
                       help="folder of scans, or CSV with an image (or file) column and optional id, mask (ground "
                            "truth), region_mask (segmentation: the region to explain), volume, series columns; several "
                            "channels per case: CSV columns image_0000, image_0001, ... or nnU-Net's CASE_0000.nii.gz, "
                            "CASE_0001.nii.gz ... files in the folder")
    batch.add_argument("--out", required=True)
    batch.add_argument("--method", help="method or comma list, as for explain (e.g. hirescam,integrated_gradients)")
    batch.add_argument("--target", help="all | predicted | index | name | comma list")
    batch.add_argument("--layer")
    batch.add_argument("--output-activation", choices=["auto", "none", "softmax", "sigmoid"],
                       help="what the network applies to its logits (default: the config's)")
    batch.add_argument("--placement", choices=["receptive_field", "align_corners"],
                       help="where the maps' cells sit on the scan (default: the config's, receptive_field)")
    scan_options(batch)
    batch.add_argument("--resume", action="store_true",
                       help="skip cases already explained with the same methods, target, layer and config from the same "
                            "inputs (each scan's, mask's and region mask's path, size and modification time; volume, "
                            "series)")
    batch.add_argument("--max-cases", type=_positive_int, default=100_000, metavar="N",
                       help="refuse lists of more than N cases (default 100000)")
    compute_options(batch)
    output_options(batch)
    batch.add_argument("--workers", type=_non_negative_int, default=1, help="DataLoader worker processes reading scans (0: none)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")

    layers = add("layers", "list candidate target layers and their output shapes", _cmd_layers)
    model_options(layers)
    layers.add_argument("--image", help="preprocess this scan to get the input size")
    layers.add_argument("--shape", type=_positive_int, nargs="+", help="input shape C D H W")

    evaluate = add("evaluate", "score explanation methods on a cohort: localization, faithfulness, sanity; report + "
                   "failure gallery", _cmd_evaluate,
                   description="Localization (pointing game, energy, Dice/IoU, box IoU), weakly-supervised segmentation "
                               "(threshold vs seed-expand-constrain: Dice, IoU, HD95, box IoU in mm), faithfulness "
                               "(deletion/insertion, completeness) and the randomization sanity check per case, class and "
                               "method; a summary table (CSV, Markdown, segmentation.json), plots, and a gallery of the "
                               "misclassified cases.")
    evaluate.add_argument("--config", required=True, help="YAML config (model, classes, preprocessing)")
    evaluate.add_argument("--inputs", required=True, help="folder of scans, or CSV with columns image|file[, id, mask, labels]")
    evaluate.add_argument("--masks", help="folder of ground-truth label maps named <case>_mask.nii.gz (label c+1 = class c)")
    evaluate.add_argument("--methods", default="hirescam,gradcam", help="comma list (default: hirescam,gradcam)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--device", default="cpu", help="cpu | cuda[:i] | auto (default: cpu)")
    evaluate.add_argument("--steps", type=_positive_int, default=10, help="deletion/insertion steps per curve (default: 10)")
    evaluate.add_argument("--max-fraction", type=_open_fraction, default=0.05,
                          help="share of the ranked voxels the deletion/insertion curves cover (default: 0.05)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, help="perturbed volumes per forward pass (default: 8)")
    evaluate.add_argument("--randomization-cases", type=_non_negative_int, default=1,
                          help="cases for the randomization test (default: 1)")
    evaluate.add_argument("--no-segmentation", dest="segmentation", action="store_false",
                          help="skip the weakly-supervised segmentation scores (threshold and seed-expand-constrain "
                               "per present lesion with a mask: Dice, IoU, HD95, box IoU in mm, pointing game)")
    evaluate.add_argument("--fuse-layer", metavar="LAYER",
                          help="also score segmentation of fused maps: LayerCAM on this finer layer gated by each "
                               "method's map (e.g. features.relu0 for the demo model)")
    evaluate.add_argument("--trust", action="store_true", help="allow model files that run code (bundles, TorchScript)")
    limit_options(evaluate)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")

    weak_train = add("weak-train", "train a weakly-supervised segmenter from a classifier and image labels (SEC)",
                     _cmd_weak_train,
                     description="Seed, expand, constrain: seeds from the classifier's class maps (local maxima above a "
                                 "level calibrated on the scans without each class), a MONAI UNet/SegResNet trained on "
                                 "them with global weighted rank pooling against the image labels and a CRF constraint; "
                                 "writes OUT/<name>.yaml, .pt (state_dict) and .json (how it was made).")
    weak_train.add_argument("--config", required=True, help="the classifier's YAML config (e.g. configs/demo.yaml)")
    source = weak_train.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", help="CSV with image (or file) and labels columns (class names present, ';'-separated), "
                                         "or a folder of scans")
    source.add_argument("--demo-cases", type=_positive_int, metavar="N",
                        help="instead: N scans of the demo generator, image labels only (for configs/demo.yaml)")
    weak_train.add_argument("--out", required=True, help="output folder")
    weak_train.add_argument("--train-cases", type=_positive_int, metavar="N", help="use only the first N cases of --inputs")
    weak_train.add_argument("--seed-method", help="the classifier's map that gives the seeds: any --method of explain "
                                                  "(default: gradxinput*fused, chosen on the demo set; a*b multiplies maps)")
    weak_train.add_argument("--layer", help="the classifier's layer for layer-level seed methods (default: the config's)")
    weak_train.add_argument("--seed-smooth", type=float, metavar="VOXELS",
                            help="Gaussian blur of the maps before peaks are sought (default 2.5 input voxels)")
    weak_train.add_argument("--seed-quantile", type=float, metavar="Q",
                            help="seed level: this quantile of a class map's maximum over the scans without the class "
                                 "(default 0.8)")
    weak_train.add_argument("--max-peaks", type=_positive_int, metavar="N",
                            help="seeded peaks per class and scan (default 1; raise it for several lesions of a class)")
    weak_train.add_argument("--seed-radius", type=float, metavar="VOXELS",
                            help="a seeded peak's region: voxels within this distance of it where the map is at least "
                                 "0.6 x the peak (default 1)")
    weak_train.add_argument("--background-reach", type=_reach, metavar="VOXELS|none",
                            help="dense background: where every present class is seeded, voxels farther than this from "
                                 "all seeds are background too (default none: only where the maps are low)")
    weak_train.add_argument("--size-weight", type=float, metavar="W",
                            help="weight of the size prior that keeps a present class lesion-sized (default 1; 0: off)")
    weak_train.add_argument("--size-factor", type=float, metavar="F",
                            help="size prior bound: F x the seeded peaks' median map extent (default 1)")
    weak_train.add_argument("--network", choices=["unet", "segresnet"], default="unet", help="MONAI network (default unet)")
    weak_train.add_argument("--channels", type=_positive_int, nargs="+", metavar="C",
                            help="UNet channels per level (default 8 16 32 64); SegResNet: its init_filters")
    weak_train.add_argument("--epochs", type=_positive_int, default=6, help="passes over the training scans (default 6)")
    weak_train.add_argument("--batch-size", type=_positive_int, default=4, help="scans per step (default 4)")
    weak_train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, one-cycle AdamW (default 3e-3)")
    weak_train.add_argument("--decay", type=_unit_interval, default=0.98,
                            help="expand loss: rank-pooling decay, 0 max .. 1 mean (default 0.98, about 50 voxels)")
    weak_train.add_argument("--constrain-weight", type=float, default=1.0, help="weight of the CRF constraint (0: off)")
    weak_train.add_argument("--seed", type=int, default=0, help="torch seed (initialisation, batch order, flips)")
    weak_train.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    weak_train.add_argument("--name", default="weak_segmenter", help="file stem of the outputs (default weak_segmenter)")
    weak_train.add_argument("--trust", action="store_true", help="allow configs and model files that run code")

    segment = add("segment", "segment scans with a trained segmenter: label maps and lesion boxes in scanner space",
                  _cmd_segment)
    segment.add_argument("--config", required=True, help="a segmenter config (task: segmentation), e.g. from weak-train")
    scans = segment.add_mutually_exclusive_group(required=True)
    scans.add_argument("--image", action="append", metavar="PATH",
                       help="one scan (NIfTI, NRRD, MHA/MHD file or DICOM folder); repeat it for a segmenter of several "
                            "input channels (one scan each, in order, stacked on the first one's grid)")
    scans.add_argument("--inputs", help="a folder of scans (nnU-Net's CASE_0000, CASE_0001 ... files: one case of "
                                        "several channels) or a CSV with an image (or file) column, or image_0000, "
                                        "image_0001 ... columns")
    segment.add_argument("--out", required=True, help="output folder; results go to OUT/<case>/")
    segment.add_argument("--min-volume", type=float, default=20.0, metavar="MM3",
                         help="drop components smaller than this (default 20 mm^3)")
    segment.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    segment.add_argument("--trust", action="store_true", help="allow configs and model files that run code")

    info = add("info", "print versions for bug reports, or describe a scan (--image)", _cmd_info)
    info.add_argument("--image", help="describe this scan from its headers: grid, volumes of a 4D file, DICOM series")
    info.add_argument("--json", action="store_true", help="with --image: print JSON")
    info.add_argument("--trust", action="store_true", help="with --image: allow headers that point to files elsewhere")
    return parser


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


_NO_REACH = "none"


def _reach(text: str) -> float | str:
    """``--background-reach``: a number of voxels >= 0, or ``none``."""
    if text.strip().lower() == _NO_REACH:
        return _NO_REACH
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of voxels or 'none', not {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of voxels >= 0 or 'none', not {text!r}")
    return value


def _cmd_weak_train(args: argparse.Namespace) -> int:
    import torch

    from .jobs.weak import weak_train

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = {key: value for key, value in (("smooth", args.seed_smooth), ("quantile", args.seed_quantile),
                                           ("max_peaks", args.max_peaks), ("background_reach", args.background_reach),
                                           ("region_radius", args.seed_radius))
             if value is not None}
    seeds.update({"background_reach": None} if args.background_reach == _NO_REACH else {})
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


def _cmd_segment(args: argparse.Namespace) -> int:
    from .jobs.weak import segment_cases

    image = None if not args.image else args.image[0] if len(args.image) == 1 else list(args.image)
    rows = segment_cases(args.config, args.out, image=image, inputs=args.inputs, device=args.device,
                         trust=args.trust, min_volume_mm3=args.min_volume)
    _print_table([{"case": r["case"], "lesions": r["lesions"], "classes": ", ".join(r["classes"]) or "-"} for r in rows])
    print(f"{len(rows)} case(s) segmented: label maps and lesion boxes in {Path(args.out)}/<case>/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs.evaluate import run

    if hasattr(args, "max_voxels") or hasattr(args, "max_activation_memory"):
        from .config import load_config

        args.config = _with_limits(load_config(args.config), args)
    return run(args)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("medcam3d: %(message)s" if verbosity <= 1 else
                                           "medcam3d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("medcam3d")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _check_path_options(args: argparse.Namespace) -> None:
    """An empty path (``--image ''``) is a usage error, not the current folder."""
    for name in ("image", "channels", "mask", "region_mask", "inputs", "out", "config"):
        value = getattr(args, name, None)
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and not text.strip():
                raise UsageError(f"--{name.replace('_', '-')} is empty ({text!r}); expected the path of a file or folder.")


def _check_out_folder(args: argparse.Namespace) -> None:
    """``--out`` must be a folder that medcam3d can create or write in: refused before any work otherwise."""
    text = getattr(args, "out", None)
    if not isinstance(text, str) or not text.strip():
        return
    out = Path(text)
    existing = out
    while not existing.exists() and existing.parent != existing:  # the deepest part of the path that exists
        if existing.is_symlink():  # a link to nothing (or a loop): it cannot be created as a folder
            raise UsageError(f"--out {text!r} cannot be created: {str(existing)!r} is a symbolic link to "
                             f"{os.readlink(existing)!r}, which does not exist (or is a loop); create the link's target, "
                             "remove the link, or choose another --out.")
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == out:
            raise UsageError(f"--out {text!r} is a file, not a folder; give a folder (it is created if missing).")
        raise UsageError(f"--out {text!r} cannot be created: {str(existing)!r} is a file, not a folder; choose another "
                         "--out.")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPermissionError(
            f"--out {text!r}: medcam3d cannot write in {str(existing)!r} (permission denied, or a read-only file "
            "system); choose a folder you can write to, or change its permissions."
        )


def _check_device(args: argparse.Namespace) -> None:
    """``--device``: a device this machine has (``mps`` without Apple's GPU, ``cuda:7`` on two GPUs ... are
    usage errors here, before the model is loaded)."""
    device = getattr(args, "device", None)
    if isinstance(device, str) and device != "auto":
        from .jobs.runner import resolve_device

        resolve_device(device)


#: OS errors that the user's paths cause (exit 2, with the path), not medcam3d.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def _path_error_text(error: OSError) -> str:
    where = " and ".join(repr(str(name)) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error)
    return (f"{reason}: {where or 'a path'} (errno {error.errno}). Check that the path exists as a folder or file, "
            "and its permissions; for outputs, choose an --out you can write to.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcam3d`` console script; returns the exit code.

    Every failure prints one line on stderr (:func:`medcam3d.errors.one_line`): ``medcam3d COMMAND: error:
    ...``; SIGTERM prints ``medcam3d COMMAND: terminated.`` and exits 143, Ctrl-C ``interrupted.`` and 130.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0)
    _configure_logging(verbosity)
    command = f"medcam3d {args.command}"
    try:
        with sigterm_as_interrupt():
            _check_path_options(args)
            _check_out_folder(args)
            _check_device(args)
            _apply_read_limits(args)
            return int(args.run(args))
    except Terminated:
        print(f"{command}: terminated.", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Medcam3dError as error:
        print(f"{command}: error: {one_line(str(error))}", file=sys.stderr)
        return exit_code(error)
    except MemoryError as error:
        print(f"{command}: error: out of memory ({one_line(str(error), 500) if str(error) else 'no details'}). Try --roi "
              "for sliding windows, --amp bf16 on a GPU, or a machine with more memory.", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        if error.errno not in _PATH_ERRNOS:
            return _internal_error(command, error, verbosity)
        if verbosity >= 2:
            logger.exception("path error")
        print(f"{command}: error: {one_line(_path_error_text(error))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug or an environment failure: one line, traceback only with -vv
        return _internal_error(command, error, verbosity)
    finally:
        if "medcam3d.io" in sys.modules:
            sys.modules["medcam3d.io"].set_read_limits()  # the flags were for this run only


def _internal_error(command: str, error: BaseException, verbosity: int) -> int:
    if verbosity >= 2:
        logger.exception("internal error")
    print(f"{command}: error: {type(error).__name__}: {one_line(str(error))}"
          + ("" if verbosity >= 2 else " (run with -vv for the traceback)"), file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
