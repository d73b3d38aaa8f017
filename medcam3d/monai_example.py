"""A worked example: a MONAI bundle whose ``inference.json`` gains heatmaps by swapping the inferer
and adding one post-transform (docs/monai.md).

``python -m medcam3d.monai_example OUT`` writes a small classification bundle to ``OUT``::

    OUT/configs/metadata.json
    OUT/configs/inference.json          # HeatmapInferer + SaveHeatmapsd
    OUT/configs/inference_plain.json    # the same bundle as it was: SimpleInferer, no maps
    OUT/models/model.pt                 # a tiny DenseNet with seeded random weights (a state_dict)
    OUT/data/case_0.nii.gz, ...         # two tiny synthetic scans (with --scans N, N of them)

and it runs with MONAI's own bundle runner::

    python -m monai.bundle run --config_file OUT/configs/inference.json --meta_file OUT/configs/metadata.json \\
        --bundle_root OUT

which writes the class probabilities (``OUT/eval/predictions.csv``) and, for every scan, one
heatmap per class on the scan's own grid (``OUT/eval/case_0/case_0_heatmap_hirescam_bright.nii.gz``, ...).

:func:`write_bundle` writes such a bundle for any MONAI network, weights and preprocessing (the
benchmark uses it for the shipped demo model and for DenseNet121).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXAMPLE_CLASSES",
    "EXAMPLE_NETWORK",
    "EXAMPLE_PREPROCESSING",
    "inference_config",
    "write_bundle",
    "write_example_bundle",
    "write_scans",
]

#: The tiny network of the example bundle (MONAI DenseNet, 3D, two classes).
EXAMPLE_NETWORK: dict[str, Any] = {
    "_target_": "DenseNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "init_features": 4, "growth_rate": 4, "block_config": [2, 2],
}
#: Its preprocessing, as MONAI dictionary transforms of the "image" key after loading.
EXAMPLE_PREPROCESSING: list[dict[str, Any]] = [
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear", "padding_mode": "border"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0,
     "b_max": 1.0, "clip": True},
    {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [32, 32, 32]},
]
#: Its class names.
EXAMPLE_CLASSES = ["bright", "dark"]


def inference_config(
    network_def: Mapping[str, Any],
    preprocessing: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    heatmaps: bool = True,
    batch_size: int = 2,
    inferer_args: Mapping[str, Any] | None = None,
    saver_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A classification bundle's ``inference.json`` as a dict (``SupervisedEvaluator``).

    With ``heatmaps=False`` it is an ordinary MONAI bundle config; ``heatmaps=True`` differs in
    exactly two places: ``inferer`` is :class:`medcam3d.monai.HeatmapInferer` instead of
    ``SimpleInferer``, and :class:`medcam3d.monai.SaveHeatmapsd` is the first post-transform.

    Parameters
    ----------
    network_def : mapping
        The network as a bundle component (``{"_target_": ..., args}``).
    preprocessing : sequence of mapping
        MONAI dictionary transforms after ``LoadImaged`` and ``EnsureChannelFirstd``.
    class_names : sequence of str
    heatmaps : bool
    batch_size : int
    inferer_args, saver_args : mapping, optional
        Extra arguments of :class:`~medcam3d.monai.HeatmapInferer` and
        :class:`~medcam3d.monai.SaveHeatmapsd`.

    Returns
    -------
    dict
    """
    inferer: dict[str, Any] = {"_target_": "SimpleInferer"}
    post: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]
    if heatmaps:
        inferer = {"_target_": "medcam3d.monai.HeatmapInferer", "target": "all", "class_names": "@class_names",
                   **dict(inferer_args or {})}
        post.insert(0, {"_target_": "medcam3d.monai.SaveHeatmapsd", "keys": "pred", "output_dir": "@output_dir",
                        **dict(saver_args or {})})
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "class_names": list(class_names),
        "network_def": copy.deepcopy(dict(network_def)),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                *(copy.deepcopy(dict(t)) for t in preprocessing),
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": int(batch_size),
                       "shuffle": False, "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "ClassificationSaver", "output_dir": "@output_dir",
             "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
             "output_transform": "$lambda output: [item['pred'] for item in output]"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def _metadata(network_def: Mapping[str, Any], class_names: Sequence[str], input_shape: Sequence[int]) -> dict:
    import monai
    import torch

    from . import __version__ as medcam3d_version

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "example bundle written by medcam3d.monai_example"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medcam3d": medcam3d_version},
        "task": "3D classification with class activation maps",
        "description": "A tiny classifier whose inference also writes class activation maps in scanner space.",
        "authors": "medcam3d",
        "copyright": "medcam3d, Apache-2.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(input_shape), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(class_names),
                                 "spatial_shape": [len(class_names)], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False,
                                 "channel_def": {str(i): name for i, name in enumerate(class_names)}}},
        },
    }


