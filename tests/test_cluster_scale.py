"""Tests for isereid.clustering.scale (cluster.eps=auto) against slow dense oracles.

Core distances are checked bit for bit against the dense Jaccard matrix that the reference's
min-sum loop (test_clustering.py) computes from the same V' (V' itself is tested there); the
core-point property against sklearn's DBSCAN on that matrix over a scan of eps values; the
Otsu split against a loop over every threshold; and the automatic partition against DBSCAN on
the dense matrix at the chosen eps.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from isereid.clustering import jaccard_dbscan, jaccard_dbscan_auto, partition_warning
from isereid.clustering.jaccard import expanded_neighbourhoods
from isereid.clustering.scale import choose_eps, core_distances, otsu_split, sample_rows
from isereid.errors import ClusteringError, IsereidError
from test_clustering import blobs, noise, oracle_min_sum_distance, unit, with_duplicates

CASES = [
    (lambda: blobs(120, dim=16, centres=8, spread=0.35, seed=3), 6, 3, 4),
    (lambda: blobs(150, dim=32, centres=6, spread=0.5, seed=7), 20, 6, 4),
    (lambda: noise(70, seed=4), 10, 1, 3),
    (with_duplicates, 10, 3, 4),
    (lambda: blobs(60, dim=8, centres=4, spread=0.3, seed=1), 6, 3, 1),
]


@functools.lru_cache(maxsize=None)
def dense_case(index: int):
    """(features, V', dense Jaccard matrix from V' by the reference's loop) of CASES[index]."""
    make, k1, k2, _ = CASES[index]
    x = make()
    v, _ = expanded_neighbourhoods(x, k1, k2)
    return x, v, oracle_min_sum_distance(v.toarray())


def oracle_core(dense: np.ndarray, min_samples: int) -> np.ndarray:
    """Row by row: the (min_samples - 1)-th smallest distance to another row (0 for min_samples 1)."""
    out = []
    for i, row in enumerate(dense):
        others = np.sort(np.delete(row, i))
        out.append(0.0 if min_samples == 1 else others[min_samples - 2])
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_core_distances_match_dense_oracle(index):
    _, v, dense = dense_case(index)
    _, _, _, min_samples = CASES[index]
    np.testing.assert_array_equal(core_distances(v, min_samples), oracle_core(dense, min_samples))
    rows = sample_rows(v.shape[0], 17)
    np.testing.assert_array_equal(core_distances(v, min_samples, rows), oracle_core(dense, min_samples)[rows])


@pytest.mark.parametrize("index", [0, 1, 3])
def test_core_distance_decides_core_points_for_every_eps(index):
    """Brute force over eps on the dense matrix: DBSCAN's core points are exactly core <= eps."""
    _, v, dense = dense_case(index)
    min_samples = CASES[index][3]
    core = core_distances(v, min_samples)
    for eps in np.unique(np.concatenate([np.linspace(0.05, 0.95, 19), core[core < 1]])).tolist():
        # a Python float, compared with the float32 distances in float32 as sklearn does
        fitted = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(dense)
        np.testing.assert_array_equal(np.sort(fitted.core_sample_indices_), np.flatnonzero(core <= eps))


def oracle_otsu(values: np.ndarray) -> float:
    """Every threshold t among the distinct values: lower class <= t; the first best t."""
    best, best_t = -1.0, None
    distinct = np.unique(values)
    for t in distinct[:-1]:
        low, high = values[values <= t], values[values > t]
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best + 1e-12 * max(best, 1.0):
            best, best_t = between, t
    return float(best_t)


@pytest.mark.parametrize("seed", range(6))
def test_otsu_split_matches_threshold_loop(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.3, 0.05, 40 + seed), rng.normal(0.75, 0.03, 200)])
    values = np.round(values, 2 + seed % 2)  # ties, which must stay in one class
    assert otsu_split(values) == pytest.approx(oracle_otsu(values), abs=0)


