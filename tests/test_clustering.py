"""Tests for isereid.clustering against a slow, literal, dense oracle of docs/method.md#jaccard and #dbscan.

The oracle follows the reference loop by loop: a full stable argsort of the float32 squared
distance 2 - 2<x_i, x_j> keeping only k1 columns, k-reciprocal sets with the "k1 + 1" slices
capped at those columns, the 2/3 expansion test, dense softmax weights, query expansion over
the top-k2 rows including self, and the min-sum Jaccard. DBSCAN partitions are compared with
sklearn's DBSCAN run on the oracle's dense matrix.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from isereid.clustering import ClusteringReport, cluster_report, exact_knn, jaccard_dbscan, jaccard_distance
from isereid.clustering import jaccard as jaccard_module
from isereid.errors import ClusteringError, IsereidError, MissingDependency


# ----------------------------------------------------------------------------------------------
# Dense oracle
# ----------------------------------------------------------------------------------------------
def oracle_ranking(x: np.ndarray, k1: int) -> np.ndarray:
    """R0: the first k1 columns of the stable argsort of the squared distance (self included)."""
    dist = (np.float32(2.0) - np.float32(2.0) * (x @ x.T)).astype(np.float32)
    return np.argsort(dist, axis=1, kind="stable")[:, :k1]


def oracle_k_reciprocal(ranking: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = ranking[i, :k + 1]
    backward = ranking[forward, :k + 1]
    fi = np.where(backward == i)[0]
    return forward[fi]


def oracle_jaccard(x: np.ndarray, k1: int = 30, k2: int = 6) -> np.ndarray:
    """Dense (N, N) float32 k-reciprocal Jaccard distance, the reference's loops."""
    x = x.astype(np.float32)
    n = x.shape[0]
    ranking = oracle_ranking(x, k1)
    half = int(np.around(k1 / 2))
    nn_k1 = [oracle_k_reciprocal(ranking, i, k1) for i in range(n)]
    nn_half = [oracle_k_reciprocal(ranking, i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        recip = nn_k1[i]
        expansion = recip
        for candidate in recip:
            cand = nn_half[candidate]
            if len(np.intersect1d(cand, recip)) > 2 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        d = (np.float32(2.0) - np.float32(2.0) * (x[i:i + 1] @ x[expansion].T)).astype(np.float32)
        e = np.exp(-d - (-d).max())
        v[i, expansion] = (e / e.sum()).ravel()
    if k2 != 1:
        v = np.stack([np.mean(v[ranking[i, :k2], :], axis=0) for i in range(n)]).astype(np.float32)
    return oracle_min_sum_distance(v)


def oracle_min_sum_distance(v: np.ndarray) -> np.ndarray:
    """The reference's min-sum loop on a dense (N, N) float32 V': float32 sums over the
    columns of row i in order, then max(0, 1 - m / (2 - m))."""
    n = len(v)
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        m = np.zeros(n, dtype=np.float32)
        for col in np.where(v[i] != 0)[0]:
            others = np.where(v[:, col] != 0)[0]
            m[others] += np.minimum(v[i, col], v[others, col])
        jac[i] = 1 - m / (2 - m)
    jac[jac < 0] = 0
    return jac


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def blobs(n: int, dim: int = 16, centres: int = 6, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Gaussian blobs on the unit sphere, in shuffled order."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    return unit(c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim)))


def noise(n: int, dim: int = 8, seed: int = 1) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def with_duplicates(seed: int = 2) -> np.ndarray:
    """Blobs where some rows repeat exactly (distance-0 pairs and ranking ties)."""
    x = blobs(90, dim=32, centres=5, spread=0.25, seed=seed)
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 90, 20)
    x = np.concatenate([x, x[src], x[src[:5]]])
    return x[rng.permutation(len(x))]


def densify(dist) -> np.ndarray:
    dense = np.ones(dist.shape, dtype=np.float32)
    coo = dist.tocoo()
    dense[coo.row, coo.col] = coo.data
    return dense


CASES = [
    ("blobs", lambda: blobs(200, dim=32, centres=8, spread=0.25), 30, 6),
    ("blobs", lambda: blobs(200, dim=32, centres=8, spread=0.4, seed=3), 20, 6),
    ("noise", lambda: noise(90), 10, 1),
    ("noise", lambda: noise(80, seed=4), 6, 3),
    ("duplicates", with_duplicates, 30, 6),
    ("duplicates", with_duplicates, 10, 3),
    ("tiny", lambda: blobs(7, seed=5), 30, 6),
]


@pytest.fixture(scope="module")
def oracle_cache():
    cache = {}

    def get(index: int):
        if index not in cache:
            _, make, k1, k2 = CASES[index]
            x = make()
            cache[index] = (x, oracle_jaccard(x, k1, k2))
        return cache[index]
    return get


# ----------------------------------------------------------------------------------------------
# Jaccard distance
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-k1={c[2]}-k2={c[3]}" for c in CASES])
def test_jaccard_matches_dense_oracle(index, oracle_cache):
    x, expected = oracle_cache(index)
    _, _, k1, k2 = CASES[index]
    dist = jaccard_distance(x, k1=k1, k2=k2)
    assert dist.shape == expected.shape and dist.dtype == np.float32
    assert dist.has_sorted_indices
    dense = densify(dist)
    np.testing.assert_allclose(dense, expected, atol=1e-6, rtol=0)
    # Everything with distance < 1 is stored; nothing stored is >= 1.
    stored = np.zeros(expected.shape, dtype=bool)
    coo = dist.tocoo()
    stored[coo.row, coo.col] = True
    assert np.all(expected[~stored] == 1.0)
    assert np.all(coo.data < 1.0)
    assert np.all(dense == dense.T)


def test_duplicates_keep_explicit_zeros(oracle_cache):
    x, expected = oracle_cache(4)
    dist = jaccard_distance(x, k1=30, k2=6)
    zero_pairs = (expected == 0) & ~np.eye(len(x), dtype=bool)
    assert zero_pairs.any()  # the fixture really produces distance-0 pairs
    coo = dist.tocoo()
    stored = np.zeros(expected.shape, dtype=bool)
    stored[coo.row, coo.col] = True
    assert stored[zero_pairs].all() and stored.diagonal().all()
    assert (dist.data == 0).sum() >= len(x) // 2  # explicit zeros survive (diagonal, duplicates)
    assert np.all(densify(dist)[zero_pairs] <= 1e-6)


def test_off_by_one_in_k1_is_detected(oracle_cache):
    """The test can fail: the oracle with k1 + 1 ranking columns differs from our result."""
    x, _ = oracle_cache(0)
    wrong = oracle_jaccard(x, 31, 6)
    assert np.abs(densify(jaccard_distance(x, k1=30, k2=6)) - wrong).max() > 1e-3


def test_torch_and_numpy_inputs_agree():
    x = blobs(100, seed=7)
    a = jaccard_distance(x, k1=20, k2=6)
    b = jaccard_distance(torch.from_numpy(x), k1=20, k2=6)
    assert (a != b).nnz == 0 and np.array_equal(a.indices, b.indices)


def test_single_point():
    x = unit(np.ones((1, 4)))
    dist = jaccard_distance(x)
    assert dist.shape == (1, 1) and densify(dist)[0, 0] == 0.0
    assert jaccard_dbscan(x, eps=0.5).tolist() == [-1]
    assert jaccard_dbscan(x, eps=0.5, min_samples=1).tolist() == [0]


# ----------------------------------------------------------------------------------------------
# The min-sum step on a given V' (bit-exact against the reference's float32 loop)
# ----------------------------------------------------------------------------------------------
def random_v(n: int, per_row: int, seed: int) -> sp.csr_matrix:
    """A V'-like sparse matrix: rows of positive float32 weights summing to about 1, self
    included, neighbours drawn from a few groups so that rows overlap."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, max(1, n // 12), n)
    rows, cols = [], []
    for i in range(n):
        mates = np.flatnonzero(group == group[i])
        pick = np.unique(np.concatenate([[i], rng.choice(mates, min(per_row, len(mates))),
                                         rng.integers(0, n, 2)]))
        rows += [i] * len(pick)
        cols += pick.tolist()
    w = rng.gamma(0.7, size=len(rows)).astype(np.float32) + np.float32(1e-3)
    v = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    v = sp.diags(1.0 / np.asarray(v.sum(axis=1)).ravel()).astype(np.float32) @ v
    v = v.astype(np.float32).tocsr()
    v.sort_indices()
    return v


@pytest.mark.parametrize("seed", [0, 1])
def test_min_sum_step_is_bit_exact(seed, monkeypatch):
    """Sums in the reference's order and precision: equal to the last bit, also when the
    rows are split into many chunks that run on several threads."""
    v = random_v(150, per_row=9, seed=seed)
    expected = np.triu(oracle_min_sum_distance(v.toarray()))
    expected[np.tril_indices(len(expected), -1)] = 1.0
    for budget in (jaccard_module._SCRATCH_ELEMENTS, 97):
        monkeypatch.setattr(jaccard_module, "_SCRATCH_ELEMENTS", budget)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        upper = jaccard_module._jaccard_upper(v)
        assert upper.has_sorted_indices and np.all(upper.data < 1)
        np.testing.assert_array_equal(densify(upper), expected)


def test_within_eps_equals_thresholded_distances(monkeypatch):
    """The bounded search for dist <= eps returns exactly the pairs of the full computation,
    at eps equal to stored distances and one float32 step either side; pairs are decided by
    the bounds and by exact sums (both paths run)."""
    v = random_v(150, per_row=9, seed=2)
    full = jaccard_module._jaccard_upper(v)
    exact_calls = []
    original = jaccard_module._exact_min_sums

    def spy(v_, rows, cols):
        exact_calls.append(len(rows))
        return original(v_, rows, cols)
    monkeypatch.setattr(jaccard_module, "_exact_min_sums", spy)
    values = np.unique(full.data[(full.data > 0.05) & (full.data < 0.95)])
    assert len(values) > 50
    decided_by_bounds = decided_exactly = 0
    for base in values[::len(values) // 12]:
        for eps in (base, np.nextafter(base, np.float32(0)), np.nextafter(base, np.float32(1))):
            exact_calls.clear()
            within = jaccard_module._jaccard_upper_within(v, float(eps))
            expected = full.copy()
            expected.data = (expected.data <= float(eps)).astype(np.float32)
            expected.eliminate_zeros()
            assert within.has_sorted_indices and np.all(within.data <= float(eps))
            pattern = within.copy()
            pattern.data[:] = 1.0
            assert (pattern != expected).nnz == 0
            decided_by_bounds += within.nnz - sum(exact_calls)
            decided_exactly += sum(exact_calls)
    assert decided_by_bounds > 0 and decided_exactly > 0


# ----------------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------------
def test_exact_knn_matches_stable_argsort():
    x = with_duplicates()
    dist = (np.float32(2.0) - np.float32(2.0) * (x @ x.T)).astype(np.float32)
    expected = np.argsort(dist, axis=1, kind="stable")[:, :12]
    d, idx = exact_knn(x, 12, block_size=7)
    assert idx.dtype == np.int64 and d.dtype == np.float32 and idx.shape == (len(x), 12)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(d, np.take_along_axis(dist, expected, 1), atol=1e-6)
    assert exact_knn(x[:5], 30)[1].shape == (5, 5)


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_exact_knn_ties_straddling_k(k):
    """Five copies of each row: ties at the k-th position resolve by the smaller index."""
    x = np.tile(noise(4, dim=6, seed=9), (5, 1))[np.random.default_rng(0).permutation(20)]
    dist = (np.float32(2.0) - np.float32(2.0) * (x @ x.T)).astype(np.float32)
    d, idx = exact_knn(torch.from_numpy(x), k, block_size=6)
    expected = np.argsort(dist, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, expected)


@pytest.mark.parametrize("copies, k", [(4, 12), (1, 9), (30, 7)])
def test_exact_knn_copies_across_blocks(copies, k):
    """Exact copies get identical distances wherever their blocks are, ties go to the
    smaller index, and k may exceed the number of distinct rows."""
    base = noise(5, dim=24, seed=11)
    x = np.tile(base, (copies, 1))[np.random.default_rng(1).permutation(5 * copies)]
    dist = (np.float32(2.0) - np.float32(2.0) * (x @ x.T)).astype(np.float32)
    group = np.unique(x, axis=0, return_inverse=True)[1].ravel()
    canonical = dist[np.arange(len(x))[:, None], np.argmax(group[None, :] == group[:, None], axis=1)[None, :]]
    expected = np.argsort(canonical, axis=1, kind="stable")[:, :k]
    for block_size in (3, 4, 2048):
        d, idx = exact_knn(x, k, block_size=block_size)
        np.testing.assert_array_equal(idx, expected)
        assert np.all(np.diff(d, axis=1) >= 0)
        same = group[idx] == group[idx[:, :1]]
        np.testing.assert_array_equal(d[same], np.broadcast_to(d[:, :1], d.shape)[same])


def test_exact_knn_blocks_agree_with_one_block():
    x = blobs(300, dim=40, centres=9, spread=0.3, seed=12)
    d1, i1 = exact_knn(x, 25, block_size=4096)
    for block_size in (7, 64, 299):
        d, idx = exact_knn(torch.from_numpy(x), 25, block_size=block_size)
        np.testing.assert_array_equal(idx, i1)
        np.testing.assert_allclose(d, d1, atol=1e-6, rtol=0)


def test_faiss_backend_missing_and_unknown_backend_are_one_line_errors():
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="faiss"):
            jaccard_distance(noise(10), knn_backend="faiss")
    with pytest.raises(ValueError, match="backend"):  # a library error, not the CLI's ConfigError
        exact_knn(noise(10), 3, backend="annoy")
    with pytest.raises(IsereidError, match="backend"):  # ... that the CLI still shows on one line
        exact_knn(noise(10), 3, backend="annoy")


@pytest.mark.parametrize("bad, message", [
    (dict(features=np.zeros(5, np.float32)), "2-D"),
    (dict(features=np.full((4, 3), np.nan, np.float32)), "NaN"),
    (dict(features=np.array([[1.0, 0.0], [np.inf, 0.0]], np.float32)), "infinite"),
    (dict(k1=0), "k1"),
    (dict(k2=0), "k2"),
    (dict(eps=0.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(min_samples=0), "min_samples"),
    (dict(features="not an array"), "numpy"),
])
def test_invalid_inputs(bad, message):
    args = dict(features=noise(10), eps=0.5, k1=5, k2=2, min_samples=2)
    args.update(bad)
    with pytest.raises(IsereidError, match=message):
        jaccard_dbscan(args.pop("features"), **args)


# ----------------------------------------------------------------------------------------------
# DBSCAN
# ----------------------------------------------------------------------------------------------
def dense_dbscan(dense: np.ndarray, eps: float, min_samples: int = 4) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)


@pytest.mark.parametrize("index", [0, 1, 3, 4, 6])
@pytest.mark.parametrize("eps", [0.3, 0.5, 0.6, 0.7, 1.0, 1.5])
def test_dbscan_matches_dense_reference(index, eps, oracle_cache):
    x, expected = oracle_cache(index)
    _, _, k1, k2 = CASES[index]
    labels = jaccard_dbscan(x, eps=eps, k1=k1, k2=k2)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    np.testing.assert_array_equal(labels, dense_dbscan(expected, eps))


def test_dbscan_eps_at_a_stored_distance(oracle_cache):
    """eps equal to an actual float32 distance: the pair must count (<=), as in the dense case."""
    x, expected = oracle_cache(0)
    ours = densify(jaccard_distance(x, k1=30, k2=6))
    values = np.unique(ours[(ours > 0.2) & (ours < 0.8)])
    for eps in values[::max(1, len(values) // 5)]:
        eps = float(eps)
        np.testing.assert_array_equal(jaccard_dbscan(x, eps=eps), dense_dbscan(ours, eps))


def test_dbscan_all_outliers():
    x = noise(40, dim=32)
    labels = jaccard_dbscan(x, eps=0.05, k1=10, k2=3)
    assert labels.tolist() == [-1] * 40
    report = cluster_report(labels)
    assert report.num_clusters == 0 and report.num_outliers == 40 and report.size_histogram == {}


def test_dbscan_clusters_blobs():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((5, 32)))
    truth = np.repeat(np.arange(5), 20)
    x = unit(centres[truth] + 0.1 * rng.standard_normal((100, 32)))
    labels = jaccard_dbscan(x, eps=0.6, k1=20, k2=6)
    report = cluster_report(labels, truth)
    assert report.num_clusters == 5 and report.purity == 1.0 and report.ari > 0.9


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def test_cluster_report_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 2, 2, 2, 2])
    truth = np.array([5, 5, 6, 7, 7, 7, 8, 8, 8, 8, 8, 8, 9, 9])
    report = cluster_report(labels, truth)
    assert isinstance(report, ClusteringReport)
    assert report.num_clusters == 3 and report.num_outliers == 1
    assert report.size_histogram == {"1": 0, "2-3": 2, "4-7": 0, "8-15": 1}
    # purity: cluster 0 -> 2 of 3, cluster 1 -> 2 of 2, cluster 2 -> 6 of 8; over 13 clustered
    assert report.purity == pytest.approx(10 / 13)
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    singleton = np.array([0, 0, 0, 1, 1, 3, 2, 2, 2, 2, 2, 2, 2, 2])
    assert report.nmi == pytest.approx(normalized_mutual_info_score(truth, singleton))
    assert report.ari == pytest.approx(adjusted_rand_score(truth, singleton))
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"num_clusters", "num_outliers", "histogram", "nmi", "ari", "purity",
                      "cross_camera_clusters", "cross_camera_images", "mutual_cross_camera",
                      "cross_camera_nn_accuracy", "previous_agreement"}
    assert d["nmi"] == pytest.approx(report.nmi)
    assert d["cross_camera_clusters"] is None and d["cross_camera_images"] is None  # no cameras given


def test_cluster_report_without_truth():
    d = cluster_report(np.array([0, 1, 1, -1, -1])).to_dict()
    assert d == {"num_clusters": 2, "num_outliers": 2, "histogram": {"1": 1, "2-3": 1},
                 "nmi": None, "ari": None, "purity": None, "cross_camera_clusters": None,
                 "cross_camera_images": None, "mutual_cross_camera": None, "cross_camera_nn_accuracy": None,
                 "previous_agreement": None}


def _ari_oracle(a, b):
    """The adjusted Rand index from its definition: pairs together in a, in b, in both, over all pairs
    (outliers, -1, each alone)."""
    n = len(a)
    same_a = [[a[i] == a[j] and a[i] >= 0 for j in range(n)] for i in range(n)]
    same_b = [[b[i] == b[j] and b[i] >= 0 for j in range(n)] for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    both = sum(same_a[i][j] and same_b[i][j] for i, j in pairs)
    in_a = sum(same_a[i][j] for i, j in pairs)
    in_b = sum(same_b[i][j] for i, j in pairs)
    expected = in_a * in_b / len(pairs)
    top = (in_a + in_b) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


@pytest.mark.parametrize("seed", range(6))
def test_label_agreement_matches_the_pair_counting_oracle(seed):
    from isereid.clustering import label_agreement

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    a = rng.integers(-1, int(rng.integers(2, 8)), n)
    b = np.where(rng.random(n) < 0.7, a, rng.integers(-1, 6, n))  # mostly the same clusters, some moved
    assert label_agreement(a, b) == pytest.approx(_ari_oracle(a, b), abs=1e-12)
    assert label_agreement(a, a) == pytest.approx(1.0)
    renamed = np.where(a >= 0, (a + 3) * 7, -1)  # the same partition under other names
    assert label_agreement(a, renamed) == pytest.approx(1.0)
    with pytest.raises(ClusteringError, match="previous labels"):
        label_agreement(a, b[:-1])


def test_label_agreement_counts_outliers_as_singletons():
    from isereid.clustering import label_agreement

    clustered = np.array([0, 0, 1, 1, 2, 2])
    # all outliers now: no pair stays together; counting -1 as one cluster would call it a merge instead
    assert label_agreement(clustered, np.full(6, -1)) == pytest.approx(_ari_oracle(clustered, np.full(6, -1)))
    assert label_agreement(np.array([0, 0, -1, -1]), np.array([0, 0, -1, -1])) == pytest.approx(1.0)


def _camera_spread_oracle(labels, cameras):
    clusters = sorted({int(c) for c in labels if c >= 0})
    multi = {c for c in clusters if len({int(k) for y, k in zip(labels, cameras) if y == c}) >= 2}
    clustered = [y for y in labels if y >= 0]
    if not clustered:
        return 0.0, 0.0
    return len(multi) / len(clusters), sum(y in multi for y in clustered) / len(clustered)


def test_cluster_report_camera_spread_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2, 2, 2])
    cameras = np.array([0, 1, 1, 2, 2, 0, 3, 0, 3, 3])
    d = cluster_report(labels, cameras=cameras).to_dict()
    # clusters 0 and 2 span two cameras, cluster 1 does not; 7 of the 9 clustered images sit in them
    assert d["cross_camera_clusters"] == pytest.approx(2 / 3)
    assert d["cross_camera_images"] == pytest.approx(7 / 9)
    assert d["nmi"] is None


@pytest.mark.parametrize("seed", range(6))
def test_camera_spread_matches_loop_oracle(seed):
    from isereid.clustering.report import camera_spread

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    labels = rng.integers(-1, int(rng.integers(1, 12)), n)
    cameras = rng.integers(0, int(rng.integers(1, 4)), n)
    assert camera_spread(labels, cameras) == pytest.approx(_camera_spread_oracle(labels, cameras))
    with pytest.raises(ClusteringError):
        camera_spread(labels, cameras[:-1] if n > 1 else np.zeros(2))


@pytest.mark.parametrize("seed", range(5))
def test_outliers_as_singletons_matches_a_loop(seed):
    from isereid.clustering import outliers_as_singletons

    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, int(rng.integers(1, 6)), int(rng.integers(1, 30)))
    expected, nxt = [], int(labels.max()) + 1 if (labels >= 0).any() else 0
    for y in labels:  # clusters keep their label; each outlier takes the next free one, in order
        if y >= 0:
            expected.append(int(y))
        else:
            expected.append(nxt)
            nxt += 1
    before = labels.copy()
    out = outliers_as_singletons(labels)
    assert out.dtype == np.int64 and out.tolist() == expected
    assert np.array_equal(labels, before) and outliers_as_singletons(np.full(3, -1)).tolist() == [0, 1, 2]
    assert outliers_as_singletons(np.zeros(0, dtype=np.int64)).tolist() == []
