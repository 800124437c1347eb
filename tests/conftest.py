"""Shared test setup."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Run every test in its own temporary folder, so that default output folders
    (``logs/``, ``ranklists/``) never land in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small demo dataset (24 identities, 3 cameras, seed 2), generated once per test run and only
    read by the tests that use it (a module may define its own ``tiny_demo`` with other data)."""
    from isereid.cli import main
    root = tmp_path_factory.mktemp("tiny_demo")
    assert main(["demo-data", str(root), "--identities", "24", "--cameras", "3", "--seed", "2"]) == 0
    return root
