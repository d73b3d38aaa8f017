"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) headers, checked before SimpleITK opens anything.

One concept: what such a header says and whether it may be read: where its voxel data are
(:class:`DataFile`: in the header file, a detached data file in the header's own folder unless
``trust``, or several files), its line ends, dimensions, direction and the size it claims, each
refused with a clear message (:func:`data_file`, :func:`detached_data_file`). SimpleITK reads the
checked files: :mod:`medcam3d.io.itk`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import is_inside
from ..errors import GeometryError, ImageReadError, UntrustedFileError
from ._common import _fmt_bytes, _suffix

__all__ = ["DataFile", "check_direction", "data_file", "detached_data_file"]

# how much of a MetaImage/NRRD file is searched for the end of its header
_MAX_HEADER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DataFile:
    """Where the voxel data of a MetaImage/NRRD file is, as its header says."""

    path: Path | None  # the data file (None: in the header file itself, or several files)
    offset: int  # bytes of header before the data, when the data is in the header file
    multiple: bool  # a list or pattern of data files
    encoding: str  # "raw", "deflate" (gzip/zlib), "bzip2", "ascii", "hex" or "other"


def _untrusted_data_file(p: Path, value: str, reason: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"'{p}' names its voxel data file as '{value}', {reason}. Expected a data file in the "
        f"header's own folder ('{p.parent}'), since a header from someone else could otherwise make "
        "medcam3d read any file you can read. If you trust this file, pass trust=True to "
        "medcam3d.io.read; otherwise put the data next to the header and name it without a folder."
    )


def _resolve_data_file(p: Path, value: str, multiple: bool, trust: bool) -> Path | None:
    if multiple:
        if not trust:
            raise _untrusted_data_file(p, value, "a list or pattern of several data files")
        return None
    target = p.parent / value
    if not trust:
        if os.path.isabs(value) or value.startswith("\\") or re.match(r"^[A-Za-z]:", value):
            raise _untrusted_data_file(p, value, "an absolute path")
        if not is_inside(target, p.parent):
            raise _untrusted_data_file(p, value, "which leads out of the header's folder ('..' or a link)")
    return target


def _header_bytes(p: Path) -> bytes:
    """The first :data:`_MAX_HEADER_BYTES` (+1) bytes of ``p``."""
    with open(p, "rb") as f:
        return f.read(_MAX_HEADER_BYTES + 1)


def _too_long_header(p: Path, what: str) -> ImageReadError:
    return ImageReadError(
        f"'{p}': no {what} in the first {_fmt_bytes(_MAX_HEADER_BYTES)}; expected a complete "
        "MetaImage/NRRD header before the data. The file is corrupt or not in the format its "
        "extension says."
    )


def _ambiguous_header(p: Path, what: str, expected: str = "one plain data-file line") -> ImageReadError:
    return ImageReadError(
        f"'{p}': {what}. Expected {expected}; a header that different readers could "
        "understand differently is refused. Export the image again (or write it as .nii.gz)."
    )


_BARE_CR = re.compile(rb"\r(?!\n)")


def _check_line_ends(p: Path, header: bytes) -> None:
    """Refuse a header holding a bare CR or a NUL byte (see :mod:`medcam3d.io`, "Untrusted files")."""
    cr = _BARE_CR.search(header)
    if cr is not None:
        line = header.count(b"\n", 0, cr.start()) + 1
        raise _ambiguous_header(
            p, f"line {line} of its header holds a bare carriage return (CR, byte {cr.start()}), not followed by "
            "a line feed; the NRRD reader ends a line there, MetaIO ends a key but not a value there, and "
            "medcam3d's check would see other lines than the reader", "lines ending in LF or CR LF")
    if b"\0" in header:
        raise _ambiguous_header(p, f"its header holds a NUL byte (byte {header.index(0)})",
                                "a text header: C readers end a value at a NUL byte, medcam3d would not")


# MetaIO reads keys case-sensitively, skips any run of '=', ':', spaces and tabs after the key and
# takes the rest of that line as the value; it stops reading the header at ElementDataFile.
_META_DATAFILE = re.compile(rb"(?i)elementdatafile")
_META_VALUE = re.compile(rb"[ \t]*[=:][ \t=:]*([^\r\n]*)")
_META_FIELD = re.compile(r"\s*(\w+)\s*[=:][\s=:]*(.*)$")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# MetaIO fields holding one number per dimension, or a dimension x dimension matrix
_META_PER_AXIS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation")
_META_MATRIX = ("TransformMatrix", "Rotation", "Orientation")


