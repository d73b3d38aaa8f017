"""``python -m medcam3d``: the command-line interface."""

from .cli import main

raise SystemExit(main())
