"""The ``medcam3d`` command's argument types: each turns a word into a value or a clear usage error
(``argparse.ArgumentTypeError``)."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (a clear usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {minimum} or more")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)


non_negative_int = int_at_least(0)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def voxel_limit(text: str) -> int | None:
    from ..config import parse_count

    try:
        return parse_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def memory_limit(text: str) -> int | None:
    from ..config import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def expansion_limit(text: str) -> float | None:
    """A positive number, or ``none`` (no limit)."""
    if text.strip().lower() in ("none", "inf", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', not {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', not {text!r}")
    return value


def open_fraction(text: str) -> float:
    value = fraction(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1)")
    return value


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


NO_REACH = "none"


def reach(text: str) -> float | str:
    """``--background-reach``: a number of voxels >= 0, or ``none``."""
    if text.strip().lower() == NO_REACH:
        return NO_REACH
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of voxels or 'none', not {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of voxels >= 0 or 'none', not {text!r}")
    return value
