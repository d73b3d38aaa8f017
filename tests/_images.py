"""Synthetic scans with known geometry, and a model with a planted region, for end-to-end tests."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_lpi_affine(spacing=(0.9, 1.1, 2.5), origin=(62.0, -35.5, 48.0), angles=(7.0, -5.0, 11.0)) -> np.ndarray:
    """Voxel -> RAS affine of a grid stored L-P-I (every axis flipped), slightly oblique."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles) @ np.diag([-1.0, -1.0, -1.0]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def planted_scan(shape, affine, centre_mm, radius_mm=7.0, seed=0):
    """Noise plus a bright ball of ``radius_mm`` around ``centre_mm`` (world RAS)."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = (np.linalg.norm(world - np.asarray(centre_mm), axis=1) <= radius_mm).reshape(shape)
    image = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    image[inside] += 300.0
    return image, inside


class PlantedModel(nn.Module):
    """Conv → ReLU → AvgPool(4) → Flatten → Linear, whose class-1 logit reads only chosen cells.

    Linear weights of class 1 are non-zero only at the feature cells in ``cells`` (a boolean
    feature-grid mask), those of class 0 only outside them. Activations are positive everywhere
    (positive bias), so HiResCAM of class 1 is non-zero exactly on ``cells``.
    """

    def __init__(self, feature_shape, cells: np.ndarray, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool3d(4)
        self.head = nn.Linear(3 * int(np.prod(feature_shape)), 2)
        with torch.no_grad():
            self.conv.weight.copy_(0.01 * torch.rand(self.conv.weight.shape, generator=generator))
            self.conv.bias.fill_(1.0)
            inside = torch.from_numpy(cells.reshape(-1)).repeat(3)
            weights = torch.rand(2, inside.numel(), generator=generator) + 0.5
            weights[1, ~inside] = 0
            weights[0, inside] = 0
            self.head.weight.copy_(weights)
            self.head.bias.copy_(torch.tensor([0.25, -0.5]))

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def cells_near(input_affine: np.ndarray, feature_shape, stride: int, centre_mm, radius_mm: float) -> np.ndarray:
    """Feature cells whose input-voxel block centroid (via the MetaTensor affine) is near a point."""
    cells = np.stack(np.meshgrid(*[np.arange(s) for s in feature_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    centroids = cells * stride + (stride - 1) / 2.0  # mean of the block's input voxel indices
    world = centroids @ input_affine[:3, :3].T + input_affine[:3, 3]
    return (np.linalg.norm(world - np.asarray(centre_mm), axis=1) <= radius_mm).reshape(feature_shape)


def write_dicom_series(image: sitk.Image, directory, series_uid: str = "1.2.826.0.1.3680043.8.498.1", *,
                       modality: str = "CT", description: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Write a 3D SimpleITK image as a DICOM series, one file per slice, with geometry tags (and ``tags``)."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        piece.SetMetaData("0008|0060", modality)
        if description is not None:
            piece.SetMetaData("0008|103e", description)
        piece.SetMetaData("0020|000d", "1.2.826.0.1.3680043.8.498.2")
        piece.SetMetaData("0020|000e", series_uid)
        piece.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        piece.SetMetaData("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        piece.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        for key, value in (tags or {}).items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(directory / f"{series_uid.rsplit('.', 1)[-1]}_slice{k:03d}.dcm"))
        writer.Execute(piece)
