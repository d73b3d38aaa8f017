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


@pytest.fixture(autouse=True)
def _keep_the_c_locale():
    """GDCM's DICOM writer (SimpleITK, used by some tests to make series) sets the C library's locale to "C"
    and leaves it so: text opened without an explicit encoding in later tests (and subprocess output) would be
    ASCII. Put back the locale each test started with."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != before:
        locale.setlocale(locale.LC_ALL, before)


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


# ------------------------------------------------------------------ the tiny model every job test uses
TINY_NETWORK = "monai.networks.nets.DenseNet"
TINY_NETWORK_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4, "growth_rate": 4,
                     "block_config": [1, 1]}


def write_tiny_model(folder: Path, name: str = "weights.pt") -> Path:
    """A seeded two-class 3D DenseNet (random weights), saved as a state_dict in ``folder``."""
    import torch
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    model = DenseNet(**{**TINY_NETWORK_ARGS, "block_config": tuple(TINY_NETWORK_ARGS["block_config"])})
    path = Path(folder) / name
    torch.save(model.state_dict(), path)
    return path


def write_tiny_config(path: Path, weights: Path | str = "weights.pt", *, size: int = 24, spacing: float | None = 2.5,
                      output: str | None = "{pictures: false}", extra: str = "") -> Path:
    """A config for the tiny model: two classes ``bright``/``dark``, RAS, optional resampling, a ``size``³ input."""
    import json

    steps = ["  - {name: Orientation, axcodes: RAS}"]
    if spacing is not None:
        steps.append(f"  - {{name: Spacing, pixdim: [{spacing}, {spacing}, {spacing}]}}")
        steps.append("  - {name: ScaleIntensityRange, a_min: 0, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}")
    steps.append(f"  - {{name: ResizeWithPadOrCrop, spatial_size: [{size}, {size}, {size}]}}")
    text = (f"model:\n  network: {TINY_NETWORK}\n  args: {json.dumps(TINY_NETWORK_ARGS)}\n  weights: {weights}\n"
            "task: multilabel\nclass_names: [bright, dark]\n"
            "preprocessing:\n" + "\n".join(steps) + "\n"
            + (f"output: {output}\n" if output else "") + extra)
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)
