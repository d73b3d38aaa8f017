"""LPS+ <-> RAS+ conversion of voxel -> world affines: the one place in medcam3d that does it.

SimpleITK (DICOM, NRRD, MetaImage) works in LPS+ (x towards the patient's Left, y Posterior,
z Superior); nibabel and MONAI work in RAS+ (x Right, y Anterior, z Superior). The two differ by
negating the x and y world axes. :mod:`medcam3d.io` (reading and writing SimpleITK formats) and
:mod:`medcam3d.space` (MONAI ``MetaTensor`` objects whose ``meta["space"]`` is ``"LPS"``) both
import these two functions from here; no other module flips LPS and RAS.

This module is a leaf: it imports only numpy and :mod:`medcam3d.errors`, so any module may use it
without import cycles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import SpaceError

__all__ = ["lps_to_ras", "ras_to_lps"]

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: Any) -> np.ndarray:
    """Convert a voxel -> LPS+ mm affine to voxel -> RAS+ mm (negate the x and y world rows).

    Parameters
    ----------
    affine : array_like, shape (4, 4)

    Returns
    -------
    numpy.ndarray, shape (4, 4), float64

    Raises
    ------
    SpaceError
        (ValueError) ``affine`` is not 4x4.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise SpaceError(f"expected a 4x4 affine, got shape {a.shape}; pass the homogeneous voxel -> world matrix.")
    return _LPS_RAS @ a


def ras_to_lps(affine: Any) -> np.ndarray:
    """Convert a voxel -> RAS+ mm affine to voxel -> LPS+ mm.

    The flip is its own inverse: this is :func:`lps_to_ras` (same argument, result and errors).
    """
    return lps_to_ras(affine)
