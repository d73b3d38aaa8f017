"""Explanation methods (the strategies the :class:`~medcam3d.explainer.Explainer` runs), one file each,
and the registry that names them (``METHODS``, ``get_method``).

Two kinds answer two questions:

* *Where the model's evidence is* (faithful to the model, on a layer's feature grid): the CAM family
  (``hirescam`` … ``eigencam``), ``fused`` (several stages on the finest one) and ``scorecam``.
* *Where in the patient* (on the input's voxels, class by class): ``gradxinput``, ``smoothgrad``,
  ``integrated_gradients``, and ``occlusion`` as a gradient-free reference.

Methods with parameters are used as instances: ``Explainer(model, method=SmoothGrad(samples=32))``.
"""

from __future__ import annotations

import ast
import difflib
import inspect

from ..errors import MethodNotFoundError, UsageError
from .base import Method, MethodContext
from .cam import CAM
from .eigen_cam import EigenCAM
from .fused import FusedCAM
from .grad_cam import GradCAM
from .grad_cam_pp import GradCAMPlusPlus
from .gradxinput import GradientXInput
from .hires_cam import HiResCAM
from .integrated_gradients import IntegratedGradients
from .layer_cam import LayerCAM
from .occlusion import Occlusion
from .scorecam import ScoreCAM
from .smoothgrad import SmoothGrad
from .xgrad_cam import XGradCAM

__all__ = [
    "METHODS",
    "get_method",
    "split_methods",
    "DEFAULT_METHOD",
    "Method",
    "MethodContext",
    "CAM",
    "GradCAM",
    "HiResCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "EigenCAM",
    "FusedCAM",
    "GradientXInput",
    "SmoothGrad",
    "IntegratedGradients",
    "Occlusion",
    "ScoreCAM",
]

#: Registry: name -> method class. Keys are lowercase.
METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (HiResCAM, GradCAM, CAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM,
                FusedCAM, GradientXInput, SmoothGrad, IntegratedGradients, Occlusion, ScoreCAM)
}
DEFAULT_METHOD = "hirescam"


def _normal(name: str) -> str:
    """A name as users may type it, compared without case, spaces, ``_`` and ``-``."""
    return name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")


# Common spellings users type (normalized), mapped to registry keys.
_ALIASES = {
    "gradcampp": "gradcam++", "gradcamplusplus": "gradcam++",
    "gradientxinput": "gradxinput", "gradienttimesinput": "gradxinput", "inputxgradient": "gradxinput",
    "ig": "integrated_gradients", "integratedgradient": "integrated_gradients",
    "fusedcam": "fused", "multilayer": "fused",
}


def split_methods(text: str) -> list[str]:
    """A comma-separated list of method specifications, split at the commas outside parentheses.

    >>> split_methods("hirescam, occlusion(patch=16, stride=8)")
    ['hirescam', 'occlusion(patch=16, stride=8)']
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _parameters(name: str, text: str) -> dict[str, object]:
    """``key=value, ...`` of a method specification, values as Python literals."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args:
        raise UsageError(f"Cannot read the parameters of {name}({text}): write them as key=value pairs, e.g. "
                         "occlusion(patch=16, stride=8).")
    values = {}
    for keyword in call.keywords:
        try:
            values[str(keyword.arg)] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise UsageError(f"The value of {keyword.arg} in {name}({text}) is not a number, string, list or "
                             "None; give a literal, e.g. samples=32.") from None
    return values


def get_method(name: str | Method) -> Method:
    """Return a method instance by registry name, or from a specification with parameters.

    Parameters
    ----------
    name : str or Method
        One of :data:`METHODS` (case, spaces, ``-`` and ``_`` are ignored), optionally with
        parameters of its constructor as Python literals, e.g. ``"smoothgrad(samples=32)"`` or
        ``"occlusion(patch=16, stride=8)"`` (what the CLI's ``--method`` accepts); or a
        :class:`Method` instance, which is returned as is.

    Raises
    ------
    MethodNotFoundError
        For an unknown name; the message suggests the closest names.
    UsageError
        For parameters the method does not take or values it refuses.
    """
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        message = f"method must be a name (str) or a Method, not {type(name).__name__}."
        raise TypeError(message)
    text = name.strip()
    options: dict[str, object] = {}
    if text.endswith(")") and "(" in text:
        text, _, arguments = text[:-1].partition("(")
        options = _parameters(text.strip(), arguments)
    found = _lookup(text)
    cls = METHODS[found]
    if not options:
        return cls()
    signature = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in signature if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        takes = f"its parameters are {', '.join(accepted)}" if accepted else "it takes none"
        raise UsageError(f"Method {found!r} has no parameter {unknown[0]!r}: {takes}.")
    try:
        return cls(**options)
    except TypeError as error:
        raise UsageError(f"Method {found!r} cannot be built with {options}: {error}.") from None


def _lookup(name: str) -> str:
    """The registry key for a method name as typed (see :func:`get_method`)."""
    key = _normal(name)
    names = {_normal(registered): registered for registered in METHODS}
    found = names.get(key) or _ALIASES.get(key)
    if found is not None:
        return found
    close = difflib.get_close_matches(name.strip().lower(), list(METHODS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    message = f"Unknown method {name!r}.{hint} Available methods: {', '.join(METHODS)}."
    raise MethodNotFoundError(message)
