"""What a receptive field is: :class:`ReceptiveField` (per-axis step, offset and size of a layer's cells
in input voxels), and the placements an :class:`~medcam3d.Explainer` offers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


#: The placements an :class:`~medcam3d.Explainer` offers.
PLACEMENTS = ("receptive_field", "align_corners")


@dataclass(frozen=True)
class ReceptiveField:
    """Where the cells of a layer's output look in the input, per spatial axis (input voxel units).

    Cell ``u`` (an index along one axis of the layer's output) is centred on input voxel index
    ``offset + step * u`` and reaches ``size`` input voxels along that axis.

    Attributes
    ----------
    step : tuple of float
        Input voxels between neighbouring cells (the layer's total stride), per spatial axis.
    offset : tuple of float
        Input voxel index (fractional) of the centre of cell 0, per spatial axis.
    size : tuple of float
        Extent of the input that one cell reaches, per axis (for ``source="graph"`` the kernels'
        reach, not counting normalization or attention over the whole image; for ``"probe"`` the
        extent of the gradient's support, a lower bound where it reaches the input's borders).
    source : {"graph", "probe", "identity"}
        How it was found: from the network's operations, from a gradient probe, or the input grid
        itself (:meth:`identity`).
    """

    step: tuple[float, ...]
    offset: tuple[float, ...]
    size: tuple[float, ...]
    source: str = "graph"

    def __post_init__(self) -> None:
        step = tuple(float(v) for v in self.step)
        offset = tuple(float(v) for v in self.offset)
        size = tuple(float(v) for v in self.size)
        if not len(step) == len(offset) == len(size) or not step:
            raise ValueError(f"step, offset and size need one value per spatial axis, not {step}, {offset}, {size}.")
        if not all(math.isfinite(v) for v in (*step, *offset, *size)) or min(step) <= 0:
            raise ValueError(f"step must be positive and all values finite, not step={step}, offset={offset}, "
                             f"size={size}.")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "size", size)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.step)

    @classmethod
    def identity(cls, ndim: int) -> ReceptiveField:
        """The input grid itself (``step 1, offset 0, size 1``): for maps computed on the input, such as
        input-level attributions (gradient x input)."""
        return cls((1.0,) * ndim, (0.0,) * ndim, (1.0,) * ndim, "identity")

    def centres(self, index: Any) -> np.ndarray:
        """Input voxel coordinates of cell centres.

        Parameters
        ----------
        index : (..., ndim) array_like
            Cell indices on the layer's grid.

        Returns
        -------
        (..., ndim) ndarray
            float64 ``offset + step * index``.
        """
        index = np.asarray(index, dtype=np.float64)
        if index.shape[-1:] != (self.ndim,):
            raise ValueError(f"index must have {self.ndim} values in its last axis, not shape {index.shape}.")
        return np.asarray(self.offset) + np.asarray(self.step) * index

    def matrix(self) -> np.ndarray:
        """The 4x4 map from feature cell indices to input voxel indices, ``[[diag(step), offset], [0, 1]]``
        (float64; a 2D field leaves the third axis as it is)."""
        matrix = np.eye(4)
        for axis, (step, offset) in enumerate(zip(self.step, self.offset)):
            matrix[axis, axis] = step
            matrix[axis, 3] = offset
        return matrix

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"step": [...], "offset": [...], "size": [...], "source": ...}``."""
        return {"step": list(self.step), "offset": list(self.offset), "size": list(self.size), "source": self.source}

    @classmethod
    def from_dict(cls, data: Any) -> ReceptiveField:
        """The inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or not {"step", "offset", "size"} <= set(data):
            raise ValueError(f"A receptive field is a mapping with step, offset and size, not {data!r:.80}.")
        return cls(tuple(data["step"]), tuple(data["offset"]), tuple(data["size"]), str(data.get("source", "graph")))

    def __str__(self) -> str:
        def text(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:g}" for v in values) + ")"

        return f"step {text(self.step)}, offset {text(self.offset)}, size {text(self.size)} voxels ({self.source})"
