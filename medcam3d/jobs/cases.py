"""Cases: the one place where a path, a folder or a CSV becomes a list of scans to explain.

A case id names the case's output folder (``OUT/<id>/``) and prefixes its files, so it must be
one safe path component: no path separators, not ``.``/``..``, no leading dot, no control
characters, at most :data:`MAX_ID_LENGTH` characters (:func:`check_case_id`). Ids given by the
user (a CSV's ``id`` column) are checked and must be unique; ids derived from file names are
cleaned and made unique by construction (:func:`derive_case_ids`). Every problem is reported
before any work starts, naming the CSV line.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CaseIdError, CohortError

__all__ = [
    "Case",
    "collect_cases",
    "case_id_of",
    "check_case_id",
    "derive_case_ids",
    "safe_component",
    "IMAGE_SUFFIXES",
    "MAX_ID_LENGTH",
]

#: File endings read as scans in folder mode (DICOM series are folders).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_ID_LENGTH = 100

_IMAGE_COLUMNS = ("image", "file", "path", "scan", "filename")
_ID_COLUMNS = ("id", "case_id", "case", "name", "subject", "patient")
_MASK_COLUMNS = ("mask", "mask_file", "label", "labelmap", "label_map", "segmentation")
_LABEL_COLUMNS = ("labels", "labels_present", "labels present", "present", "findings")
_VOLUME_COLUMNS = ("volume", "volume_index", "timepoint")
_SERIES_COLUMNS = ("series", "series_uid", "seriesinstanceuid")
_REGION_COLUMNS = ("region_mask", "region_mask_file")
_FORBIDDEN = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
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
    """

    id: str
    image: Path
    mask: Path | None = None
    labels: list[str] | None = None
    source: str = ""
    volume: int | None = None
    series: str | None = None
    region_mask: Path | None = None


