"""What every settings record shares: its fields checked one way, and its JSON form.

One concept: the settings records (:class:`medcam3d.segment_records.SegmentSettings`,
:class:`medcam3d.weak.SeedSettings`, :class:`medcam3d.weak.TrainSettings`,
:class:`medcam3d.weak.SegmenterSettings`) are frozen dataclasses built on :class:`Settings`
(``to_dict``), and check their numeric fields in ``__post_init__`` with the rules here, each rule
with one error text. A failed check raises a :class:`~medcam3d.errors.UsageError` that names the
field, the rule and the value given, e.g. ``"margin_mm must be a finite number >= 0, not -1.0."``;
``prefix`` puts the record's name in front (``"seed setting "``). Booleans are not numbers here
(``True`` is no margin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np

from .errors import UsageError

__all__ = ["Settings", "check_number", "check_numbers", "check_range", "check_whole"]


class Settings:
    """The base of a settings record (a frozen dataclass): its fields as a JSON-ready dict."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # set by @dataclass on each record

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_number(value: object, name: str, *, minimum: float = 0.0, note: str = "", prefix: str = "") -> float:
    """``value`` as a float, if it is a finite number ``>= minimum``.

    Parameters
    ----------
    note : str
        Said after the rule, e.g. ``" (background_distance)"``.

    Raises
    ------
    UsageError
        ``"<prefix><name> must be a finite number >= <minimum><note>, not <value>."``
    """
    if not (_is_real(value) and math.isfinite(float(value)) and float(value) >= minimum):  # type: ignore[arg-type]
        raise UsageError(f"{prefix}{name} must be a finite number >= {minimum:g}{note}, not {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_numbers(record: object, names: Iterable[str], *, minimum: float = 0.0, prefix: str = "") -> None:
    """:func:`check_number` on each named attribute of ``record``."""
    for name in names:
        check_number(getattr(record, name), name, minimum=minimum, prefix=prefix)


def check_range(value: object, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                note: str = "", prefix: str = "") -> float:
    """``value`` as a float, if it lies in the interval from ``low`` to ``high``.

    Parameters
    ----------
    low_open, high_open : bool
        Exclude that end (``(0, 1]`` is ``low_open=True``).
    note : str
        Said after the interval, e.g. ``" (e.g. 0.9)"`` or ``": background seeds lie below it"``.

    Raises
    ------
    UsageError
        ``"<prefix><name> must lie in [low, high)<note>, not <value>."``
    """
    number = float(value) if _is_real(value) else math.nan  # type: ignore[arg-type]
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):  # NaN fails both
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(f"{prefix}{name} must lie in {interval}{note}, not {value!r}.")
    return number


def check_whole(value: object, name: str, *, minimum: int = 1, prefix: str = "") -> int:
    """``value`` as an int, if it is a whole number (an int, not a bool) ``>= minimum``.

    Raises
    ------
    UsageError
        ``"<prefix><name> must be a whole number >= <minimum>, not <value>."``
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise UsageError(f"{prefix}{name} must be a whole number >= {minimum}, not {value!r}.")
    return int(value)
