"""Output folders: written atomically, replaced only where medcam3d wrote them, never over an input.

Each case is written into a staging folder ``OUT/.<id>.partial-<pid>-<8 hex>/`` (marked by a
``.medcam3d-staging`` file holding ``<pid>-<8 hex>``) and renamed to ``OUT/<id>/`` when complete.
Before the rename, medcam3d writes the folder's **manifest** into the marker object of its
``summary.json`` (``{"medcam3d": {"kind": "case", "manifest": {...}}}``): every other file it
wrote, with its size and a fingerprint (:func:`fingerprint`). A case folder is medcam3d's own only
when its ``summary.json`` is a regular file (not a link) holding such a manifest; a marker alone
is not enough.

When a case is written again, the existing folder is replaced only when every entry in it is
``summary.json`` or a file that the manifest lists, unchanged (same size and fingerprint). Any
other entry (a user's notes, a file edited since) makes the case fail with
:class:`~medcam3d.errors.OutputConflictError` naming those files, and nothing is deleted. The
replaced folder is renamed aside (``.<id>.old-<pid>-<8 hex>``) and only the files its manifest
lists are then deleted, each checked once more.

Staging and renamed-aside folders left by a killed run are removed once their process is gone
(:func:`remove_stale_staging`), but only when their name is exactly one that medcam3d makes and
their contents are its own: a staging folder must hold its staging mark (with the pid and token of
its name), a renamed-aside folder a manifest that matches every entry in it.

Files that medcam3d writes directly into ``OUT`` (``summary.csv`` of ``batch``, the report of
``evaluate``) are listed the same way in ``OUT/medcam3d-manifest.json``; a file of that name that
medcam3d did not write is never replaced or merged into (:func:`check_own_files`,
:func:`record_own_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._files import MARK, atomic_write_text, default_mode, is_inside
from ..errors import OutputConflictError
from .case_identity import input_identity
from .case_ids import check_case_id, derive_case_ids

__all__ = [
    "MARKER",
    "MANIFEST",
    "fingerprint",
    "is_own_case_folder",
    "read_case_summary",
    "check_case_slot",
    "read_manifest",
    "foreign_entries",
    "check_output_location",
    "check_own_files",
    "record_own_files",
    "own_file_kind",
    "staging_folder",
    "publish_case_folder",
    "remove_stale_staging",
]

logger = logging.getLogger(__name__)

#: Key of the marker object in every case's summary.json and every manifest.
MARKER = MARK
#: The manifest of the files medcam3d writes directly into OUT (a case folder's is in its summary.json).
#: Not a dot-file: names starting with a dot are medcam3d's temporaries (staging folders, the lock).
MANIFEST = "medcam3d-manifest.json"
_STAGING_MARK = ".medcam3d-staging"
_TOKEN = re.compile(r"[0-9a-f]{8}")
#: Files up to this size are fingerprinted by the SHA-256 of their whole content.
FULL_HASH_BYTES = 8 * 1024 * 1024
#: Bigger files (scan-grid maps: 300 MB for a CT): SHA-256 of their first and last MiB, with size and mtime.
EDGE_BYTES = 1024 * 1024
_MAX_JSON_BYTES = 64 * 1024 * 1024
_SHOWN = 5  # files named in a message, then "and N more"


# --------------------------------------------------------------------------- fingerprints
def _open_regular(path: Path) -> int | None:
    """A read-only descriptor of ``path`` when it is a regular file reached without following a link.

    Opened without blocking: a FIFO put in place of a file would otherwise wait for a writer forever.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a device or FIFO is not even opened
            return None
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
                             | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # replaced between lstat and open
        os.close(descriptor)
        return None
    if hasattr(os, "set_blocking"):
        os.set_blocking(descriptor, True)
    return descriptor


