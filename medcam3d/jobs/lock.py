"""One medcam3d job at a time per output folder: an exclusive lock on ``OUT/.medcam3d.lock``.

``batch``, ``evaluate`` and ``explain`` hold the lock for their whole run. A second job into the
same ``--out`` fails at once with a :class:`~medcam3d.errors.OutputConflictError` (exit code 2)
that says who holds it::

    results is being written by medcam3d batch (pid 4711, started 2024-05-02T10:31:07+02:00);
    wait for it to finish, or choose another --out.

The lock is an ``flock`` on the file, so the kernel releases it when its process ends, however it
ends: a lock file left by a killed run does not block the next one. The file holds the holder's
pid, host, start time and command line, and is removed when the lock is released. Under
``torchrun`` rank 0 takes the lock and tells the other ranks whether it got it
(:func:`output_lock` with a ``context``); the lock is held until every rank is done.

On file systems without ``flock`` support the job runs without a lock (with a warning).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shlex
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._files import default_mode
from ..errors import OutputConflictError, OutputPermissionError

__all__ = ["LOCK_NAME", "OutputLock", "output_lock", "lock_holder"]

logger = logging.getLogger(__name__)

#: The lock file's name inside the output folder.
LOCK_NAME = ".medcam3d.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: dict[str, OutputLock] = {}  # output folders this process holds, by path: taking one again is a no-op


def lock_holder(out: str | Path) -> dict | None:
    """What the lock file of ``out`` says about its holder (pid, host, started, command), if readable."""
    try:  # without blocking: a FIFO named like the lock file would wait for a writer forever
        descriptor = os.open(Path(out) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        data = json.loads(os.read(descriptor, 64 * 1024).decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(descriptor)
    return data if isinstance(data, dict) else None


def _busy_message(out: Path, holder: dict | None) -> str:
    if not holder:
        who = "another medcam3d job"
    else:
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = (f"medcam3d {holder.get('command', 'job')} (pid {holder.get('pid', '?')}{where}, "
               f"started {holder.get('started', '?')})")
    return f"{out} is being written by {who}; wait for it to finish, or choose another --out."


class OutputLock:
    """An exclusive lock on an output folder, taken by :meth:`acquire` and given back by :meth:`release`.

    Parameters
    ----------
    out : path
        The output folder; it must exist.
    command : str
        The job's name for the message a second job gets (``"batch"``, ``"evaluate"``, ``"explain"``).
    """

    def __init__(self, out: str | Path, command: str) -> None:
        self.out = Path(out).expanduser()
        self.path = self.out / LOCK_NAME
        self.command = command
        self.descriptor: int | None = None
        self.count = 0
        self._outer: OutputLock | None = None
        self._key = str(self.out.resolve())

    def acquire(self) -> OutputLock:
        """Take the lock, or raise at once when another process holds it.

        Raises
        ------
        OutputConflictError
            Another job holds the lock (the message names it), or the lock file is a link or a folder.
        OutputPermissionError
            The output folder is not writable.
        """
        if self.count > 0 or self._outer is not None:
            raise RuntimeError("this OutputLock is already held; use a new one (holds nest)")
        held = _HELD.get(self._key)
        if held is not None:  # this process holds it already (e.g. evaluate() inside a locked job)
            held.count += 1
            self._outer = held
            return self
        for _ in range(10):
            descriptor = self._open()
            if not self._lock(descriptor):
                os.close(descriptor)
                raise OutputConflictError(_busy_message(self.out, lock_holder(self.out)))
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                now = None
            mine = os.fstat(descriptor)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(descriptor)  # the holder removed the file as we opened it: lock the new one
        else:
            raise OutputConflictError(_busy_message(self.out, lock_holder(self.out)))
        self.descriptor, self.count = descriptor, 1
        _HELD[self._key] = self
        self._describe()
        return self

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.path, flags, default_mode())
        except PermissionError as error:
            raise OutputPermissionError(
                f"--out {str(self.out)!r} is not writable ({error.strerror}); choose a folder you can write to.") from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise OutputConflictError(
                    f"{self.path} is not a file (a link, a folder or a device); medcam3d keeps its lock file there. "
                    "Remove it, or choose another --out.") from None
            raise

    def _lock(self, descriptor: int) -> bool:
        """Whether the lock was taken (or cannot exist on this file system); ``False``: someone holds it."""
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as error:
            if sys.platform == "win32" and error.errno in (errno.EACCES, errno.EDEADLK):
                return False
            if error.errno not in _NO_LOCKS:
                raise
            logger.warning("%s: this file system does not support file locks; two jobs writing into %s at once "
                           "would not be stopped", self.path, self.out)
        return True

    def _describe(self) -> None:
        assert self.descriptor is not None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": self.command, "argv": shlex.join(sys.argv)[:4000]}
        data = (json.dumps(holder) + "\n").encode("utf-8")
        with contextlib.suppress(OSError):  # the lock holds without its description
            os.ftruncate(self.descriptor, 0)
            os.lseek(self.descriptor, 0, os.SEEK_SET)
            os.write(self.descriptor, data)

    def release(self) -> None:
        """Give the lock back (the outermost holder removes the lock file, then unlocks)."""
        if self._outer is not None:
            outer, self._outer = self._outer, None
            outer.release()
            return
        if self.count <= 0 or self.descriptor is None:
            return
        self.count -= 1
        if self.count > 0:
            return
        descriptor, self.descriptor = self.descriptor, None
        _HELD.pop(self._key, None)
        try:
            now = os.lstat(self.path)
            mine = os.fstat(descriptor)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino) and sys.platform != "win32":
                os.unlink(self.path)  # while still locked: a waiting job then locks a new file
        except OSError:
            pass
        finally:
            os.close(descriptor)  # closing the last descriptor releases the flock

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def torch_broadcast(objects: list) -> None:
    """Rank 0's ``objects`` to every rank of the process group (in place)."""
    import torch.distributed

    torch.distributed.broadcast_object_list(objects, src=0)


