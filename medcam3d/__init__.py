"""medcam3d: class activation maps for 3D medical-imaging CNNs, in the scanner's own space.

>>> import medcam3d                                                     # doctest: +SKIP
>>> explainer = medcam3d.Explainer(model, method="hirescam", layer="auto")  # doctest: +SKIP
>>> result = explainer(x, target="all")                                 # doctest: +SKIP

``import medcam3d`` is cheap: torch and MONAI are imported on first use of a name that needs them
(PEP 562 module ``__getattr__``), so ``medcam3d --help`` and ``medcam3d.__version__`` stay fast.
``from medcam3d import Explainer`` and submodules such as ``medcam3d.space`` work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it (imported on first access).
_LAZY = {
    "Explainer": "explainer",
    "Explanation": "explanation",
    "METHODS": "methods",
    "get_method": "methods",
    "Medcam3dError": "errors",
    "list_layers": "layers",
    "LayerInfo": "layers",
    "ReceptiveField": "receptive_field",  # the function is medcam3d.layers.receptive_field (this name is its module)
    "normalize": "heatmap",
    "Region": "targets",
    "InputError": "errors",
    "LayerError": "errors",
    "LayerNotFoundError": "errors",
    "MethodNotFoundError": "errors",
    "TargetError": "errors",
    "TargetIndexError": "errors",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs (``import X as X``: a re-export); at run time the names load lazily
    from .errors import InputError as InputError
    from .errors import LayerError as LayerError
    from .errors import LayerNotFoundError as LayerNotFoundError
    from .errors import Medcam3dError as Medcam3dError
    from .errors import MethodNotFoundError as MethodNotFoundError
    from .errors import TargetError as TargetError
    from .errors import TargetIndexError as TargetIndexError
    from .explainer import Explainer as Explainer
    from .explanation import Explanation as Explanation
    from .heatmap import normalize as normalize
    from .layers import LayerInfo as LayerInfo
    from .layers import list_layers as list_layers
    from .receptive_field import ReceptiveField as ReceptiveField
    from .methods import METHODS as METHODS
    from .methods import get_method as get_method
    from .targets import Region as Region


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # e.g. medcam3d.space, medcam3d.io
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
