"""Heatmaps: normalization, placement in scanner space, and saving.

A :class:`Heatmap` is one class's map on a grid (a :class:`~medcam3d.space.Space`) with its
provenance. :func:`to_scanner_space` takes an :class:`~medcam3d.explainer.Explanation` and
resamples each map in one trilinear step, straight from the feature grid to the scan's own grid
and affine (DESIGN §3): no full-size intermediate at input resolution, no replay of the
preprocessing. Normalization is a separate, explicit step; raw values are kept.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .space import Space, SpaceError, feature_space, resample

if TYPE_CHECKING:
    from .explainer import Explanation

__all__ = ["Heatmap", "normalize", "to_scanner_space", "input_space_of", "save_heatmaps"]


def normalize(maps: torch.Tensor, *, spatial_dims: int | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Min–max normalize each map to [0, 1].

    Never inverts (the minimum maps to 0, the maximum to 1) and never returns NaN:
    a flat map (max − min ≤ ``eps``) becomes all zeros.

    Parameters
    ----------
    maps : (..., *spatial) Tensor or ndarray
        Raw maps, e.g. ``Explanation.maps`` of shape ``(B, T, D, V, U)``.
    spatial_dims : int, optional
        How many trailing axes form one map. Defaults to ``maps.ndim - 2``
        (``(B, T, *spatial)`` layout) and to ``maps.ndim`` for 1- or 2-axis input.
    eps : float
        Range below which a map counts as flat.

    Returns
    -------
    (..., *spatial) Tensor or ndarray
        float32, values in [0, 1]; the same kind as the input.
    """
    as_numpy = isinstance(maps, np.ndarray)
    maps = torch.as_tensor(maps)
    if spatial_dims is None:
        spatial_dims = maps.ndim - 2 if maps.ndim > 2 else maps.ndim
    if not 1 <= spatial_dims <= maps.ndim:
        message = f"spatial_dims must be in [1, {maps.ndim}] for a {maps.ndim}-D array, not {spatial_dims}."
        raise ValueError(message)
    maps = maps.float()
    flat = maps.flatten(start_dim=maps.ndim - spatial_dims)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    scaled = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    scaled = scaled.view_as(maps)
    return scaled.numpy() if as_numpy else scaled


@dataclass(frozen=True)
class Heatmap:
    """One class's map on a grid, with its provenance.

    Attributes
    ----------
    data : (*space.shape) ndarray
        float32 raw values (ReLU applied or not, as explained).
    space : Space
        The grid: the scan's (``scanner_space``) or the feature grid.
    method, layer : str
    class_index : int
    class_name : str or None
    score : float or None
        The explained score (logit or region sum).
    """

    data: np.ndarray
    space: Space
    method: str
    layer: str
    class_index: int
    class_name: str | None = None
    score: float | None = None

    @property
    def label(self) -> str:
        """Class name, or ``class<i>``."""
        return self.class_name if self.class_name else f"class{self.class_index}"

    @property
    def file_label(self) -> str:
        """:attr:`label` made safe for file names."""
        return _safe(self.label)

    @property
    def descrip(self) -> str:
        """Text for the NIfTI ``descrip`` field (at most 80 bytes)."""
        text = f"medcam3d {self.method} layer={self.layer} class={self.class_index}:{self.label}"
        return text.encode("ascii", "replace")[:80].decode("ascii")

    def normalized(self) -> np.ndarray:
        """The map min–max scaled to [0, 1] (zeros when flat)."""
        return normalize(self.data, spatial_dims=self.data.ndim)

    def peak(self) -> tuple[tuple[int, ...], np.ndarray]:
        """Voxel index of the maximum and its world position (RAS mm, shape (3,))."""
        voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(self.data)), self.data.shape))
        return voxel, self.space.voxel_to_world(np.asarray(voxel, dtype=float))

    def save(self, path: str | Path, *, like=None, normalized: bool = False) -> Path:
        """Write the map (raw float32, or normalized) as NIfTI on its grid; atomic."""
        from . import io

        data = self.normalized() if normalized else self.data
        io.write(path, data.astype(np.float32), self.space, like=like, descrip=self.descrip)
        return Path(path)


def input_space_of(result: Explanation, sample: int = 0) -> Space:
    """The input grid of an explanation, from the MetaTensor affine it kept.

    Raises
    ------
    SpaceError
        When the input was a plain tensor (no affine).
    """
    if result.input_affine is None:
        message = (
            "The explained input had no affine (a plain torch.Tensor), so its grid in the world is unknown. "
            "Pass input_space=Space(input_shape, affine), or preprocess with medcam3d.preprocess / MONAI so "
            "that the input is a MetaTensor."
        )
        raise SpaceError(message)
    affine = np.asarray(result.input_affine, dtype=np.float64)
    if affine.ndim == 3:
        affine = affine[sample]
    return Space(tuple(result.input_shape), affine)