def write_bundle(
    out: str | Path,
    network_def: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    preprocessing: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    input_shape: Sequence[int] = (32, 32, 32),
    batch_size: int = 2,
    inferer_args: Mapping[str, Any] | None = None,
    saver_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write a MONAI classification bundle with and without heatmaps.

    Parameters
    ----------
    out : path
        The bundle folder (created; existing files of the same names are replaced).
    network_def, preprocessing, class_names, batch_size, inferer_args, saver_args
        See :func:`inference_config`.
    state_dict : mapping
        The network's weights, saved as ``models/model.pt``.
    input_shape : sequence of int
        The network's input size, for ``metadata.json``.

    Returns
    -------
    Path
        ``out``.
    """
    import torch

    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    for name, heatmaps in (("inference.json", True), ("inference_plain.json", False)):
        config = inference_config(network_def, preprocessing, class_names, heatmaps=heatmaps, batch_size=batch_size,
                                  inferer_args=inferer_args, saver_args=saver_args)
        (out / "configs" / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    metadata = _metadata(network_def, class_names, input_shape)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    torch.save(dict(state_dict), out / "models" / "model.pt")
    return out


def write_scans(folder: str | Path, count: int = 2, *, seed: int = 0) -> list[Path]:
    """Write ``count`` small synthetic CT-like NIfTI scans (about 30-40 voxels a side, LPS or RAS,
    anisotropic voxels, an oblique one) with a bright and a dark blob each.

    Returns
    -------
    list of Path
    """
    from . import io
    from .space import Space

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(count):
        shape = (int(rng.integers(30, 40)), int(rng.integers(30, 40)), int(rng.integers(16, 24)))
        spacing = (1.8, 1.9, 3.0)
        affine = np.diag([*spacing, 1.0])
        if n % 2:  # LPS-stored scan (flipped x and y axes), as DICOM-derived files often are
            affine[:2] *= -1
        if n % 3 == 2:  # oblique: 10 degrees about z
            c, s = np.cos(np.pi / 18), np.sin(np.pi / 18)
            affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
        affine[:3, 3] = -np.asarray(affine[:3, :3] @ (np.array(shape) / 2)) + rng.normal(0, 5, 3)
        grid = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), axis=-1) * spacing
        volume = rng.normal(-50.0, 20.0, shape)
        for value, radius in ((400.0, 6.0), (-300.0, 5.0)):
            centre = np.array(shape) * spacing * rng.uniform(0.3, 0.7, 3)
            volume += value * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * radius**2))
        path = folder / f"case_{n}.nii.gz"
        io.write(path, volume.astype(np.float32), Space(shape, affine))  # codes 1, 1: one affine in both forms
        paths.append(path)
    return paths


def write_example_bundle(out: str | Path, *, scans: int = 2, seed: int = 0) -> Path:
    """Write the example bundle (tiny seeded DenseNet) and ``scans`` synthetic scans in ``out/data``.

    Returns
    -------
    Path
        ``out``.
    """
    import torch
    from monai.bundle import ConfigParser

    torch.manual_seed(seed)
    network = ConfigParser({"net": EXAMPLE_NETWORK}).get_parsed_content("net")
    write_bundle(out, EXAMPLE_NETWORK, network.state_dict(), EXAMPLE_PREPROCESSING, EXAMPLE_CLASSES)
    if scans:
        write_scans(Path(out) / "data", scans, seed=seed)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcam3d.monai_example", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="bundle folder to write")
    parser.add_argument("--scans", type=int, default=2, help="synthetic scans to put in OUT/data (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_example_bundle(args.out, scans=args.scans, seed=args.seed)
    print(f"wrote {out}; run it with:\n  python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--meta_file {out}/configs/metadata.json --bundle_root {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
