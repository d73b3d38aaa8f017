"""A MONAI bundle's own ``preprocessing`` chain (built by :func:`medcam3d.models.load_bundle`), run as
:class:`BundlePreprocessing`: under the size limit of :mod:`medcam3d.preprocess_grid`, on a file
checked as :func:`medcam3d.io.read` checks it, returning what :func:`medcam3d.preprocess.preprocess`
returns."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DEFAULT_MAX_VOXELS
from .errors import PreprocessingError, cause_line
from .preprocess_grid import check_grid, lazy_shape, working_shape
from .space import Space

__all__ = ["BundlePreprocessing"]


class BundlePreprocessing:
    """A MONAI bundle's ``preprocessing`` chain, applied to one image file.

    The chain is the bundle's own, built by MONAI's ``ConfigParser`` (usually ``LoadImaged``,
    ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, intensity scaling, cropping). It is
    given ``{key: path}`` and its result under ``key`` is the model input. Before the bundle's
    reader opens the file, :func:`medcam3d.io.describe` checks its header as
    :func:`medcam3d.io.read` would (data files stay in the header's folder, the header claims no
    more data than the file holds); afterwards the grid the bundle's reader saw is compared with
    the one medcam3d reads, so that maps go back to the right place in the scan.

    Attributes
    ----------
    transform : callable
        The chain (usually a ``monai.transforms.Compose``).
    key : str
        The dictionary key of the image (``image`` in most bundles): the first key of the chain's
        ``LoadImaged`` that the metadata lists as a network input, else ``image``, else its first
        key.
    config_file : Path
        The bundle config it came from (named in errors).
    max_voxels : int or None
        The largest grid (voxels) a step of the chain may make unless its input is already larger
        (default :data:`medcam3d.preprocess_grid.MAX_VOXELS`; None: no limit). The steps of a
        ``Compose`` run one at a time, as MONAI's ``Compose`` runs them, and each step's output
        grid is computed from metadata before it runs (see :mod:`medcam3d.preprocess_grid`).
    """

    def __init__(self, transform, key: str, config_file: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
        self.transform, self.key, self.config_file = transform, key, Path(config_file)
        self.max_voxels = max_voxels

    def _apply(self, data: Any, where: str) -> Any:
        """The chain on ``data``, step by step (as MONAI's Compose runs it), refusing a grid over ``max_voxels``."""
        from monai.transforms import Compose, apply_transform

        chain = self.transform
        if not isinstance(chain, Compose) or chain.lazy:
            return chain(data)
        scan_voxels: int | None = None  # the image as the chain's loading step read it
        for index, step in enumerate(chain.flatten().transforms):
            image = data.get(self.key) if isinstance(data, Mapping) else None
            if image is not None:
                if scan_voxels is None and getattr(image, "ndim", 0) >= 2:
                    scan_voxels = int(np.prod(image.shape))  # all its values: with or without a channel axis
                label = f"step {index} ({type(step).__name__})"
                working = working_shape(getattr(step, "zoomer", step), image)  # Zoomd zooms with a Zoom
                for shape in (working, lazy_shape(step, data, self.key)):
                    if shape is not None:
                        check_grid(shape, image, label, where + " ", self.max_voxels, made=False, scan_voxels=scan_voxels)
            data = apply_transform(step, data, chain.map_items, chain.unpack_items, lazy=chain.lazy,
                                   overrides=chain.overrides, log_stats=chain.log_stats)
        return data

    def __repr__(self) -> str:
        return f"BundlePreprocessing(key={self.key!r}, config_file={str(self.config_file)!r})"

    def __call__(self, image: str | Path, *, trust: bool = False):
        """Read and preprocess one image as the bundle does.

        Parameters
        ----------
        image : str or Path, or a list of them
            An image file or a folder holding one DICOM series; or one per channel (MR sequences),
            which the bundle's ``LoadImaged`` stacks in order (a channel not on the first one's grid
            is first resampled onto it, with a :class:`~medcam3d.errors.ChannelGridWarning`); the
            scanner space is the first channel's.
        trust : bool
            As for :func:`medcam3d.io.read`: allow headers whose data files lie elsewhere.

        Returns
        -------
        (MetaTensor, Space)
            The model input ``(C, *input_shape)`` (add the batch axis with ``x[None]``), whose
            ``.affine`` is the input grid's voxel -> RAS mm affine, and the scan's own
            ``scanner_space``, as :func:`medcam3d.preprocess.preprocess` returns them.

        Raises
        ------
        ImageReadError
            The file's header is refused (see :func:`medcam3d.io.describe`), a folder holds
            several DICOM series (a bundle's reader takes one series per folder), or a series'
            slices cannot be placed (:class:`~medcam3d.errors.GeometryError`, as
            :func:`medcam3d.io.read` would raise).
        PreprocessingError
            The chain fails, returns several samples or no MetaTensor, or its reader placed the scan
            elsewhere than medcam3d's reader does.
        """
        import tempfile

        from monai.data import MetaTensor

        from . import io

        channels = io.as_channel_paths(image)
        if channels is None and not isinstance(image, (str, os.PathLike)):
            raise PreprocessingError(f"A bundle's preprocessing reads an image file or DICOM folder (or a list of them, "
                                     f"one per channel); got a {type(image).__name__}.")
        paths = [Path(p) for p in (channels or [image])]
        infos = [self._checked_info(p, trust) for p in paths]
        path, info = paths[0], infos[0]
        where = f"{self.config_file}: preprocessing"
        with tempfile.TemporaryDirectory(prefix="medcam3d-channels-") as folder:
            given: Any = str(path)
            if len(paths) > 1:  # the bundle's LoadImaged stacks a list of files as channels (original_channel_dim 0)
                given = [str(p) for p in self._on_first_grid(paths, infos, Path(folder), trust)]
            return self._run(given, path, info, where)

    @staticmethod
    def _checked_info(path: Path, trust: bool):
        """:func:`medcam3d.io.describe` of one file, refusing what :func:`medcam3d.io.read` refuses."""
        from . import io
        from .errors import GeometryError, ImageReadError

        info = io.describe(path, trust=trust)
        if len(info.series) > 1:
            uids = ", ".join(series.uid for series in info.series)
            message = (
                f"'{path}' holds {len(info.series)} DICOM series ({uids}); the bundle's reader takes one series per "
                "folder. Copy the series to explain into a folder of its own."
            )
            raise ImageReadError(message)
        if info.series and info.series[0].problem:  # what medcam3d.io.read refuses, the bundle's reader may not
            raise GeometryError(f"'{path}' (series {info.series[0].uid}): {info.series[0].problem}")
        if info.affine is None:
            raise GeometryError(f"'{path}': the headers do not say where the voxels are, so the maps could not be placed.")
        return info

    @staticmethod
    def _on_first_grid(paths: list[Path], infos: list, folder: Path, trust: bool) -> list[Path]:
        """The channel files, those not on the first one's grid replaced by a resampled copy in ``folder``
        (NIfTI on the first channel's grid, as :func:`medcam3d.io.read_channels` resamples them, with its
        :class:`~medcam3d.errors.ChannelGridWarning`)."""
        from . import io
        from .io.channels import CHANNEL_ATOL_MM

        first = Space(infos[0].spatial_shape, infos[0].affine)
        given = [paths[0]]
        for index, (path, info) in enumerate(zip(paths[1:], infos[1:]), 1):
            if Space(info.spatial_shape, info.affine).isclose(first, atol=CHANNEL_ATOL_MM, rtol=1e-5):
                given.append(path)
                continue
            from .errors import ChannelGridWarning
            from .space import resample

            values, grid = io.read(path, trust=trust)
            warnings.warn(f"channel {index} ('{path}', {grid}) is not on the grid of channel 0 ('{paths[0]}', {first}); "
                          "it was resampled onto channel 0's grid (linear, 0 outside its field of view)",
                          ChannelGridWarning, stacklevel=3)
            copy = folder / f"channel_{index:04d}.nii.gz"
            io.write(copy, resample(values, grid, first, mode="linear"), first)
            given.append(copy)
        return given

    def _run(self, given: Any, path: Path, info: Any, where: str):
        """The chain on ``{key: given}`` (a path, or a list of channel paths) and the checks of its result."""
        from monai.data import MetaTensor

        from .errors import SpaceError

        try:
            data = self._apply({self.key: given}, where)
        except PreprocessingError:
            raise
        except Exception as error:  # MONAI wraps errors in RuntimeError with the transform's name
            raise PreprocessingError(f"{where} failed on '{path}': {cause_line(error)}") from error
        if isinstance(data, (list, tuple)):
            message = (
                f"{where} returned {len(data)} samples for '{path}' (a random or patch crop?); medcam3d explains one "
                "input per scan. Remove the cropping transform (large scans: use sliding_window)."
            )
            raise PreprocessingError(message)
        result = data.get(self.key) if isinstance(data, Mapping) else data
        if not isinstance(result, MetaTensor):
            message = (
                f"{where} gave a {type(result).__name__} under {self.key!r}, not a MONAI MetaTensor with an affine; "
                "medcam3d needs the input grid to place the maps."
            )
            raise PreprocessingError(message)
        assert info.spatial_shape is not None  # a single image or series (several series were refused above)
        scanner_space = Space(info.spatial_shape, info.affine)
        seen = result.meta.get("original_affine")  # the file's grid as the bundle's reader saw it
        if seen is not None:
            seen = np.asarray(seen.cpu() if isinstance(seen, torch.Tensor) else seen, dtype=np.float64)
            try:
                same = scanner_space.isclose(Space(scanner_space.shape, seen), atol=1e-3, rtol=1e-5)
            except SpaceError:  # not a 4x4 voxel -> world matrix
                same = False
            if not same:
                message = (
                    f"{where}: the bundle's reader placed '{path}' with the voxel -> world affine "
                    f"{np.array2string(seen, precision=4)}, but medcam3d reads it as {scanner_space}; the maps could not "
                    "be placed reliably. Check the reader arguments of LoadImaged (e.g. ITKReader's affine_lps_to_ras "
                    "must stay true)."
                )
                raise PreprocessingError(message)
        return result.float(), scanner_space
