"""The code follows the project's lint and format rules (``[tool.ruff]`` in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["splitfed", "strategies", "simulation", "tests"]


@pytest.mark.parametrize(
    "command",
    [["check"], ["format", "--check"]],
    ids=["lint", "format"],
)
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PACKAGES],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        f"ruff {' '.join(command)} found problems; run `ruff format` and `ruff check --fix`:\n"
        + result.stdout
        + result.stderr
    )
