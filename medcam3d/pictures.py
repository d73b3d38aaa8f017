"""Slice pictures. Moved to :mod:`medcam3d.jobs.report`; this alias keeps old imports working."""

import sys as _sys

from .jobs import report as _module

_sys.modules[__name__] = _module