def test_otsu_split_separates_two_groups():
    assert otsu_split(np.array([0.1, 0.12, 0.11, 0.8, 0.82, 0.79, 0.81])) == pytest.approx(0.12)
    with pytest.raises(ClusteringError):
        otsu_split(np.array([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("index", [0, 1, 3])
def test_auto_partition_equals_fixed_and_dense_at_chosen_eps(index):
    x, _, dense = dense_case(index)
    _, k1, k2, min_samples = CASES[index]
    labels, choice = jaccard_dbscan_auto(x, k1, k2, min_samples)
    assert 0 < choice.eps < 1 and choice.sampled == len(x)
    assert choice.core_share == pytest.approx(np.mean(oracle_core(dense, min_samples) <= choice.eps))
    np.testing.assert_array_equal(labels, jaccard_dbscan(x, choice.eps, k1, k2, min_samples))
    expected = DBSCAN(eps=choice.eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(labels, expected)


def test_auto_eps_follows_the_scale_of_the_clusters():
    """Tight blobs give a smaller radius than loose ones, and both recover the blobs."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((6, 32)))
    truth = np.repeat(np.arange(6), 25)
    chosen = []
    for spread in (0.05, 0.2):
        x = unit(centres[truth] + spread * rng.standard_normal((150, 32)))
        labels, choice = jaccard_dbscan_auto(x, k1=20, k2=6)
        clustered = labels >= 0
        assert clustered.mean() > 0.8
        pairs = np.unique(np.stack([labels[clustered], truth[clustered]]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]  # every cluster holds one blob
        chosen.append(choice.eps)
    assert chosen[0] < chosen[1]


def test_choose_eps_samples_evenly():
    assert sample_rows(5, 8).tolist() == [0, 1, 2, 3, 4]
    rows = sample_rows(10_000, 100)
    assert rows.size == 100 and rows[0] == 0 and rows[-1] == 9_999 and np.all(np.diff(rows) > 0)
    x = blobs(300, dim=16, centres=10, spread=0.3, seed=2)
    v, _ = expanded_neighbourhoods(x, 10, 3)
    sampled = choose_eps(v, 4, sample=64)
    assert sampled.sampled == 64 and 0 < sampled.eps < 1


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("features, message", [
    (np.ones((50, 8), np.float32) / np.sqrt(8), "identical"),
    (blobs(6, seed=1), "at least 2 x min_samples"),
])
def test_auto_bad_input_is_one_line_clustering_error(features, message):
    with pytest.raises(ClusteringError) as error:
        jaccard_dbscan_auto(features, k1=6, k2=3, min_samples=4)
    assert message in one_line(error)


def test_auto_without_neighbours_names_k1():
    with pytest.raises(ClusteringError) as error:
        jaccard_dbscan_auto(noise(60, dim=64), k1=1, k2=1, min_samples=4)
    assert "cluster.k1" in one_line(error)


def test_auto_nan_features_are_rejected():
    x = blobs(40)
    x[3, 2] = np.nan
    with pytest.raises(IsereidError) as error:
        jaccard_dbscan_auto(x, k1=6, k2=3)
    assert "NaN" in one_line(error)


def test_partition_warning_names_the_cause():
    assert partition_warning(np.repeat(np.arange(10), 5)) is None
    assert "outliers" in partition_warning(np.r_[np.full(95, -1), np.zeros(5, int)])
    assert "one cluster holds" in partition_warning(np.r_[np.zeros(60, int), np.repeat(np.arange(1, 11), 4)])
    assert "one cluster holds" in partition_warning(np.r_[np.zeros(30, int), np.full(20, -1)])
    oversized = np.r_[np.zeros(90, int), np.repeat(np.arange(1, 41), 3)]
    assert "largest cluster (90 images)" in partition_warning(oversized)
    assert partition_warning(np.zeros(0, int)) is None
