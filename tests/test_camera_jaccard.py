"""CA-Jaccard (camera-aware k-reciprocal sets) against a dense loop oracle."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from isereid.clustering import PseudoLabelSettings, jaccard_distance, pseudo_labels
from isereid.clustering.camera_jaccard import camera_jaccard_distance, camera_ranking
from isereid.errors import ClusteringError, InvalidArgument


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranked(d_row, members):
    """``members`` sorted by (distance, index), as a plain stable sort."""
    members = np.asarray(members)
    return members[np.lexsort((members, d_row[members]))]


def ca_jaccard_oracle(x, cams, k1a, k1e, k2a, k2e):
    """Dense loops, float64 except the float32 distances both sides rank by."""
    n = len(x)
    d32 = (2.0 - 2.0 * (x @ x.T)).astype(np.float32)
    d = d32.astype(np.float64)
    same = [ranked(d32[i], np.flatnonzero(cams == cams[i])) for i in range(n)]  # a small camera: shorter
    other = [ranked(d32[i], np.flatnonzero(cams != cams[i])) for i in range(n)]
    v = np.zeros((n, n))
    for i in range(n):
        members = [j for j in same[i][:k1a] if i in same[j][:k1a]]
        members += [j for j in other[i][:k1e] if i in other[j][:k1e]]
        w = np.exp(-d[i, members])
        v[i, members] = w / w.sum()
    vq = np.zeros_like(v)
    for i in range(n):
        rows = list(same[i][:k2a]) + list(other[i][:k2e])
        vq[i] = v[rows].mean(axis=0)
    dist = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            m = np.minimum(vq[i], vq[j]).sum()
            dist[i, j] = max(0.0, 1.0 - m / (2.0 - m))
    return dist


@pytest.mark.parametrize("n,dim,ncam,k1a,k1e,k2a,k2e,seed", [
    (30, 8, 2, 5, 20, 2, 4, 0),     # the paper's defaults; k1_inter capped by the smaller camera
    (40, 6, 3, 4, 3, 2, 2, 1),
    (25, 5, 2, 3, 2, 1, 0, 2),      # no query expansion
    (50, 4, 4, 6, 5, 3, 1, 3),
    (12, 3, 2, 50, 50, 9, 9, 4),    # every width capped
    (30, 6, 3, 5, 4, 3, 2, 5),      # camera 2 holds two images: shorter own-camera lists there
    (30, 6, 3, 5, 4, 3, 2, 6),      # camera 2 holds one image
    (30, 6, 2, 5, 20, 2, 6, 7),     # camera 1 holds 3 images: 27 others for them, 3 for the rest
])
def test_camera_jaccard_matches_dense_oracle(n, dim, ncam, k1a, k1e, k2a, k2e, seed):
    x = unit_rows(n, dim, seed)
    cams = np.random.default_rng(seed + 100).integers(0, ncam, size=n)
    cams[:ncam] = np.arange(ncam)  # every camera present
    if seed in (5, 6):
        cams = np.where(cams == 2, 0, cams)
        cams[:7 - seed] = 2
    if seed == 7:
        cams = np.where(np.arange(n) < 3, 1, 0)
    stored = camera_jaccard_distance(x, cams, k1a, k1e, k2a, k2e).tocoo()
    dense = np.ones((n, n), dtype=np.float32)  # pairs not stored have distance 1
    dense[stored.row, stored.col] = stored.data  # explicit zeros are real distances of 0
    want = ca_jaccard_oracle(x, cams, k1a, k1e, k2a, k2e)
    np.testing.assert_allclose(dense, want, atol=2e-6, rtol=0)
    assert (want < 1).sum() > n  # not a trivial all-ones case


def test_camera_ranking_lists_stay_in_and_out_of_the_camera():
    x = unit_rows(60, 8, 5)
    cams = np.repeat([0, 1, 2], 20)
    rank = camera_ranking(torch.from_numpy(x), cams, 4, 7)
    assert (cams[rank.intra] == cams[:, None]).all()
    assert (cams[rank.inter] != cams[:, None]).all()
    assert (rank.intra[:, 0] == np.arange(60)).all()  # the row itself first
    assert (rank.intra_count == 4).all()
    assert (np.diff(rank.inter_dist, axis=1) >= 0).all()


def test_other_view_enters_the_overlap_that_plain_jaccard_misses():
    # Two cameras with a strong per-camera offset: every plain neighbour is same-camera, so the
    # plain Jaccard distance between a person's two views is 1; the camera-aware one is below 1.
    rng = np.random.default_rng(0)
    people = rng.normal(size=(20, 16))
    offset = 6.0 * rng.normal(size=(2, 16))
    x = np.concatenate([people + offset[0], people + offset[1]]) + 0.05 * rng.normal(size=(40, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cams = np.repeat([0, 1], 20)
    pairs = (np.arange(20), np.arange(20) + 20)
    plain = jaccard_distance(x, k1=5, k2=2).toarray()
    plain[plain == 0] = 1.0
    plain[np.diag_indices(40)] = 0.0
    assert (plain[pairs] == 1.0).all()
    ca = camera_jaccard_distance(x, cams, k1_intra=3, k1_inter=1, k2_intra=1, k2_inter=0).toarray()
    assert (ca[pairs] < 1.0).mean() > 0.5


def test_pseudo_labels_with_camera_jaccard_join_the_two_views():
    rng = np.random.default_rng(1)
    people = rng.normal(size=(10, 16))
    offset = rng.normal(size=(2, 16))  # enough to make every plain neighbour list camera-pure
    views = [people[:, None] + offset[c] + 0.02 * rng.normal(size=(10, 4, 16)) for c in (0, 1)]
    x = np.concatenate([v.reshape(40, 16) for v in views])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cams = np.repeat([0, 1], 40)
    person = np.tile(np.repeat(np.arange(10), 4), 2)
    settings = PseudoLabelSettings(eps=0.6, min_samples=4, camera_jaccard=True, k1_intra=4, k1_inter=4,
                                   k2_intra=2, k2_inter=1)
    labels = pseudo_labels(x, cams, settings).labels
    joined = [p for p in range(10) if np.unique(labels[person == p]).size == 1 and labels[person == p][0] >= 0]
    assert len(joined) >= 8  # one cluster holding both cameras' views of the person
    plain = pseudo_labels(x, cams, PseudoLabelSettings(eps=0.6, min_samples=4, k1=4, k2=2)).labels
    assert all(np.unique(cams[plain == c]).size == 1 for c in np.unique(plain[plain >= 0]))


def test_camera_jaccard_auto_eps_runs_and_reports_the_choice():
    x = unit_rows(80, 8, 7)
    cams = np.repeat([0, 1], 40)
    out = pseudo_labels(x, cams, PseudoLabelSettings(eps="auto", camera_jaccard=True, k1_intra=4, k1_inter=3))
    assert out.choice is not None and 0 < out.choice.eps < 1
    assert out.labels.shape == (80,)


def test_camera_jaccard_bad_input():
    x = unit_rows(10, 4, 0)
    with pytest.raises(InvalidArgument, match="two or more cameras"):
        camera_jaccard_distance(x, np.zeros(10, dtype=int))
    with pytest.raises(InvalidArgument, match="camids"):
        camera_jaccard_distance(x, np.zeros(9, dtype=int))
    for key in ("k1_intra", "k1_inter"):
        for bad in (0, -1, True):
            with pytest.raises(InvalidArgument, match=key):
                camera_jaccard_distance(x, np.repeat([0, 1], 5), **{key: bad})
    with pytest.raises(ClusteringError, match="identical"):
        pseudo_labels(np.ones((20, 4), np.float32) / 2, np.repeat([0, 1], 10),
                      PseudoLabelSettings(eps="auto", camera_jaccard=True))
    with pytest.raises(InvalidArgument, match="k2_inter"):
        camera_jaccard_distance(x, np.repeat([0, 1], 5), k2_inter=-1)
    with pytest.raises(InvalidArgument, match="camids are needed"):
        pseudo_labels(x, None, PseudoLabelSettings(camera_jaccard=True))


def test_trainer_clusterer_switches_to_camera_jaccard_at_the_start_epoch():
    from isereid.config import load_config
    from isereid.engine.trainer import jaccard_clusterer
    cfg = load_config("demo", ["cluster.camera_jaccard=true", "cluster.camera_jaccard_start=2", "cluster.eps=0.6",
                               "cluster.camera_norm=false", "cluster.associate=false", "cluster.k1=4", "cluster.k2=2",
                               "cluster.k1_intra=4", "cluster.k1_inter=4", "cluster.k2_inter=1",
                               "cluster.colour_weight=0"]).cluster
    rng = np.random.default_rng(1)
    people = rng.normal(size=(10, 16))
    offset = rng.normal(size=(2, 16))
    x = np.concatenate([(people[:, None] + offset[c] + 0.02 * rng.normal(size=(10, 4, 16))).reshape(40, 16)
                        for c in (0, 1)])
    x = torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    cams = np.repeat([0, 1], 40)
    cluster = jaccard_clusterer(cfg)
    plain = dataclasses.replace(PseudoLabelSettings.of(cfg), camera_jaccard=False)
    for epoch in (0, 1):
        np.testing.assert_array_equal(cluster(x, cams, epoch), pseudo_labels(x, cams, plain).labels)
    np.testing.assert_array_equal(cluster(x, cams, 2), pseudo_labels(x, cams, PseudoLabelSettings.of(cfg)).labels)
    assert not np.array_equal(cluster(x, cams, 2), cluster(x, cams, 1))
    assert cluster.scale["camera_jaccard"] is False  # epoch 1, the last call
    cluster(x, cams, 3)
    assert cluster.scale == {"eps": 0.6, "camera_jaccard": True}