def case_id_of(path: str | Path) -> str:
    """The file or folder name without its image suffix (``scan.nii.gz`` → ``scan``); not cleaned."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_case_id(text: str, where: str = "case id") -> str:
    """Return ``text`` if it is one safe path component, else raise :class:`CaseIdError`.

    Safe: 1 to :data:`MAX_ID_LENGTH` characters, no ``/ \\ : * ? " < > |`` or control characters,
    not starting with ``.`` or a space, not ending with a space or ``.``.
    """
    problem = None
    if not text:
        problem = "it is empty"
    elif len(text) > MAX_ID_LENGTH:
        problem = f"it has {len(text)} characters (at most {MAX_ID_LENGTH})"
    elif _FORBIDDEN.search(text):
        bad = sorted({repr(c) for c in _FORBIDDEN.findall(text)})
        problem = f"it contains {', '.join(bad)} (path separators and control characters are not allowed)"
    elif text.startswith((".", " ")) or text.endswith((" ", ".")):
        problem = "it starts with a dot or a space, or ends with a space or a dot"
    if problem:
        raise CaseIdError(
            f"{where}: {text!r} cannot be a case id because {problem}. A case id names the output folder "
            f"OUT/<id>/, so it must be a single plain name such as 'patient_001'; fix the id (or the file name)."
        )
    return text


def safe_component(text: str, fallback: str = "case") -> str:
    """``text`` cleaned into a safe path component (forbidden characters → ``_``, no leading dots)."""
    text = unicodedata.normalize("NFC", text)
    text = _FORBIDDEN.sub("_", text).strip(" .")
    return text[:MAX_ID_LENGTH].rstrip(" .") or fallback


def derive_case_ids(images: Sequence[Path]) -> list[str]:
    """Distinct, safe case ids for scans that have no given id.

    The id is the cleaned file name without its suffix; where two scans would get the same id
    (``p1.nii.gz`` and ``p1.nrrd``; ``p1/scan.nii.gz`` and ``p2/scan.nii.gz``), each gets a longer
    one (the first in input order keeps the plain id): with its format where the formats differ
    (``p1_nrrd``), with its parent folder where the names are the same (``p2_scan``), then numbered.
    Comparison ignores case, so ids also stay distinct on case-insensitive file systems.
    """
    def key(text: str) -> str:
        return text.casefold()

    ids = [safe_component(case_id_of(p)) for p in images]
    for attempt in range(3):
        groups: dict[str, list[int]] = {}
        for n, i in enumerate(ids):
            groups.setdefault(key(i), []).append(n)
        # the first of each group keeps its id; the others get a longer one
        clashing = [(n, members[0]) for members in groups.values() if len(members) > 1 for n in members[1:]]
        if not clashing:
            return ids
        for n, first in clashing:
            image = Path(images[n])
            fmt = image.name[len(case_id_of(image)):].lstrip(".").replace(".", "_") or "dicom"
            same_format = image.name.casefold() == Path(images[first]).name.casefold()
            if attempt == 0 and not same_format:
                ids[n] = safe_component(f"{ids[n]}_{fmt}")
            elif attempt <= 1:
                ids[n] = safe_component(f"{image.parent.name}_{ids[n]}")
            else:
                ids[n] = safe_component(f"{ids[n]}_{n + 1}")
    seen: set[str] = set()
    for n, i in enumerate(ids):  # last resort, cannot clash any more
        while key(i) in seen:
            i = safe_component(f"{i}_{n + 1}")
        seen.add(key(i))
        ids[n] = i
    return ids


def _column(header: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {h.strip().lower(): h for h in header if h is not None}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


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


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    size = path.stat().st_size
    if size > _CSV_MAX_BYTES:
        raise CohortError(f"{path}: {size} bytes is too large for a cohort list (at most {_CSV_MAX_BYTES}).")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark from Excel is not part of a column name
    except UnicodeDecodeError as error:
        raise CohortError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 CSV.") from None
    try:
        reader = csv.DictReader(text.splitlines(), restkey="__extra__")
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [(n, row) for n, row in enumerate(reader, start=2)]
    except csv.Error as error:
        raise CohortError(f"{path}: not a valid CSV file: {error}.") from None
    return header, rows


def _from_csv(path: Path) -> tuple[list[Case], list[bool]]:
    header, rows = _read_csv(path)
    image_col = _column(header, _IMAGE_COLUMNS)
    if image_col is None:
        raise CohortError(
            f"{path}: the CSV has columns {header}, but none names the scan. Add a column 'image' (or 'file') "
            "with paths to scan files or DICOM folders, relative to the CSV's folder.")
    id_col, mask_col, label_col = (_column(header, c) for c in (_ID_COLUMNS, _MASK_COLUMNS, _LABEL_COLUMNS))
    volume_col, series_col = _column(header, _VOLUME_COLUMNS), _column(header, _SERIES_COLUMNS)
    region_col = _column(header, _REGION_COLUMNS)
    cases: list[Case] = []
    given: list[bool] = []

    def local(text: str) -> Path:
        candidate = Path(text.strip()).expanduser()
        return candidate if candidate.is_absolute() else path.parent / candidate

    for number, raw in rows:
        row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in raw.items()}
        where = f"{path}, line {number}"
        if not any(v.strip() for v in row.values()):
            continue  # blank line
        text = row.get(image_col, "").strip()
        if not text:
            raise CohortError(f"{where}: empty {image_col!r}; every row needs a scan path.")
        image = local(text)
        mask_text = row.get(mask_col, "").strip() if mask_col else ""
        labels = None  # no labels column: presence unknown; an empty cell: no class present
        if label_col is not None:
            labels = [t for t in re.split(r"[;,|\s]+", row.get(label_col, "").strip()) if t and t.lower() not in ("none", "-")]
        case_id = row.get(id_col, "").strip() if id_col else ""
        if case_id:
            check_case_id(case_id, f"{where}, column {id_col!r}")
        volume_text = row.get(volume_col, "").strip() if volume_col else ""
        if volume_text and not volume_text.isdigit():
            raise CohortError(f"{where}: {volume_col!r} must be a volume index (0, 1, ...), not {volume_text!r}.")
        series = (row.get(series_col, "").strip() if series_col else "") or None
        region_text = row.get(region_col, "").strip() if region_col else ""
        cases.append(Case(case_id, image, local(mask_text) if mask_text else None, labels, where,
                          int(volume_text) if volume_text else None, series, local(region_text) if region_text else None))
        given.append(bool(case_id))
    return cases, given


def _from_folder(folder: Path) -> list[Case]:
    cases = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and "_mask" not in path.name:
            cases.append(Case("", path, source=str(path)))
        elif path.is_dir() and _is_dicom_folder(path):
            cases.append(Case("", path, source=str(path)))
    if not cases:
        raise CohortError(f"{folder} holds no scans ({', '.join(IMAGE_SUFFIXES)} files or DICOM folders).")
    return cases


def collect_cases(inputs: str | Path | Iterable[str | Path], masks: str | Path | None = None, *,
                  check_files: bool = True) -> list[Case]:
    """Cases from a folder of scans, a CSV, one scan path, or a list of scan paths.

    Parameters
    ----------
    inputs : path or list of paths
        A folder (image files ``.nii[.gz]``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` and DICOM
        folders; names containing ``_mask`` and hidden files are skipped); a CSV (UTF-8, a
        byte-order mark is fine) with an image column (``image``, ``file``, ``path`` or ``scan``)
        and optional ``id`` (or ``case_id``/``case``), ``mask``, ``labels``, ``volume`` (of a 4D
        file), ``series`` (a SeriesInstanceUID of a multi-series DICOM folder) and ``region_mask``
        (a 0/1 region on the scan's grid to explain a segmentation network in; an empty cell: none)
        columns, relative paths being relative to the CSV's folder; or a single scan (file or DICOM
        folder).
    masks : path, optional
        A folder of masks named ``<case>_mask.nii.gz``; they override the CSV's.
    check_files : bool
        Refuse cases whose scan (or mask) does not exist, up front.

    Returns
    -------
    list of Case
        With safe, unique ids, in input order.

    Raises
    ------
    CohortError
        No scans, a CSV without an image column, missing files (all listed at once).
    CaseIdError
        A given id that is not a safe path component, or given ids that repeat (all listed).
    """
    if not isinstance(inputs, (str, Path)):
        paths = [Path(p) for p in inputs]
        cases, given = [Case("", p, source=str(p)) for p in paths], [False] * len(paths)
    else:
        inputs = Path(inputs)
        if inputs.is_file() and inputs.suffix.lower() in (".csv", ".tsv", ".txt"):
            cases, given = _from_csv(inputs)
            if not cases:
                raise CohortError(f"{inputs} lists no cases (only a header or blank lines).")
        elif inputs.is_dir() and not _is_dicom_folder(inputs):
            cases = _from_folder(inputs)
            given = [False] * len(cases)
        elif inputs.exists():
            cases, given = [Case("", inputs, source=str(inputs))], [False]
        else:
            raise CohortError(f"--inputs {str(inputs)!r} does not exist; give a folder of scans, a CSV with an "
                              "'image' column, or a scan.")
    _assign_ids(cases, given)
    if masks is not None:
        folder = Path(masks)
        if not folder.is_dir():
            raise CohortError(f"--masks {str(folder)!r} is not a folder; give the folder holding <case>_mask.nii.gz files.")
        for case in cases:
            candidate = folder / f"{case.id}_mask.nii.gz"
            if candidate.is_file():
                case.mask = candidate
    if check_files:
        missing = [f"{c.source or c.id}: {p}" for c in cases for p in (c.image, c.mask, c.region_mask)
                   if p is not None and not p.exists()]
        if missing:
            shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise CohortError(f"{len(missing)} input file(s) do not exist: {shown}. Fix the paths (relative paths "
                              "in a CSV are relative to the CSV's folder).")
    return cases


def _assign_ids(cases: list[Case], given: list[bool]) -> None:
    """Fill in derived ids; refuse given ids that repeat (ignoring case) or clash with derived ones."""
    key = str.casefold
    taken: dict[str, list[str]] = {}
    for case, is_given in zip(cases, given):
        if is_given:
            taken.setdefault(key(case.id), []).append(case.source)
    repeated = {k: v for k, v in taken.items() if len(v) > 1}
    if repeated:
        listed = "; ".join(f"{k!r} at {', '.join(v)}" for k, v in list(repeated.items())[:10])
        raise CaseIdError(f"Case ids must be unique (ignoring upper/lower case), but these repeat: {listed}. "
                          "Each case writes to OUT/<id>/; give every row its own id.")
    derived = [n for n, is_given in enumerate(given) if not is_given]
    ids = derive_case_ids([cases[n].image for n in derived])
    for n, case_id in zip(derived, ids):
        candidate, suffix = case_id, 2
        while key(candidate) in taken:  # a derived id never takes a given one
            candidate = safe_component(f"{case_id}_{suffix}")
            suffix += 1
        taken[key(candidate)] = [cases[n].source]
        cases[n].id = candidate
