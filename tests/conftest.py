"""Shared test setup."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Run every test in its own temporary folder, so that default output folders
    (``logs/``, ``ranklists/``) never land in the checkout."""
    monkeypatch.chdir(tmp_path)
