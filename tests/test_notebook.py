"""The factors notebook runs top to bottom on the embedded default, and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_factors.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(
        not c.get("outputs") and not c.get("execution_count")
        for c in nb.cells
        if c.cell_type == "code"
    )


@pytest.mark.timeout(600)
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVA_RUN", str(tmp_path / "runs" / "nb" / "stage1"))
    monkeypatch.setenv("DIVA_SAMPLES", "16")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    root = NOTEBOOK.parents[1]
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "mean distance same sample U-G" in outputs
    assert "suggested middle layers" in outputs
