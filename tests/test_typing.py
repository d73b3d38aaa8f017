"""mypy is clean on the whole package (configuration: ``[tool.mypy]`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy_clean_package() -> None:
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--no-error-summary",
        str(ROOT / "medcam3d"),
    ])
    assert status == 0, f"mypy found errors in the package:\n{stdout}{stderr}"
