"""The tutorials run top to bottom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def code_of(notebook: Path) -> list[tuple[str, int]]:
    cells = json.loads(notebook.read_text())["cells"]
    return [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]


@pytest.mark.parametrize(
    "notebook",
    [
        # Those that start Flower's simulation engine take a minute.
        pytest.param(n, marks=pytest.mark.slow)
        if any("run_simulation" in source for source, _ in code_of(n))
        else n
        for n in NOTEBOOKS
    ],
    ids=[n.name for n in NOTEBOOKS],
)
def test_notebook_runs_top_to_bottom(notebook, monkeypatch):
    code = code_of(notebook)
    assert code, f"{notebook.name} has no code"
    monkeypatch.chdir(notebook.parent)
    namespace: dict = {"__name__": "__main__"}
    for source, index in code:
        exec(compile(source, f"{notebook.name}[cell {index}]", "exec"), namespace)  # noqa: S102
