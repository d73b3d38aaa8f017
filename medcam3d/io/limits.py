"""The reading limits of :mod:`medcam3d.io` (see its "Untrusted files"): memory (``max_bytes``),
decompression (``max_expansion``), voxel sizes (``max_voxel_mm``, :data:`MIN_VOXEL_MM`) and DICOM
folder size (``max_slices``); their defaults, their command-line flags (:data:`LIMIT_FLAGS`,
:func:`set_read_limits`) and the errors they raise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, ImageTooLargeError, UsageError
from ._common import _fmt_bytes


#: Default ceiling on the memory :func:`read` may allocate for voxel data (16 GiB).
DEFAULT_MAX_BYTES = 16 * 1024**3
#: Default ceiling on the memory reading a compressed file may take, as a multiple of the file's
#: size (beyond :data:`EXPANSION_FREE_BYTES`).
DEFAULT_MAX_EXPANSION = 100.0
#: Memory any compressed file may take whatever its size (1 GiB): empty masks and maps compress
#: more than 100:1 and are read without question up to this size.
EXPANSION_FREE_BYTES = 1024**3
#: Default ceiling on the number of files in a DICOM folder (each file's header is read).
DEFAULT_MAX_SLICES = 5000
#: Smallest voxel size (mm) accepted on reading (0.1 micrometre).
MIN_VOXEL_MM = 1e-4
#: Default largest voxel size (mm) accepted on reading: 100 mm. Clinical scans have voxels of at
#: most ~10-20 mm (thick CT slices), thick MR slabs reach a few cm.
MAX_VOXEL_MM = 100.0

# deflate (gzip, zlib) cannot expand data more than 1032:1; a little slack for headers.
_DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 4096


@dataclass(frozen=True)
class _Limits:
    """The ceilings of one :func:`read` (see its parameters); ``None`` lifts one."""

    max_bytes: int | None = DEFAULT_MAX_BYTES
    max_expansion: float | None = DEFAULT_MAX_EXPANSION
    max_voxel_mm: float | None = MAX_VOXEL_MM
    max_slices: int | None = DEFAULT_MAX_SLICES


#: The command-line flag that sets each reading limit for a whole run (:func:`set_read_limits`).
LIMIT_FLAGS = {"max_bytes": "--max-image-bytes", "max_expansion": "--max-expansion",
               "max_voxel_mm": "--max-voxel-mm", "max_slices": "--max-slices"}
_DEFAULTS = {"max_bytes": DEFAULT_MAX_BYTES, "max_expansion": DEFAULT_MAX_EXPANSION,
             "max_voxel_mm": MAX_VOXEL_MM, "max_slices": DEFAULT_MAX_SLICES}
# Limits set for this process (the CLI's flags); they replace the defaults, not explicit arguments.
_RUN_LIMITS: dict[str, Any] = {}


def set_read_limits(**limits: Any) -> dict[str, Any]:
    """Set this process's default reading limits (what the CLI's ``--max-image-bytes``,
    ``--max-expansion``, ``--max-voxel-mm`` and ``--max-slices`` do).

    Every later :func:`read`, :func:`read_space`, :func:`describe` and :func:`read_volumes` call of
    this process (and of the DataLoader workers it forks) that leaves a limit at its default uses the
    value given here; ``None`` lifts that limit. Call with no arguments to go back to the defaults.

    Parameters
    ----------
    **limits
        Any of ``max_bytes``, ``max_expansion``, ``max_voxel_mm``, ``max_slices``.

    Returns
    -------
    dict
        The limits set before (pass them back to restore them).

    Raises
    ------
    UsageError
        An unknown name or a value that is not positive (or None).
    """
    unknown = sorted(set(limits) - set(_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown reading limit(s) {unknown}; expected any of {sorted(_DEFAULTS)}.")
    _limits(**limits)  # validates
    before = dict(_RUN_LIMITS)
    _RUN_LIMITS.clear()
    _RUN_LIMITS.update(limits)
    return before


def _run_limit(name: str, value: Any) -> Any:
    """``value``, or this run's limit where ``value`` is the default (:func:`set_read_limits`)."""
    if name in _RUN_LIMITS and value is not None and not isinstance(value, bool) and value == _DEFAULTS[name]:
        return _RUN_LIMITS[name]
    return value


def _lift(name: str) -> str:
    """How to lift one limit: the CLI flag and the Python argument."""
    return f"{LIMIT_FLAGS[name]} on the command line, {name}= to medcam3d.io.read"


