"""Cases: the one place where a path, a folder or a CSV becomes a list of scans to explain.

Each case gets a safe, unique id (:mod:`medcam3d.jobs.case_ids`: ids given by the user, a CSV's
``id`` column, are checked and must be unique; ids derived from file names are cleaned and made
unique by construction). Every problem is reported before any work starts, naming the CSV line;
cheap checks (columns, ids, row count) come before the file system is asked. What ``batch
--resume`` compares of a case is :mod:`medcam3d.jobs.case_identity`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CaseIdError, CohortError
from .case_identity import case_identity
from .case_ids import (IMAGE_SUFFIXES, case_id_key, case_id_of, check_case_id, derive_case_ids, id_with_suffix,
                       shown_text)

__all__ = [
    "Case",
    "collect_cases",
    "MAX_CASES",
]

#: At most this many cases in one list (CSV rows, scans in a folder); ``max_cases`` lifts it.
MAX_CASES = 100_000
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
                              f"not {shown_text(volume_text)}.")
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
        missing = [f"{c.source or c.id}: {shown_text(text, 200)}" for c in cases for p in (*c.inputs, c.mask, c.region_mask)
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
        listed = "; ".join(f"{shown_text(k)} at {', '.join(v[:5])}" + (f" and {len(v) - 5} more" if len(v) > 5 else "")
                           for k, v in list(repeated.items())[:10])
        raise CaseIdError(f"Case ids must be unique (ignoring upper/lower case and Unicode normalisation), but "
                          f"{len(repeated)} repeat: {listed}. Each case writes to OUT/<id>/; give every row its own id.")
    derived = [n for n, is_given in enumerate(given) if not is_given]
    ids = derive_case_ids([(cases[n].image if naming is None else naming[n]) for n in derived])
    for n, case_id in zip(derived, ids):
        candidate, suffix = case_id, 2
        while key(candidate) in taken:  # a derived id never takes a given one
            candidate = id_with_suffix(case_id, f"_{suffix}")
            suffix += 1
        taken[key(candidate)] = [cases[n].source]
        cases[n].id = candidate
