"""Tests for isereid.kreciprocal, the k-reciprocal core shared by clustering and re-ranking.

Each step is compared with a slow loop written from the reference code (docs/method.md#jaccard);
the float32 steps must agree to the last bit. The last tests
check that both users, ``jaccard_distance`` and ``re_ranking``, really run through the core.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from isereid import kreciprocal
from isereid.clustering import jaccard_distance
from isereid.evaluation import re_ranking


# ----------------------------------------------------------------------------------------------
# Slow references and data
# ----------------------------------------------------------------------------------------------
def loop_reciprocal(ranking: np.ndarray, i: int, width: int) -> np.ndarray:
    """kr(i, .): members j of ranking[i, :width] whose list ranking[j, :width] holds i, in order."""
    return np.array([j for j in ranking[i, :width] if i in ranking[j, :width]], dtype=np.int64)


def loop_expansion(ranking: np.ndarray, i: int, k1: int) -> np.ndarray:
    """E(i) as the reference builds it: R(i) plus every Rh(c) passing the strict 2/3 test."""
    columns = ranking.shape[1]
    own = loop_reciprocal(ranking, i, min(k1 + 1, columns))
    expansion = list(own)
    for candidate in own:
        half = loop_reciprocal(ranking, candidate, min(int(np.around(k1 / 2)) + 1, columns))
        if len(np.intersect1d(half, own)) > 2 / 3 * len(half):
            expansion.extend(half)
    return np.unique(np.array(expansion, dtype=np.int64))


def loop_min_sums(v: np.ndarray, rows: range, first_row: int) -> np.ndarray:
    """The reference's inverted-index loop: for each row i, float32 ``temp_min[others] +=
    minimum(...)`` over the non-zero columns of row i in ascending order, where ``others`` are
    the rows j >= max(i, first_row) with a non-zero in that column. Returns (len(rows), N)."""
    n = v.shape[0]
    out = np.zeros((len(rows), n), dtype=np.float32)
    for a, i in enumerate(rows):
        for col in np.flatnonzero(v[i]):
            others = np.flatnonzero(v[:, col])
            others = others[others >= max(i, first_row)]
            out[a, others] += np.minimum(v[i, col], v[others, col])
    return out


def clustered_ranking(n: int, columns: int, seed: int) -> np.ndarray:
    """(n, columns) stable ranking of loose blobs, self first: reciprocal sets of mixed sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 15), 8))
    x = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.standard_normal((n, 8))
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.argsort(dist, axis=1, kind="stable")[:, :columns].astype(np.int64)


