""":func:`read_channels`: several scans of one case (MR sequences: T1, T1c, T2, FLAIR ...) read as one
channel-first array on the first scan's grid."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ChannelGridWarning, UsageError
from ..space import Space, resample
from .reading import read

__all__ = ["read_channels", "CHANNEL_ATOL_MM", "as_channel_paths"]

#: Two channels share one grid when their shapes are equal and their affines agree within this many
#: mm (plus 1e-5 relative), the tolerance medcam3d uses for masks on a scan's grid.
CHANNEL_ATOL_MM = 1e-3


def as_channel_paths(image: Any) -> list | None:
    """``image`` as a list of channel paths when it is a list or tuple of paths, else None.

    ``[t1, t1c]`` and ``(t1, t1c)`` are channels; an ``(array, Space)`` pair is not (its items are not
    paths). A list of one path is one channel.
    """
    if isinstance(image, (list, tuple)) and image and all(isinstance(p, (str, os.PathLike)) for p in image):
        return list(image)
    return None


def read_channels(paths: Sequence[str | os.PathLike], *, trust: bool = False, volume: int | None = None,
                  series: str | None = None, atol: float = CHANNEL_ATOL_MM) -> tuple[np.ndarray, Space]:
    """Read several scans of one case and stack them, in order, as the channels of one array.

    Every channel is read by :func:`medcam3d.io.read` (with its checks). A channel whose grid is not
    the first channel's (another shape, or an affine more than ``atol`` mm away) is resampled onto
    the first channel's grid (:func:`medcam3d.space.resample`, linear; 0 outside its field of view),
    with a :class:`~medcam3d.errors.ChannelGridWarning` naming the channel (the jobs log it as one line).
    The result lies on the first channel's grid: maps, masks and every output of the case land there.

    Parameters
    ----------
    paths : sequence of path
        One file or DICOM folder per channel, in the model's channel order (at least one).
    trust, volume, series
        As for :func:`medcam3d.io.read`, applied to every channel.
    atol : float
        Tolerance (mm) of the affines' comparison.

    Returns
    -------
    array : numpy.ndarray, float32, shape (C, *S)
        ``array[c]`` is channel ``c`` on the first channel's grid.
    space : Space
        The first channel's grid, ``space.shape == S``.

    Raises
    ------
    UsageError
        No path given.
    ImageReadError, ImageNotFoundError, ...
        As :func:`medcam3d.io.read`, for the channel that fails.
    SpaceError
        A channel of another dimensionality (2D and 3D) than the first.
    """
    paths = list(paths)
    if not paths:
        raise UsageError("read_channels needs at least one image path (one per input channel).")
    first, space = read(paths[0], trust=trust, volume=volume, series=series)
    stacked = np.empty((len(paths), *first.shape), dtype=np.float32)
    stacked[0] = first
    del first
    for index, path in enumerate(paths[1:], 1):
        values, grid = read(path, trust=trust, volume=volume, series=series)
        if grid.ndim != space.ndim:
            from ..errors import SpaceError

            raise SpaceError(f"channel {index} ('{path}') is {grid.ndim}D but channel 0 ('{paths[0]}') is {space.ndim}D; "
                             "every channel of a case must be a scan of the same dimensionality.")
        if grid.isclose(space, atol=atol, rtol=1e-5):
            stacked[index] = values
            continue
        message = (f"channel {index} ('{path}', {grid}) is not on the grid of channel 0 ('{paths[0]}', {space}); it "
                   "was resampled onto channel 0's grid (linear, 0 outside its field of view)")
        warnings.warn(message, ChannelGridWarning, stacklevel=2)
        stacked[index] = resample(values, grid, space, mode="linear")
    return stacked, space
