"""A tiny nnU-Net v2 model folder with random weights, a scan and a config, to try the nnU-Net path.

``python -m medcam3d.demo.nnunet_folder OUT`` writes::

    OUT/Dataset900_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  fold_0/checkpoint_final.pth  fold_1/checkpoint_final.pth
    OUT/case_0000.nii.gz   a CT-like scan (1.5 mm, oblique-free, 28 x 24 x 20) with a bright blob
    OUT/nnunet.yaml        model: {nnunet: ..., configuration: 3d_fullres, folds: [0, 1]}

The network is nnU-Net's ``PlainConvUNet`` with a few features per stage, its weights random
(seeded) and saved as nnU-Net saves them (``network_weights`` beside a training log with NumPy
scalars). Nothing here is trained: the maps explain a random network. Needs the extra
``medcam3d[nnunet]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PLANS", "DATASET", "SCAN_SHAPE", "SCAN_SPACING", "write_model_folder", "write_scan", "main"]

#: Scan written by :func:`write_scan`: shape (i, j, k) and voxel size (mm).
SCAN_SHAPE = (28, 24, 20)
SCAN_SPACING = (1.5, 1.5, 2.0)

ARCHITECTURE: dict[str, Any] = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}

#: plans.json: one 3d_fullres configuration, CT normalization, 2 mm target spacing, a 16^3 patch.
PLANS: dict = {
    "dataset_name": "Dataset900_Tiny",
    "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [2.0, 1.5, 1.5],
    "original_median_shape_after_transp": [20, 24, 28],
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "configurations": {
        "3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "median_image_size_in_voxels": [20, 18, 21],
            "spacing": [2.0, 2.0, 2.0],
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": ARCHITECTURE,
            "batch_dice": False,
        },
    },
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {"max": 400.0, "mean": 100.0, "median": 90.0, "min": -100.0, "percentile_00_5": -50.0,
              "percentile_99_5": 300.0, "std": 60.0},
    },
}

#: dataset.json: one CT channel, background and a lesion label.
DATASET: dict = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "lesion": 1},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}


def write_model_folder(out: str | Path, folds: tuple = (0, 1), *, seed: int = 0, plans: dict | None = None,
                       dataset: dict | None = None) -> Path:
    """Write plans.json, dataset.json and one random-weight checkpoint per fold; return the model folder."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    folder = Path(out) / "Dataset900_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    plans = PLANS if plans is None else plans
    dataset = DATASET if dataset is None else dataset
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    kwargs: dict[str, Any] = dict(ARCHITECTURE["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    for number, fold in enumerate(folds):
        torch.manual_seed(seed + number)
        network = PlainConvUNet(input_channels=len(dataset["channel_names"]), num_classes=len(dataset["labels"]),
                                deep_supervision=True, **kwargs)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)], "epoch_end_timestamps": [0.0]},
            "_best_ema": np.float64(0.5),
            "current_epoch": 1,
            "init_args": {"configuration": "3d_fullres", "fold": fold},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def write_scan(path: str | Path) -> Path:
    """A CT-like scan: -100 HU air around a 40 HU body with a 200 HU blob; RAS, :data:`SCAN_SPACING` mm."""
    from ..io import write

    shape = SCAN_SHAPE
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array([n / 2 for n in shape], dtype=np.float32)[:, None, None, None]
    distance = np.sqrt((((grid - centre) * np.array(SCAN_SPACING, dtype=np.float32)[:, None, None, None]) ** 2).sum(0))
    scan = np.where(distance < 19, 40.0, 0.0).astype(np.float32)
    blob = np.array([18, 10, 12], dtype=np.float32)[:, None, None, None]
    scan[np.sqrt((((grid - blob) * np.array(SCAN_SPACING, dtype=np.float32)[:, None, None, None]) ** 2).sum(0)) < 4] = 200.0
    affine = np.diag([*SCAN_SPACING, 1.0])
    affine[:3, 3] = (-20.0, -18.0, -20.0)
    return write(path, scan, (shape, affine))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcam3d.demo.nnunet_folder", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the model folder, the scan and the config into")
    args = parser.parse_args(argv)
    folder = write_model_folder(args.out)
    scan = write_scan(args.out / "case_0000.nii.gz")
    config = args.out / "nnunet.yaml"
    config.write_text(
        "# A tiny nnU-Net v2 model with random weights (medcam3d.demo.nnunet_folder): its maps explain an untrained network.\n"
        "model:\n"
        f"  nnunet: {folder.relative_to(args.out).as_posix()}\n"
        "  configuration: 3d_fullres\n"
        "  folds: [0, 1]\n"
        "  checkpoint: checkpoint_final.pth\n"
        "task: segmentation\n"
        "target: [1]\n", encoding="utf-8")
    print(f"model folder {folder}\nscan {scan}\nconfig {config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
