"""Lint and import layering as tests, so that `pytest` in CI enforces them.

The import contracts live in pyproject.toml ([tool.importlinter]); both tools come with
``pip install -e .[dev]`` and the tests are skipped where they are not installed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The console script next to this interpreter (the active environment), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"


def test_import_contracts():
    """cli > engine > features, models, data > pure array code; leaves import only errors."""
    _run([_tool("lint-imports"), "--no-cache"])


def test_ruff():
    _run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "src", "tests", "benchmarks"])
