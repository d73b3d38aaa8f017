"""medcam3d: class activation maps for 3D medical-imaging CNNs, in the scanner's own space.

>>> import medcam3d                                                     # doctest: +SKIP
>>> explainer = medcam3d.Explainer(model, method="hirescam", layer="auto")  # doctest: +SKIP
>>> result = explainer(x, target="all")                                 # doctest: +SKIP
"""

from __future__ import annotations

from .errors import (
    InputError,
    LayerError,
    LayerNotFoundError,
    MethodNotFoundError,
    TargetError,
    TargetIndexError,
)
from .explainer import Explainer, Explanation
from .explainers import EXPLAINERS, get_explainer
from .heatmap import normalize
from .layers import LayerInfo, list_layers
from .targets import Region

__version__ = "0.1.0"

__all__ = [
    "Explainer",
    "Explanation",
    "EXPLAINERS",
    "get_explainer",
    "list_layers",
    "LayerInfo",
    "normalize",
    "Region",
    "InputError",
    "LayerError",
    "LayerNotFoundError",
    "MethodNotFoundError",
    "TargetError",
    "TargetIndexError",
]