def fingerprint(path: str | Path) -> dict | None:
    """Size and fingerprint of a regular file (``None`` for a link, a folder, a missing file).

    Files up to :data:`FULL_HASH_BYTES` get the SHA-256 of their content (``sha256``). Bigger files
    (a 512x512x300 CT's map is 300 MB) get the SHA-256 of their first and last
    :data:`EDGE_BYTES` (``sha256_edges``) and their modification time (``mtime_ns``), so checking
    one costs 2 MiB of reading however big it is. Any ordinary change to such a file (saved again
    by a viewer, recompressed, truncated, replaced) changes its modification time or size, and for
    a ``.nii.gz`` its gzip trailer (CRC and length) in the last bytes; what it misses is a
    deliberate edit of the middle that restores the time stamp, which is not the mistake this
    guards against. A copy that does not keep time stamps (``cp`` without ``-p``) makes big files
    count as changed: they are then left alone, never deleted.
    """
    descriptor = _open_regular(Path(path))
    if descriptor is None:
        return None
    try:
        info = os.fstat(descriptor)
        digest = hashlib.sha256()
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            if info.st_size <= FULL_HASH_BYTES:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
                return {"size": info.st_size, "sha256": digest.hexdigest()}
            digest.update(stream.read(EDGE_BYTES))
            stream.seek(info.st_size - EDGE_BYTES)
            digest.update(stream.read(EDGE_BYTES))
            return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256_edges": digest.hexdigest()}
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _unchanged(path: Path, recorded: object) -> bool:
    """Whether ``path`` is still the regular file that ``recorded`` (a :func:`fingerprint`) describes."""
    if not isinstance(recorded, dict):
        return False
    now = fingerprint(path)
    return now is not None and all(now.get(key) == recorded.get(key) for key in ("size", "sha256", "mtime_ns",
                                                                                 "sha256_edges"))


# --------------------------------------------------------------------------- manifests
def _read_json_file(path: Path) -> object:
    descriptor = _open_regular(path)
    if descriptor is None:
        return None
    try:
        if os.fstat(descriptor).st_size > _MAX_JSON_BYTES:
            return None
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(descriptor)


def _manifest_file(kind: str) -> str:
    return "summary.json" if kind == "case" else MANIFEST


def read_manifest(folder: str | Path, kind: str = "case") -> dict[str, dict] | None:
    """The files that medcam3d listed as written into ``folder`` (relative POSIX path → fingerprint), or ``None``.

    ``kind`` ``"case"``: a case folder, whose manifest is the ``manifest`` of the marker object in
    its ``summary.json``; ``"out"``: the files written directly into ``OUT``, listed in
    ``OUT/medcam3d-manifest.json``. ``None`` when the folder is a link, or the manifest file is
    missing, a link, not JSON, not marked as medcam3d's of this kind, or lists a path that leaves
    the folder.
    """
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
    except OSError:
        return None
    return _listing(_read_json_file(folder / _manifest_file(kind)), kind)


def _listing(data: object, kind: str) -> dict[str, dict] | None:
    """The manifest held by ``data`` (a parsed manifest file), or ``None``."""
    marker = data.get(MARKER) if isinstance(data, dict) else None
    if not (isinstance(marker, dict) and marker.get("kind") == kind and isinstance(marker.get("manifest"), dict)):
        return None
    files = marker["manifest"]
    for name, entry in files.items():
        parts = name.split("/")
        if not isinstance(entry, dict) or name == _manifest_file(kind) or any(p in ("", ".", "..") or "\\" in p
                                                                             for p in parts):
            return None
    return files


def _write_manifest(folder: Path, kind: str, files: dict[str, dict]) -> None:
    """Write the manifest of ``folder``: into its ``summary.json``'s marker (a case), or ``OUT/medcam3d-manifest.json``."""
    from .. import __version__

    path = folder / _manifest_file(kind)
    data = _read_json_file(path) if kind == "case" else None
    document = data if isinstance(data, dict) else {}
    found = document.get(MARKER)
    marker: dict = found if isinstance(found, dict) else {}
    document[MARKER] = {**marker, "kind": kind, "version": marker.get("version", __version__),
                        "manifest": dict(sorted(files.items()))}
    if kind != "case":
        document["comment"] = "The files medcam3d wrote here; only these, unchanged, are ever replaced or deleted by it."
    atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """Every file-like entry (files, links, sockets ...) and every folder under ``folder``, as
    relative POSIX paths; links are listed, never followed."""
    files: list[str] = []
    folders: list[str] = []

    def walk(current: Path, prefix: str) -> None:
        with os.scandir(current) as listing:
            for entry in listing:
                name = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    folders.append(name)
                    walk(Path(entry.path), f"{name}/")
                else:
                    files.append(name)

    walk(folder, "")
    return files, folders


