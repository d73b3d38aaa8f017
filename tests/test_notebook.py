"""The quickstart notebook runs headless, top to bottom, on the shipped samples."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "inside the true lesion" in outputs
    assert any(p.suffix == ".png" for p in (tmp_path / "quickstart_out").iterdir())
    assert any(p.name.endswith(".nii.gz") for p in (tmp_path / "quickstart_out").iterdir())
