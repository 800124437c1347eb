"""Tests for isereid.evaluation: ranking metrics, pairwise distances and re-ranking.

The slow references live here: a per-query loop scored with scikit-learn (mAP) and a plain
first-match loop (CMC), and a dense, loop-by-loop version of the reference k-reciprocal
re-ranking of docs/method.md#re-ranking.
"""
from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from isereid.evaluation import RankingResult, evaluate_ranking, pairwise_distance, re_ranking


# ----------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------
def loop_ranking_reference(distmat, query_pids, gallery_pids, query_camids, gallery_camids, max_rank):
    """Per-query protocol of docs/method.md#ranking with sklearn AP; ties in CMC by stable argsort.

    Returns (per-query AP with NaN for skipped queries, cmc (max_rank,))."""
    distmat = np.asarray(distmat, dtype=np.float64)
    aps = np.full(distmat.shape[0], np.nan)
    first_ranks = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((gallery_pids[order] == query_pids[i]) & (gallery_camids[order] == query_camids[i]))
        matches = (gallery_pids[order] == query_pids[i])[keep]
        if not matches.any():
            continue
        aps[i] = average_precision_score(matches, -distmat[i][order][keep])
        first_ranks.append(int(np.flatnonzero(matches)[0]))
    cmc = np.zeros(max_rank)
    for rank in first_ranks:
        if rank < max_rank:
            cmc[rank:] += 1
    return aps, cmc / max(1, len(first_ranks))


