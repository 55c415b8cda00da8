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
    monkeypatch.setenv("DIVA_DATA", str(tmp_path / "shapes"))  # tests write only under tmp
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    started = NOTEBOOK.parent  # opened from notebooks/ (#18 item 20): it finds the repository
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(started)}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "mean distance same sample U-G" in outputs
    assert "suggested middle layers" in outputs


def test_the_notebook_picks_the_newest_checkpoint_by_step_not_by_name(tmp_path):
    """#18 item 20: "epoch=0-step=9.ckpt" sorts after "epoch=0-step=10.ckpt" by name."""
    import torch

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if "def newest_checkpoint" in c.source)
    definition = cell[cell.index("def newest_checkpoint") : cell.index("RUN = ensure_run")]
    scope = {"Path": Path, "torch": torch}
    exec(definition, scope)
    (tmp_path / "checkpoints").mkdir()
    for step in (9, 10):
        torch.save({"global_step": step}, tmp_path / "checkpoints" / f"epoch=0-step={step}.ckpt")
    assert scope["newest_checkpoint"](tmp_path).name == "epoch=0-step=10.ckpt"
