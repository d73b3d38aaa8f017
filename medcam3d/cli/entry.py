"""The ``medcam3d`` console script: parse, check what needs no work, run the command, and turn every
failure into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._signals import sigterm_as_interrupt
from ..errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Medcam3dError,
    OutputPermissionError,
    Terminated,
    UsageError,
    exit_code,
    one_line,
)
from .parser import build_parser

logger = logging.getLogger("medcam3d")


def _apply_read_limits(args: argparse.Namespace) -> None:
    """The reading limits given on the command line, for this run (:func:`medcam3d.io.set_read_limits`)."""
    chosen = {name: getattr(args, name) for name in ("max_bytes", "max_expansion", "max_voxel_mm", "max_slices")
              if hasattr(args, name)}
    from ..io import set_read_limits

    set_read_limits(**chosen)  # none given: the defaults (a process running main() twice starts afresh)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("medcam3d: %(message)s" if verbosity <= 1 else
                                           "medcam3d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("medcam3d")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _check_path_options(args: argparse.Namespace) -> None:
    """An empty path (``--image ''``) is a usage error, not the current folder."""
    for name in ("image", "channels", "mask", "region_mask", "inputs", "out", "config"):
        value = getattr(args, name, None)
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and not text.strip():
                raise UsageError(f"--{name.replace('_', '-')} is empty ({text!r}); expected the path of a file or folder.")


def _check_out_folder(args: argparse.Namespace) -> None:
    """``--out`` must be a folder that medcam3d can create or write in: refused before any work otherwise."""
    text = getattr(args, "out", None)
    if not isinstance(text, str) or not text.strip():
        return
    out = Path(text)
    existing = out
    while not existing.exists() and existing.parent != existing:  # the deepest part of the path that exists
        if existing.is_symlink():  # a link to nothing (or a loop): it cannot be created as a folder
            raise UsageError(f"--out {text!r} cannot be created: {str(existing)!r} is a symbolic link to "
                             f"{os.readlink(existing)!r}, which does not exist (or is a loop); create the link's target, "
                             "remove the link, or choose another --out.")
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == out:
            raise UsageError(f"--out {text!r} is a file, not a folder; give a folder (it is created if missing).")
        raise UsageError(f"--out {text!r} cannot be created: {str(existing)!r} is a file, not a folder; choose another "
                         "--out.")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPermissionError(
            f"--out {text!r}: medcam3d cannot write in {str(existing)!r} (permission denied, or a read-only file "
            "system); choose a folder you can write to, or change its permissions."
        )


def _check_device(args: argparse.Namespace) -> None:
    """``--device``: a device this machine has (``mps`` without Apple's GPU, ``cuda:7`` on two GPUs ... are
    usage errors here, before the model is loaded)."""
    device = getattr(args, "device", None)
    if isinstance(device, str) and device != "auto":
        from ..jobs.runner import resolve_device

        resolve_device(device)


#: OS errors that the user's paths cause (exit 2, with the path), not medcam3d.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def _path_error_text(error: OSError) -> str:
    where = " and ".join(repr(str(name)) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error)
    return (f"{reason}: {where or 'a path'} (errno {error.errno}). Check that the path exists as a folder or file, "
            "and its permissions; for outputs, choose an --out you can write to.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcam3d`` console script; returns the exit code.

    Every failure prints one line on stderr (:func:`medcam3d.errors.one_line`): ``medcam3d COMMAND: error:
    ...``; SIGTERM prints ``medcam3d COMMAND: terminated.`` and exits 143, Ctrl-C ``interrupted.`` and 130.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0)
    _configure_logging(verbosity)
    command = f"medcam3d {args.command}"
    try:
        with sigterm_as_interrupt():
            _check_path_options(args)
            _check_out_folder(args)
            _check_device(args)
            _apply_read_limits(args)
            return int(args.run(args))
    except Terminated:
        print(f"{command}: terminated.", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Medcam3dError as error:
        print(f"{command}: error: {one_line(str(error))}", file=sys.stderr)
        return exit_code(error)
    except MemoryError as error:
        print(f"{command}: error: out of memory ({one_line(str(error), 500) if str(error) else 'no details'}). Try --roi "
              "for sliding windows, --amp bf16 on a GPU, or a machine with more memory.", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        if error.errno not in _PATH_ERRNOS:
            return _internal_error(command, error, verbosity)
        if verbosity >= 2:
            logger.exception("path error")
        print(f"{command}: error: {one_line(_path_error_text(error))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug or an environment failure: one line, traceback only with -vv
        return _internal_error(command, error, verbosity)
    finally:
        if "medcam3d.io" in sys.modules:
            sys.modules["medcam3d.io"].set_read_limits()  # the flags were for this run only


def _internal_error(command: str, error: BaseException, verbosity: int) -> int:
    if verbosity >= 2:
        logger.exception("internal error")
    print(f"{command}: error: {type(error).__name__}: {one_line(str(error))}"
          + ("" if verbosity >= 2 else " (run with -vv for the traceback)"), file=sys.stderr)
    return EXIT_FAILURE
