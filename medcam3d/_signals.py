"""SIGTERM handled as Ctrl-C is, by the ``medcam3d`` command and the processes it forks.

``kill``, ``docker stop``, systemd and batch schedulers stop a job with SIGTERM, usually sent to the
whole process group: the command, its DataLoader workers and the batch writer. Python's default
is to die on the spot, leaving staging folders, temporary files and the output lock behind. Inside
:func:`sigterm_as_interrupt` a SIGTERM raises :class:`~medcam3d.errors.Terminated` (a
``KeyboardInterrupt``) instead, so every ``finally`` and ``except BaseException`` clean-up that
Ctrl-C runs runs too, and the command exits with status 143.

- Forked processes inherit the handler: the batch writer removes the staging folder of the case it
  was writing and leaves quietly, as on Ctrl-C.
- PyTorch's DataLoader workers install their own C-level SIGTERM handler (the worker dies of the
  signal, and the main process then raises "DataLoader worker is killed by signal" from its SIGCHLD
  handler, possibly in the middle of a clean-up): :func:`worker_init` puts the Python handler back
  in each worker, which then stops like the main process (PyTorch's worker loop leaves quietly on a
  ``KeyboardInterrupt``).
- Background threads whose peer process has gone fail with connection errors: above all
  ``multiprocessing``'s resource sharer, which hands shared-memory tensors between the processes and
  prints a traceback when the other side stops mid-transfer (the other side's failure is reported
  on its own). Those are logged at debug level, not printed, so the command's last word is its one
  line.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from .errors import Terminated

__all__ = ["sigterm_as_interrupt", "worker_init", "stopping"]

logger = logging.getLogger(__name__)

_state = {"installed": False, "stopping": False}


def stopping() -> bool:
    """Whether this process received SIGTERM inside :func:`sigterm_as_interrupt` and is stopping."""
    return bool(_state["stopping"])


def _stop(signum: int, frame: object) -> None:
    # Once: a second SIGTERM during the clean-up is ignored (as a second Ctrl-C is not, by Python).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _state["stopping"] = True
    raise Terminated()


def _peer_gone(error: BaseException | None) -> bool:
    """An error of a background thread whose peer process stopped: quiet while stopping, and always
    for the resource sharer's thread (``Thread-N (_serve)``), whose peer's failure is reported elsewhere."""
    if threading.current_thread() is threading.main_thread() or not isinstance(error, (ConnectionError, EOFError)):
        return False
    if _state["stopping"] or threading.current_thread().name.endswith("(_serve)"):
        logger.debug("a background thread lost its peer process: %s: %s", type(error).__name__, error)
        return True
    return False


def _quiet_thread_errors(previous):
    def hook(args: threading.ExceptHookArgs) -> None:
        if not _peer_gone(args.exc_value):
            previous(args)

    return hook


def _quiet_excepthook(previous):
    def hook(kind: type[BaseException], value: BaseException, traceback: object) -> None:
        if not _peer_gone(value):  # multiprocessing's resource sharer reports through sys.excepthook
            previous(kind, value, traceback)

    return hook


def _quiet_unraisable(previous):
    def hook(unraisable: object) -> None:
        if _state["stopping"]:
            return  # a finalizer (e.g. a DataLoader iterator's) interrupted while stopping
        previous(unraisable)

    return hook


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block: SIGTERM raises :class:`~medcam3d.errors.Terminated` in the main thread.

    Only in the main thread (where Python runs signal handlers); elsewhere the block runs unchanged.
    The previous SIGTERM handler, ``threading.excepthook`` and ``sys.unraisablehook`` are restored
    on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    thread_hook, except_hook, unraisable_hook = threading.excepthook, sys.excepthook, sys.unraisablehook
    threading.excepthook = _quiet_thread_errors(thread_hook)
    sys.excepthook = _quiet_excepthook(except_hook)
    sys.unraisablehook = _quiet_unraisable(unraisable_hook)
    _state.update(installed=True, stopping=False)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, except_hook, unraisable_hook
        _state.update(installed=False, stopping=False)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of medcam3d's DataLoaders: in a worker forked inside
    :func:`sigterm_as_interrupt`, SIGTERM stops the worker as it stops the main process (PyTorch's own
    handler would kill it by the signal). Elsewhere (the Python API, spawned workers) nothing changes."""
    if _state["installed"]:
        signal.signal(signal.SIGTERM, _stop)
