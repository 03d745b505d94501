"""Every notebook in examples/ runs headless (nbclient) against the embedded default model.

The kernel is ``python3`` resolved to this interpreter (the project's .venv, where
ipykernel is installed): jupyter_client starts ipykernel's own spec with
``sys.executable``, and nothing is registered globally. Figures go to the Agg backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_S = 180  # one cell (nbclient)
NOTEBOOK_TIMEOUT_S = 300  # a whole notebook (pytest-timeout)


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel (and the engine / server processes it starts) inherit."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model on a small shared CPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("MMENGINE_MODEL", "MMENGINE_URL", "MMENGINE_API_KEY"):  # the embedded model
        monkeypatch.delenv(var, raising=False)


def _execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Runs the notebook from examples/, as a user would; raises CellExecutionError at
    the first cell that fails."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    return client.execute()


def test_there_are_notebooks() -> None:
    assert {"caption_images.ipynb", "caption_video.ipynb", "chat_with_server.ipynb"} <= set(
        NOTEBOOKS
    )


def test_the_kernel_is_this_interpreter() -> None:
    cell = nbformat.v4.new_code_cell("import sys; print(sys.executable); print(sys.prefix)")
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    executable, prefix = _execute(nb).cells[0].outputs[0]["text"].split()
    assert (executable, prefix) == (sys.executable, sys.prefix)  # the .venv under `make test`


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_headless(name: str) -> None:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    _execute(nb)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
