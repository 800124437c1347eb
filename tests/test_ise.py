"""Memory, support samples, LP loss and the interpolation schedule against loop oracles."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isereid.ise import interpolation_weight, support_samples
from isereid.losses import label_preserving_loss
from isereid.memory import ClusterMemory


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- schedule
def test_interpolation_weight_schedule():
    assert interpolation_weight(0, 1000) == 0.0
    assert interpolation_weight(1000, 1000) == pytest.approx(0.25)  # ln(e) = 1, both 0.5 factors
    assert interpolation_weight(500, 1000) == pytest.approx(0.25 * math.log(1 + (math.e - 1) / 2))
    assert interpolation_weight(500, 1000) == pytest.approx(0.155, abs=1e-3)
    assert interpolation_weight(250, 1000, lambda_base=2.0) == pytest.approx(2 * interpolation_weight(250, 1000))
    values = [interpolation_weight(t, 28000) for t in range(0, 28000, 700)]
    assert all(a < b for a, b in zip(values, values[1:]))  # progressive
    with pytest.raises(ValueError):
        interpolation_weight(1, 0)


# ----------------------------------------------------------------------------- supports
def supports_oracle(feats, labels, cents, weight, topk):
    out = []
    for b in range(feats.shape[0]):
        sims = [(float(feats[b] @ cents[k]), k) for k in range(cents.shape[0])]
        ranked = [k for _, k in sorted(sims, key=lambda t: -t[0]) if k != int(labels[b])]
        for k in ranked[:topk]:
            s = feats[b] + weight * (cents[k] - cents[int(labels[b])])
            out.append(s / s.norm())
    return torch.stack(out)


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_support_samples_match_loop(topk):
    feats = unit(10, 6, seed=1).requires_grad_()
    cents = unit(5, 6, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    ours = support_samples(feats, labels, cents, 0.2, topk=topk)
    torch.testing.assert_close(ours, supports_oracle(feats.detach(), labels, cents, 0.2, topk))
    assert ours.shape == (10 * topk, 6)
    # gradients reach the features (through f + const and the normalisation), not the centroids
    ours.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_support_direction_is_centroid_to_centroid():
    feats = unit(1, 3, seed=0)
    cents = torch.eye(3, dtype=torch.float64)
    label = torch.tensor([0])
    s = support_samples(feats, label, cents, 0.25)
    k = int(torch.argmax(feats[0, 1:])) + 1  # nearest other centroid
    expected = F.normalize(feats[0] + 0.25 * (cents[k] - cents[0]), dim=0)
    torch.testing.assert_close(s[0], expected)


def test_support_topk_must_leave_a_foreign_centroid():
    with pytest.raises(ValueError):
        support_samples(unit(2, 4), torch.tensor([0, 1]), unit(2, 4, seed=1), 0.1, topk=2)


# ----------------------------------------------------------------------------- memory
def test_from_features_is_normalised_mean():
    feats = unit(9, 5, seed=3, dtype=torch.float32)
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2, 0])
    mem = ClusterMemory.from_features(feats, labels, momentum=0.1, mode="ori")
    for k in range(3):
        mean = feats[labels == k].mean(0)
        torch.testing.assert_close(mem.centroids[k], mean / mean.norm())
    assert mem.momentum == 0.1 and mem.mode == "ori"
    with pytest.raises(ValueError):
        ClusterMemory.from_features(feats, torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2]))  # label 1 missing


def test_contrastive_loss_matches_loop_and_leaves_memory_untouched():
    cents = unit(4, 6, seed=4)
    rows = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    mem = ClusterMemory(cents.clone(), temperature=0.05)
    loss = mem(rows, labels)
    expected = 0.0
    for r in range(7):
        q = rows[r] / rows[r].norm()
        logits = torch.stack([q @ mem.centroids[k] / 0.05 for k in range(4)])
        expected = expected - torch.log_softmax(logits, 0)[labels[r]]
    torch.testing.assert_close(loss, expected / 7)
    loss.backward()
    assert not mem.centroids.requires_grad and rows.grad is not None
    torch.testing.assert_close(mem.centroids, F.normalize(cents, dim=1))


def memory_update_oracle(cents, rows, labels, momentum, mode):
    cents = cents.clone()
    q = [r / r.norm() for r in rows]
    if mode == "ori":
        for r, y in zip(q, labels.tolist()):
            c = momentum * cents[y] + (1 - momentum) * r
            cents[y] = c / c.norm()
        return cents
    new = cents.clone()
    for y in sorted(set(labels.tolist())):
        idx = [i for i in range(len(q)) if labels[i] == y]
        sims = [float(q[i] @ cents[y]) for i in idx]
        hard = idx[sims.index(min(sims))]  # first on ties
        c = momentum * cents[y] + (1 - momentum) * q[hard]
        new[y] = c / c.norm()
    return new


@pytest.mark.parametrize("mode,momentum", [("hard", 0.2), ("ori", 0.1), ("ori", 0.5), ("hard", 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_update_matches_loop(mode, momentum, seed):
    g = torch.Generator().manual_seed(seed)
    cents = unit(6, 8, seed=seed + 10, dtype=torch.float32)
    labels = torch.randint(0, 5, (24,), generator=g)  # repeated labels, label 5 absent
    rows = torch.randn(24, 8, generator=g) * 3  # un-normalised: the update normalises rows first
    mem = ClusterMemory(cents.clone(), momentum=momentum, mode=mode)
    mem.update(rows, labels)
    expected = memory_update_oracle(F.normalize(cents, dim=1), rows, labels, momentum, mode)
    torch.testing.assert_close(mem.centroids, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mem.centroids[5], F.normalize(cents, dim=1)[5])  # untouched
    torch.testing.assert_close(mem.centroids.norm(dim=1), torch.ones(6))


def test_hard_update_breaks_ties_by_first_row():
    cents = torch.eye(3)
    rows = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # rows 0,1 tie (sim 0)
    mem = ClusterMemory(cents.clone(), momentum=0.5, mode="hard")
    mem.update(rows, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(mem.centroids[0], F.normalize(torch.tensor([0.5, 0.5, 0.0]), dim=0))


def test_memory_rejects_bad_settings():
    with pytest.raises(ValueError):
        ClusterMemory(unit(2, 3), mode="median")
    with pytest.raises(ValueError):
        ClusterMemory(unit(2, 3), temperature=0)


def test_memory_buffer_in_state_dict():
    mem = ClusterMemory(unit(3, 4, dtype=torch.float32))
    assert "centroids" in mem.state_dict()


# ----------------------------------------------------------------------------- LP loss
def lp_oracle(feats, sups, labels, temp, negatives):
    B = feats.shape[0]
    K = sups.shape[0] // B
    sup_labels = [int(labels[j // K]) for j in range(sups.shape[0])]
    total = 0.0
    for b in range(B):
        e = [torch.exp(feats[b] @ sups[j] / temp) for j in range(sups.shape[0])]
        pos = min((e[j] for j in range(len(e)) if sup_labels[j] == int(labels[b])), key=lambda t: float(t.detach()))
        if negatives == "all":
            neg = sum(e[j] for j in range(len(e)) if sup_labels[j] != int(labels[b]))
        else:
            neg = 0.0
            for other in sorted(set(sup_labels) - {int(labels[b])}):
                neg = neg + max((e[j] for j in range(len(e)) if sup_labels[j] == other),
                                key=lambda t: float(t.detach()))
        total = total - torch.log(pos / (pos + neg + 1e-6) + 1e-6)
    return total / B


@pytest.mark.parametrize("negatives", ["per_identity", "all"])
@pytest.mark.parametrize("topk", [1, 2])
def test_lp_loss_and_gradients_match_loop(negatives, topk):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([3, 3, 3, 1, 1, 1, 0, 0, 0, 2, 2, 2])
    cents = unit(4, 6, seed=8)

    def both(fn):
        feats = F.normalize(base, dim=1)
        sups = support_samples(feats, labels, cents, 0.2, topk=topk)
        loss = fn(feats, sups)
        (grad,) = torch.autograd.grad(loss, base)
        return loss, grad

    ours, g_ours = both(lambda f, s: label_preserving_loss(f, s, labels, 0.6, negatives=negatives))
    ref, g_ref = both(lambda f, s: lp_oracle(f, s, labels, 0.6, negatives))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_lp_per_identity_equals_reference_blocks_on_standard_batch():
    """On contiguous blocks of Z the reference reshapes negatives to rows of Z and takes row maxima."""
    Z = 4
    labels = torch.tensor([5] * Z + [2] * Z + [7] * Z)
    feats = unit(12, 8, seed=9)
    sups = support_samples(feats, labels, unit(8, 8, seed=10), 0.2)
    e = torch.exp(feats @ sups.t() / 0.6)
    ref = 0.0
    for b in range(12):
        pos = e[b, labels == labels[b]].min()
        neg = e[b, labels != labels[b]].reshape(-1, Z).max(dim=1).values.sum()
        ref = ref - torch.log(pos / (pos + neg + 1e-6) + 1e-6)
    torch.testing.assert_close(label_preserving_loss(feats, sups, labels), ref / 12)


def test_lp_loss_single_identity_has_no_negatives():
    feats = unit(4, 3)
    loss = label_preserving_loss(feats, feats.clone(), torch.zeros(4, dtype=torch.long))
    # P/(P+0+1e-6) ~ 1: the loss is ~ -log(1 + 1e-6)
    assert abs(float(loss)) < 1e-5


# ----------------------------------------------------------------------------- camera-aware foreign centroids
def restricted_oracle(feats, labels, cents, weight, topk, allowed):
    """Loop version of ise.foreign=same_camera: rank only allowed foreign centroids, unless a row has
    fewer than topk of them (then all foreign centroids, as the reference)."""
    out = []
    for b in range(feats.shape[0]):
        foreign = [k for k in range(cents.shape[0]) if k != int(labels[b])]
        ok = [k for k in foreign if bool(allowed[b, k])]
        pool = ok if len(ok) >= topk else foreign
        ranked = sorted(pool, key=lambda k: -float(feats[b] @ cents[k]))
        for k in ranked[:topk]:
            s = feats[b] + weight * (cents[k] - cents[int(labels[b])])
            out.append(s / s.norm())
    return torch.stack(out)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_support_samples_restricted_to_allowed_centroids(topk, seed):
    from isereid.ise import same_camera_candidates

    g = torch.Generator().manual_seed(seed)
    feats = unit(12, 5, seed=10 + seed)
    cents = unit(6, 5, seed=20 + seed)
    labels = torch.randint(0, 6, (12,), generator=g)
    cluster_cams = torch.rand(6, 3, generator=g) < 0.4  # (M, C) which cameras each cluster holds
    cams = torch.randint(0, 3, (12,), generator=g)
    allowed = same_camera_candidates(cams, cluster_cams)
    for b in range(12):  # same_camera_candidates against its definition
        for m in range(6):
            assert bool(allowed[b, m]) == bool(cluster_cams[m, cams[b]])
    ours = support_samples(feats, labels, cents, 0.2, topk=topk, allowed=allowed)
    torch.testing.assert_close(ours, restricted_oracle(feats, labels, cents, 0.2, topk, allowed))


def test_restriction_changes_the_chosen_centroid():
    # Row 0 (cluster 0) is nearest to cluster 1, but only cluster 2 shares its camera.
    feats = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    cents = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.43589, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    from isereid.ise import nearest_foreign_centroids

    assert int(nearest_foreign_centroids(feats, labels, cents)[0, 0]) == 1
    allowed = torch.tensor([[True, False, True]])
    assert int(nearest_foreign_centroids(feats, labels, cents, allowed=allowed)[0, 0]) == 2
    # No allowed foreign centroid: fall back to all foreign ones.
    assert int(nearest_foreign_centroids(feats, labels, cents, allowed=torch.tensor([[True, False, False]]))[0, 0]) == 1
    with pytest.raises(ValueError):
        nearest_foreign_centroids(feats, labels, cents, allowed=torch.ones(2, 3, dtype=torch.bool))
