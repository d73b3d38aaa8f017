"""Heatmaps: normalization, placement in scanner space, and saving.

A :class:`Heatmap` is one class's map on a grid (a :class:`~medcam3d.space.Space`) with its
provenance. :func:`to_scanner_space` takes an :class:`~medcam3d.explanation.Explanation` and
resamples each map in one trilinear step, straight from the feature grid to the scan's own grid
and affine (docs/architecture.md §3): no full-size intermediate at input resolution, no replay of the
preprocessing. Normalization is a separate, explicit step; raw values are kept. Maps seen on the
scan's grid without resampling the whole volume, and their NIfTI files: :mod:`medcam3d.scan_maps`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch

from .space import Space, SpaceError, feature_space, resample

if TYPE_CHECKING:
    from .explanation import Explanation

__all__ = ["Heatmap", "ClassMaps", "normalize", "to_scanner_space", "feature_maps", "heatmaps_of", "heatmap_list",
           "input_space_of", "feature_space_of", "file_label", "unique_file_labels"]

@overload
def normalize(maps: torch.Tensor, *, spatial_dims: int | None = None, eps: float = 1e-8) -> torch.Tensor: ...
@overload
def normalize(maps: np.ndarray, *, spatial_dims: int | None = None, eps: float = 1e-8) -> np.ndarray: ...
def normalize(maps: torch.Tensor | np.ndarray, *, spatial_dims: int | None = None,
              eps: float = 1e-8) -> torch.Tensor | np.ndarray:
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
    placement : {"receptive_field", "align_corners"} or None
        How the feature grid was placed on the input (:attr:`Explanation.placement`); recorded in
        :attr:`descrip` as ``place=rf`` or ``place=ac``.
    """

    data: np.ndarray
    space: Space
    method: str
    layer: str
    class_index: int
    class_name: str | None = None
    score: float | None = None
    placement: str | None = None

    @property
    def label(self) -> str:
        """Class name, or ``class<i>``."""
        return self.class_name if self.class_name else f"class{self.class_index}"

    @property
    def file_label(self) -> str:
        """:attr:`label` made safe for file names."""
        return file_label(self.label)

    @property
    def descrip(self) -> str:
        """Text for the NIfTI ``descrip`` field (at most 80 bytes): method, layer, class and placement
        (``place=rf``: receptive-field centres, ``place=ac``: the align_corners convention; kept when the
        text is cut to 80 bytes)."""
        text = f"medcam3d {self.method} layer={self.layer} class={self.class_index}:{self.label}"
        suffix = f" place={_PLACEMENT_CODES[self.placement]}" if self.placement in _PLACEMENT_CODES else ""
        return text.encode("ascii", "replace")[: 80 - len(suffix)].decode("ascii") + suffix

    def normalized(self) -> np.ndarray:
        """The map min–max scaled to [0, 1] (zeros when flat)."""
        return normalize(self.data, spatial_dims=self.data.ndim)

    def peak(self) -> tuple[tuple[int, ...], np.ndarray] | None:
        """Voxel index of the maximum (the first in C order) and its world position (RAS mm, shape (3,)).

        ``None`` when the map is flat (all values equal: all zero, say, a ReLU'd negative map): a
        flat map has no peak. The same rule as :meth:`medcam3d.scan_maps.ScanGridMap.peak` and
        :func:`medcam3d.masks.peak` (NaN values are ignored).

        Returns
        -------
        (voxel, world) or None
            ``voxel``: tuple of int; ``world``: (3,) RAS mm of that voxel's centre.
        """
        from .masks import peak

        found = peak(self.data, self.space)
        return None if found is None else (found[0], np.asarray(found[1], dtype=np.float64))

    def save(self, path: str | Path, *, like=None, normalized: bool = False) -> Path:
        """Write the map (raw float32, or normalized) as NIfTI on its grid; atomic."""
        from . import io

        data = self.normalized() if normalized else self.data
        io.write(path, data.astype(np.float32), self.space, like=like, descrip=self.descrip)
        return Path(path)


#: The placement codes written in ``descrip`` (see :attr:`Heatmap.descrip`).
_PLACEMENT_CODES = {"receptive_field": "rf", "align_corners": "ac"}


def feature_space_of(result: Explanation, input_space: Space | None = None, sample: int = 0) -> Space:
    """The feature grid of an explanation's maps: placed by its receptive field (``placement=
    "receptive_field"``) or by the align_corners convention (:func:`medcam3d.space.feature_space`).

    Parameters
    ----------
    result : Explanation
    input_space : Space, optional
        The model input's grid; default: from the MetaTensor the explainer saw.
    sample : int
    """
    if input_space is None:
        input_space = input_space_of(result, sample)
    if tuple(input_space.shape) != tuple(result.input_shape):
        message = f"input_space has shape {input_space.shape}, but the explained input was {result.input_shape}."
        raise SpaceError(message)
    placed = getattr(result, "receptive_field", None) if getattr(result, "placement", None) == "receptive_field" else None
    return feature_space(input_space, result.feature_shape, receptive_field=placed)


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


