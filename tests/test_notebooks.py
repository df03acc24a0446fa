"""notebooks/attention_maps.ipynb executes top to bottom (nbclient), localises above chance, and is committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "attention_maps.ipynb"


def test_committed_without_outputs():
    path = NOTEBOOK
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.slow
def test_attention_maps_notebook_runs_and_localises_above_chance(tmp_path, monkeypatch):
    """Trains a small shapes model (about a minute on 2 CPU cores), draws the maps, scores localisation."""
    from nbclient import NotebookClient

    out = tmp_path / "out"
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("CAPTIONER_NOTEBOOK_CHECKPOINT", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # model + reference figures for three images
    assert any("image/gif" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    res = json.loads((out / "attention_maps.json").read_text())
    assert res["trained"] and res["attention_mentions"] > 100
    assert res["attention_localisation"] > res["attention_localisation_chance"] + 0.1
    assert res["attention_localisation_per_word"] > res["attention_localisation_per_word_chance"]
    assert all(res["captions"].values())  # it says something about every example
