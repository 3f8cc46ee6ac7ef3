"""The notebook runs top to bottom in a real Jupyter kernel, with top-level `await`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


@pytest.mark.slow
def test_notebook_executes_in_a_jupyter_kernel(home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_DEMO_MODEL", "firetitan/nano-qwen3")
    monkeypatch.setenv("FIRETITAN_DEMO_STEPS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "'trainer_job_id': 'firetitan-" in outputs and "'deployment_id': 'notebook-serving'" in outputs
    assert outputs.count("'eval_score':") == 3  # steps 0, 1 and 2
    assert home.worker_pids() == []  # closed from the notebook: trainer deleted, deployment at zero
