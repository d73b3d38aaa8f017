"""The main job (one scan). Moved to :mod:`medcam3d.jobs.runner`; this alias keeps old imports working."""

import sys as _sys

from .jobs import runner as _module

_sys.modules[__name__] = _module
