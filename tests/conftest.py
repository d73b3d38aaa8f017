"""Shared pytest set-up.

Qt tests (the napari plugin's) need an X server: pytest-xvfb starts Xvfb when it is installed,
and Qt's xcb platform plugin needs a few system libraries. Without them Qt aborts the whole
pytest process, so here tests that use a Qt fixture are skipped with the reason instead.
``scripts/install-system-deps.sh`` (run by ``make test``) installs what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QT_FIXTURES = {"qapp", "qtbot", "make_napari_viewer", "make_napari_viewer_proxy"}
FIX = "scripts/install-system-deps.sh installs them (needs apt-get and root or sudo)"


@pytest.hookimpl(optionalhook=True)
def pytest_xvfb_disable(config: pytest.Config) -> bool:
    """Tell pytest-xvfb not to start an X server that is not installed (the Qt tests are skipped)."""
    backend = config.getoption("--xvfb-backend", None)
    return shutil.which({"xvnc": "Xvnc", "xephyr": "Xephyr"}.get(backend, "Xvfb")) is None


def qt_unavailable() -> str | None:
    """Why Qt cannot open a window here (None when it can): checked in a subprocess, as Qt aborts."""
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM", "xcb") == "xcb":
        if shutil.which("Xvfb") is None:
            return f"no X server: Xvfb is not installed and DISPLAY is not set; {FIX}"
        return "no X server: DISPLAY is not set and pytest-xvfb did not start Xvfb (pip install -e '.[dev]')"
    try:
        import PyQt6
    except ImportError:
        return "PyQt6 is not installed: pip install -e '.[napari]'"
    plugin = Path(PyQt6.__file__).parent / "Qt6" / "plugins" / "platforms" / "libqxcb.so"
    if plugin.exists() and shutil.which("ldd"):
        ldd = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True).stdout
        missing = sorted({line.split()[0] for line in ldd.splitlines() if "not found" in line})
        if missing:
            return f"Qt's xcb plugin lacks {', '.join(missing)}; {FIX}"
    probe = "from PyQt6.QtWidgets import QApplication; QApplication([])"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "creating a QApplication timed out"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"Qt cannot start (exit {done.returncode}: {last}); {FIX}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    qt_items = [item for item in items if QT_FIXTURES & set(getattr(item, "fixturenames", ()))]
    reason = qt_unavailable() if qt_items else None
    for item in qt_items if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))
