"""The tutorials run top to bottom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(notebook, monkeypatch):
    cells = json.loads(notebook.read_text())["cells"]
    code = [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    assert code, f"{notebook.name} has no code"
    monkeypatch.chdir(notebook.parent)
    namespace: dict = {"__name__": "__main__"}
    for source, index in code:
        exec(compile(source, f"{notebook.name}[cell {index}]", "exec"), namespace)  # noqa: S102
