"""Shared helpers: the one atomic-write helper and the CSR row pointer."""
from __future__ import annotations

import numpy as np
import pytest

from isereid.utils import atomic_path, atomic_write_text, counts_to_indptr


def test_atomic_path_replaces_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target, suffix=".tmp.txt") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp.txt") and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["file.txt"]
    with pytest.raises(FileNotFoundError):  # a writer that wrote nothing does not replace the target
        with atomic_path(target):
            pass
    assert target.read_text() == "new"


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "{}")

    class Unprintable:
        def __str__(self):
            raise ValueError("no")

    with pytest.raises(TypeError):
        atomic_write_text(target, Unprintable())  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and target.read_text() == "{}"


@pytest.mark.parametrize("counts", [np.array([2, 0, 3, 1]), np.array([], dtype=np.int64), np.array([0.5, 1.5])])
def test_counts_to_indptr_against_a_loop(counts):
    expected = [0]
    for c in counts:
        expected.append(expected[-1] + c)
    got = counts_to_indptr(counts)
    assert got.shape == (len(counts) + 1,)
    np.testing.assert_array_equal(got, np.array(expected))
