"""Cohorts. Moved to :mod:`medcam3d.jobs.cohort`; this alias keeps old imports working."""

import sys as _sys

from .jobs import cohort as _module

_sys.modules[__name__] = _module
