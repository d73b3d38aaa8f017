"""File safety shared by every writer and reader of medcam3d.

- Atomic writes (:func:`atomic_write`, :func:`atomic_write_text`, :func:`atomic_paths`): a
  temporary file in the target folder, renamed onto the target. Readers never see a half-written
  file, and a failure leaves no file (and no temporary) behind.
- :func:`is_inside`: whether a path lies in a folder once links are resolved.
- :func:`written_by_medcam3d`: whether an existing file carries medcam3d's mark (:data:`MARK`),
  the test every writer makes before replacing a file it did not just create.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MARK", "atomic_paths", "atomic_write", "atomic_write_text", "default_mode", "is_inside",
           "written_by_medcam3d"]

#: medcam3d's mark in what it writes: the start of a NIfTI ``descrip``, a DICOM ``Manufacturer``, the key
#: of the marker object in its JSON files (:data:`medcam3d.jobs.outputs.MARKER`).
MARK = "medcam3d"


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | Path], *, suffix: str | None = None) -> Iterator[list[str]]:
    """Temporary files for ``paths``, renamed onto them when the ``with`` block ends without error.

    Each temporary lives in its target's folder (so the rename is atomic), is named
    ``.<name>.<random><suffix>`` (``suffix`` defaults to the target's own: libraries such as
    matplotlib and nibabel pick the format from it) and has the permissions a new file gets under
    the umask. On any error, or when the block raises, every temporary is removed and no target is
    touched. Targets are renamed in order once the block is done (close what you opened on them
    inside it).
    """
    targets = [Path(path) for path in paths]
    temporaries: list[str] = []
    try:
        for target in targets:
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                                 suffix=(target.suffix if suffix is None else suffix) or ".tmp")
            os.close(handle)
            temporaries.append(temporary)
            os.chmod(temporary, default_mode())  # mkstemp makes 0600; outputs get the usual permissions
        yield list(temporaries)
        for temporary, target in zip(temporaries, targets):
            os.replace(temporary, target)
    except BaseException:
        for temporary in temporaries:
            Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[str], object], *, suffix: str | None = None) -> Path:
    """Call ``write(temporary_path)`` and rename the result onto ``path`` (see :func:`atomic_paths`).

    The temporary file has the suffix ``suffix``, by default the same as ``path``'s (libraries such
    as matplotlib pick the format from it), and lives in the same folder, so the rename is atomic.
    """
    path = Path(path)
    with atomic_paths([path], suffix=suffix) as (temporary,):
        write(temporary)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda name: Path(name).write_text(text, encoding="utf-8"))


def default_mode(directory: bool = False) -> int:
    """Permissions a new file (0666) or folder (0777) gets under the process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc); elsewhere from a probe file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Portable and thread-safe: create a file with mode 0666 and see what the umask left.
    probe = Path(tempfile.gettempdir()) / f".medcam3d-umask-{os.getpid()}-{threading.get_ident()}"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return 0o666 & ~os.stat(probe).st_mode & 0o777
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def is_inside(path: str | os.PathLike, folder: str | os.PathLike, *,
              realpath: Callable[[str], str] = os.path.realpath) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, once links (and ``..``) are resolved in both.

    A link in ``folder`` that leads outside it is outside; a link elsewhere that leads into
    ``folder`` is inside: what counts is where reading or writing ``path`` would land.
    ``realpath`` resolves a path (:func:`os.path.realpath`); a caller checking thousands of paths
    may pass one with the same result that caches resolved folders.
    """
    try:
        real_folder = realpath(os.fspath(folder))
        real_path = realpath(os.fspath(path))
        return os.path.commonpath([real_folder, real_path]) == real_folder
    except ValueError:  # different drives (Windows), or a relative path from a custom realpath
        return False


def written_by_medcam3d(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` carries medcam3d's mark (:data:`MARK`), by its format.

    A NIfTI file (``.nii``, ``.nii.gz``) whose ``descrip`` starts with the mark; any other file
    whose DICOM ``Manufacturer`` is the mark (``False`` without pydicom). Never raises: a missing, unreadable or foreign file
    is not medcam3d's. (Output folders and the files of ``OUT`` are recognised by their manifest
    instead, which also proves them unchanged: :mod:`medcam3d.jobs.outputs`.)
    """
    name = os.fspath(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError

        try:
            header: Any = nib.load(os.fspath(path)).header
            descrip = header["descrip"].tobytes().split(b"\0")[0]
        except (ImageFileError, OSError, EOFError, ValueError, zlib.error):  # unreadable: not ours
            return False
        return bool(descrip.startswith(MARK.encode("ascii")))
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # without pydicom (an optional dependency) no file can be shown to be ours
        return False
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("Manufacturer", "")) == MARK
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):  # not DICOM: not ours
        return False
