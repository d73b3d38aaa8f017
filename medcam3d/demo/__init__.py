"""Reproducible demo data: synthetic CT-like phantoms with lesions, and a small trained model.

:mod:`medcam3d.demo.synthetic` samples labelled phantoms on any grid; :mod:`medcam3d.demo.train`
(``python -m medcam3d.demo.train --out data_samples``) trains the demo classifier and writes the
shipped sample cases. See ``data_samples/README.md``.
"""

from __future__ import annotations

from .synthetic import (
    CLASS_NAMES,
    MODEL_SHAPE,
    MODEL_SPACING_MM,
    PREPROCESSING,
    make_case,
    make_phantom,
    model_grid,
    sample_grids,
    scale_intensity,
)

__all__ = [
    "CLASS_NAMES",
    "MODEL_SHAPE",
    "MODEL_SPACING_MM",
    "PREPROCESSING",
    "make_case",
    "make_phantom",
    "model_grid",
    "sample_grids",
    "scale_intensity",
]