def _metaimage_fields(header: bytes) -> dict[str, str]:
    fields = {}
    for line in header.decode("latin-1").split("\n"):
        m = _META_FIELD.match(line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def _check_metaimage_fields(p: Path, fields: dict[str, str]) -> None:
    """Name what is wrong with NDims, per-axis fields and the direction matrix (MetaIO only says
    'No such file or directory' when it cannot parse a header)."""
    text = fields.get("NDims")
    if text is None:
        raise ImageReadError(f"'{p}' has no NDims line; expected a MetaImage header with 'NDims = 3' (or 2, 4).")
    if not re.fullmatch(r"\d+", text) or not 2 <= int(text) <= 5:
        raise ImageReadError(
            f"'{p}': NDims = {text[:40]}; expected 2 to 5 dimensions (medcam3d reads 2D and 3D images and "
            "4D stacks of volumes). The header is corrupt or not a MetaImage image header."
        )
    ndims = int(text)
    for key in _META_PER_AXIS + _META_MATRIX:
        if key not in fields:
            continue
        values = fields[key].split()
        expected = ndims * ndims if key in _META_MATRIX else ndims
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = []
        if len(values) != expected or len(numbers) != expected:  # (finiteness: the voxel size and direction checks)
            raise ImageReadError(
                f"'{p}': {key} = {fields[key][:80]!r} but NDims = {ndims}; expected {expected} numbers "
                f"({'a ' + str(ndims) + ' x ' + str(ndims) + ' matrix' if key in _META_MATRIX else 'one per dimension'}). "
                "The header is corrupt: export the image again."
            )
        if key == "DimSize" and not all(math.isfinite(v) and v >= 1 and v == int(v) for v in numbers):
            raise ImageReadError(f"'{p}': DimSize = {fields[key][:80]!r}; expected {ndims} positive whole numbers.")
        if key in _META_MATRIX:
            check_direction(p, np.array(numbers).reshape(ndims, ndims), f"{key} = {fields[key][:80]}")


def check_direction(p: Path, direction: np.ndarray, what: str) -> None:
    """Refuse a singular direction matrix (a zero or repeated axis): no voxel -> world mapping."""
    d = np.asarray(direction, dtype=np.float64)
    norms = np.linalg.norm(d, axis=0)
    if not np.all(np.isfinite(d)) or np.any(norms < 1e-6) or abs(np.linalg.det(d / np.where(norms > 0, norms, 1))) < 1e-6:
        raise GeometryError(
            f"'{p}': the direction matrix ({what}) is singular (determinant 0): some voxel axis has no "
            "direction or repeats another, so voxels have no place in space. Expected independent axis "
            "directions (e.g. the identity, '1 0 0 0 1 0 0 0 1'); fix the header or export the image again."
        )


def _parse_metaimage(p: Path, trust: bool) -> DataFile:
    head = _header_bytes(p)
    match = _META_DATAFILE.search(head)
    if match is None:
        if len(head) > _MAX_HEADER_BYTES:
            raise _too_long_header(p, "ElementDataFile line")
        raise ImageReadError(
            f"'{p}' has no ElementDataFile line; expected a MetaImage header ending with "
            "'ElementDataFile = LOCAL' or the name of its data file."
        )
    line_end = head.find(b"\n", match.end())
    offset = len(head) if line_end < 0 else line_end + 1
    _check_line_ends(p, head[:offset])  # MetaIO reads no further than the ElementDataFile line
    line_start = head.rfind(b"\n", 0, match.start()) + 1
    if head[match.start() : match.end()] != b"ElementDataFile" or head[line_start : match.start()].strip():
        shown = head[line_start : match.end()].decode("latin-1").strip()
        raise _ambiguous_header(p, f"'{shown}' is not a plain 'ElementDataFile' key at the start of a line")
    value_match = _META_VALUE.match(head, match.end())
    if value_match is None:
        raise _ambiguous_header(p, "the ElementDataFile key has no '=' on its line")
    raw = value_match.group(1)
    if _CONTROL.search(raw):
        raise _ambiguous_header(p, f"the ElementDataFile value {raw.decode('latin-1')!r} holds control characters")
    value = os.fsdecode(raw.strip(b" \t"))
    fields = _metaimage_fields(head[:line_start])
    _check_metaimage_fields(p, fields)
    encoding = "deflate" if fields.get("CompressedData", "").lower() in ("true", "1") else "raw"
    if value.upper() == "LOCAL":
        return DataFile(None, offset, False, encoding)
    if not value:
        raise ImageReadError(f"'{p}': ElementDataFile is empty; expected LOCAL or the name of the data file.")
    if len(_META_DATAFILE.findall(head)) > 1:  # a detached header is all text: one data-file line only
        raise _ambiguous_header(p, "it has more than one ElementDataFile line")
    tokens = value.split()
    multiple = value.upper().startswith("LIST") or "%" in value or (
        len(tokens) >= 4 and all(re.fullmatch(r"-?\d+", t) for t in tokens[-3:])
    )
    return DataFile(_resolve_data_file(p, value, multiple, trust), 0, multiple, encoding)


_NRRD_ENCODINGS = {
    "raw": "raw",
    "gzip": "deflate",
    "gz": "deflate",
    "bzip2": "bzip2",
    "bz2": "bzip2",
    "ascii": "ascii",
    "text": "ascii",
    "txt": "ascii",
    "hex": "hex",
}
# teem reads field names case-insensitively ("data file" or "datafile"); any such line counts.
_NRRD_DATAFILE = re.compile(r"(?i)^\s*data\s*file\s*:[\s=]*(.*)$")
# teem (airOneLine) ends a line at LF, CR LF or a bare CR
_LINE_END = re.compile(rb"\r\n|\n|\r")


def _nrrd_lines(p: Path, head: bytes) -> Iterator[tuple[str, int]]:
    """The header lines of a NRRD file as teem reads them, each with the offset after its line end.

    A bare CR (which teem takes as a line end) or a NUL byte in a line is refused, so every line
    seen here is a line teem sees, and the other way round.
    """
    pos = 0
    while pos < len(head):
        m = _LINE_END.search(head, pos)
        if m is None:
            if len(head) > _MAX_HEADER_BYTES:
                raise _too_long_header(p, "end of the NRRD header (a blank line)")
            line, end = head[pos:], len(head)
        else:
            line, end = head[pos : m.start()], m.end()
            if m.group() == b"\r":
                _check_line_ends(p, head[: m.end() + 1])
        _check_line_ends(p, line)
        yield line.decode("latin-1"), end
        pos = end


def _parse_nrrd(p: Path, trust: bool) -> DataFile:
    head = _header_bytes(p)
    if not head.startswith(b"NRRD"):
        raise ImageReadError(f"'{p}' does not start with 'NRRD'; expected a NRRD header. The file is corrupt or not NRRD.")
    lines = _nrrd_lines(p, head)
    _, pos = next(lines)  # the magic line, NRRD000<n>
    encoding = "raw"
    colour: str | None = None
    values: list[str] = []
    for line, pos in lines:
        if not line:
            break  # the blank line ending the header; attached data follows
        if line.startswith("#"):
            continue
        m = _NRRD_DATAFILE.match(line)
        if m:
            if _CONTROL.search(m.group(1).encode("latin-1")):
                raise _ambiguous_header(p, f"the 'data file' value {m.group(1)!r} holds control characters")
            values.append(os.fsdecode(m.group(1).encode("latin-1").strip(b" \t\x0b\x0c")))
            if values[-1].upper().startswith("LIST"):
                break  # file names follow, one per line, to the end of the file
            continue
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "encoding":
            encoding = _NRRD_ENCODINGS.get(value.strip(" =").lower(), "other")
        elif sep and key.strip().lower() == "kinds":
            colour = next((k for k in value.strip(" =").split() if k.lower().endswith("-color")), colour)
    offset = min(pos, len(head))
    if colour is not None:
        raise ImageReadError(
            f"'{p}' stores colour voxels (NRRD kind '{colour}'); expected one scalar intensity per "
            "voxel. Convert it to a greyscale (or single-channel) image first."
        )
    if not values:
        return DataFile(None, offset, False, encoding)
    if len(values) > 1:
        raise _ambiguous_header(p, f"it has {len(values)} 'data file' lines")
    value = values[0]
    if not value:
        raise ImageReadError(f"'{p}': 'data file' is empty; expected the name of the data file.")
    tokens = value.split()
    multiple = value.upper().startswith("LIST") or "%" in value or (
        len(tokens) >= 4 and all(re.fullmatch(r"-?\d+", t) for t in tokens[1:4])
    )
    return DataFile(_resolve_data_file(p, value, multiple, trust), 0, multiple, encoding)


def data_file(p: Path, trust: bool) -> DataFile:
    ext = _suffix(p)
    try:
        return _parse_metaimage(p, trust) if ext in (".mha", ".mhd") else _parse_nrrd(p, trust)
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ImageReadError(f"could not read the header of '{p}': {e}") from None


def detached_data_file(path: str | os.PathLike, *, trust: bool = False) -> Path | None:
    """The data file a MetaImage (``.mha``, ``.mhd``) or NRRD (``.nrrd``, ``.nhdr``) header names, as
    :func:`medcam3d.io.read` parses the header (before SimpleITK opens anything).

    Parameters
    ----------
    path : str or os.PathLike
        The header file.
    trust : bool
        As for :func:`medcam3d.io.read`: allow a data file outside the header's folder, or a list or
        pattern of data files.

    Returns
    -------
    pathlib.Path or None
        The data file; None when the data follow the header in the same file, or for a list or
        pattern of several data files.

    Raises
    ------
    ImageReadError, UntrustedFileError
        As :func:`medcam3d.io.read` would for this header.
    """
    return data_file(Path(os.fspath(path)), trust).path
