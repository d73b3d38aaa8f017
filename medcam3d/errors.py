"""Error types of medcam3d.

Each subclasses a builtin so that callers can catch the usual exception
(``ValueError``, ``IndexError`` ...) and each message says what was wrong,
what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "MethodNotFoundError",
    "LayerNotFoundError",
    "LayerError",
    "TargetError",
    "TargetIndexError",
    "InputError",
]


class MethodNotFoundError(KeyError, ValueError):
    """An explainer name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(KeyError, ValueError):
    """A target layer name or module that is not part of the model."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LayerError(ValueError):
    """A target layer that exists but cannot be explained (not spatial, not used, ...)."""


class TargetError(ValueError):
    """A target (class, classes, region) that does not fit the model's output."""


class TargetIndexError(TargetError, IndexError):
    """A class index outside the model's output range."""


class InputError(ValueError):
    """An input tensor with the wrong shape, dtype or non-finite values."""
