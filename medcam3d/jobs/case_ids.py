"""Case ids: the safe, unique folder names of a cohort's cases, and the scans a case is named after.

A case id names the case's output folder (``OUT/<id>/``) and prefixes its files, so it must be
one safe path component (:func:`check_case_id`): no path separators, not ``.``/``..``, no leading
dot, no control or invisible formatting characters (zero-width spaces, bidi overrides), at most
:data:`MAX_ID_BYTES` bytes in UTF-8, and not the name of a file that medcam3d writes at the top of
``--out`` (:data:`RESERVED_IDS`). Ids are normalised to Unicode NFC and compared ignoring case
(:func:`case_id_key`), so two spellings of one name (NFC/NFD, upper/lower case) are one id, as
they are one folder on macOS and Windows. Ids given by the user (a CSV's ``id`` column) are
checked (:func:`check_case_id`); ids derived from file names are cleaned and made unique by
construction (:func:`derive_case_ids`). Collecting cases from a folder or CSV is
:mod:`medcam3d.jobs.cases`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from ..errors import CaseIdError, CohortError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_ID_BYTES",
    "MAX_ID_LENGTH",
    "RESERVED_IDS",
    "case_id_key",
    "case_id_of",
    "check_case_id",
    "derive_case_ids",
    "first_image",
    "id_with_suffix",
    "image_paths",
    "safe_component",
    "shown_text",
]

#: File endings read as scans in folder mode (DICOM series are folders).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: A case id's limit in UTF-8 bytes (100 ASCII letters, 33 CJK characters). File names are limited
#: to 255 bytes (NAME_MAX) and medcam3d adds up to ~26 bytes to a case folder's name while it is
#: written (``.<id>.partial-<pid>-<8 hex>``) and ``_<method>_<class>_feature.nii.gz`` to its files,
#: which leaves the method and class label about 130 bytes.
MAX_ID_BYTES = 100
MAX_ID_LENGTH = MAX_ID_BYTES  # the same limit, under its earlier name
#: Names that medcam3d writes at the top of an output folder (compared ignoring case): a case
#: folder of that name would collide with them. Names starting with a dot (the lock, staging
#: folders) are refused for every id anyway.
RESERVED_IDS = frozenset({
    "summary.csv", "summary.json", "summary.md", "metrics.csv", "cases.csv", "randomization.csv",
    "randomization.png", "curves.png", "segmentation.json", "failures", "medcam3d-manifest.json",
})

_FORBIDDEN = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
# control (C0/C1), format (zero-width, bidi, soft hyphen, BOM), surrogate and line/paragraph separators
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_ASCII_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


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


def shown_text(text: str, limit: int = 80) -> str:
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
        quoted = shown_text(text) if isinstance(text, str) else repr(text)
        raise CaseIdError(
            f"{where}: {quoted} cannot be a case id because {problem}. A case id names the output folder "
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


def id_with_suffix(text: str, suffix: str) -> str:
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
                ids[n] = id_with_suffix(ids[n], f"_{fmt}")
            elif attempt <= 1:
                ids[n] = safe_component(f"{os.path.basename(os.path.dirname(paths[n]))}_{ids[n]}")
            else:
                ids[n] = id_with_suffix(ids[n], f"_{n + 1}")
    seen: set[str] = set()
    for n, i in enumerate(ids):  # last resort: numbered, until it is free
        number = 1
        while key(i) in seen:
            number += 1
            i = id_with_suffix(ids[n], f"_{n + 1}_{number}")
        seen.add(key(i))
        ids[n] = i
    return ids
