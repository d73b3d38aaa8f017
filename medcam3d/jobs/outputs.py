"""Case folders: written atomically, replaced only when medcam3d wrote them, never over an input.

Each case is written into a staging folder ``OUT/.<id>.partial-<pid>-<random>/`` (marked by a
``.medcam3d-staging`` file) and renamed to ``OUT/<id>/`` when complete. A case folder is
recognised as medcam3d's own by its ``summary.json``, which holds a ``"medcam3d"`` marker
(:func:`is_own_case_folder`); only such a folder is ever replaced. Anything else at
``OUT/<id>/`` (a user's folder, an input) makes the case fail with
:class:`~medcam3d.errors.OutputConflictError`, and nothing is deleted. Staging folders left by a
killed run are removed once their process is gone (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from .._files import default_mode
from ..errors import OutputConflictError
from .cases import check_case_id

__all__ = [
    "MARKER",
    "is_own_case_folder",
    "read_case_summary",
    "check_output_location",
    "staging_folder",
    "publish_case_folder",
    "remove_stale_staging",
]

logger = logging.getLogger(__name__)

#: Key of the marker object in every case's summary.json.
MARKER = "medcam3d"
_STAGING_MARK = ".medcam3d-staging"


def read_case_summary(folder: str | Path) -> dict | None:
    """The case's ``summary.json`` as a dict when medcam3d wrote the folder, else ``None``.

    Never raises for a missing, empty, corrupt or foreign ``summary.json``.
    """
    path = Path(folder) / "summary.json"
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024 * 1024:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get(MARKER), dict) and data[MARKER].get("kind") == "case":
        return data
    return None


def is_own_case_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a case folder that medcam3d wrote (a real folder with a marked summary)."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and read_case_summary(folder) is not None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(out: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """Refuse an output folder that is a file, equals or contains an input, or lies inside an input folder.

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
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if _inside(source, resolved):
            raise OutputConflictError(
                f"The output folder {str(out)!r} contains the input {str(item)!r}; medcam3d writes OUT/<case>/ folders "
                "and must never write over or beside its inputs. Choose an output folder outside the input data, "
                "e.g. --out results/.")
        if source.is_dir() and _inside(resolved, source):
            raise OutputConflictError(
                f"The output folder {str(out)!r} lies inside the input folder {str(item)!r}. Choose an output folder "
                "outside the input data, e.g. --out results/.")
    return resolved


def staging_folder(out_dir: Path, case_id: str) -> Path:
    """Create ``OUT/.<id>.partial-<pid>-<random>/`` with the usual permissions and a staging mark."""
    check_case_id(case_id)
    folder = out_dir / f".{case_id}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    folder.chmod(default_mode(directory=True))
    (folder / _STAGING_MARK).write_text(str(os.getpid()), encoding="utf-8")
    return folder


def publish_case_folder(staging: Path, final: Path) -> None:
    """Rename a complete staging folder to ``final``, replacing ``final`` only if medcam3d wrote it.

    Raises
    ------
    OutputConflictError
        ``final`` exists and is not a medcam3d case folder (it is left untouched).
    """
    (staging / _STAGING_MARK).unlink(missing_ok=True)
    if final.is_symlink() or (final.exists() and not is_own_case_folder(final)):
        raise OutputConflictError(
            f"{final} exists and was not written by medcam3d (no summary.json with a medcam3d marker), so it is left "
            "as it is. Move it away, or choose another --out.")
    if not final.exists():
        staging.rename(final)
        return
    trash = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    final.rename(trash)
    try:
        staging.rename(final)
    except BaseException:
        trash.rename(final)  # put the previous result back
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: str | Path, case_id: str) -> list[Path]:
    """Remove ``.<id>.partial-*``/``.<id>.old-*`` folders of this case whose process has ended.

    Only folders that medcam3d created are touched: a staging folder must hold the staging mark,
    a replaced folder (``.old-``) a marked ``summary.json``.
    """
    out_dir = Path(out_dir)
    removed = []
    for kind in ("partial", "old"):
        for folder in out_dir.glob(f".{case_id}.{kind}-*"):
            pid_text = folder.name.rsplit(f".{kind}-", 1)[-1].split("-", 1)[0]
            if not pid_text.isdigit() or not folder.is_dir() or folder.is_symlink():
                continue
            pid = int(pid_text)
            if pid == os.getpid() or _alive(pid):
                continue
            ours = (folder / _STAGING_MARK).is_file() if kind == "partial" else is_own_case_folder(folder)
            if ours:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
                logger.info("removed %s, left by an interrupted run (process %d)", folder, pid)
    return removed
