"""Sample data: the shipped demo cases (File > Open Sample > medcam3d).

*demo case* is the first row of ``data_samples/cases.csv`` of a source checkout (or the first
``data_samples/case_*.nii.gz``); *oblique demo case* is the first row whose ``grid`` column says
``oblique`` (a scan tilted 10 degrees, shown resampled onto an axis-aligned grid). Each comes with
its lesion label map when there is one. Without the folder (e.g. an installed wheel) a case is
generated with :mod:`medcam3d.demo.synthetic`, on a scanner-like LPS grid (tilted for the oblique
case).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

import medcam3d

from .. import io
from ..space import Space
from ._grid import layer_grid, napari_affine, resample_labels
from ._scan import image_layer_data
from ._view import AXIS_LABELS, UNITS, open_axial_when_added
from ._writer import prefer_medcam3d_writers

__all__ = ["demo_case", "oblique_case", "find_demo_case", "DATA_SAMPLES"]

logger = logging.getLogger(__name__)

#: The sample folder of a source checkout.
DATA_SAMPLES = Path(medcam3d.__file__).parent.parent / "data_samples"
_NIFTI = (".nii.gz", ".nii")


def _is_image(text: str) -> bool:
    return text.strip().lower().endswith(io.READ_FORMATS)


def _mask_for(image: Path) -> Path | None:
    for suffix in _NIFTI:
        if image.name.endswith(suffix):
            candidate = image.with_name(image.name[: -len(suffix)] + "_mask" + suffix)
            return candidate if candidate.is_file() else None
    return None


def find_demo_case(folder: str | Path | None = None, *, oblique: bool = False) -> tuple[Path, Path | None] | None:
    """The demo scan and its label map (or None) in ``folder``; None when there is no case.

    ``folder`` defaults to :data:`DATA_SAMPLES`.

    Reads ``cases.csv`` (first row with an existing image: a column named ``image``/``path``/
    ``scan``, else the first cell that names an image file that is not a mask; a column named
    ``mask``/``labels``/``label`` for the label map), else takes the first ``case_*`` image.
    With ``oblique=True`` only rows whose ``grid`` cell contains ``oblique`` count, and there is
    no fallback to file names.
    """
    folder = Path(DATA_SAMPLES if folder is None else folder)
    table = folder / "cases.csv"
    if table.is_file():
        try:
            with open(table, newline="", encoding="utf-8") as stream:
                rows = list(csv.DictReader(stream))
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            logger.warning("cannot read %s: %s", table, error)
            rows = []
        for row in rows:
            cells = {str(k).strip().lower(): str(v or "").strip() for k, v in row.items() if k is not None}
            if oblique and "oblique" not in cells.get("grid", "").lower():
                continue
            image = next((cells[k] for k in ("image", "path", "scan", "file") if _is_image(cells.get(k, ""))), None)
            if image is None:
                image = next((v for v in cells.values() if _is_image(v) and "mask" not in Path(v).name.lower()), None)
            if image is None or not (folder / image).exists():
                continue
            mask = next((cells[k] for k in ("mask", "labels", "label", "lesions") if _is_image(cells.get(k, ""))), None)
            mask_path = folder / mask if mask and (folder / mask).is_file() else _mask_for(folder / image)
            return folder / image, mask_path
    if oblique:
        return None
    for candidate in sorted(folder.glob("case_*")):
        if _is_image(candidate.name) and "_mask" not in candidate.name:
            return candidate, _mask_for(candidate)
    return None


def _lesions_layer(labels: np.ndarray, space: Space, name: str, path: str | None, scan: tuple) -> tuple:
    """The lesion label map on the grid its scan is shown on (nearest neighbour when resampled)."""
    scan_meta = scan[1]["metadata"]
    labels = np.asarray(labels).astype(np.uint8)
    if scan_meta["resampled"]:
        shape = scan[0][0].shape if isinstance(scan[0], list) else scan[0].shape  # a multiscale scan: level 0
        display = Space(shape, scan_meta["affine"])
        data, axes = resample_labels(labels, space, display), None
    else:
        data, _, axes = layer_grid(labels, space)
    metadata = {**{k: scan_meta[k] for k in ("affine", "resampled", "file_shape", "file_affine")},
                "axes": axes, "path": path, "medcam3d": "lesions"}
    kwargs = {"name": name, "affine": napari_affine(metadata["affine"], data.ndim), "metadata": metadata,
              "opacity": 0.7, "visible": False, "axis_labels": AXIS_LABELS[: data.ndim], "units": UNITS[: data.ndim]}
    return data, kwargs, "labels"


def demo_case() -> list[tuple]:
    """The demo scan (image layer) and its lesion labels (labels layer, hidden).

    Returns
    -------
    list of napari layer data tuples
        Placed in RAS mm like :func:`medcam3d.napari._reader.read_image`; the labels are 1 for
        ``bright_round`` and 2 for ``dark_elongated`` (label ``c + 1`` = class ``c``).
    """
    return _case(oblique=False)


def oblique_case() -> list[tuple]:
    """The oblique demo scan (shown resampled onto an axis-aligned grid) and its lesion labels.

    Returns
    -------
    list of napari layer data tuples
        As :func:`demo_case`; the scan's ``metadata["resampled"]`` is True.
    """
    return _case(oblique=True)


def _case(oblique: bool) -> list[tuple]:
    from ..jobs.case_ids import case_id_of

    open_axial_when_added()
    prefer_medcam3d_writers()
    found = find_demo_case(oblique=oblique)
    if found is not None:
        image_path, mask_path = found
        name = case_id_of(image_path)
        array, space = io.read(image_path, dtype=None)
        layers = [image_layer_data(array, space, name=name, path=image_path)]
        if mask_path is not None:
            labels, label_space = io.read(mask_path, dtype=None)
            if label_space.isclose(space, atol=1e-3):
                layers.append(_lesions_layer(labels, label_space, f"{name} lesions", str(mask_path), layers[0]))
        return layers
    # No sample folder (an installed package): generate the same kind of case.
    from ..demo import synthetic

    logger.info("no demo case under %s; generating a synthetic one", DATA_SAMPLES)
    grid = "lps_oblique" if oblique else "lps_aniso"
    name = "demo_oblique_case" if oblique else "demo_case"
    space = synthetic.sample_grids(align=False)[grid]
    image, labels, _ = synthetic.make_case(1, space, present=(True, True))
    scan = image_layer_data(image, space, name=name)
    return [scan, _lesions_layer(labels, space, f"{name} lesions", None, scan)]
