"""Values a config or a command line gives, checked: counts and memory sizes (``1e9``, ``2**30``,
``16GiB``, ``none``) and plain data (what a config may pass to code without trust)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import short_repr

__all__ = ["parse_count", "parse_size", "plain_data_problem", "MAX_CONFIG_DEPTH"]

#: Deepest nesting of lists and mappings in a config.
MAX_CONFIG_DEPTH = 50

#: Leading characters that MONAI's ConfigParser evaluates: ``$`` Python expression, ``@`` reference,
#: ``%`` macro (another file's content).
_EXPRESSION_PREFIXES = ("$", "@", "%")
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def parse_count(text: str | int | None) -> int | None:
    """A limit given as a count: a positive int (``1073741824``, ``1e9``, ``2**30``), or ``none``/``0`` for no limit.

    Raises
    ------
    ValueError
        Anything else (the message says what is accepted).
    """
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        value = text
    else:
        word = str(text).strip().lower().replace("_", "").replace(",", "")
        if word in ("none", "0", "off", "unlimited"):
            return None
        try:
            if word.startswith("2**"):
                value = 2 ** int(word[3:])
            else:
                number = float(word)
                value = int(number) if number == int(number) else -1
        except (ValueError, OverflowError):
            raise ValueError(f"expected a positive whole number (e.g. 1073741824, 1e9 or 2**30) or 'none', not {short_repr(text)}") from None
    if value is None or value == 0:
        return None
    if value < 0:
        raise ValueError(f"expected a positive whole number (e.g. 1073741824, 1e9 or 2**30) or 'none', not {short_repr(text)}")
    return int(value)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
               "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4}


def parse_size(text: str | int | None) -> int | None:
    """A memory limit in bytes: ``16GiB``, ``16G`` (both 2^30-based), ``16GB`` (10^9), ``512MiB``, a
    number of bytes, or ``none``/``0`` for no limit.

    Raises
    ------
    ValueError
        Anything else (the message says what is accepted).
    """
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return None if not text else _positive_size(text, text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if str(text).strip().lower() in ("none", "off", "unlimited"):
        return None
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 16GiB, 16G, 500MB or a number of bytes, or 'none', not {short_repr(text)}")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return None if value == 0 else _positive_size(int(value), text)


def _positive_size(value: int, text: object) -> int:
    if value < 1:
        raise ValueError(f"expected a positive size such as 16GiB, or 'none', not {short_repr(text)}")
    return int(value)


def plain_data_problem(value: object, key: str) -> tuple[str, str] | None:
    """Why ``value`` is not plain data a config may give without trust, or None if it is.

    Plain data is numbers, strings, booleans, None, and lists, tuples and mappings of those, with
    string keys. Refused: any other type (callables, classes, bytes, sets, dates ...); mapping keys
    that start with ``_`` (MONAI-bundle directives such as ``_target_``, ``_requires_``,
    ``_disabled_``, ``_mode_``, ``_desc_``, ``__path``) or with ``$``/``@``/``%``; strings that start
    with ``$``, ``@`` or ``%`` (expressions, references and macros that MONAI's ConfigParser
    evaluates); nesting deeper than :data:`MAX_CONFIG_DEPTH` or a structure that contains itself.

    Parameters
    ----------
    value : object
        The value from the config.
    key : str
        Its dotted key (``model.args``, ``preprocessing[2].pixdim``), used in the answer.

    Returns
    -------
    (str, str) or None
        The innermost offending key (e.g. ``model.args.act``) and the reason, or None.
    """
    return _plain_problem(value, key, 0, set())


def _plain_problem(value: object, key: str, depth: int, active: set[int]) -> tuple[str, str] | None:
    if depth > MAX_CONFIG_DEPTH:
        return key, f"nested more than {MAX_CONFIG_DEPTH} levels deep"
    if isinstance(value, str):
        if value.startswith(_EXPRESSION_PREFIXES):
            reason = (
                f"the string {short_repr(value)} starts with {value[0]!r}, which MONAI's ConfigParser evaluates "
                "(`$` runs a Python expression, `@` references another entry, `%` pulls in another file)"
            )
            return key, reason
        return None
    if isinstance(value, _PLAIN_SCALARS):
        return None
    if not isinstance(value, (list, tuple, Mapping)):
        return key, f"a {type(value).__name__} ({short_repr(value)}) is not plain data (numbers, strings, booleans, null, lists, mappings)"
    if id(value) in active:
        return key, "the value contains itself"
    active.add(id(value))
    try:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if not isinstance(name, str):
                    return key, f"the key {short_repr(name)} is a {type(name).__name__}; keys must be strings"
                if name.startswith("_"):
                    reason = (
                        "keys starting with '_' are directives (in MONAI bundles _target_ imports and calls a "
                        "callable, _requires_/_disabled_/_mode_/_desc_ control the call, __path names a callable)"
                    )
                    return f"{key}.{name}", reason
                if name.startswith(_EXPRESSION_PREFIXES):
                    return f"{key}.{name}", f"keys starting with {name[0]!r} are evaluated by MONAI's ConfigParser"
                problem = _plain_problem(item, f"{key}.{name}", depth + 1, active)
                if problem:
                    return problem
        else:
            for index, item in enumerate(value):
                problem = _plain_problem(item, f"{key}[{index}]", depth + 1, active)
                if problem:
                    return problem
    finally:
        active.discard(id(value))
    return None
