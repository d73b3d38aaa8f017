"""Refuse a 2D image for a 3D model (and the reverse) before preprocessing: :func:`check_input_rank`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..input_rank import expected_input_channels, expected_spatial_dims

__all__ = ["check_input_rank", "check_input_channels"]


def check_input_rank(scan_shape, model: nn.Module, *, path: str | Path | None = None) -> int | None:
    """Refuse a scan whose dimensionality is not the model's, before any preprocessing runs.

    A 2D image (shape ``(I, J)``, or ``(I, J, 1)``: one slice stored as a volume) cannot go through
    a 3D network, nor a volume through a 2D one; without this check the mismatch surfaces later as
    an obscure error from a transform or a convolution.

    Parameters
    ----------
    scan_shape : sequence of int
        The scan's spatial shape (``medcam3d.io.describe(path).spatial_shape``, or
        ``Space.shape``): 2 or 3 values.
    model : torch.nn.Module
        The network (eager or TorchScript); its first convolution tells its dimensionality.
    path : str or Path, optional
        The scan, named in the error.

    Returns
    -------
    int or None
        The model's spatial dimensionality, or None if it has no convolution (then nothing is
        checked).

    Raises
    ------
    InputError
        The scan is 2D and the model 3D, or the reverse, or ``scan_shape`` is not a spatial shape.
    """
    from ..errors import InputError

    shape = tuple(int(n) for n in scan_shape)
    name = f"'{path}'" if path is not None else "the scan"
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise InputError(f"{name}: expected a spatial shape of 2 or 3 positive sizes, got {shape}; for a 4D file pick one volume first.")
    dims = expected_spatial_dims(model)
    if dims is None:
        return None
    flat = [axis for axis, n in enumerate(shape) if n == 1]
    if dims == 3 and len(shape) == 2:
        message = (
            f"{name} is a 2D image (shape {shape}); the model takes 3D volumes (its first convolution is 3D). "
            "Give a 3D scan, or a model for 2D images."
        )
        raise InputError(message)
    if dims == 3 and flat:
        message = (
            f"{name} is a single slice (shape {shape}: one voxel along axis {'ijk'[flat[0]]}), a 2D image stored as a "
            "volume; the model takes 3D volumes (its first convolution is 3D). Give the whole 3D scan."
        )
        raise InputError(message)
    if dims == 2 and len(shape) == 3:
        what = "one slice stored as a volume" if flat else "a 3D volume"
        message = (
            f"{name} is {what} (shape {shape}); the model takes 2D images (its first convolution is 2D). "
            + ("Save the slice as a 2D image (shape (I, J))." if flat else "Give a 2D image (one slice), or a model for 3D volumes.")
        )
        raise InputError(message)
    if dims not in (2, 3) or (dims == 2 and len(shape) != 2):
        raise InputError(f"{name} has shape {shape}, but the model's first convolution is {dims}D.")
    return dims


def check_input_channels(count: int, model: nn.Module, *, what: str = "the input") -> int | None:
    """Refuse an input of ``count`` channels for a model that takes another number, before it runs.

    Parameters
    ----------
    count : int
        Channels given: the number of scans of a case (``--image`` repeated, CSV columns
        ``image_0000``, ``image_0001`` ...), or the preprocessed input's first axis.
    model : torch.nn.Module
        The network (eager or TorchScript); its first convolution tells its input channels
        (:func:`medcam3d.input_rank.expected_input_channels`).
    what : str
        What gave the channels, named in the error (``"--image (2 given)"``, a case).

    Returns
    -------
    int or None
        The model's input channels, or None when they cannot be told (then nothing is checked).

    Raises
    ------
    InputError
        ``count`` differs from the model's input channels.
    """
    from ..errors import InputError

    expected = expected_input_channels(model)
    if expected is None or int(count) == expected:
        return expected
    def scans(n: int) -> str:
        return f"{n} channel{'s' if n != 1 else ''}"

    raise InputError(f"{what} has {scans(int(count))}, but the model takes {scans(expected)} (its first convolution's "
                     f"in_channels); give one scan per channel, in the model's order (explain: --image repeated; a "
                     "CSV: columns image_0000, image_0001, ...; a folder: CASE_0000.nii.gz, CASE_0001.nii.gz, ...).")
