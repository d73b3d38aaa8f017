"""Cases: the one place where a path, a folder or a CSV becomes a list of scans to explain.

A case id names the case's output folder (``OUT/<id>/``) and prefixes its files, so it must be
one safe path component (:func:`check_case_id`): no path separators, not ``.``/``..``, no leading
dot, no control or invisible formatting characters (zero-width spaces, bidi overrides), at most
:data:`MAX_ID_BYTES` bytes in UTF-8, and not the name of a file that medcam3d writes at the top of
``--out`` (:data:`RESERVED_IDS`). Ids are normalised to Unicode NFC and compared ignoring case
(:func:`case_id_key`), so two spellings of one name (NFC/NFD, upper/lower case) are one id, as
they are one folder on macOS and Windows. Ids given by the user (a CSV's ``id`` column) are
checked and must be unique; ids derived from file names are cleaned and made unique by
construction (:func:`derive_case_ids`). Every problem is reported before any work starts, naming
the CSV line; cheap checks (columns, ids, row count) come before the file system is asked.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import stat
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CaseIdError, CohortError

__all__ = [
    "Case",
    "collect_cases",
    "case_id_of",
    "check_case_id",
    "derive_case_ids",
    "safe_component",
    "case_id_key",
    "input_identity",
    "case_identity",
    "IMAGE_SUFFIXES",
    "image_paths",
    "first_image",
    "MAX_ID_BYTES",
    "MAX_ID_LENGTH",
    "MAX_CASES",
    "RESERVED_IDS",
]

#: File endings read as scans in folder mode (DICOM series are folders).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: A case id's limit in UTF-8 bytes (100 ASCII letters, 33 CJK characters). File names are limited
#: to 255 bytes (NAME_MAX) and medcam3d adds up to ~26 bytes to a case folder's name while it is
#: written (``.<id>.partial-<pid>-<8 hex>``) and ``_<method>_<class>_feature.nii.gz`` to its files,
#: which leaves the method and class label about 130 bytes.
MAX_ID_BYTES = 100
MAX_ID_LENGTH = MAX_ID_BYTES  # the same limit, under its earlier name
#: At most this many cases in one list (CSV rows, scans in a folder); ``max_cases`` lifts it.
MAX_CASES = 100_000
#: Names that medcam3d writes at the top of an output folder (compared ignoring case): a case
#: folder of that name would collide with them. Names starting with a dot (the lock, staging
#: folders) are refused for every id anyway.
RESERVED_IDS = frozenset({
    "summary.csv", "summary.json", "summary.md", "metrics.csv", "cases.csv", "randomization.csv",
    "randomization.png", "curves.png", "segmentation.json", "failures", "medcam3d-manifest.json",
})

_IMAGE_COLUMNS = ("image", "file", "path", "scan", "filename")
_ID_COLUMNS = ("id", "case_id", "case", "name", "subject", "patient")
_MASK_COLUMNS = ("mask", "mask_file", "label", "labelmap", "label_map", "segmentation")
_LABEL_COLUMNS = ("labels", "labels_present", "labels present", "present", "findings")
_VOLUME_COLUMNS = ("volume", "volume_index", "timepoint")
_SERIES_COLUMNS = ("series", "series_uid", "seriesinstanceuid")
_REGION_COLUMNS = ("region_mask", "region_mask_file")
#: CSV columns of a case of several channels: ``image_0000``, ``image_0001`` ... (nnU-Net's numbering).
_CHANNEL_COLUMN = re.compile(r"^image_(\d{4})$", re.IGNORECASE)
#: nnU-Net's file naming of a case's channels in a folder: ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ...
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_FORBIDDEN = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
# control (C0/C1), format (zero-width, bidi, soft hyphen, BOM), surrogate and line/paragraph separators
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_ASCII_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_CSV_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class Case:
    """One scan of a cohort.

    Attributes
    ----------
    id : str
        A safe, unique path component (the case folder's name).
    image : Path
        A scan file or a DICOM folder.
    mask : Path, optional
        A ground-truth label map on the scan's grid (label ``c + 1`` = class ``c``).
    labels : list of str, optional
        Class names or indices present (from a CSV's ``labels`` column), when there is no mask.
    source : str
        Where the case came from (``cases.csv, line 4``), for messages.
    volume : int, optional
        The volume to explain in a 4D file (0-based).
    series : str, optional
        The SeriesInstanceUID to explain in a folder holding several DICOM series.
    region_mask : Path, optional
        Segmentation networks: a 0/1 region on the scan's grid that each class is explained in
        (a CSV's ``region_mask`` column); ``mask`` stays the ground truth.
    channels : list of Path
        A case of several scans (MR sequences), one per input channel in order: CSV columns
        ``image_0000``, ``image_0001`` ..., or nnU-Net's ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``
        ... in a folder; ``image`` is then the first. Empty for a case of one scan.
    """

    id: str
    image: Path
    mask: Path | None = None
    labels: list[str] | None = None
    source: str = ""
    volume: int | None = None
    series: str | None = None
    region_mask: Path | None = None
    channels: list[Path] = field(default_factory=list)

    @property
    def scan(self) -> Path | list[Path]:
        """What the runner reads: ``image``, or the list of channel scans (several channels)."""
        return list(self.channels) if len(self.channels) > 1 else self.image

    @property
    def inputs(self) -> list[Path]:
        """Every scan of the case (its channels, or its image)."""
        return list(self.channels) if len(self.channels) > 1 else [self.image]

    def identity(self) -> dict:
        """Its inputs' identity (see :func:`case_identity`), what ``batch --resume`` compares."""
        return case_identity(self.scan, self.mask, self.region_mask, self.volume, self.series)


def case_id_of(path: str | Path | Sequence[str | Path]) -> str:
    """The file or folder name without its image suffix (``scan.nii.gz`` → ``scan``); not cleaned.

    A list of channel paths is named after its first channel.
    """
    path = first_image(path)
    name = os.path.basename(os.fspath(path).rstrip("/" + os.sep))
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_paths(image: str | Path | Sequence[str | Path]) -> list:
    """The scans of a case as a list: ``[image]``, or the channel paths of a list or tuple."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def first_image(image: str | Path | Sequence[str | Path]) -> str | Path:
    """The first channel of a list of channel paths, or the one image: what names the case and its grid."""
    paths = image_paths(image)
    if not paths:
        raise CohortError("a case needs at least one scan (no image paths given).")
    return paths[0]


def case_id_key(text: str) -> str:
    """The form in which case ids are compared: Unicode NFC, ignoring case.

    ``'Émile'`` (NFC), ``'E\\u0301mile'`` (NFD) and ``'émile'`` have one key: they are one folder on
    macOS (which normalises names) and on case-insensitive file systems.
    """
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


_RESERVED_KEYS = frozenset(case_id_key(name) for name in RESERVED_IDS)


def _code_point(char: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``: a character by its code point and name."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def _invisible(text: str) -> list[str]:
    """The distinct control, format (zero-width, bidi) and separator characters of ``text``, in order."""
    if text.isascii():
        return list(dict.fromkeys(_ASCII_CONTROLS.findall(text))) if _ASCII_CONTROLS.search(text) else []
    return list(dict.fromkeys(c for c in text if unicodedata.category(c) in _INVISIBLE_CATEGORIES))


def _shown(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: quoted, escaped, long texts cut (with their length)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_case_id(text: str, where: str = "case id") -> str:
    """Return ``text`` in Unicode NFC if it is one safe path component, else raise :class:`CaseIdError`.

    Safe: 1 to :data:`MAX_ID_BYTES` bytes in UTF-8; no ``/ \\ : * ? " < > |``; no control,
    invisible formatting (Unicode category Cf: zero-width spaces and joiners, bidi embeddings,
    overrides and isolates, the byte-order mark ...) or line/paragraph separator characters; not
    starting with ``.`` or whitespace, not ending with whitespace or ``.``; not one of
    :data:`RESERVED_IDS` (ignoring case).

    Returns
    -------
    str
        ``text`` normalised to NFC (the form medcam3d names folders and files with).
    """
    problem = None
    if isinstance(text, str) and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if not isinstance(text, str) or not text:
        problem = "it is empty"
    elif _FORBIDDEN.search(text):
        bad = sorted({repr(c) for c in _FORBIDDEN.findall(text)})
        problem = f"it contains {', '.join(bad)} (path separators and control characters are not allowed)"
    elif invisible := _invisible(text):
        shown = ", ".join(f"{_code_point(c)} at character {text.index(c) + 1}" for c in invisible[:3])
        problem = (f"it contains {shown} (invisible control and formatting characters such as zero-width spaces "
                   "and right-to-left overrides are not allowed: they make different ids look the same)")
    elif _utf8_length(text) > MAX_ID_BYTES:
        problem = (f"it is {_utf8_length(text)} bytes long in UTF-8 ({len(text)} characters; at most "
                   f"{MAX_ID_BYTES} bytes, i.e. {MAX_ID_BYTES} ASCII or about {MAX_ID_BYTES // 3} CJK characters, "
                   "so that the file names made from it fit the file system's 255-byte limit)")
    elif text.startswith(".") or text[0].isspace() or text[-1].isspace() or text.endswith("."):
        problem = "it starts with a dot or a space, or ends with a space or a dot"
    elif case_id_key(text) in _RESERVED_KEYS:
        problem = (f"OUT/{text} is a file that medcam3d writes into the output folder itself (reserved, ignoring "
                   f"case: {', '.join(sorted(RESERVED_IDS))})")
    if problem:
        shown_text = _shown(text) if isinstance(text, str) else repr(text)
        raise CaseIdError(
            f"{where}: {shown_text} cannot be a case id because {problem}. A case id names the output folder "
            f"OUT/<id>/, so it must be a single plain name such as 'patient_001'; fix the id (or the file name)."
        )
    return text


def _truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, at a character boundary, in NFC."""
    while _utf8_length(text) > limit:
        text = unicodedata.normalize("NFC", text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore"))
    return text


_EDGES = re.compile(r"^[\s.]+|[\s.]+$")


def safe_component(text: str, fallback: str = "case") -> str:
    """``text`` cleaned into a valid case id (one that :func:`check_case_id` accepts).

    NFC; invisible formatting characters (category Cf) dropped; path separators, control and
    separator characters → ``_``; no leading dots or whitespace, no trailing ones; cut to
    :data:`MAX_ID_BYTES` bytes; ``fallback`` when nothing is left; ``_case`` appended to a
    reserved name (:data:`RESERVED_IDS`).
    """
    text = unicodedata.normalize("NFC", text)
    if not text.isascii():
        text = "".join("" if (kind := unicodedata.category(c)) == "Cf" else "_" if kind in _INVISIBLE_CATEGORIES
                       else c for c in text)
    text = _EDGES.sub("", _FORBIDDEN.sub("_", text))
    text = _EDGES.sub("", _truncate(text, MAX_ID_BYTES)) or fallback
    if case_id_key(text) in _RESERVED_KEYS:
        text = f"{text}_case"
    return text


def _with_suffix(text: str, suffix: str) -> str:
    """``text`` + ``suffix`` as a valid case id, ``text`` cut so that the suffix is kept."""
    return safe_component(_truncate(text, MAX_ID_BYTES - _utf8_length(suffix)) + suffix)


def derive_case_ids(images: Sequence[Path]) -> list[str]:
    """Distinct, safe case ids for scans that have no given id.

    The id is the cleaned file name without its suffix; where two scans would get the same id
    (``p1.nii.gz`` and ``p1.nrrd``; ``p1/scan.nii.gz`` and ``p2/scan.nii.gz``), each gets a longer
    one (the first in input order keeps the plain id): with its format where the formats differ
    (``p1_nrrd``), with its parent folder where the names are the same (``p2_scan``), then numbered.
    Ids are compared as :func:`case_id_key` does (NFC, ignoring case), so they also stay distinct
    on case-insensitive and normalising file systems.
    """
    key = case_id_key
    paths = [os.fspath(p).rstrip("/" + os.sep) for p in images]  # plain strings: lists have up to 100,000 scans
    names = [os.path.basename(p) for p in paths]
    ids = [safe_component(case_id_of(name)) for name in names]
    for attempt in range(3):
        groups: dict[str, list[int]] = {}
        for n, i in enumerate(ids):
            groups.setdefault(key(i), []).append(n)
        # the first of each group keeps its id; the others get a longer one
        clashing = [(n, members[0]) for members in groups.values() if len(members) > 1 for n in members[1:]]
        if not clashing:
            return ids
        for n, first in clashing:
            name = names[n]
            fmt = name[len(case_id_of(name)):].lstrip(".").replace(".", "_") or "dicom"
            same_format = name.casefold() == names[first].casefold()
            if attempt == 0 and not same_format:
                ids[n] = _with_suffix(ids[n], f"_{fmt}")
            elif attempt <= 1:
                ids[n] = safe_component(f"{os.path.basename(os.path.dirname(paths[n]))}_{ids[n]}")
            else:
                ids[n] = _with_suffix(ids[n], f"_{n + 1}")
    seen: set[str] = set()
    for n, i in enumerate(ids):  # last resort: numbered, until it is free
        number = 1
        while key(i) in seen:
            number += 1
            i = _with_suffix(ids[n], f"_{n + 1}_{number}")
        seen.add(key(i))
        ids[n] = i
    return ids


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as stream:
            return stream.read(132)[128:] == b"DICM"  # the DICOM preamble's magic
    except OSError:
        return False


def _is_dicom_folder(path: Path) -> bool:
    """A folder that directly holds DICOM files (``.dcm``/``.ima``, or extension-less files starting with DICM)."""
    try:
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return False
    return any(_is_dicom_file(p) for p in files[:50])


def _read_csv(path: Path, max_cases: int) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with the line each starts on) of a cohort CSV.

    Read with the ``csv`` module from the file itself (``newline=''``), so quoted fields keep their
    line breaks and split at nothing else (U+0085, U+2028 are text); a UTF-8 byte-order mark is
    dropped. Stops at the first row beyond ``max_cases``.
    """
    size = path.stat().st_size
    if size > _CSV_MAX_BYTES:
        raise CohortError(f"{path}: {size} bytes is too large for a cohort list (at most {_CSV_MAX_BYTES}); split it "
                          "into several lists.")
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        with path.open(encoding="utf-8-sig", newline="") as stream:  # a byte-order mark from Excel is not a column name
            reader = csv.reader(stream)
            first = next(reader, [])
            header = [h.strip() for h in first]
            done = reader.line_num
            for row in reader:
                line, done = done + 1, reader.line_num  # the line the row starts on (quoted fields may span lines)
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                if len(rows) >= max_cases:
                    raise CohortError(
                        f"{path}, line {line}: the list has more than {max_cases} cases, the limit for one run. Split "
                        "it into several lists, or raise the limit with --max-cases N (collect_cases(max_cases=N)).")
                rows.append((line, row))
    except UnicodeDecodeError:
        try:
            path.read_bytes().decode("utf-8-sig")
            reason, at = "not UTF-8", "?"
        except UnicodeDecodeError as error:
            reason, at = error.reason, str(error.start)
        raise CohortError(f"{path} is not UTF-8 text ({reason} at byte {at}); save it as UTF-8 CSV.") from None
    except csv.Error as error:
        raise CohortError(f"{path}, line {line}: not a valid CSV file: {error}.") from None
    return header, rows


def _column(header: Sequence[str], candidates: Sequence[str]) -> int | None:
    """The index of the first column named like one of ``candidates`` (in their order; ignoring case)."""
    lowered: dict[str, int] = {}
    for index, name in enumerate(header):
        lowered.setdefault(name.strip().lower(), index)
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def _channel_columns(path: Path, header: Sequence[str]) -> list[int]:
    """The indices of the columns ``image_0000``, ``image_0001`` ... in channel order ([] when there are none).

    Raises
    ------
    CohortError
        A channel column repeated, a gap in the numbering (``image_0000``, ``image_0002``), or channel
        columns next to a plain image column (``image``, ``file`` ...).
    """
    found: dict[int, int] = {}
    for index, name in enumerate(header):
        match = _CHANNEL_COLUMN.match(name.strip())
        if match is None:
            continue
        channel = int(match.group(1))
        if channel in found:
            raise CohortError(f"{path}: the column {name!r} appears twice; each channel column image_NNNN must be "
                              "given once.")
        found[channel] = index
    if not found:
        return []
    plain = _column(header, _IMAGE_COLUMNS)
    if plain is not None:
        raise CohortError(f"{path}: the CSV has both a {header[plain]!r} column and channel columns "
                          f"({', '.join(header[i] for i in found.values())}); give one scan per row in {header[plain]!r}, "
                          "or several channels in image_0000, image_0001, ... (not both).")
    missing = [f"image_{n:04d}" for n in range(max(found) + 1) if n not in found]
    if missing:
        raise CohortError(f"{path}: the channel columns skip {', '.join(missing)} (found "
                          f"{', '.join(header[found[n]] for n in sorted(found))}); number them image_0000, image_0001, "
                          "... without gaps, in the model's channel order.")
    return [found[n] for n in range(len(found))]


def _from_csv(path: Path, max_cases: int = MAX_CASES) -> tuple[list[Case], list[bool]]:
    header, rows = _read_csv(path, max_cases)
    channel_cols = _channel_columns(path, header)
    image_col = channel_cols[0] if channel_cols else _column(header, _IMAGE_COLUMNS)
    if image_col is None:
        raise CohortError(
            f"{path}: the CSV has columns {header}, but none names the scan. Add a column 'image' (or 'file') "
            "with paths to scan files or DICOM folders, relative to the CSV's folder (several channels: columns "
            "image_0000, image_0001, ...).")
    id_col, mask_col, label_col = (_column(header, c) for c in (_ID_COLUMNS, _MASK_COLUMNS, _LABEL_COLUMNS))
    volume_col, series_col = _column(header, _VOLUME_COLUMNS), _column(header, _SERIES_COLUMNS)
    region_col = _column(header, _REGION_COLUMNS)
    cases: list[Case] = []
    given: list[bool] = []
    base = str(path.parent)

    def local(text: str) -> Path:  # plain string work: this runs once per row of lists with 100,000 rows
        text = os.path.expanduser(text) if text.startswith("~") else text
        return Path(text if os.path.isabs(text) else os.path.join(base, text))

    def cell(row: list[str], column: int | None) -> str:
        return row[column].strip() if column is not None and column < len(row) else ""

    for number, row in rows:
        where = f"{path}, line {number}"
        text = cell(row, image_col)
        if not text:
            raise CohortError(f"{where}: empty {header[image_col]!r}; every row needs a scan path.")
        mask_text = cell(row, mask_col)
        labels = None  # no labels column: presence unknown; an empty cell: no class present
        if label_col is not None:
            labels = [t for t in re.split(r"[;,|\s]+", cell(row, label_col)) if t and t.lower() not in ("none", "-")]
        case_id = cell(row, id_col)
        if case_id:
            case_id = check_case_id(case_id, f"{where}, column {header[id_col]!r}")  # type: ignore[index]
        volume_text = cell(row, volume_col)
        if volume_text and not (volume_text.isascii() and volume_text.isdigit()):
            raise CohortError(f"{where}: {header[volume_col]!r} must be a volume index (0, 1, ...), "  # type: ignore[index]
                              f"not {_shown(volume_text)}.")
        series = cell(row, series_col) or None
        region_text = cell(row, region_col)
        channels = []
        for column in channel_cols:
            channel_text = cell(row, column)
            if not channel_text:
                raise CohortError(f"{where}: empty {header[column]!r}; every row needs a scan for each channel column "
                                  f"({', '.join(header[c] for c in channel_cols)}).")
            channels.append(local(channel_text))
        cases.append(Case(case_id, local(text), local(mask_text) if mask_text else None, labels, where,
                          int(volume_text) if volume_text else None, series, local(region_text) if region_text else None,
                          channels if len(channels) > 1 else []))
        given.append(bool(case_id))
    return cases, given


def _from_folder(folder: Path, max_cases: int = MAX_CASES) -> tuple[list[Case], list[Path]]:
    """The cases of a folder, and the path each case's id is derived from.

    Files named as nnU-Net names a case's channels (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ...)
    are grouped into one case per ``CASE`` (its id), when every scan of the folder is named so and
    at least one is channel ``0000``; otherwise every file or DICOM folder is a case.
    """
    scans = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and "_mask" not in path.name:
            scans.append((path, False))
        elif path.is_dir() and _is_dicom_folder(path):
            scans.append((path, True))
        if len(scans) > max_cases:
            raise CohortError(f"{folder} holds more than {max_cases} scans, the limit for one run. Split them into "
                              "several folders, or raise the limit with --max-cases N (collect_cases(max_cases=N)).")
    if not scans:
        raise CohortError(f"{folder} holds no scans ({', '.join(IMAGE_SUFFIXES)} files or DICOM folders).")
    grouped = _channel_groups(folder, [path for path, dicom in scans], any(dicom for _, dicom in scans))
    if grouped is not None:
        return grouped
    return [Case("", path, source=str(path)) for path, _ in scans], [path for path, _ in scans]


def _channel_groups(folder: Path, scans: list[Path], any_dicom: bool) -> tuple[list[Case], list[Path]] | None:
    """nnU-Net's channel files grouped into cases (see :func:`_from_folder`), or None when the folder is not
    named so. Every case must have the same channels ``0000`` ... ``N-1``."""
    if any_dicom:
        return None
    parsed = []
    for path in scans:
        stem = case_id_of(path.name)
        match = _CHANNEL_FILE.match(stem)
        if match is None:
            return None
        parsed.append((match.group("case"), int(match.group("channel")), path, path.name[len(stem):]))
    if not any(channel == 0 for _, channel, _, _ in parsed):
        return None
    groups: dict[str, dict[int, Path]] = {}
    suffixes: dict[str, str] = {}
    for case, channel, path, suffix in parsed:
        channels = groups.setdefault(case, {})
        if channel in channels:
            raise CohortError(f"{folder}: case {case!r} has channel {channel:04d} twice ({channels[channel].name}, "
                              f"{path.name}); keep one file per channel.")
        channels[channel] = path
        suffixes.setdefault(case, suffix)
    count = max(max(channels) + 1 for channels in groups.values())
    for case, channels in groups.items():
        missing = [n for n in range(count) if n not in channels]
        if missing:
            names = ", ".join(f"{case}_{n:04d}{suffixes[case]}" for n in missing)
            raise CohortError(f"{folder}: case {case!r} lacks channel(s) {', '.join(f'{n:04d}' for n in missing)} "
                              f"({names} not found); every case of a folder named as nnU-Net names channels "
                              f"(CASE_0000, CASE_0001, ...) needs all {count} channels.")
    cases = [Case("", channels[0], source=str(channels[0]),
                  channels=[channels[n] for n in range(count)] if count > 1 else [])
             for channels in groups.values()]
    naming = [folder / f"{case}{suffixes[case]}" for case in groups]
    return cases, naming


def collect_cases(inputs: str | Path | Iterable[str | Path], masks: str | Path | None = None, *,
                  check_files: bool = True, max_cases: int = MAX_CASES) -> list[Case]:
    """Cases from a folder of scans, a CSV, one scan path, or a list of scan paths.

    Everything that needs no file system is checked first (the CSV's columns, every id, volume
    index and the number of cases), then that the files exist, so a bad list fails in about a
    second even with :data:`MAX_CASES` rows.

    Parameters
    ----------
    inputs : path or list of paths
        A folder (image files ``.nii[.gz]``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` and DICOM
        folders; names containing ``_mask`` and hidden files are skipped); a CSV (UTF-8, a
        byte-order mark is fine; quoted fields may hold commas and line breaks) with an image
        column (``image``, ``file``, ``path`` or ``scan``) and optional ``id`` (or
        ``case_id``/``case``), ``mask``, ``labels``, ``volume`` (of a 4D file), ``series`` (a
        SeriesInstanceUID of a multi-series DICOM folder) and ``region_mask`` (a 0/1 region on the
        scan's grid to explain a segmentation network in; an empty cell: none) columns, relative
        paths being relative to the CSV's folder; or a single scan (file or DICOM folder).
        Several channels (MR sequences) per case: CSV columns ``image_0000``, ``image_0001`` ...
        (instead of ``image``; numbered without gaps), or in a folder nnU-Net's naming
        ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ... (grouped into case ``CASE``; every case
        needs every channel). See :attr:`Case.channels`.
    masks : path, optional
        A folder of masks named ``<case>_mask.nii.gz``; they override the CSV's.
    check_files : bool
        Refuse cases whose scan (or mask) does not exist, up front.
    max_cases : int
        Refuse lists (CSV rows, scans of a folder) of more cases (default :data:`MAX_CASES`).

    Returns
    -------
    list of Case
        With safe, unique ids (NFC), in input order.

    Raises
    ------
    CohortError
        No scans, more than ``max_cases``, a CSV that is not UTF-8 CSV or has no image column,
        missing files (all listed at once).
    CaseIdError
        A given id that is not a safe path component (see :func:`check_case_id`), or given ids
        that repeat (ignoring case and Unicode normalisation; all listed).
    """
    naming: list[Path] | None = None  # what derived ids are made from (default: each case's image)
    if not isinstance(inputs, (str, Path)):
        paths = [Path(p) for p in inputs]
        if len(paths) > max_cases:
            raise CohortError(f"{len(paths)} scans is more than {max_cases}, the limit for one run; split them, or "
                              "raise the limit with --max-cases N (collect_cases(max_cases=N)).")
        cases, given = [Case("", p, source=str(p)) for p in paths], [False] * len(paths)
    else:
        inputs = Path(inputs)
        if inputs.is_file() and inputs.suffix.lower() in (".csv", ".tsv", ".txt"):
            cases, given = _from_csv(inputs, max_cases)
            if not cases:
                raise CohortError(f"{inputs} lists no cases (only a header or blank lines).")
        elif inputs.is_dir() and not _is_dicom_folder(inputs):
            cases, naming = _from_folder(inputs, max_cases)
            given = [False] * len(cases)
        elif inputs.exists() and not inputs.is_dir() and not inputs.is_file():
            raise CohortError(f"--inputs {str(inputs)!r} is not a regular file or folder (a FIFO, socket or device); "
                              "give a folder of scans, a CSV with an 'image' column, or a scan.")
        elif inputs.exists():
            cases, given = [Case("", inputs, source=str(inputs))], [False]
        else:
            raise CohortError(f"--inputs {str(inputs)!r} does not exist; give a folder of scans, a CSV with an "
                              "'image' column, or a scan.")
    _assign_ids(cases, given, naming)
    if masks is not None:
        folder = Path(masks)
        if not folder.is_dir():
            raise CohortError(f"--masks {str(folder)!r} is not a folder; give the folder holding <case>_mask.nii.gz files.")
        for case in cases:
            candidate = folder / f"{case.id}_mask.nii.gz"
            if candidate.is_file():
                case.mask = candidate
    if check_files:
        exists: dict[str, bool] = {}  # a mask or scan listed by many rows is asked about once
        missing = [f"{c.source or c.id}: {_shown(text, 200)}" for c in cases for p in (*c.inputs, c.mask, c.region_mask)
                   if p is not None and not exists.setdefault(text := str(p), os.path.exists(text))]
        if missing:
            shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise CohortError(f"{len(missing)} input file(s) do not exist: {shown}. Fix the paths (relative paths "
                              "in a CSV are relative to the CSV's folder).")
    return cases


def _assign_ids(cases: list[Case], given: list[bool], naming: Sequence[Path] | None = None) -> None:
    """Fill in derived ids; refuse given ids that repeat (ignoring case and Unicode normalisation) or
    clash with derived ones."""
    key = case_id_key
    taken: dict[str, list[str]] = {}
    for case, is_given in zip(cases, given):
        if is_given:
            taken.setdefault(key(case.id), []).append(case.source)
    repeated = {k: v for k, v in taken.items() if len(v) > 1}
    if repeated:
        listed = "; ".join(f"{_shown(k)} at {', '.join(v[:5])}" + (f" and {len(v) - 5} more" if len(v) > 5 else "")
                           for k, v in list(repeated.items())[:10])
        raise CaseIdError(f"Case ids must be unique (ignoring upper/lower case and Unicode normalisation), but "
                          f"{len(repeated)} repeat: {listed}. Each case writes to OUT/<id>/; give every row its own id.")
    derived = [n for n, is_given in enumerate(given) if not is_given]
    ids = derive_case_ids([(cases[n].image if naming is None else naming[n]) for n in derived])
    for n, case_id in zip(derived, ids):
        candidate, suffix = case_id, 2
        while key(candidate) in taken:  # a derived id never takes a given one
            candidate = _with_suffix(case_id, f"_{suffix}")
            suffix += 1
        taken[key(candidate)] = [cases[n].source]
        cases[n].id = candidate


# --------------------------------------------------------------------------------- resume
def input_identity(path: str | Path | None) -> dict | None:
    """What ``batch --resume`` compares of one input: its resolved path, size and modification time.

    A file: ``{"path", "size", "mtime_ns"}``; a MetaImage/NRRD header with a detached data file
    also its data file's identity (``"data_file"``). A folder (a DICOM series): ``{"path",
    "files", "listing"}``, the listing being a digest of the name, size and modification time of
    every file directly in it. A path that cannot be read: ``{"path", "missing": True}``.
    Replacing, editing, adding or removing a file changes the identity; only the file system's
    metadata is read (no voxel data), so checking a cohort costs one ``stat`` per file.

    Parameters
    ----------
    path : path or None

    Returns
    -------
    dict or None
        JSON-ready; ``None`` for ``None``.
    """
    if path is None:
        return None
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    try:
        info = os.stat(real)
    except (OSError, ValueError):
        return {"path": real, "missing": True}
    if stat.S_ISDIR(info.st_mode):
        digest, count = hashlib.sha256(), 0
        try:
            with os.scandir(real) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        found = entry.stat()
                        digest.update(os.fsencode(entry.name) + f"\0{found.st_size}\0{found.st_mtime_ns}\n".encode())
                        count += 1
        except OSError:
            return {"path": real, "missing": True}
        return {"path": real, "files": count, "listing": digest.hexdigest()[:16]}
    identity: dict = {"path": real, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if real.lower().endswith((".nhdr", ".mhd")):
        from .. import io

        try:
            data_file = io.detached_data_file(real, trust=True)  # the header as the reader parses it
        except Exception:  # an unreadable header: reading the case reports it
            data_file = None
        if data_file is not None and os.path.realpath(data_file) != real:
            identity["data_file"] = input_identity(data_file)
    return identity


def case_identity(image: str | Path | Sequence[str | Path], mask: str | Path | None = None,
                  region_mask: str | Path | None = None, volume: int | None = None, series: str | None = None) -> dict:
    """The identity of a case's inputs, as ``batch --resume`` compares them: each file's
    :func:`input_identity` (``None`` where there is no mask or region mask), the volume and the
    series. A case of several channels (``image`` a list of paths) also has ``channels``, the
    identity of each channel in order; ``image`` is then the first channel's."""
    paths = image_paths(image)
    identity: dict[str, Any] = {"image": input_identity(first_image(image)), "mask": input_identity(mask),
                "region_mask": input_identity(region_mask), "volume": volume, "series": series}
    if len(paths) > 1:
        identity["channels"] = [input_identity(p) for p in paths]
    return identity
