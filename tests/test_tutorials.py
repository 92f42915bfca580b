"""The tutorials run top to bottom, and are committed without outputs.

Every ``tutorials/*.ipynb`` is executed in memory (nothing is written back) with nbclient, in a
fresh ``python3`` kernel whose working directory is the repository root, with the tutorials'
environment variables set to their smallest settings: a couple of epochs on a few hundred
cells. The full-length settings are each notebook's defaults (see its first code cell).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))

#: The environment variables the notebooks' parameter cells read, at test size.
SMALL = {
    "PYROSC_TUTORIAL_EPOCHS": "2",
    "PYROSC_TUTORIAL_SAMPLES": "4",
    "PYROSC_TUTORIAL_CELLS": "256",
    "PYROSC_TUTORIAL_REPEATS": "3",
}
#: Seconds one notebook may take before it fails (they take well under a minute each).
TIMEOUT = 300


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 4, TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.name)
def test_tutorial_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {number} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {number} has an execution count"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.name)
def test_tutorial_has_one_parameters_cell_first(path):
    """The settings live in one cell tagged "parameters", the first code cell."""
    code_cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    tagged = [c for c in code_cells if "parameters" in c.metadata.get("tags", [])]
    assert tagged == code_cells[:1]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.name)
def test_tutorial_runs_top_to_bottom(path, monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)
    # The kernel imports pyrosc from this checkout whether or not it is pip-installed.
    python_path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    # Fits this small gain nothing from a second thread, and PyTorch's threads slow down many
    # times over when other processes keep the cores busy.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell, if a cell fails
