"""memory.cluster_online: each L_cc row's cross-camera partner cluster (docs/camera_aware.md#cluster-online),
against loops over rows and columns written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isereid.config import ISEConfig, MemoryConfig, load_config
from isereid.engine.step import ise_losses
from isereid.errors import ConfigError
from isereid.memory import ClusterMemory, disjoint_partners, partner_cross_entropy


def _random_case(seed: int, rows: int = 30, clusters: int = 14, cameras: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)
    cents = F.normalize(torch.randn(clusters, dim, generator=g, dtype=torch.float64), dim=1)
    cams = torch.rand(clusters, cameras, generator=g) < 0.4
    cams[torch.arange(clusters), torch.randint(cameras, (clusters,), generator=g)] = True  # >= 1 camera each
    cams[0] = True  # one cluster spans every camera: its rows have no partner
    labels = torch.randint(clusters, (rows,), generator=g)
    labels[:3] = 0
    return feats, labels, cents, cams


def _partners_oracle(feats, labels, cents, cams):
    out = []
    for r in range(feats.shape[0]):
        own = set(np.flatnonzero(cams[labels[r]].numpy()))
        best, arg = -math.inf, -1
        for m in range(cents.shape[0]):
            if own & set(np.flatnonzero(cams[m].numpy())):
                continue
            sim = float(feats[r] @ cents[m])
            if sim > best:
                best, arg = sim, m
        out.append(arg)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_partner_is_the_nearest_cluster_sharing_no_camera(seed):
    feats, labels, cents, cams = _random_case(seed)
    got = disjoint_partners(feats * 3.0, labels, cents, cams)  # the rows' norm does not matter
    want = _partners_oracle(feats, labels, cents, cams)
    assert got.tolist() == want
    assert (got[:3] == -1).all()  # cluster 0 spans every camera
    assert (got >= 0).any()


def test_one_camera_gives_no_partner():
    feats, labels, cents, _ = _random_case(0)
    cams = torch.ones(cents.shape[0], 1, dtype=torch.bool)
    assert (disjoint_partners(feats, labels, cents, cams) == -1).all()


def _loss_oracle(logits, labels, partners, weight):
    total = 0.0
    for r in range(logits.shape[0]):
        row = logits[r].tolist()
        y, p = int(labels[r]), int(partners[r])
        cols = [m for m in range(len(row)) if not (weight is None and m == p)]
        log_z = math.log(sum(math.exp(row[m]) for m in cols))
        if p < 0 or weight is None:
            total += -(row[y] - log_z)
        else:
            total += -((row[y] - log_z) + weight * (row[p] - log_z)) / (1 + weight)
    return total / logits.shape[0]


@pytest.mark.parametrize("weight", [None, 0.0, 0.5, 1.0, 2.0])
def test_partner_cross_entropy_matches_the_row_by_row_formula(weight):
    feats, labels, cents, cams = _random_case(3)
    logits = (feats @ cents.t() / 0.05).requires_grad_(True)
    partners = disjoint_partners(feats, labels, cents, cams)
    loss = partner_cross_entropy(logits, labels, partners, weight)
    assert loss.item() == pytest.approx(_loss_oracle(logits.detach(), labels, partners, weight), rel=1e-12)
    # Gradient: finite differences of the oracle on a few entries, the partner column included.
    (grad,) = torch.autograd.grad(loss, logits)
    r = int(torch.nonzero(partners >= 0)[0])
    for col in (int(labels[r]), int(partners[r]), (int(partners[r]) + 1) % logits.shape[1]):
        bumped = [logits.detach().clone() for _ in range(2)]
        bumped[0][r, col] += 1e-6
        bumped[1][r, col] -= 1e-6
        numeric = (_loss_oracle(bumped[0], labels, partners, weight)
                   - _loss_oracle(bumped[1], labels, partners, weight)) / 2e-6
        assert grad[r, col].item() == pytest.approx(numeric, abs=1e-6)
    if weight is None:
        assert grad[r, int(partners[r])].item() == 0.0  # ignored: neither pulled nor pushed


def test_weight_zero_and_no_partner_are_the_plain_loss():
    feats, labels, cents, cams = _random_case(1)
    logits = feats @ cents.t() / 0.05
    plain = F.cross_entropy(logits, labels)
    partners = disjoint_partners(feats, labels, cents, cams)
    torch.testing.assert_close(partner_cross_entropy(logits, labels, partners, 0.0), plain, rtol=1e-12, atol=0)
    none = torch.full_like(partners, -1)
    for weight in (None, 1.0):
        torch.testing.assert_close(partner_cross_entropy(logits, labels, none, weight), plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["ignore", "positive"])
def test_ise_losses_use_the_partner_on_anchors_and_supports(mode):
    feats, labels, cents, cams = _random_case(2)
    feats, cents = feats.float(), cents.float()
    cfg = MemoryConfig(cluster_online=mode, cluster_online_weight=0.7, cluster_weight=0.25)
    ise = ISEConfig(lp_weight=0.1)
    out = ise_losses(feats, labels, ClusterMemory(cents.clone()), 0.2, ise, cfg, None, cams)
    plain = ise_losses(feats, labels, ClusterMemory(cents.clone()), 0.2, ise, MemoryConfig(cluster_weight=0.25))
    # The same supports (label-preserving term unchanged); L_cc over anchors and supports with partners.
    torch.testing.assert_close(out.label_preserving, plain.label_preserving)
    rows, row_labels = plain.memory_inputs, plain.memory_labels
    memory = ClusterMemory(cents.clone())
    partners = disjoint_partners(rows, row_labels, memory.centroids, cams)
    want = _loss_oracle(memory.logits(rows).double(), row_labels, partners, None if mode == "ignore" else 0.7)
    assert out.contrastive.item() == pytest.approx(want, rel=1e-5)
    assert out.contrastive.item() != pytest.approx(plain.contrastive.item(), rel=1e-5)
    with pytest.raises(ValueError, match="cluster_cameras"):
        ise_losses(feats, labels, ClusterMemory(cents.clone()), 0.2, ise, cfg)


def test_config_checks_the_mode_and_the_weight():
    assert load_config("cpu").memory.cluster_online == "negative"  # the reference, in the presets too
    assert load_config("cpu", ["memory.cluster_online=positive"]).memory.cluster_online == "positive"
    with pytest.raises(ConfigError, match="memory.cluster_online"):
        load_config("cpu", ["memory.cluster_online=both"])
    with pytest.raises(ConfigError, match="memory.cluster_online_weight"):
        load_config("cpu", ["memory.cluster_online_weight=-1"])
