"""notebooks/gradient_flow.ipynb executes top to bottom (its cells assert what its text claims) and draws its plots."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "gradient_flow.ipynb"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_gradient_flow_notebook_runs(tmp_path, monkeypatch):
    """About 30 s on two shared CPU cores, most of it the kernel's start and the 150-update clipping runs."""
    from nbclient import NotebookClient

    out = tmp_path / "out"
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # spectral, cells, clipping, the combined README figure
    assert (out / "gradient_flow.png").stat().st_size > 10_000
    res = json.loads((out / "gradient_flow.json").read_text())
    assert res["rnn_spectral_ratio_per_step"]["0.5"] < 0.6 < 1.5 < res["rnn_spectral_ratio_per_step"]["2.0"]
    assert res["ratio_per_step"]["lstm"] > res["ratio_per_step"]["rnn"]
    assert res["clipping"]["clipped"]["diverged_at"] is None