@contextlib.contextmanager
def output_lock(out: str | Path, command: str, *, context: Any = None,
                check: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock on ``out`` (created if needed) for the ``with`` block, and run ``check`` under it.

    Parameters
    ----------
    out : path
        The output folder.
    command : str
        The job's name, shown to a second job (``"batch"``).
    context : DistributedContext, optional
        Under ``torchrun`` (``context.distributed``), only rank 0 takes the lock and runs
        ``check``; its outcome reaches every rank, so all ranks fail together with the same
        message, and the lock is held until the block ends on rank 0 (after the ranks' last
        barrier). Every rank must call this.
    check : callable, optional
        Run under the lock before the block (e.g. :func:`~medcam3d.jobs.outputs.check_own_files`);
        an :class:`~medcam3d.errors.OutputConflictError` it raises ends the job before any work.

    Raises
    ------
    OutputConflictError
        Another job holds the lock, or ``check`` refused.
    """
    out = Path(out).expanduser()
    rank = getattr(context, "rank", 0)
    distributed = bool(getattr(context, "distributed", False))
    lock = None
    created = rank == 0 and not os.path.lexists(out)  # removed again when the job leaves it empty
    if rank == 0:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            lock = OutputLock(out, command).acquire()
            if check is not None:
                check()
        except Exception as error:  # under torchrun every rank must learn of it, or they would wait forever
            if lock is not None:
                lock.release()
            if created:
                with contextlib.suppress(OSError):
                    Path(out).rmdir()
            if distributed:
                torch_broadcast([f"{error}" or type(error).__name__])
            raise
    if distributed:
        shared: list[str | None] = [None]
        torch_broadcast(shared)  # rank 0 sends None (it holds the lock); the others receive its outcome
        if shared[0] is not None:
            raise OutputConflictError(shared[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        if created:
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # only when empty: a job that failed before writing leaves no folder
