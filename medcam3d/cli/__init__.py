"""Command-line interface: ``medcam3d demo | explain | batch | layers | evaluate | info``.

The package only builds parsers and calls the jobs: heavy imports (torch, MONAI) happen inside the commands, so
``medcam3d --help`` and usage errors are fast. Exit codes (see :func:`medcam3d.errors.exit_code`):
0 success, 1 a failure while running (a case of a cohort failed, an internal error), 2 a usage
error (bad arguments, an invalid config, an unusable input, a refused model or output folder),
130 interrupted (Ctrl-C). Messages go to stderr; ``-v`` shows what was chosen (layer, device ...),
``-vv`` also debug details and the traceback of an internal error.

One concept per module, each importing only those before it: ``arguments`` (argument types), ``tables``
(what is printed), ``runner`` (the Runner a command builds, and the checks before the model is loaded),
``demo``, ``commands`` (the other commands), ``parser`` (:func:`build_parser`), ``entry`` (:func:`main`).
"""

from __future__ import annotations

from .entry import main
from .parser import build_parser

__all__ = ["main", "build_parser"]
