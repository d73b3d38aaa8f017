"""nnU-Net v2's own preprocessing, run by ``nnunetv2`` itself, with the input grid's exact affine.

:class:`NnunetPreprocessing` reads a scan as medcam3d reads every scan (:func:`medcam3d.io.read`,
voxel axes ``(i, j, k)`` with the RAS affine), hands it to nnU-Net in the axis order nnU-Net's
default reader (``SimpleITKIO``) gives it, ``(k, j, i)`` with the spacing reversed, and runs
``nnunetv2``'s ``DefaultPreprocessor.run_case_npy``: ``transpose_forward``, crop to the non-zero
box, the plans' normalization schemes (``CTNormalization`` with the plans'
``foreground_intensity_properties_per_channel``, ``ZScoreNormalization`` ...) and resampling to the
configuration's spacing (separate-z where nnU-Net does it). Every one of these steps is a known map
of voxel indices, so the model input's affine is exact (:func:`input_affine`):

    v = R · T · (c + crop start),   c = (n + ½) · (cropped shape / resampled shape) − ½

(``R`` the axis reversal, ``T`` the transpose, ``n`` an index of the model input; nnU-Net's
resampling, ``skimage`` ``resize`` and its separate-z ``map_coordinates``, puts voxel centres
this way). The maps are then placed on the scan's grid by its affine like every other model's: the
inverse of the preprocessing (``transpose_backward``, uncropping, resampling back) is that affine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PreprocessingError, cause_line
from .space import Space

__all__ = ["NnunetPreprocessing", "input_affine"]


def input_affine(scan_affine: np.ndarray, transpose_forward: Sequence[int], bbox: Sequence[Sequence[int]],
                 cropped_shape: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The voxel -> world affine of nnU-Net's preprocessed grid.

    Parameters
    ----------
    scan_affine : (D+1, D+1) array
        The scan's voxel ``(i, j, k)`` -> RAS mm affine.
    transpose_forward : sequence of D int
        The plans' ``transpose_forward`` (on nnU-Net's ``(k, j, i)`` axes).
    bbox : D pairs of int
        ``bbox_used_for_cropping`` (start, stop) on the transposed axes.
    cropped_shape, shape : sequence of D int
        The grid after cropping and after resampling.

    Returns
    -------
    (D+1, D+1) ndarray
    """
    d = len(shape)
    matrix = np.zeros((d + 1, d + 1))
    matrix[d, d] = 1.0
    for axis in range(d):
        scale = float(cropped_shape[axis]) / float(shape[axis])
        scan_axis = d - 1 - int(transpose_forward[axis])  # transposed axis -> nnU-Net axis -> medcam3d axis
        matrix[scan_axis, axis] = scale
        matrix[scan_axis, d] = 0.5 * scale - 0.5 + float(bbox[axis][0])
    return np.asarray(scan_affine, dtype=np.float64) @ matrix


class NnunetPreprocessing:
    """An nnU-Net v2 configuration's preprocessing, applied to one scan (a reader for the CLI).

    Parameters
    ----------
    plans, dataset : dict
        ``plans.json`` and ``dataset.json`` of the model folder.
    configuration : str
    source : str or Path, optional
        The model folder (named in errors).

    Notes
    -----
    Takes ``(C, *S)`` channels on one grid: one image per input channel, in the order of
    ``dataset.json``'s ``channel_names``.
    """

    def __init__(self, plans: dict, dataset: dict, configuration: str, source: str | Path | None = None) -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans, self.dataset, self.configuration = plans, dataset, configuration
        self.source = source
        self.manager = PlansManager(plans)
        self.config = self.manager.get_configuration(configuration)
        self.channels = len(dataset.get("channel_names", dataset.get("modality", {})))
        name = self.config.configuration.get("preprocessor_name", "DefaultPreprocessor")
        if name != "DefaultPreprocessor":
            raise PreprocessingError(f"{source}: configuration {configuration!r} uses the preprocessor {name!r}; medcam3d runs "
                                     "nnU-Net's DefaultPreprocessor only.")
        if len(self.config.patch_size) != 3:
            raise PreprocessingError(f"{source}: configuration {configuration!r} is {len(self.config.patch_size)}D; medcam3d "
                                     "explains nnU-Net's 3D configurations (3d_fullres, 3d_lowres).")

    def __repr__(self) -> str:
        return f"NnunetPreprocessing(configuration={self.configuration!r}, source={str(self.source)!r})"

    def run(self, channels: np.ndarray, scanner_space: Space):
        """Preprocess ``(C, *S)`` channels on ``scanner_space``'s grid.

        Returns
        -------
        (MetaTensor, Space)
            The model input ``(C, *input_shape)`` with its affine, and ``scanner_space``.
        """
        from monai.data import MetaTensor
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        channels = np.asarray(channels, dtype=np.float32)
        if channels.ndim != 4:
            raise PreprocessingError(f"nnU-Net's 3D preprocessing takes (C, i, j, k) channels, not an array of shape {channels.shape}.")
        if channels.shape[0] != self.channels:
            names = ", ".join(map(str, self.dataset.get("channel_names", {}).values()))
            raise PreprocessingError(f"the model takes {self.channels} input channel(s) ({names}); got {channels.shape[0]}.")
        spacing = [float(s) for s in scanner_space.spacing]
        data = channels.transpose(0, 3, 2, 1)  # nnU-Net's SimpleITKIO order: (C, k, j, i)
        properties: dict[str, Any] = {"spacing": spacing[::-1]}
        try:
            out, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
                data, None, properties, self.manager, self.config, self.dataset)
        except Exception as error:  # from nnunetv2: the plans' normalization or resampling failed
            raise PreprocessingError(f"{self.source}: nnU-Net's preprocessing failed: {cause_line(error)}") from error
        affine = input_affine(scanner_space.affine, self.manager.transpose_forward, properties["bbox_used_for_cropping"],
                              properties["shape_after_cropping_and_before_resampling"], out.shape[1:])
        tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), affine=torch.from_numpy(affine))
        return tensor, scanner_space

    def __call__(self, image: Any, *, trust: bool = False):
        """Read and preprocess one scan.

        Parameters
        ----------
        image : path, sequence of paths, or (array, Space)
            One file (or DICOM folder) per input channel, all on one grid; or an array ``(*S)`` or
            ``(C, *S)`` with its :class:`~medcam3d.space.Space`.
        trust : bool
            As for :func:`medcam3d.io.read`.

        Returns
        -------
        (MetaTensor, Space)
            The model input ``(C, *input_shape)`` (add the batch axis with ``x[None]``) with its
            exact affine, and the scan's grid (the first channel's).
        """
        from . import io

        if isinstance(image, tuple) and len(image) == 2 and isinstance(image[0], np.ndarray):
            array, space = image[0], Space.of(image[1])
            array = np.asarray(array, dtype=np.float32)
            return self.run(array[None] if array.ndim == 3 else array, space)
        paths = [image] if isinstance(image, (str, os.PathLike)) else list(image)
        arrays, first = [], None
        for path in paths:
            array, space = io.read(path, trust=trust)
            if first is None:
                first = space
            elif not space.isclose(first, atol=1e-3):
                raise PreprocessingError(f"'{path}' is not on the grid of '{paths[0]}' ({space} vs {first}); nnU-Net's "
                                         "channels share one grid.")
            arrays.append(np.asarray(array, dtype=np.float32))
        assert first is not None
        return self.run(np.stack(arrays), first)