class ClassMaps(Mapping):
    """One sample's heatmaps by class: ``maps["nodule"]`` or ``maps[5]`` (the class index).

    What :func:`to_scanner_space` and :meth:`Explanation.to_scanner_space
    <medcam3d.explanation.Explanation.to_scanner_space>` return: a mapping, so **iterating yields
    keys, not heatmaps** (``for name in maps``, ``list(maps)``); use ``maps.values()`` or
    :meth:`list` for the :class:`Heatmap` objects, ``maps.items()`` for both, all in the order the
    classes were explained.

    Keys are the class names when every explained class has its own name, else the class indices
    as ``int`` (no names, or only some classes named, or two with one name). Lookup takes either in
    every case: a class's name where it has one, and its index as an ``int`` (always the class
    index, never a position in the target list). A class explained twice in one target list
    appears once (the last).

    Parameters
    ----------
    heatmaps : sequence of Heatmap
    """

    def __init__(self, heatmaps: Sequence[Heatmap]) -> None:
        self._by_index: dict[int, Heatmap] = {}
        for heat in heatmaps:
            self._by_index.pop(heat.class_index, None)
            self._by_index[heat.class_index] = heat

    def _names(self) -> list[str] | None:
        """The class names in order, when every class has its own name; else None (keys are indices)."""
        names = [heat.class_name for heat in self._by_index.values()]
        if not all(names) or len(set(names)) != len(names):
            return None
        return names  # type: ignore[return-value]

    def __getitem__(self, key: object) -> Heatmap:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if int(key) in self._by_index:
                return self._by_index[int(key)]
        elif isinstance(key, str):
            named = [heat for heat in self._by_index.values() if heat.class_name == key]
            if named:
                return named[-1]
        shown = ", ".join(repr(k) for k in self) or "none"
        message = (
            f"no map for class {key!r}: these maps are for {shown} (a class name, or its index as an int; "
            "explain it with target=... to get its map)."
        )
        raise KeyError(message)

    def __iter__(self) -> Iterator:
        names = self._names()
        return iter(list(self._by_index) if names is None else names)

    def __len__(self) -> int:
        return len(self._by_index)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __repr__(self) -> str:
        return f"ClassMaps({list(self)!r})"

    def list(self) -> list[Heatmap]:
        """The heatmaps in the order the classes were explained."""
        return list(self._by_index.values())


def heatmap_list(heatmaps: Sequence[Heatmap] | Mapping[Any, Heatmap]) -> list[Heatmap]:
    """The heatmaps of a :class:`ClassMaps` (or any mapping) in order, or of a sequence, as a list."""
    return list(heatmaps.values()) if isinstance(heatmaps, Mapping) else list(heatmaps)


def heatmaps_of(
    result: Explanation,
    scanner_space: Space | None = None,
    *,
    input_space: Space | None = None,
    sample: int = 0,
    fill: float = 0.0,
) -> list[Heatmap]:
    """Each explained map of one sample as a :class:`Heatmap`, in target order: the list behind
    :func:`to_scanner_space` (same parameters) and :func:`feature_maps` (``scanner_space=None``:
    the feature grid, with its exact affine).

    Returns
    -------
    list of Heatmap
        One per target, in ``result`` order (a class explained twice appears twice).
    """
    grid = feature_space_of(result, input_space, sample)
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
            placement=getattr(result, "placement", None),
        )
        for t, index in enumerate(indices)
    ]


def to_scanner_space(
    result: Explanation,
    scanner_space: Space,
    *,
    input_space: Space | None = None,
    sample: int = 0,
    fill: float = 0.0,
) -> ClassMaps:
    """Each explained class's map of one sample on the scan's own grid and affine.

    One trilinear step from the feature grid (placed at the receptive-field centres, or by the
    convention the explanation names) to the scan's grid.

    Parameters
    ----------
    result : Explanation
    scanner_space : Space
        The scan's grid (``medcam3d.io.read_space``, ``medcam3d.io.read`` or
        ``medcam3d.preprocess.preprocess`` give it). For the maps on the feature grid instead,
        use :func:`feature_maps`.
    input_space : Space, optional
        The model input's grid; default: from the MetaTensor the explainer saw.
    sample : int
        Which sample of the batch.
    fill : float
        Value of scan voxels outside the model's field of view.

    Returns
    -------
    ClassMaps
        ``maps["class name"]`` or ``maps[class_index]``: a :class:`Heatmap` on ``scanner_space``.
    """
    if scanner_space is None:
        message = (
            "to_scanner_space needs the scan's grid (a Space: medcam3d.io.read_space(path), or the second value "
            "of medcam3d.preprocess.preprocess); for the maps on the feature grid use feature_maps() instead."
        )
        raise TypeError(message)
    return ClassMaps(heatmaps_of(result, Space.of(scanner_space), input_space=input_space, sample=sample, fill=fill))


def feature_maps(result: Explanation, *, input_space: Space | None = None, sample: int = 0) -> ClassMaps:
    """Each explained class's map of one sample on its feature grid, with that grid's exact affine.

    Tiny arrays (``(d, v, u)``) that any viewer places correctly in the world; see
    :func:`to_scanner_space` for the parameters.
    """
    return ClassMaps(heatmaps_of(result, input_space=input_space, sample=sample))


def file_label(text: str) -> str:
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

    labels = [file_label(name) if name else f"class{i}" for i, name in enumerate(class_names)]
    seen: dict[str, list[str]] = {}
    for name, label in zip(class_names, labels):
        seen.setdefault(label.casefold(), []).append(name)
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    if clashes:
        listed = "; ".join(f"{v} -> {k!r}" for k, v in clashes.items())
        raise ConfigError(f"class_names would overwrite each other's files: {listed}. Give every class a distinct "
                          "name (letters, digits, '.', '_', '+', '-').")
    return labels
