"""The evaluate job. Moved to :mod:`medcam3d.jobs.evaluate`; this alias keeps old imports working."""

import sys as _sys

from .jobs import evaluate as _module

_sys.modules[__name__] = _module
