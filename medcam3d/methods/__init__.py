"""CAM methods (the strategies the :class:`~medcam3d.explainer.Explainer` runs), one file each, and
the registry that names them. ``EXPLAINERS``/``get_explainer`` are the older names of
``METHODS``/``get_method``."""

from __future__ import annotations

import difflib

from ..errors import MethodNotFoundError
from .base import Method, MethodContext
from .cam import CAM
from .eigen_cam import EigenCAM
from .grad_cam import GradCAM
from .grad_cam_pp import GradCAMPlusPlus
from .hires_cam import HiResCAM
from .layer_cam import LayerCAM
from .xgrad_cam import XGradCAM

__all__ = [
    "METHODS",
    "get_method",
    "EXPLAINERS",
    "DEFAULT_METHOD",
    "get_explainer",
    "Method",
    "MethodContext",
    "CAM",
    "GradCAM",
    "HiResCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "EigenCAM",
]

#: Registry: name -> method class. Keys are lowercase.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (HiResCAM, GradCAM, CAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM)
}
EXPLAINERS = METHODS  # the older name
DEFAULT_METHOD = "hirescam"

# Common spellings users type, mapped to registry keys.
_ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam", "hires-cam": "hirescam"}


def get_method(name: str | Method) -> Method:
    """Return a method instance by registry name.

    Parameters
    ----------
    name : str or Method
        One of :data:`EXPLAINERS` (case, ``-`` and ``_`` are ignored), or a
        :class:`Method` instance, which is returned as is.

    Raises
    ------
    MethodNotFoundError
        For an unknown name; the message suggests the closest names.
    """
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        message = f"method must be a name (str) or a Method, not {type(name).__name__}."
        raise TypeError(message)
    key = name.strip().lower().replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key.replace("-", "") if key.replace("-", "") in EXPLAINERS else key)
    if key in EXPLAINERS:
        return EXPLAINERS[key]()
    close = difflib.get_close_matches(key, list(EXPLAINERS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    message = f"Unknown method {name!r}.{hint} Available methods: {', '.join(EXPLAINERS)}."
    raise MethodNotFoundError(message)


get_explainer = get_method  # the older name