def foreign_entries(folder: str | Path, listed: dict[str, dict], kind: str = "case") -> list[str]:
    """The entries of ``folder`` that medcam3d may not delete: not in ``listed`` (a manifest's
    files), or changed since (a different size or fingerprint, now a link or a folder).

    Folders are foreign unless a listed file lies in them. The manifest itself (``summary.json`` of
    a case, see :func:`read_manifest`) is not reported.
    Each returned name ends with why (``" (not written by medcam3d)"``, ``" (changed)"``).
    """
    folder = Path(folder)
    files, folders = _entries(folder)
    parents = {"/".join(name.split("/")[:i]) for name in listed for i in range(1, name.count("/") + 1)}
    found = []
    for name in sorted(files):
        if name == _manifest_file(kind):
            continue
        if name not in listed:
            found.append(f"{name} (not written by medcam3d)")
        elif not _unchanged(folder / name, listed[name]):
            found.append(f"{name} (changed since medcam3d wrote it)")
    found += [f"{name}/ (not written by medcam3d)" for name in sorted(folders) if name not in parents]
    return found


def _named(entries: Sequence[str]) -> str:
    shown = ", ".join(entries[:_SHOWN])
    return shown + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")


def _remove_listed(folder: Path, listed: dict[str, dict], kind: str = "case") -> list[str]:
    """Delete the listed files that are unchanged, then the manifest and the emptied folders.

    Returns what was left (nothing when the folder is gone).
    """
    for name in listed:
        path = folder / name
        if _unchanged(path, listed[name]):
            path.unlink(missing_ok=True)
    (folder / _manifest_file(kind)).unlink(missing_ok=True)
    files, folders = _entries(folder)
    for name in sorted(folders, key=lambda n: n.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            (folder / name).rmdir()  # only when empty
    with contextlib.suppress(OSError):
        folder.rmdir()
    return [] if not os.path.lexists(folder) else files


# --------------------------------------------------------------------------- case folders
def read_case_summary(folder: str | Path) -> dict | None:
    """The case's ``summary.json`` as a dict when medcam3d wrote the folder, else ``None``.

    The folder must be a real folder (not a link) and ``summary.json`` a regular file (not a link)
    whose marker holds the manifest of the files medcam3d wrote (:func:`read_manifest`); a marker
    alone is not enough. Never raises for a missing, empty, corrupt or foreign ``summary.json``.
    """
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
    except OSError:
        return None
    data = _read_json_file(Path(folder) / "summary.json")
    return data if isinstance(data, dict) and _listing(data, "case") is not None else None


def check_case_slot(out_dir: str | Path, case_id: str, image: str | Path, *, volume: int | None = None,
                    series: str | None = None, id_option: str = "--id") -> None:
    """Refuse to replace a case folder that medcam3d wrote from *another* input (``medcam3d explain``).

    ``explain --image t1.nrrd --out O`` and then ``--image t1.mha --out O`` would both write
    ``O/t1/``: the second run would replace the first one's maps. A folder written from the same
    scan (the same resolved path, volume and series: a rerun) may be replaced; one written from
    another is refused, before any work, with the id to use instead (the one ``batch`` would derive,
    :func:`~medcam3d.jobs.case_ids.derive_case_ids`).

    Raises
    ------
    OutputConflictError
        ``out_dir/case_id`` holds the results of another scan, volume or series.
    """
    summary = read_case_summary(Path(out_dir) / case_id)
    if summary is None:
        return
    def entry(record: dict, key: str) -> dict:
        value = record.get(key)
        return value if isinstance(value, dict) else {}

    recorded = entry(entry(summary, "run"), "inputs")
    before = entry(recorded, "image")
    previous = before.get("path") or summary.get("image")
    now = (input_identity(image) or {}).get("path")
    if not isinstance(previous, str) or now is None:
        return
    same_scan = os.path.realpath(previous) == now
    if same_scan and recorded.get("volume") == volume and recorded.get("series") == series:
        return
    what = []
    if recorded.get("volume") is not None:
        what.append(f"volume {recorded['volume']}")
    if recorded.get("series"):
        what.append(f"series {recorded['series']}")
    of = f" ({', '.join(what)})" if what else ""
    if same_scan:
        suggestion = f"{case_id}_{'v' + str(volume) if volume is not None else 'series'}"
    else:
        suggestion = derive_case_ids([Path(previous), Path(now)])[1]
    message = (
        f"{Path(out_dir) / case_id} holds the results of {previous}{of}; explaining {image} there would replace them. "
        f"Give this scan its own case id ({id_option} {suggestion}) or another --out (or remove that folder to "
        "replace it)."
    )
    raise OutputConflictError(message)


def is_own_case_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a case folder that medcam3d wrote (a real folder whose summary.json holds its manifest)."""
    return read_case_summary(folder) is not None


def _real(text: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(text)``, resolving each folder once (a cohort lists thousands of files in a few folders)."""
    absolute = os.path.abspath(text) if ".." not in text.split(os.sep) else None  # '..' after a link: realpath's job
    if absolute is None or os.path.islink(absolute):
        return os.path.realpath(text)
    folder, name = os.path.split(absolute)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name) if name else folders[folder]