def _limits(max_bytes: Any = DEFAULT_MAX_BYTES, max_expansion: Any = DEFAULT_MAX_EXPANSION,
            max_voxel_mm: Any = MAX_VOXEL_MM, max_slices: Any = DEFAULT_MAX_SLICES) -> _Limits:
    """Check the limit arguments of :func:`read` (a :class:`UsageError` names a wrong one)."""
    max_bytes, max_expansion = _run_limit("max_bytes", max_bytes), _run_limit("max_expansion", max_expansion)
    max_voxel_mm, max_slices = _run_limit("max_voxel_mm", max_voxel_mm), _run_limit("max_slices", max_slices)

    def positive(name: str, value: Any, integer: bool) -> Any:
        if value is None:
            return None
        kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
            what = "a positive int" if integer else "a positive number"
            raise UsageError(f"{name} must be {what} or None (no limit), got {value!r}.")
        return int(value) if integer else float(value)

    voxel = positive("max_voxel_mm", max_voxel_mm, False)
    if voxel is not None and voxel < MIN_VOXEL_MM:
        raise UsageError(f"max_voxel_mm must be at least MIN_VOXEL_MM={MIN_VOXEL_MM:g}, got {max_voxel_mm!r}.")
    return _Limits(positive("max_bytes", max_bytes, True), positive("max_expansion", max_expansion, False),
                   voxel, positive("max_slices", max_slices, True))


def _out_itemsize(dtype: Any, stored_itemsize: int) -> int:
    return stored_itemsize if dtype is None else np.dtype(dtype).itemsize


def _check_allocation(p: Path, need: int, what: str, limits: _Limits, compressed: int | None = None) -> None:
    """Refuse to read when about ``need`` bytes would be allocated and that exceeds a limit.

    ``compressed`` is the size (bytes) of the compressed data the voxels come from (None for raw
    data): reading it may take at most ``max(EXPANSION_FREE_BYTES, max_expansion * compressed)``.
    """
    max_bytes = limits.max_bytes
    if max_bytes is not None and need > max_bytes:
        suggestion = 1 << max(int(need - 1).bit_length(), 0)
        raise ImageTooLargeError(
            f"reading '{p}' would allocate about {need} bytes ({_fmt_bytes(need)}) for {what}, more than "
            f"max_bytes={max_bytes} ({_fmt_bytes(max_bytes)}). If the image is that large and you have the "
            f"memory, raise the limit ({_lift('max_bytes')}; e.g. {suggestion}), or set it to none for no "
            "limit; otherwise the header is wrong: export the image again."
        )
    ratio = limits.max_expansion
    if compressed is None or ratio is None or need <= max(EXPANSION_FREE_BYTES, ratio * max(compressed, 1)):
        return
    factor = need / max(compressed, 1)
    raise ImageTooLargeError(
        f"reading '{p}' would allocate about {_fmt_bytes(need)} for {what} from {_fmt_bytes(compressed)} of "
        f"compressed data ({factor:.0f} times its size), more than max_expansion={ratio:g} times its size "
        f"(and more than {_fmt_bytes(EXPANSION_FREE_BYTES)}): such a small file that expands this much is "
        "more often a decompression bomb than a scan. If you trust the file and have the memory, pass "
        f"raise the limit to {math.ceil(factor)} or none ({_lift('max_expansion')})."
    )


def _too_large_for_file(p: Path, claimed: int, what: str, holds: int, expands_to: int | None = None) -> ImageTooLargeError:
    """The error for a header claiming more voxel bytes than the file can hold."""
    if expands_to is not None:
        holds_text = f"{holds} bytes of compressed data, which expand to at most {expands_to} bytes"
    else:
        holds_text = f"{holds} bytes"
    return ImageTooLargeError(
        f"'{p}': the header claims {claimed} bytes of voxel data ({what}); the file holds "
        f"{holds_text}. Expected the data to fit the file: it is truncated, or its header is wrong "
        "or forged. Export it again (or copy it again if a transfer was interrupted)."
    )


def _check_voxel_sizes(p: Path, sizes: Any, source: str, max_mm: float | None = MAX_VOXEL_MM) -> None:
    """Refuse voxel sizes that are not finite, not positive, or outside the accepted range."""
    max_mm = _run_limit("max_voxel_mm", max_mm)
    top = math.inf if max_mm is None else float(max_mm)
    for axis, v in enumerate(np.asarray(sizes, dtype=np.float64).ravel()):
        if not math.isfinite(v):
            reason = f"is {v}"
        elif v == 0.0:
            reason = "is 0" + (" (-0.0)" if math.copysign(1.0, v) < 0 else "")
        elif v < 0:
            reason = f"is negative ({v:g}); a voxel size must be positive (the direction carries the sign)"
        elif v < MIN_VOXEL_MM:
            reason = f"is {v:g} mm, below {MIN_VOXEL_MM:g} mm"
        elif v > top:
            raise GeometryError(
                f"'{p}': the voxel size along axis {axis} ({source}) is {v:g} mm, more than max_voxel_mm={top:g}. "
                f"Expected a finite size between {MIN_VOXEL_MM:g} and {top:g} mm: real scans have voxels of at most "
                "a few cm, so the header is wrong (or not in mm). Fix the spacing in the header, or if the size "
                f"is right raise the limit ({_lift('max_voxel_mm')}; none lifts it)."
            )
        else:
            continue
        raise GeometryError(
            f"'{p}': the voxel size along axis {axis} ({source}) {reason}. Expected a finite size "
            f"between {MIN_VOXEL_MM:g} and {top:g} mm, so positions in mm cannot be trusted "
            "(a voxel size of 0 also makes the voxel -> world matrix singular: determinant 0). "
            "Fix the spacing in the header or export the image again."
        )
