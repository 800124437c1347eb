"""One full ISE iteration (losses, gradients, memory update) against a hand-written step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isereid.config import ISEConfig, MemoryConfig
from isereid.engine.step import ise_losses
from isereid.ise import interpolation_weight
from isereid.memory import ClusterMemory


def hand_written_step(feats, labels, centroids, weight, lp_weight, temp=0.05, lp_temp=0.6, momentum=0.2):
    """docs/method.md#training-loop (step 2.5) written out with loops, float64, for K=1 and 'hard' memory."""
    B, C = feats.shape[0], centroids.shape[0]
    supports = []
    for b in range(B):
        sims = [float(feats[b].detach() @ centroids[k]) for k in range(C)]
        order = sorted(range(C), key=lambda k: -sims[k])
        nearest = [k for k in order if k != int(labels[b])][0]
        s = feats[b] + weight * (centroids[nearest] - centroids[int(labels[b])])
        supports.append(s / s.norm())
    supports = torch.stack(supports)
    rows = torch.cat([feats, supports])
    targets = torch.cat([labels, labels])
    cc = 0.0
    for r in range(rows.shape[0]):
        q = rows[r] / rows[r].norm()
        logits = torch.stack([q @ centroids[k] / temp for k in range(C)])
        cc = cc - (logits[targets[r]] - torch.logsumexp(logits, 0))
    cc = cc / rows.shape[0]
    lp = 0.0
    for b in range(B):
        e = [torch.exp(feats[b] @ supports[j] / lp_temp) for j in range(B)]
        pos = min((e[j] for j in range(B) if labels[j] == labels[b]), key=lambda t: float(t.detach()))
        neg = 0.0
        for other in sorted({int(x) for x in labels} - {int(labels[b])}):
            neg = neg + max((e[j] for j in range(B) if int(labels[j]) == other), key=lambda t: float(t.detach()))
        lp = lp - torch.log(pos / (pos + neg + 1e-6) + 1e-6)
    lp = lp / B
    total = cc + lp_weight * lp
    # memory update, 'hard': per label, the least similar of its rows (originals + supports)
    new = centroids.clone()
    q_rows = torch.cat([feats.detach(), supports.detach()])
    for k in sorted({int(x) for x in targets}):
        idx = [r for r in range(q_rows.shape[0]) if int(targets[r]) == k]
        hard = min(idx, key=lambda r: float(q_rows[r] @ centroids[k]))
        c = momentum * centroids[k] + (1 - momentum) * q_rows[hard]
        new[k] = c / c.norm()
    return total, cc, lp, new


@pytest.mark.parametrize("seed", [0, 1])
def test_one_iteration_matches_hand_written_step(seed):
    g = torch.Generator().manual_seed(seed)
    B, D, C, Z = 12, 8, 5, 4  # 3 identities x 4 instances, 5 clusters in memory
    labels = torch.tensor([1] * Z + [3] * Z + [0] * Z)
    weights = torch.randn(16, D, dtype=torch.float64, generator=g, requires_grad=True)
    inputs = torch.randn(B, 16, dtype=torch.float64, generator=g)
    centroids = F.normalize(torch.randn(C, D, dtype=torch.float64, generator=g), dim=1)
    weight = interpolation_weight(700, 1000)

    feats = F.normalize(inputs @ weights, dim=1)
    total, cc, lp, new_centroids = hand_written_step(feats, labels, centroids, weight, lp_weight=0.1)
    (g_oracle,) = torch.autograd.grad(total, weights)

    memory = ClusterMemory(centroids.clone(), temperature=0.05, momentum=0.2, mode="hard")
    feats2 = F.normalize(inputs @ weights, dim=1)
    out = ise_losses(feats2, labels, memory, weight,
                     ISEConfig(lp_weight=0.1), MemoryConfig(momentum=0.2, mode="hard"))
    (g_ours,) = torch.autograd.grad(out.total, weights)
    torch.testing.assert_close(out.total.double(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.contrastive.double(), cc.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.label_preserving.double(), lp.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_oracle, rtol=1e-4, atol=1e-6)
    # The memory is untouched by the loss and changes only through the explicit update.
    torch.testing.assert_close(memory.centroids.double(), centroids, rtol=0, atol=1e-6)
    memory.update(out.memory_inputs, out.memory_labels)
    torch.testing.assert_close(memory.centroids.double(), new_centroids, rtol=1e-5, atol=1e-6)
    assert out.memory_inputs.shape == (2 * B, D)


def test_switches_give_baseline_and_ablations():
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    feats = F.normalize(torch.randn(12, 6, generator=g), dim=1).requires_grad_()
    cents = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    mcfg = MemoryConfig()
    w = interpolation_weight(1, 2)

    def run(pil, lp):
        mem = ClusterMemory(cents.clone(), temperature=0.05, momentum=0.2, mode="hard")
        return mem, ise_losses(feats, labels, mem, w, ISEConfig(pil=pil, lp=lp, lp_weight=0.1), mcfg)

    mem, base = run(False, False)
    assert float(base.label_preserving) == 0.0 and base.memory_inputs.shape[0] == 12
    torch.testing.assert_close(base.total, mem(feats, labels))  # plain Cluster Contrast
    _, lp_only = run(False, True)
    torch.testing.assert_close(lp_only.contrastive, base.contrastive)  # supports kept out of L_cc
    assert float(lp_only.label_preserving) > 0 and lp_only.memory_inputs.shape[0] == 12
    assert math.isclose(float(lp_only.total.detach()),
                        float(base.total.detach()) + 0.1 * float(lp_only.label_preserving), rel_tol=1e-5)
    _, pil_only = run(True, False)
    assert pil_only.memory_inputs.shape[0] == 24 and float(pil_only.label_preserving) == 0.0
    assert not torch.allclose(pil_only.contrastive, base.contrastive)


def test_cluster_weight_scales_only_the_cluster_memory_term():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    feats = F.normalize(torch.randn(12, 6, generator=g, dtype=torch.float64), dim=1)
    cents = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    w = interpolation_weight(1, 2)
    full = ise_losses(feats, labels, ClusterMemory(cents.clone()), w, ISEConfig(lp_weight=0.1), MemoryConfig())
    part = ise_losses(feats, labels, ClusterMemory(cents.clone()), w, ISEConfig(lp_weight=0.1),
                      MemoryConfig(cluster_weight=0.25))
    torch.testing.assert_close(part.contrastive, full.contrastive)  # reported unscaled
    torch.testing.assert_close(part.total, 0.25 * full.contrastive + 0.1 * full.label_preserving)
    assert not torch.allclose(part.total, full.total)
