"""One case read and preprocessed for the model (:func:`load_case`): the scan, or one scan per input
channel, its grid, its ground-truth label map and its region mask, with the checks made before the
model runs (:func:`check_model_input`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SpaceError, TargetError, UsageError
from ..preprocess import preprocess
from ..space import Space
from ..targets import check_region_mask
from .case_ids import first_image, image_paths

__all__ = ["LoadedCase", "check_model_input", "load_case", "read_region_mask"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedCase:
    """A scan read and preprocessed: the model input, the scan's grid and voxels, its labels.

    ``region`` is a region mask to explain (segmentation targets), boolean on the scan's grid.
    """

    x: torch.Tensor
    scanner_space: Space
    scan: np.ndarray
    labels: np.ndarray | None = None
    region: np.ndarray | None = None



def read_region_mask(path: str | Path, scanner_space: object, *, trust: bool = False, image: object = None) -> np.ndarray:
    """A region mask file on the scan's grid, as a boolean array.

    The file must hold one 0/1 volume with the scan's shape and affine (within 1e-3 mm) and at least
    one voxel set; it is resampled onto the model's grid later, with nearest neighbour, when the
    target is resolved (:func:`medcam3d.targets.region_from_scan_mask`).

    Raises
    ------
    TargetError
        Not on the scan's grid, not binary, or empty; and the I/O errors of :func:`medcam3d.io.read`
        (a missing or unreadable file).
    """
    from .. import io

    values, space = io.read(path, dtype=None, trust=trust)
    scan = Space.of(scanner_space)
    if not Space.of(space).isclose(scan, atol=1e-3):
        of = f" of {image}" if image is not None else ""
        raise TargetError(f"The region mask {path} is not on the grid{of} ({space} vs {scan}); give a 0/1 mask with "
                          "the scan's shape and affine (e.g. drawn on that scan, or resampled onto it).")
    return check_region_mask(values, f"The region mask {path}")


def load_case(image: str | Path | Sequence[str | Path], transforms, mask: str | Path | None = None, *,
              trust: bool = False, volume: int | None = None, series: str | None = None, reader=None,
              model: torch.nn.Module | None = None, region_mask: str | Path | None = None,
              input_check: Callable[[tuple[int, ...]], None] | None = None) -> LoadedCase:
    """Read a scan once, preprocess it, and read its ground-truth label map if given.

    ``image`` is a scan, or a list of scans of one case (MR sequences), one per input channel in
    the model's order: they are stacked on the first one's grid (:func:`medcam3d.io.read_channels`;
    a channel on another grid is resampled onto it, with a warning), and the case's grid, scan
    (pictures) and outputs are the first channel's.
    ``trust`` lets :func:`medcam3d.io.read` open detached data files outside a header's folder;
    ``volume`` picks one volume of a 4D file, ``series`` one series of a multi-series DICOM folder.
    ``reader`` replaces ``transforms``: a callable ``reader(path, trust=...) -> (x, scanner_space)``
    such as a MONAI bundle's own preprocessing (:func:`medcam3d.models.bundle_preprocessing`; it is
    given the list of channel paths).
    ``model``, when given, is checked to take inputs of the scan's dimensionality (2D or 3D) and,
    for several channels, that many input channels (before preprocessing), and the preprocessed
    input's channels (before the model runs).
    ``region_mask`` is a 0/1 region on the scan's grid to explain (see :func:`read_region_mask`).
    ``input_check`` is called with the shape ``(C, *input_shape)`` the preprocessing will give,
    before it runs, when that can be told from metadata (see :func:`medcam3d.preprocess.preprocess`;
    :attr:`Runner.input_check` refuses an input the model's activation limit would refuse).

    Raises
    ------
    SpaceError
        When the mask is not on the scan's grid (a ``ValueError``; and the I/O errors of
        :func:`medcam3d.io.read`).
    TargetError
        A region mask that is not on the scan's grid, not binary, or empty.
    InputError
        Several channels, or a preprocessed input, whose number of channels is not the model's.
    """
    from .. import io

    paths = image_paths(image)
    first = first_image(image)
    stacked = None
    if len(paths) > 1:
        if model is not None:
            from ..models import check_input_channels

            check_input_channels(len(paths), model, what=f"the case of {', '.join(repr(str(p)) for p in paths)}")
        if reader is None:
            with _logged_channel_warnings():
                stacked, scanner_space = io.read_channels(paths, trust=trust, volume=volume, series=series)
            scan = stacked[0]
        else:  # the bundle's chain stacks them (resampling those on another grid): read the first for its grid
            scan, scanner_space = io.read(first, trust=trust, volume=volume, series=series)
    else:
        scan, scanner_space = io.read(first, trust=trust, volume=volume, series=series)
    if model is not None:
        from ..models import check_input_rank

        check_input_rank(scan.shape, model, path=first)  # a 2D image for a 3D model: a clear error, not a transform's
    if reader is not None:
        if volume is not None or series is not None:
            raise UsageError("--volume/--series cannot be used with a bundle's own preprocessing (it reads the whole "
                             "file); give the config a preprocessing list instead.")
        with _logged_channel_warnings():
            x, _ = reader(first if len(paths) == 1 else paths, trust=trust)
    else:
        x, _ = preprocess((scan if stacked is None else stacked, scanner_space), transforms, check_input=input_check)
    if model is not None:
        from ..models import check_input_channels

        check_input_channels(int(x.shape[0]), model, what=f"the preprocessed input of {str(first)!r}")
    labels = None
    if mask is not None:
        labels, mask_space = io.read(mask, dtype=None, trust=trust)
        if not mask_space.isclose(scanner_space, atol=1e-3):
            raise SpaceError(f"The mask {mask} is not on the grid of {first} ({mask_space} vs {scanner_space}); give "
                             "a label map with the scan's shape and affine.")
    region = None if region_mask is None else read_region_mask(region_mask, scanner_space, trust=trust, image=first)
    return LoadedCase(x, scanner_space, np.asarray(scan, dtype=np.float32), labels, region)


@contextlib.contextmanager
def _logged_channel_warnings() -> Iterator[None]:
    """:class:`~medcam3d.errors.ChannelGridWarning` (a channel resampled onto the first one's grid) as one
    logged line each (the CLI shows ``medcam3d: channel 1 ... was resampled ...``); other warnings pass on."""
    import warnings

    from ..errors import ChannelGridWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ChannelGridWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, ChannelGridWarning):
            logger.warning("%s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def check_model_input(model: torch.nn.Module, shape: Sequence[int]) -> None:
    """Refuse a preprocessed input of ``shape`` ``(C, *spatial)`` (one case, batch axis added) that
    ``model``'s activation limit would refuse (:func:`medcam3d.models.check_activations`)."""
    from ..models import check_activations

    check_activations(model, (1, *(int(n) for n in shape)))