def dense_reference_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value):
    """The reference re_ranking on dense (Q+G)^2 matrices, loop by loop (docs/method.md#re-ranking)."""
    num_query = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
    full = np.power(full, 2).astype(np.float32)
    original = np.transpose(full / np.max(full, axis=0))  # column max, then transpose
    num_all = original.shape[0]
    initial_rank = np.argsort(original, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        forward = initial_rank[i, : k + 1]
        return np.array([j for j in forward if i in initial_rank[j, : k + 1]], dtype=np.int64)

    V = np.zeros_like(original, dtype=np.float32)
    for i in range(num_all):
        own = reciprocal(i, k1)
        expansion = list(own)
        for candidate in own:
            candidate_set = reciprocal(candidate, half)
            if len(np.intersect1d(candidate_set, own)) > 2.0 / 3.0 * len(candidate_set):
                expansion.extend(candidate_set)
        expansion = np.unique(np.array(expansion, dtype=np.int64))
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(num_all)]).astype(np.float32)
    jaccard = np.zeros((num_query, num_all), dtype=np.float32)
    for i in range(num_query):
        overlap = np.minimum(V[i][None, :], V).sum(axis=1)
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def numpy_squared_distances(a, b):
    """Float32 ||a||^2 + ||b||^2 - 2<a, b>, as the reference computes it."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    return ((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T).astype(np.float32)


def random_protocol_data(rng, num_query, num_gallery, num_ids=12, num_cams=3, integer=False):
    """Distances and ids with junk entries, skipped queries and (optionally) many ties."""
    if integer:
        distmat = rng.integers(0, 5, size=(num_query, num_gallery)).astype(np.float32)
    else:
        distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    query_pids = rng.integers(0, num_ids + 3, num_query)  # some pids absent from the gallery
    gallery_pids = rng.integers(0, num_ids, num_gallery)
    query_camids = rng.integers(0, num_cams, num_query)
    gallery_camids = rng.integers(0, num_cams, num_gallery)
    return distmat, query_pids, gallery_pids, query_camids, gallery_camids


def assert_matches_reference(result, distmat, qp, gp, qc, gc, max_rank):
    aps, cmc = loop_ranking_reference(distmat, qp, gp, qc, gc, max_rank)
    np.testing.assert_array_equal(np.isnan(result.average_precision), np.isnan(aps))
    np.testing.assert_allclose(result.average_precision, aps, rtol=0, atol=1e-12)
    assert result.num_valid_queries == int((~np.isnan(aps)).sum())
    expected_map = float(np.nanmean(aps)) if result.num_valid_queries else 0.0
    assert result.mAP == pytest.approx(expected_map, abs=1e-12)
    np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=1e-12)
    assert result.cmc.shape == (max_rank,)


# ----------------------------------------------------------------------------------------------
# evaluate_ranking
# ----------------------------------------------------------------------------------------------
def test_hand_computed_fractions():
    # Gallery idx 6 is query 0's pid in query 0's camera, idx 4 likewise for query 1: junk.
    # Query 2's pid is not in the gallery and query 3's only match is in its own camera: skipped.
    query_pids = np.array([1, 7, 9, 4])
    query_camids = np.array([0, 0, 0, 2])
    gallery_pids = np.array([1, 7, 7, 5, 7, 4, 1, 1])
    gallery_camids = np.array([1, 1, 1, 1, 0, 2, 0, 1])
    distmat = np.array(
        [
            # 0    1    2    3    4    5    6    7
            [1.0, 2.0, 7.0, 8.0, 9.0, 5.0, 0.5, 4.0],  # q0: junk idx 6; pos 0 (d1), 7 (d4)
            [1.0, 1.0, 2.0, 2.0, 0.5, 9.0, 9.0, 9.0],  # q1: junk idx 4; pos 1 (d1), 2 (d2)
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],  # q2: skipped
            [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 7.0, 8.0],  # q3: only match is same camera -> skipped
        ]
    )
    # q0 valid order: 0 (pos, d=1), 1 (neg, 2), 7 (pos, 4), 5, 2, 3, 4 -> AP = (1/1 + 2/3) / 2 = 5/6,
    #   first match rank 0.
    # q1 valid order: tie {0 neg, 1 pos} at d=1, tie {2 pos, 3 neg} at d=2, then the rest. Tie-aware
    #   AP = 1/2 * (1/2) + 1/2 * (2/4) = 1/2 (an untied order would give 7/12); the stable order
    #   puts the negative idx 0 first -> first match rank 1.
    result = evaluate_ranking(distmat, query_pids, gallery_pids, query_camids, gallery_camids, max_rank=3)
    expected_ap = [Fraction(5, 6), Fraction(1, 2)]
    np.testing.assert_allclose(result.average_precision[:2], [float(f) for f in expected_ap], atol=1e-15)
    assert np.isnan(result.average_precision[2:]).all()
    assert result.num_valid_queries == 2
    assert result.mAP == pytest.approx(float(sum(expected_ap) / 2), abs=1e-15)  # 2/3
    np.testing.assert_allclose(result.cmc, [1 / 2, 1, 1], atol=1e-15)
    np.testing.assert_array_equal(result.first_match_rank, [0, 1, -1, -1])
    assert result.rank(1) == 0.5
    assert result.to_dict() == {"mAP": pytest.approx(2 / 3), "rank1": 0.5, "rank5": 1.0, "rank10": 1.0}
    assert_matches_reference(result, distmat, query_pids, gallery_pids, query_camids, gallery_camids, 3)


def test_all_positive_ties_and_negative_first():
    # One query, gallery all tied at d=0: 2 positives, 2 negatives -> AP = 2/4 = 1/2 exactly.
    result = evaluate_ranking(np.zeros((1, 4)), [3], [3, 0, 3, 0], [0], [1, 1, 1, 1], max_rank=4)
    assert result.mAP == 0.5
    np.testing.assert_array_equal(result.first_match_rank, [0])  # positive idx 0 first in stable order
    result = evaluate_ranking(np.zeros((1, 4)), [3], [0, 3, 0, 3], [0], [1, 1, 1, 1], max_rank=4)
    assert result.mAP == 0.5
    np.testing.assert_array_equal(result.first_match_rank, [1])  # negative idx 0 precedes
    np.testing.assert_allclose(result.cmc, [0, 1, 1, 1])


@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_matches_sklearn_loop(integer, chunk_size):
    rng = np.random.default_rng(1 + integer)
    data = random_protocol_data(rng, 50, 300, integer=integer)
    result = evaluate_ranking(*data, max_rank=20, chunk_size=chunk_size)
    assert 0 < result.num_valid_queries < 50  # some queries skipped, some scored
    assert_matches_reference(result, *data, max_rank=20)


def test_max_rank_beyond_gallery():
    rng = np.random.default_rng(3)
    data = random_protocol_data(rng, 20, 15, num_ids=4, num_cams=2, integer=True)
    result = evaluate_ranking(*data, max_rank=40)
    assert_matches_reference(result, *data, max_rank=40)
    assert result.cmc[-1] == 1.0 and result.cmc[15:].min() == 1.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(4)
    distmat, qp, gp, qc, gc = random_protocol_data(rng, 30, 120, integer=True)
    from_numpy = evaluate_ranking(distmat, qp, gp, qc, gc, max_rank=10)
    from_torch = evaluate_ranking(
        torch.from_numpy(distmat), torch.from_numpy(qp), torch.from_numpy(gp), torch.from_numpy(qc),
        torch.from_numpy(gc), max_rank=10,
    )
    from_lists = evaluate_ranking(distmat.tolist(), qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), 10)
    transposed = evaluate_ranking(torch.from_numpy(distmat.T.copy()).t(), qp, gp, qc, gc, max_rank=10)
    integer = evaluate_ranking(distmat.astype(np.int64), qp, gp, qc, gc, max_rank=10)
    half = evaluate_ranking(torch.from_numpy(distmat).half(), qp, gp, qc, gc, max_rank=10)
    for other in (from_torch, from_lists, transposed, integer, half):
        np.testing.assert_array_equal(other.average_precision, from_numpy.average_precision)
        np.testing.assert_array_equal(other.cmc, from_numpy.cmc)
        assert other.mAP == from_numpy.mAP


def test_does_not_modify_input():
    rng = np.random.default_rng(5)
    distmat, qp, gp, qc, gc = random_protocol_data(rng, 10, 40)
    before = distmat.copy()
    evaluate_ranking(distmat, qp, gp, qc, gc)
    np.testing.assert_array_equal(distmat, before)


def test_no_valid_query_warns_and_returns_zeros():
    with pytest.warns(RuntimeWarning, match="no query has a true match") as caught:
        result = evaluate_ranking(np.ones((2, 3)), [1, 2], [3, 3, 1], [0, 0], [0, 0, 0], max_rank=5)
    assert caught[0].filename == __file__  # the warning names the caller's line, not torch's wrapper
    assert result.mAP == 0.0 and result.num_valid_queries == 0
    np.testing.assert_array_equal(result.cmc, np.zeros(5))
    assert np.isnan(result.average_precision).all()
    with pytest.warns(RuntimeWarning):
        empty = evaluate_ranking(np.zeros((0, 4)), [], [1, 2, 3, 4], [], [0, 0, 0, 0], max_rank=2)
    assert empty.num_valid_queries == 0 and empty.average_precision.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(distmat=np.zeros((2, 3, 1))), "2-D"),
        (dict(query_pids=[1, 2, 3]), "query_pids"),
        (dict(gallery_pids=[1, 2]), "gallery_pids"),
        (dict(query_camids=[0]), "query_camids"),
        (dict(gallery_camids=np.zeros((3, 1), dtype=int)), "gallery_camids"),
        (dict(query_pids=[1.5, 2.0]), "integers"),
        (dict(distmat=np.array([[0, np.nan, 1], [0, 1, 2]])), "NaN"),
        (dict(distmat=np.array([["a", "b", "c"], ["a", "b", "c"]])), "real numbers"),
        (dict(max_rank=0), "max_rank"),
    ],
)
def test_invalid_inputs_raise(kwargs, message):
    args = dict(
        distmat=np.zeros((2, 3)), query_pids=[1, 2], gallery_pids=[1, 2, 3], query_camids=[0, 0],
        gallery_camids=[1, 1, 1], max_rank=5,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate_ranking(**args)


def test_rank_helper_bounds():
    result = RankingResult(0.5, np.array([0.5, 0.75]), 2, np.array([0.5, 0.5]), np.array([0, 1]))
    assert result.rank(2) == 0.75
    assert result.to_dict()["rank10"] == 0.75  # capped at max_rank
    with pytest.raises(ValueError):
        result.rank(3)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_query=st.integers(1, 8),
    num_gallery=st.integers(1, 30),
    levels=st.integers(1, 6),
)
def test_property_matches_sklearn_loop(seed, num_query, num_gallery, levels):
    rng = np.random.default_rng(seed)
    distmat = rng.integers(0, levels, size=(num_query, num_gallery)).astype(np.float64)
    qp, gp = rng.integers(0, 4, num_query), rng.integers(0, 4, num_gallery)
    qc, gc = rng.integers(0, 2, num_query), rng.integers(0, 2, num_gallery)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = evaluate_ranking(distmat, qp, gp, qc, gc, max_rank=10)
    assert_matches_reference(result, distmat, qp, gp, qc, gc, max_rank=10)


# ----------------------------------------------------------------------------------------------
# pairwise_distance
# ----------------------------------------------------------------------------------------------
def test_pairwise_distance_matches_float64():
    rng = np.random.default_rng(6)
    query, gallery = rng.standard_normal((13, 8)), rng.standard_normal((29, 8))
    expected = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    for chunk_size in (None, 4):
        got = pairwise_distance(torch.from_numpy(query), gallery, chunk_size=chunk_size)
        assert got.dtype == torch.float32 and got.shape == (13, 29)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="same D"):
        pairwise_distance(query, gallery[:, :5])


# ----------------------------------------------------------------------------------------------
# re_ranking
# ----------------------------------------------------------------------------------------------
def clustered_features(rng, num_ids, num_samples, dim, spread=0.6):
    """(num_samples, dim) unit rows around num_ids random centres, in random order."""
    centres = rng.standard_normal((num_ids, dim))
    noise = spread * rng.standard_normal((num_samples, dim))
    features = centres[rng.integers(0, num_ids, num_samples)] + noise
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32)


@pytest.mark.parametrize(
    "num_query, num_gallery, k1, k2, lambda_value",
    [
        (12, 48, 20, 6, 0.3),  # reference defaults
        (12, 48, 5, 3, 0.0),  # odd k1: round(2.5) = 2
        (10, 40, 3, 6, 0.5),  # k2 > k1 + 1
        (10, 40, 4, 1, 0.3),  # no query expansion
        (15, 45, 8, 2, 1.0),
        (30, 90, 12, 4, 0.3),
        (4, 8, 20, 6, 0.3),  # k1 + 1 > Q + G
    ],
)
def test_re_ranking_matches_dense_reference(num_query, num_gallery, k1, k2, lambda_value):
    rng = np.random.default_rng(k1 * 100 + k2)
    # Loose clusters, so that expansion (k1 >= 6) adds neighbours outside the k1-reciprocal set.
    features = clustered_features(rng, num_ids=4, num_samples=num_query + num_gallery, dim=16, spread=1.0)
    query, gallery = features[:num_query], features[num_query:]
    expected = dense_reference_re_ranking(
        numpy_squared_distances(query, gallery), numpy_squared_distances(query, query),
        numpy_squared_distances(gallery, gallery), k1, k2, lambda_value,
    )
    got = re_ranking(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    assert got.dtype == np.float32 and got.shape == (num_query, num_gallery)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    if lambda_value < 1:
        assert (got < (1 - lambda_value) * 0.999).any()  # some pairs really share neighbours


def test_re_ranking_torch_input_and_errors():
    rng = np.random.default_rng(7)
    features = clustered_features(rng, num_ids=5, num_samples=40, dim=12)
    query, gallery = features[:8], features[8:]
    from_numpy = re_ranking(query, gallery, k1=6, k2=3)
    from_torch = re_ranking(torch.from_numpy(query), torch.from_numpy(gallery), k1=6, k2=3)
    np.testing.assert_allclose(from_torch, from_numpy, atol=1e-6)
    # Re-ranking changes the order relative to the plain distance for at least one query.
    plain = pairwise_distance(query, gallery).numpy()
    assert (np.argsort(from_numpy, axis=1)[:, :5] != np.argsort(plain, axis=1)[:, :5]).any()
    with pytest.raises(ValueError, match="same D"):
        re_ranking(query, gallery[:, :4])
    with pytest.raises(ValueError, match="k1 and k2"):
        re_ranking(query, gallery, k1=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu():
    rng = np.random.default_rng(8)
    distmat, qp, gp, qc, gc = random_protocol_data(rng, 30, 120, integer=True)
    on_cpu = evaluate_ranking(distmat, qp, gp, qc, gc, max_rank=10)
    on_gpu = evaluate_ranking(torch.from_numpy(distmat).cuda(), torch.from_numpy(qp).cuda(), gp, qc, gc, 10)
    np.testing.assert_array_equal(on_gpu.average_precision, on_cpu.average_precision)
    np.testing.assert_array_equal(on_gpu.cmc, on_cpu.cmc)
    features = clustered_features(rng, num_ids=4, num_samples=60, dim=16, spread=1.0)
    query, gallery = torch.from_numpy(features[:15]), torch.from_numpy(features[15:])
    assert pairwise_distance(query.cuda(), gallery.cuda()).is_cuda
    on_gpu = re_ranking(query.cuda(), gallery.cuda(), k1=8, k2=3)
    np.testing.assert_allclose(on_gpu, re_ranking(query, gallery, k1=8, k2=3), atol=1e-5)
