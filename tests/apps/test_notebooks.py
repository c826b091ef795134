"""The analysis notebooks run from a clean kernel without errors, and are stored without outputs.

Each notebook is executed with nbclient (what ``pytest --nbmake`` does), in ``notebooks/`` as working directory,
offline. Set ``ATTNSCOPE_NOTEBOOK_OUT`` to a folder to keep the executed copies (with their plots) for reading.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
#: Each notebook should take under a minute on a CPU; the cap leaves room for a busy machine.
TIMEOUT_S = 240


def test_there_are_notebooks() -> None:
    assert [nb.name for nb in NOTEBOOKS] == ["01_localization.ipynb", "02_erasure.ipynb", "03_explain.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the kernel inherits the environment: render plots into the outputs as Jupyter does, never on a display
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    started = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - started
    out = os.environ.get("ATTNSCOPE_NOTEBOOK_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, Path(out) / path.name)
    print(f"{path.name}: {elapsed:.1f}s")
