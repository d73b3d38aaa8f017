"""Atomic file writes: a temporary file in the target folder, renamed onto the target.

Readers never see a half-written file, and a failure leaves no file (and no temporary) behind.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "default_mode"]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and rename the result onto ``path``.

    The temporary file has the same suffix as ``path`` (libraries such as matplotlib pick the format
    from it) and lives in the same folder, so the rename is atomic.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(handle)
    try:
        os.chmod(temporary, default_mode())  # mkstemp makes 0600; outputs get the usual permissions
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
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