def to_scanner_space(
    result: Explanation,
    scanner_space: Space | None = None,
    *,
    input_space: Space | None = None,
    sample: int = 0,
    fill: float = 0.0,
) -> list[Heatmap]:
    """Each explained map of one sample as a :class:`Heatmap` on the scan's grid.

    Parameters
    ----------
    result : Explanation
    scanner_space : Space, optional
        The scan's grid (``medcam3d.io.read`` or ``medcam3d.preprocess.preprocess`` give it).
        ``None`` keeps the maps on the feature grid, with its exact affine (tiny files that any
        viewer places correctly).
    input_space : Space, optional
        The model input's grid; default: from the MetaTensor the explainer saw.
    sample : int
        Which sample of the batch.
    fill : float
        Value of scan voxels outside the model's field of view.

    Returns
    -------
    list of Heatmap
        One per target, in ``result`` order.
    """
    if input_space is None:
        input_space = input_space_of(result, sample)
    if tuple(input_space.shape) != tuple(result.input_shape):
        message = f"input_space has shape {input_space.shape}, but the explained input was {result.input_shape}."
        raise SpaceError(message)
    grid = feature_space(input_space, result.feature_shape)
    maps = result.maps[sample].detach().float().cpu()
    data = maps.numpy() if scanner_space is None else resample(maps, grid, scanner_space, fill=fill).numpy()
    target_space = grid if scanner_space is None else scanner_space
    indices = result.class_indices[sample].tolist()
    names = result.class_names
    return [
        Heatmap(
            data=np.ascontiguousarray(data[t], dtype=np.float32),
            space=target_space,
            method=result.method,
            layer=result.layer,
            class_index=int(index),
            class_name=names[index] if names is not None and index < len(names) else None,
            score=float(result.scores[sample, t]),
        )
        for t, index in enumerate(indices)
    ]


def _safe(text: str) -> str:
    """Letters (any script), digits and ``._+-``; other runs become ``-``; never starts with a dot."""
    return re.sub(r"[^\w.+-]+", "-", unicodedata.normalize("NFC", text)).strip("-.") or "map"


def unique_file_labels(class_names: Sequence[str]) -> list[str]:
    """The file labels of ``class_names``; raises when two of them would name the same files.

    Raises
    ------
    ValueError
        Class names that repeat, or that clean up to the same file label (ignoring case), listed.
    """
    from .errors import ConfigError

    labels = [_safe(name) if name else f"class{i}" for i, name in enumerate(class_names)]
    seen: dict[str, list[str]] = {}
    for name, label in zip(class_names, labels):
        seen.setdefault(label.casefold(), []).append(name)
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    if clashes:
        listed = "; ".join(f"{v} -> {k!r}" for k, v in clashes.items())
        raise ConfigError(f"class_names would overwrite each other's files: {listed}. Give every class a distinct "
                          "name (letters, digits, '.', '_', '+', '-').")
    return labels


def save_heatmaps(
    heatmaps: Sequence[Heatmap],
    out_dir: str | Path,
    *,
    prefix: str = "heatmap",
    like=None,
    normalized: bool = True,
    four_d: bool = False,
) -> list[Path]:
    """Save heatmaps as NIfTI files in ``out_dir`` (created if needed).

    One file per class, ``<prefix>_<method>_<class>.nii.gz`` (raw float32), plus a
    ``..._norm.nii.gz`` copy scaled to [0, 1] when ``normalized``; or, with ``four_d``, one 4D file
    ``<prefix>_<method>.nii.gz`` with a volume per class, in order. Each write is atomic.

    Returns
    -------
    list of Path
        The files written.
    """
    from . import io

    if not heatmaps:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = heatmaps[0]
    if any(h.space != first.space for h in heatmaps):
        raise SpaceError("save_heatmaps needs all heatmaps on one grid; got several.")
    written: list[Path] = []
    stem = f"{_safe(prefix)}_{_safe(first.method)}"
    if four_d:
        labels = ",".join(h.label for h in heatmaps)
        descrip = f"medcam3d {first.method} layer={first.layer} classes={labels}"[:80]
        variants = [("", lambda h: h.data)] + ([("_norm", Heatmap.normalized)] if normalized else [])
        for suffix, values in variants:
            path = out / f"{stem}{suffix}.nii.gz"
            stacked = np.stack([values(h) for h in heatmaps]).astype(np.float32)
            io.write(path, stacked, first.space, like=like, descrip=descrip)
            written.append(path)
        return written
    for heatmap in heatmaps:
        path = out / f"{stem}_{heatmap.file_label}.nii.gz"
        written.append(heatmap.save(path, like=like))
        if normalized:
            written.append(heatmap.save(out / f"{stem}_{heatmap.file_label}_norm.nii.gz", like=like, normalized=True))
    return written
