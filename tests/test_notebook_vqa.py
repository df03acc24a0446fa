"""notebooks/vqa_attention.ipynb executes top to bottom (nbclient), answers above the image-blind baselines, and is committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "vqa_attention.ipynb"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{NOTEBOOK.name}: strip outputs before committing"


@pytest.mark.slow
def test_vqa_notebook_runs_and_beats_the_image_blind_baselines(tmp_path, monkeypatch):
    """Trains a tiny model for 4 epochs (15-45 s), draws the glimpses of every question type, tabulates per-type accuracy."""
    from nbclient import NotebookClient

    out = tmp_path / "out"
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("CAPTIONER_VQA_MINUTES", "5")  # a ceiling only: the notebook's 4 epochs end training on any CPU
    monkeypatch.delenv("CAPTIONER_VQA_CKPT", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    res = json.loads((out / "vqa_attention.json").read_text())
    assert res["trained"] and len(images) == res["figures"] == 8  # two questions of each of the four types
    assert {t for t, _, _ in res["examples"]} == {"attribute", "exist", "count", "relation"}
    assert all(f"accuracy/{t}" in res for t in ("attribute", "exist", "count", "relation"))
    assert res["accuracy"] > res["majority"] + 0.1  # it uses the image, even after 4 short epochs
    assert 0 <= res["localisation_chance"] < 0.5 and 0 <= res["localisation"] <= 1
    assert any("| **all** |" in "".join(o.get("data", {}).get("text/markdown", "")) for c in nb.cells for o in c.get("outputs", []))