def check_output_location(out: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """Refuse an output folder that is a file, equals or contains an input, or lies inside an input folder.

    ``inputs`` are every path the job reads: scans, masks, region masks, and the CSV or folder
    that lists them.

    Returns
    -------
    Path
        ``out`` resolved.

    Raises
    ------
    OutputConflictError
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputConflictError(f"--out {str(out)!r} is a file; give a folder (it is created if needed).")
    resolved = out.resolve()
    seen: set[str] = set()
    folders: dict[str, str] = {}

    def real(text: str) -> str:
        return _real(text, folders)

    for item in inputs:
        if item is None:
            continue
        text = os.path.expanduser(os.fspath(item))
        if text in seen:
            continue
        seen.add(text)
        source = _real(text, folders)
        if is_inside(source, resolved, realpath=real):
            raise OutputConflictError(
                f"The output folder {str(out)!r} contains the input {str(item)!r}; medcam3d writes OUT/<case>/ folders "
                "and must never write over or beside its inputs. Choose an output folder outside the input data, "
                "e.g. --out results/.")
        if is_inside(resolved, source, realpath=real) and os.path.isdir(source):
            raise OutputConflictError(
                f"The output folder {str(out)!r} lies inside the input folder {str(item)!r}. Choose an output folder "
                "outside the input data, e.g. --out results/.")
    return resolved


def staging_folder(out_dir: Path, case_id: str) -> Path:
    """Create ``OUT/.<id>.partial-<pid>-<8 hex>/`` with the usual permissions and a staging mark."""
    check_case_id(case_id)
    token = secrets.token_hex(4)
    folder = out_dir / f".{case_id}.partial-{os.getpid()}-{token}"
    folder.mkdir(mode=0o700)
    folder.chmod(default_mode(directory=True))
    (folder / _STAGING_MARK).write_text(f"{os.getpid()}-{token}", encoding="utf-8")
    return folder


def _refuse_case(final: Path) -> None:
    """Raise unless ``final`` is absent, or a folder whose every entry medcam3d wrote and nobody changed."""
    try:
        info = os.lstat(final)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        what = "a link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise OutputConflictError(
            f"{final} exists, is {what} and was not written by medcam3d, so it is left as it is. Move it away, or "
            "choose another --out.")
    listed = read_manifest(final, "case")
    if listed is None:
        raise OutputConflictError(
            f"{final} exists and was not written by medcam3d (no summary.json holding medcam3d's list of the files it "
            "wrote), so it is left as it is. Move it away, or choose another --out.")
    foreign = foreign_entries(final, listed)
    if foreign:
        raise OutputConflictError(
            f"{final} holds files not written by medcam3d or changed since: {_named(foreign)}; nothing was deleted "
            "and this case was not written. Move those files out of the folder (or the folder away), or choose "
            "another --out.")


def _aside(final: Path) -> Path:
    """A fresh ``.<name>.old-<pid>-<8 hex>`` path beside ``final`` (nothing exists there)."""
    while True:
        trash = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(trash):
            return trash


def publish_case_folder(staging: Path, final: Path) -> None:
    """Write ``staging``'s manifest and rename it to ``final``, replacing ``final`` only if medcam3d wrote it.

    Raises
    ------
    OutputConflictError
        ``final`` exists and is not a medcam3d case folder, or holds files that medcam3d did not
        write or that changed since (named in the message); ``final`` is left untouched.
    """
    (staging / _STAGING_MARK).unlink(missing_ok=True)
    files, _ = _entries(staging)
    listed = {}
    for name in files:
        recorded = fingerprint(staging / name)
        if recorded is not None and name != "summary.json":
            listed[name] = recorded
    _write_manifest(staging, "case", listed)
    if not os.path.lexists(final):
        staging.rename(final)
        return
    _refuse_case(final)
    trash = _aside(final)
    final.rename(trash)
    try:
        staging.rename(final)
    except BaseException:
        trash.rename(final)  # put the previous result back
        raise
    left = _remove_listed(trash, read_manifest(trash, "case") or {})
    if left:
        logger.warning("%s: kept %s, which appeared while the case was replaced; move it where you want it", trash,
                       _named(left))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_staging(out_dir: str | Path, case_id: str) -> list[Path]:
    """Remove ``.<id>.partial-<pid>-<8 hex>``/``.<id>.old-<pid>-<8 hex>`` folders of this case whose process has ended.

    Only folders that medcam3d created are touched, and only their own contents:

    - a staging folder (``.partial-``) must be a real folder holding the staging mark, a regular
      file whose text is the ``<pid>-<8 hex>`` of its name; it is removed with all its contents
      (or, when the mark is gone because the run was killed while publishing, the files its
      manifest lists, if every entry in it is listed and unchanged);
    - a renamed-aside folder (``.old-``) must hold a manifest that lists every entry in it,
      unchanged; the listed files are deleted.

    Anything else (another name, a link, a foreign file inside) is left as it is.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(rf"\.{re.escape(case_id)}\.(partial|old)-([0-9]+)-([0-9a-f]{{8}})")
    removed: list[Path] = []
    try:
        names = os.listdir(out_dir)
    except OSError:
        return removed
    for name in sorted(names):
        found = pattern.fullmatch(name)
        if found is None:
            continue
        kind, pid_text, token = found.groups()
        folder = out_dir / name
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
        except OSError:
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        listed = read_manifest(folder, "case")
        if kind == "partial" and _mark_text(folder / _STAGING_MARK) == f"{pid_text}-{token}":
            shutil.rmtree(folder, ignore_errors=True)
        elif listed is not None and not foreign_entries(folder, listed):
            _remove_listed(folder, listed)
        else:
            logger.info("left %s as it is: its contents are not all medcam3d's", folder)
            continue
        if not os.path.lexists(folder):
            removed.append(folder)
            logger.info("removed %s, left by an interrupted run (process %d)", folder, pid)
    return removed


def _mark_text(path: Path) -> str | None:
    descriptor = _open_regular(path)
    if descriptor is None:
        return None
    try:
        return os.read(descriptor, 64).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- files directly in OUT
def _check_parents(out: Path, name: str) -> None:
    current = out
    for part in name.split("/")[:-1]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            raise OutputConflictError(
                f"{current} is {'a link' if stat.S_ISLNK(info.st_mode) else 'a file'}, not a folder that medcam3d may "
                "write into; it is left as it is. Move it away, or choose another --out.")


def check_own_files(out: str | Path, names: Iterable[str]) -> None:
    """Refuse before any work when a file medcam3d is about to write into ``out`` exists and medcam3d
    did not write it there (or it changed since).

    ``names`` are relative POSIX paths (``"summary.csv"``, ``"failures/README.md"``); a file that
    does not exist is fine.

    Raises
    ------
    OutputConflictError
        Naming every such file.
    """
    out = Path(out)
    listed = read_manifest(out, "out")
    conflicts = []
    if listed is None and os.path.lexists(out / MANIFEST):  # a file of that name that is not medcam3d's manifest
        conflicts.append(f"{MANIFEST} (not written by medcam3d)")
    listed = listed or {}
    for name in names:
        _check_parents(out, name)
        path = out / name
        if not os.path.lexists(path):
            continue
        if name not in listed:
            conflicts.append(f"{name} (not written by medcam3d)")
        elif not _unchanged(path, listed[name]):
            conflicts.append(f"{name} (changed since medcam3d wrote it)")
    if conflicts:
        raise OutputConflictError(
            f"{out} already holds {_named(conflicts)}, which medcam3d would replace; it is left as it is and nothing "
            "was written. Move it away, or choose another --out.")


def record_own_files(out: str | Path, names: Iterable[str], kind: str) -> None:
    """List files that medcam3d has just written into ``out`` in ``OUT/medcam3d-manifest.json``.

    ``kind`` says what wrote them (``"batch"``, ``"evaluate"``, ``"demo"``): ``batch`` merges an
    earlier ``summary.csv`` only when ``batch`` wrote it (:func:`own_file_kind`). The caller holds
    the output lock (:mod:`medcam3d.jobs.lock`), so the manifest is not written twice at once.
    """
    out = Path(out)
    listed = dict(read_manifest(out, "out") or {})
    for name in names:
        recorded = fingerprint(out / name)
        if recorded is None:
            listed.pop(name, None)
        else:
            listed[name] = {**recorded, "written_by": kind}
    _write_manifest(out, "out", listed)


def own_file_kind(out: str | Path, name: str) -> str | None:
    """What wrote ``out/name`` (see :func:`record_own_files`), when medcam3d did and it is unchanged; else ``None``."""
    listed = read_manifest(out, "out") or {}
    entry = listed.get(name)
    if entry is None or not _unchanged(Path(out) / name, entry):
        return None
    kind = entry.get("written_by")
    return kind if isinstance(kind, str) else None
