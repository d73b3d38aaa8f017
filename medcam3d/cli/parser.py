"""The ``medcam3d`` argument parser (no heavy imports: ``medcam3d --help`` and usage errors are fast)."""

from __future__ import annotations

import argparse

from .arguments import (expansion_limit, fraction, memory_limit, non_negative_int, open_fraction, positive_int, reach,
                        unit_interval, voxel_limit)
from .commands import cmd_batch, cmd_evaluate, cmd_explain, cmd_info, cmd_layers, cmd_segment, cmd_weak_train
from .demo import cmd_demo


EXAMPLES = """examples:
  medcam3d demo --out out/demo
  medcam3d explain --config configs/demo.yaml --image data_samples/case_01.nii.gz --target all --out out
  medcam3d explain --config configs/demo.yaml --image scan.nii.gz --method hirescam,gradcam --target bright_round --out out
  medcam3d batch --config configs/demo.yaml --inputs data_samples/cases.csv --out out/cohort --resume
  medcam3d layers --config configs/demo.yaml
  medcam3d evaluate --config configs/demo.yaml --inputs data_samples/cases.csv --methods hirescam,gradcam --out out/evaluate
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``medcam3d`` argument parser (no heavy imports)."""
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                           help="say what was chosen (layer, device, outputs); -vv: debug details")
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--max-image-bytes", dest="max_bytes", type=memory_limit, default=argparse.SUPPRESS,
                         metavar="SIZE", help="most memory one scan's voxels may take when read (default 16GiB; none: no limit)")
    reading.add_argument("--max-expansion", type=expansion_limit, default=argparse.SUPPRESS, metavar="X",
                         help="a compressed scan may expand to at most X times its file size beyond 1 GiB "
                              "(default 100; none: no limit)")
    reading.add_argument("--max-voxel-mm", type=expansion_limit, default=argparse.SUPPRESS, metavar="MM",
                         help="largest voxel size accepted in a scan's header (default 100 mm; none: no limit)")
    reading.add_argument("--max-slices", type=voxel_limit, default=argparse.SUPPRESS, metavar="N",
                         help="most files a DICOM folder may hold (default 5000; none: no limit)")
    parser = argparse.ArgumentParser(prog="medcam3d", description="Class activation maps for 3D medical CNNs, in scanner space.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[verbosity])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,batch,layers,evaluate,weak-train,segment,info}")

    def add(name: str, help: str, run, description: str | None = None) -> argparse.ArgumentParser:
        sub = subcommands.add_parser(name, help=help, description=description or help, epilog=EXAMPLES,
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
        sub.add_argument("--max-voxels", type=voxel_limit, default=argparse.SUPPRESS, metavar="N",
                         help="largest grid (voxels) a preprocessing step may make, checked before it runs "
                              "(default 2**30; above 2**24 voxels also at most N / 2**24 times the scan's voxels; "
                              "none: no limit)")
        sub.add_argument("--max-activation-memory", type=memory_limit, default=argparse.SUPPRESS, metavar="SIZE",
                         help="most memory the network's layer outputs may need at once, estimated before each new "
                              "input size runs (default 4GiB; e.g. 16GiB; none: no limit)")

    def scan_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--volume", type=non_negative_int,
                         help="the volume (0-based) of a 4D file to explain (see: medcam3d info --image FILE)")
        sub.add_argument("--series", help="the SeriesInstanceUID to explain in a folder holding several DICOM series")

    def compute_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
        sub.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (GPU memory / speed)")
        sub.add_argument("--roi", type=positive_int, nargs="+", metavar="SIZE",
                         help="explain through sliding windows of this patch size (one value per spatial axis)")
        sub.add_argument("--overlap", type=fraction, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
        sub.add_argument("--sw-batch", type=positive_int, default=1, help="patches explained together (memory knob)")

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

    demo = add("demo", "run the main job on the shipped samples with the demo model", cmd_demo)
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    demo.add_argument("--synthetic", action="store_true", help="instead: a generated volume with a planted lesion")
    demo.add_argument("--size", type=positive_int, default=64, help="--synthetic: edge of the generated cube, voxels")
    demo.add_argument("--seed", type=int, default=0, help="--synthetic: seed")

    explain = add("explain", "explain one scan", cmd_explain)
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

    batch = add("batch", "explain a cohort (folder or CSV), resumable", cmd_batch)
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
    batch.add_argument("--max-cases", type=positive_int, default=100_000, metavar="N",
                       help="refuse lists of more than N cases (default 100000)")
    compute_options(batch)
    output_options(batch)
    batch.add_argument("--workers", type=non_negative_int, default=1, help="DataLoader worker processes reading scans (0: none)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")

    layers = add("layers", "list candidate target layers and their output shapes", cmd_layers)
    model_options(layers)
    layers.add_argument("--image", help="preprocess this scan to get the input size")
    layers.add_argument("--shape", type=positive_int, nargs="+", help="input shape C D H W")

    evaluate = add("evaluate", "score explanation methods on a cohort: localization, faithfulness, sanity; report + "
                   "failure gallery", cmd_evaluate,
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
    evaluate.add_argument("--steps", type=positive_int, default=10, help="deletion/insertion steps per curve (default: 10)")
    evaluate.add_argument("--max-fraction", type=open_fraction, default=0.05,
                          help="share of the ranked voxels the deletion/insertion curves cover (default: 0.05)")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="perturbed volumes per forward pass (default: 8)")
    evaluate.add_argument("--randomization-cases", type=non_negative_int, default=1,
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
                     cmd_weak_train,
                     description="Seed, expand, constrain: seeds from the classifier's class maps (local maxima above a "
                                 "level calibrated on the scans without each class), a MONAI UNet/SegResNet trained on "
                                 "them with global weighted rank pooling against the image labels and a CRF constraint; "
                                 "writes OUT/<name>.yaml, .pt (state_dict) and .json (how it was made).")
    weak_train.add_argument("--config", required=True, help="the classifier's YAML config (e.g. configs/demo.yaml)")
    source = weak_train.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", help="CSV with image (or file) and labels columns (class names present, ';'-separated), "
                                         "or a folder of scans")
    source.add_argument("--demo-cases", type=positive_int, metavar="N",
                        help="instead: N scans of the demo generator, image labels only (for configs/demo.yaml)")
    weak_train.add_argument("--out", required=True, help="output folder")
    weak_train.add_argument("--train-cases", type=positive_int, metavar="N", help="use only the first N cases of --inputs")
    weak_train.add_argument("--seed-method", help="the classifier's map that gives the seeds: any --method of explain "
                                                  "(default: gradxinput*fused, chosen on the demo set; a*b multiplies maps)")
    weak_train.add_argument("--layer", help="the classifier's layer for layer-level seed methods (default: the config's)")
    # how the seeds and the size prior are tuned: each default is the library's (None here)
    seeding = (
        ("--seed-smooth", float, "VOXELS", "Gaussian blur of the maps before peaks are sought (default 2.5 input voxels)"),
        ("--seed-quantile", float, "Q", "seed level: this quantile of a class map's maximum over the scans without the "
                                        "class (default 0.8)"),
        ("--max-peaks", positive_int, "N", "seeded peaks per class and scan (default 1; raise it for several lesions of "
                                           "a class)"),
        ("--seed-radius", float, "VOXELS", "a seeded peak's region: voxels within this distance of it where the map is "
                                           "at least 0.6 x the peak (default 1)"),
        ("--background-reach", reach, "VOXELS|none", "dense background: where every present class is seeded, voxels "
                                                     "farther than this from all seeds are background too (default none: "
                                                     "only where the maps are low)"),
        ("--size-weight", float, "W", "weight of the size prior that keeps a present class lesion-sized (default 1; 0: off)"),
        ("--size-factor", float, "F", "size prior bound: F x the seeded peaks' median map extent (default 1)"),
    )
    for flag, kind, metavar, text in seeding:
        weak_train.add_argument(flag, type=kind, metavar=metavar, help=text)
    weak_train.add_argument("--network", choices=["unet", "segresnet"], default="unet", help="MONAI network (default unet)")
    weak_train.add_argument("--channels", type=positive_int, nargs="+", metavar="C",
                            help="UNet channels per level (default 8 16 32 64); SegResNet: its init_filters")
    weak_train.add_argument("--epochs", type=positive_int, default=6, help="passes over the training scans (default 6)")
    weak_train.add_argument("--batch-size", type=positive_int, default=4, help="scans per step (default 4)")
    weak_train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, one-cycle AdamW (default 3e-3)")
    weak_train.add_argument("--decay", type=unit_interval, default=0.98,
                            help="expand loss: rank-pooling decay, 0 max .. 1 mean (default 0.98, about 50 voxels)")
    weak_train.add_argument("--constrain-weight", type=float, default=1.0, help="weight of the CRF constraint (0: off)")
    weak_train.add_argument("--seed", type=int, default=0, help="torch seed (initialisation, batch order, flips)")
    weak_train.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    weak_train.add_argument("--name", default="weak_segmenter", help="file stem of the outputs (default weak_segmenter)")
    weak_train.add_argument("--trust", action="store_true", help="allow configs and model files that run code")

    segment = add("segment", "segment scans with a trained segmenter: label maps and lesion boxes in scanner space",
                  cmd_segment)
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
    segment.add_argument("--threshold", type=float, default=None, metavar="P",
                         help="label a voxel with its most probable class where that class's probability is at least P "
                              "(0 < P < 1; lower finds more of the lesions the segmenter is unsure of); default: the most "
                              "probable label, background included")
    segment.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    segment.add_argument("--trust", action="store_true", help="allow configs and model files that run code")

    info = add("info", "print versions for bug reports, or describe a scan (--image)", cmd_info)
    info.add_argument("--image", help="describe this scan from its headers: grid, volumes of a 4D file, DICOM series")
    info.add_argument("--json", action="store_true", help="with --image: print JSON")
    info.add_argument("--trust", action="store_true", help="with --image: allow headers that point to files elsewhere")
    return parser