def random_v(n: int, per_row: int, seed: int) -> sp.csr_matrix:
    """A V'-like float32 CSR with sorted indices: positive rows summing to about 1, self
    included, neighbours from a few groups so that rows share columns."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, max(1, n // 10), n)
    rows, cols = [], []
    for i in range(n):
        mates = np.flatnonzero(group == group[i])
        pick = np.unique(np.concatenate([[i], rng.choice(mates, min(per_row, len(mates))), rng.integers(0, n, 2)]))
        rows += [i] * len(pick)
        cols += pick.tolist()
    weights = rng.gamma(0.7, size=len(rows)) + 1e-3
    v = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    v = sp.diags(1.0 / np.asarray(v.sum(axis=1)).ravel()) @ v
    v = v.astype(np.float32).tocsr()
    v.sort_indices()
    return v


# ----------------------------------------------------------------------------------------------
# Sets, expansion, query expansion
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, block", [(1, 1 << 22), (6, 50), (11, 1 << 22), (21, 300)])
def test_reciprocal_mask_matches_loop(width, block):
    ranking = clustered_ranking(120, 21, seed=width)
    mask = kreciprocal.reciprocal_mask(ranking, width, block_elements=block)
    assert mask.shape == (120, width) and mask[:, 0].all()  # self first, always reciprocal
    for i in range(len(ranking)):
        np.testing.assert_array_equal(ranking[i, :width][mask[i]], loop_reciprocal(ranking, i, width))
    assert 0 < mask.sum() < mask.size or width == 1


def test_set_widths_round_half_to_even_and_cap():
    assert kreciprocal.set_widths(30, 30) == (30, 16)  # clustering: only k1 columns exist
    assert kreciprocal.set_widths(20, 21) == (21, 11)  # re-ranking: full lists
    assert kreciprocal.set_widths(5, 6) == (6, 3)      # round(2.5) = 2
    assert kreciprocal.set_widths(7, 9) == (8, 5)      # round(3.5) = 4
    assert kreciprocal.set_widths(20, 4) == (4, 4)     # fewer points than k1


@pytest.mark.parametrize("k1, columns", [(30, 30), (20, 21), (5, 6), (6, 7), (8, 4)])
def test_expanded_sets_match_loop(k1, columns):
    ranking = clustered_ranking(150, columns, seed=k1)
    pattern = kreciprocal.expanded_sets(ranking, k1)
    assert pattern.has_canonical_format and np.all(pattern.data == 1)
    grown = 0
    for i in range(len(ranking)):
        expected = loop_expansion(ranking, i, k1)
        np.testing.assert_array_equal(pattern.indices[pattern.indptr[i]:pattern.indptr[i + 1]], expected)
        width = kreciprocal.set_widths(k1, columns)[0]
        grown += len(expected) > len(loop_reciprocal(ranking, i, width))
    if k1 != 5:  # with k1 = 5 the half sets (3 long) stay inside R(i) on this data
        assert grown > 0  # the expansion step really adds members


@pytest.mark.parametrize("k2", [2, 3, 6])
def test_query_expansion_is_numpy_mean_bit_exact(k2):
    v = random_v(60, per_row=5, seed=k2)
    ranking = clustered_ranking(60, 8, seed=k2)
    out = kreciprocal.query_expansion(v, ranking, k2)
    dense = v.toarray()
    expected = np.stack([np.mean(dense[ranking[i, :k2]], axis=0) for i in range(60)]).astype(np.float32)
    assert out.dtype == np.float32 and out.has_sorted_indices
    np.testing.assert_array_equal(out.toarray(), expected)


def test_query_expansion_k2_one_is_skipped_even_if_self_is_not_first():
    v = random_v(20, per_row=4, seed=0)
    ranking = np.roll(np.arange(20), -1)[:, None]  # row i's first neighbour is i + 1, not i
    assert kreciprocal.query_expansion(v, ranking, 1) is v
    assert (kreciprocal.query_expansion(v, ranking, 2) != v).nnz > 0


def test_expanded_weights_passes_entries_and_expands():
    ranking = clustered_ranking(80, 10, seed=3)
    seen = {}

    def weigh(rows, cols):
        seen["rows"], seen["cols"] = rows, cols
        return (1.0 + (rows * 7 + cols) % 5).astype(np.float32)
    v = kreciprocal.expanded_weights(ranking, 9, 1, weigh)
    pattern = kreciprocal.expanded_sets(ranking, 9)
    np.testing.assert_array_equal(seen["rows"], np.repeat(np.arange(80), np.diff(pattern.indptr)))
    np.testing.assert_array_equal(seen["cols"], pattern.indices)
    np.testing.assert_array_equal(v.toarray()[seen["rows"], seen["cols"]], 1.0 + (seen["rows"] * 7 + seen["cols"]) % 5)
    with_qe = kreciprocal.expanded_weights(ranking, 9, 3, weigh)
    np.testing.assert_array_equal(with_qe.toarray(), kreciprocal.query_expansion(v, ranking, 3).toarray())


# ----------------------------------------------------------------------------------------------
# Min-sums and the distance
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_row, budget", [(0, 1 << 22), (0, 37), (45, 1 << 22), (45, 61)])
def test_min_sums_are_the_reference_loop_bit_exact(first_row, budget, monkeypatch):
    """Upper triangle (first_row 0, clustering) and query rows x later rows (re-ranking),
    in one chunk or many on several threads: equal to the float32 loop to the last bit."""
    v = random_v(130, per_row=8, seed=first_row)
    index = kreciprocal.ColumnIndex(v)
    begin, fan = index.tails(first_row)
    num_rows = first_row if first_row else v.shape[0]
    chunks = kreciprocal.row_chunks(index.row_work(fan)[:num_rows], budget)
    assert (len(chunks) > 5) == (budget < 100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    parts = kreciprocal.map_chunks(lambda a, b: kreciprocal.min_sums(index, begin, fan, a, b), chunks)
    got = sp.vstack(parts).toarray()
    expected = loop_min_sums(v.toarray(), range(num_rows), first_row)
    assert np.count_nonzero(expected) > num_rows  # rows really share columns
    np.testing.assert_array_equal(got, expected)


def test_tails_give_the_rows_at_or_after_the_entry_and_first_row():
    v = random_v(50, per_row=6, seed=4)
    index = kreciprocal.ColumnIndex(v)
    csc = v.tocsc()
    for first_row in (0, 20):
        begin, fan = index.tails(first_row)
        for e in range(v.nnz):
            i, k = index.entry_rows[e], index.entry_cols[e]
            column_rows = csc.indices[csc.indptr[k]:csc.indptr[k + 1]]
            expected = column_rows[column_rows >= max(i, first_row)]
            np.testing.assert_array_equal(index.col_rows[begin[e]:begin[e] + fan[e]], expected)


def test_row_chunks_cover_rows_within_budget():
    work = np.array([3, 0, 4, 9, 1, 1, 1, 20, 2], dtype=np.float64)
    chunks = kreciprocal.row_chunks(work, budget=5)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(work)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, stop in chunks:
        assert work[start:stop].sum() <= 5 or stop == start + 1  # a heavy row stands alone
    assert all(stop - start <= 2 for start, stop in kreciprocal.row_chunks(work, budget=100, max_rows=2))
    assert kreciprocal.row_chunks(np.zeros(0), budget=5) == []


def test_overlap_distance_is_float32_and_unclipped():
    m = np.array([0.0, 0.25, 1.0, np.nextafter(np.float32(1), np.float32(2))], dtype=np.float32)
    got = kreciprocal.overlap_distance(m)
    assert got.dtype == np.float32
    expected = np.array([1 - float(x) / (2 - float(x)) for x in m])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert got[0] == 1.0 and got[2] == 0.0 and got[3] < 0  # rounding past 1 is not clipped here


# ----------------------------------------------------------------------------------------------
# Both users run through the core
# ----------------------------------------------------------------------------------------------
def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, 12))
    x = centres[rng.integers(0, 5, n)] + 0.7 * rng.standard_normal((n, 12))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def core_spy(monkeypatch):
    """Records the V' built by, and the min-sum chunks run through, the shared core."""
    calls = {"weights": [], "min_sums": 0}
    expanded_weights, min_sums = kreciprocal.expanded_weights, kreciprocal.min_sums

    def spy_weights(*args, **kwargs):
        calls["weights"].append(expanded_weights(*args, **kwargs))
        return calls["weights"][-1]

    def spy_min_sums(*args, **kwargs):
        calls["min_sums"] += 1
        return min_sums(*args, **kwargs)
    monkeypatch.setattr(kreciprocal, "expanded_weights", spy_weights)
    monkeypatch.setattr(kreciprocal, "min_sums", spy_min_sums)
    return calls


def test_clustering_runs_through_the_core(core_spy):
    jaccard_distance(features(60, 0), k1=10, k2=3)
    assert len(core_spy["weights"]) == 1 and core_spy["min_sums"] >= 1


def test_re_ranking_jaccard_is_the_reference_loop_on_the_core_weights(core_spy):
    """With lambda = 0 the re-ranked distance is the Jaccard distance of V' alone, which must
    equal the reference's float32 temp_min loop over the gallery rows to the last bit."""
    x = features(90, 1)
    num_query = 20
    got = re_ranking(x[:num_query], x[num_query:], k1=8, k2=3, lambda_value=0.0)
    assert len(core_spy["weights"]) == 1 and core_spy["min_sums"] >= 1
    v = core_spy["weights"][0].toarray()
    overlap = loop_min_sums(v, range(num_query), num_query)[:, num_query:]
    expected = (1 - overlap / (np.float32(2) - overlap)).astype(np.float32)
    assert (expected < 1).sum() > num_query
    np.testing.assert_array_equal(got, expected)
