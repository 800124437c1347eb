"""Camera normalisation and the camera-aware proxy memory against loop oracles (float64)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isereid.camera_memory import CameraProxyMemory
from isereid.clustering.camera import associate, associate_clusters, camera_normalize


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def make_memory(seed, labels=5, cams=3, dim=6, dtype=torch.float64, **kwargs):
    """A memory over a random subset of (label, camera) pairs, stored in random order.

    Label 0 lives in camera 0 only; every label has at least one proxy.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = [(y, c) for y in range(1, labels) for c in range(cams) if float(torch.rand(1, generator=g)) < 0.6]
    pairs.append((0, 0))
    for y in range(1, labels):
        if not any(p[0] == y for p in pairs):
            pairs.append((y, (y * 7) % cams))
    order = torch.randperm(len(pairs), generator=g).tolist()
    pairs = [pairs[i] for i in order]
    proxies = unit(len(pairs), dim, seed=seed + 100, dtype=dtype)
    mem = CameraProxyMemory(proxies, torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]),
                            **kwargs)
    return mem, pairs


def make_batch(pairs, size, dim, seed, dtype=torch.float64):
    """Un-normalised rows (the memory normalises them) with (label, camera) drawn from ``pairs``; label 0 forced in."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(pairs), (size,), generator=g).tolist()
    pick[0] = pairs.index((0, 0))
    labels = torch.tensor([pairs[i][0] for i in pick])
    cams = torch.tensor([pairs[i][1] for i in pick])
    rows = 2.0 * torch.randn(size, dim, generator=g, dtype=dtype)
    return rows, labels, cams


def find_proxy(mem, y, c):
    for p in range(mem.proxies.shape[0]):
        if int(mem.proxy_labels[p]) == y and int(mem.proxy_cams[p]) == c:
            return p
    raise KeyError((y, c))


# ----------------------------------------------------------------------------- camera_normalize
def camera_normalize_oracle(x, cams):
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        members = [j for j in range(x.shape[0]) if int(cams[j]) == int(cams[i])]
        mean = sum(x[j] for j in members) / len(members)
        r = x[i] - mean
        if float(r.norm()) <= 1e-6 * float(x[i].norm()):  # no residual direction: keep the row
            r = x[i]
        out[i] = r / r.norm()
    return out


@pytest.mark.parametrize("n,dim,cam_values", [(12, 5, [0, 1, 2]), (30, 8, [3, 7, 11, 20]), (9, 3, [5]),
                                              (16, 4, [0, 1])])
@pytest.mark.parametrize("seed", [0, 1])
def test_camera_normalize_matches_loop(n, dim, cam_values, seed):
    g = torch.Generator().manual_seed(seed)
    x = unit(n, dim, seed=seed + 3)
    cams = torch.tensor(cam_values)[torch.randint(0, len(cam_values), (n,), generator=g)]
    ours = camera_normalize(x, cams)
    torch.testing.assert_close(ours, camera_normalize_oracle(x, cams))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(n, dtype=torch.float64))
    # per camera, the normalised rows are built from mean-free residuals
    for c in cams.unique():
        rows = cams == c
        if int(rows.sum()) > 1:
            residual = x[rows] - x[rows].mean(0)
            torch.testing.assert_close(ours[rows] * residual.norm(dim=1, keepdim=True), residual)


def test_camera_normalize_removes_camera_offset():
    """Two identities seen by two cameras whose style adds a large offset: after normalisation
    each identity's views match across cameras."""
    ident = torch.eye(4, dtype=torch.float64)[:2]  # identity directions e0, e1
    style = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    x = F.normalize(torch.stack([ident[0] + style[0], ident[1] + style[0], ident[0] + style[1],
                                 ident[1] + style[1]]), dim=1)
    cams = torch.tensor([0, 0, 1, 1])
    before = x @ x.t()
    assert before[0, 1] > before[0, 2]  # raw: same camera beats same identity
    out = camera_normalize(x, cams)
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out[1], out[3])
    torch.testing.assert_close(out[0], F.normalize(ident[0] - ident[1], dim=0))


def test_camera_normalize_single_image_camera_keeps_row():
    x = unit(5, 4, seed=2)
    cams = np.array([0, 0, 1, 1, 2])  # camera 2 has one image; numpy ids are accepted
    out = camera_normalize(x, cams)
    torch.testing.assert_close(out[4], x[4])
    torch.testing.assert_close(out, camera_normalize_oracle(x, torch.as_tensor(cams)))


def test_camera_normalize_dtypes_and_empty():
    x = unit(10, 6, seed=4, dtype=torch.float32)
    cams = torch.tensor([0, 1] * 5)
    out32 = camera_normalize(x, cams)
    assert out32.dtype == torch.float32 and out32.device == x.device
    torch.testing.assert_close(out32.double(), camera_normalize(x.double(), cams), rtol=1e-5, atol=1e-6)
    out16 = camera_normalize(x.half(), cams)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, camera_normalize(x.half().float(), cams))
    from_numpy = camera_normalize(x.numpy(), cams.numpy())
    assert isinstance(from_numpy, torch.Tensor)
    torch.testing.assert_close(from_numpy, out32)
    empty = camera_normalize(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 3)


def test_camera_normalize_rejects_bad_inputs():
    x = unit(4, 3)
    with pytest.raises(ValueError):
        camera_normalize(x[0], torch.tensor([0]))
    with pytest.raises(ValueError):
        camera_normalize(x, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError):
        camera_normalize(x, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError):
        camera_normalize(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(TypeError):
        camera_normalize(torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 1, 0, 1]))


# ----------------------------------------------------------------------------- from_features / index
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_features_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, dim = 40, 5
    x = unit(n, dim, seed=seed + 20)
    labels = torch.tensor([0, 2, 5, 3, 2, 5, 0, 3])[torch.randint(0, 8, (n,), generator=g)]  # gaps: 1, 4 absent
    cams = torch.randint(0, 4, (n,), generator=g)
    mem = CameraProxyMemory.from_features(x, labels, cams, temperature=0.1, momentum=0.3, hard_negatives=7)
    pairs = sorted({(int(y), int(c)) for y, c in zip(labels, cams)})
    assert mem.num_proxies == len(pairs)
    assert (mem.num_labels, mem.num_cameras) == (6, int(cams.max()) + 1)
    for p, (y, c) in enumerate(pairs):
        rows = [x[i] for i in range(n) if int(labels[i]) == y and int(cams[i]) == c]
        mean = sum(rows) / len(rows)
        torch.testing.assert_close(mem.proxies[p], mean / mean.norm())
        assert (int(mem.proxy_labels[p]), int(mem.proxy_cams[p])) == (y, c)
    for y in range(mem.num_labels):
        for c in range(mem.num_cameras):
            expected = pairs.index((y, c)) if (y, c) in pairs else -1
            assert int(mem.index[y, c]) == expected
    assert (mem.temperature, mem.momentum, mem.hard_negatives) == (0.1, 0.3, 7)
    assert mem.proxies.dtype == torch.float64


def test_from_features_float32_and_numpy_ids():
    x = unit(6, 3, seed=5, dtype=torch.float32)
    mem = CameraProxyMemory.from_features(x, np.array([1, 1, 0, 0, 1, 0]), [0, 1, 0, 0, 0, 1])
    assert mem.proxies.dtype == torch.float32
    assert mem.proxy_labels.tolist() == [0, 0, 1, 1] and mem.proxy_cams.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(mem.proxies[2], F.normalize(x[0] + x[4], dim=0))


@pytest.mark.parametrize("seed", [0, 3])
def test_proxy_of_matches_loop(seed):
    mem, pairs = make_memory(seed, labels=7, cams=4)
    _, labels, cams = make_batch(pairs, 25, 6, seed)
    ours = mem.proxy_of(labels, cams)
    assert ours.dtype == torch.long
    assert ours.tolist() == [find_proxy(mem, int(y), int(c)) for y, c in zip(labels, cams)]


# ----------------------------------------------------------------------------- intra-camera loss
def intra_oracle(mem, rows, labels, cams):
    total = 0.0
    for i in range(rows.shape[0]):
        q = rows[i] / rows[i].norm()
        same_cam = [p for p in range(mem.num_proxies) if int(mem.proxy_cams[p]) == int(cams[i])]
        logits = torch.stack([q @ mem.proxies[p] / mem.temperature for p in same_cam])
        own = same_cam.index(find_proxy(mem, int(labels[i]), int(cams[i])))
        total = total - (logits[own] - torch.logsumexp(logits, 0))
    return total / rows.shape[0]


SIZES = [  # labels, cameras, dim, batch, temperature, hard_negatives
    (5, 3, 6, 12, 0.07, 50),
    (8, 4, 5, 20, 0.05, 3),
    (6, 2, 4, 9, 0.5, 1),
    (4, 1, 4, 7, 0.1, 2),  # one camera: intra == plain cross-entropy over all proxies
    (10, 5, 8, 16, 1.0, 6),
]


def loss_and_grad(fn, base):
    loss = fn(base)
    (grad,) = torch.autograd.grad(loss, base)
    return loss.detach(), grad


@pytest.mark.parametrize("labels_n,cams_n,dim,batch,temp,k", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_intra_loss_and_gradient_match_loop(labels_n, cams_n, dim, batch, temp, k, seed):
    mem, pairs = make_memory(seed, labels_n, cams_n, dim, temperature=temp, hard_negatives=k)
    rows, labels, cams = make_batch(pairs, batch, dim, seed + 50)
    base = rows.clone().requires_grad_()
    ours, g_ours = loss_and_grad(lambda f: mem.intra_loss(f, labels, cams), base)
    ref, g_ref = loss_and_grad(lambda f: intra_oracle(mem, f, labels, cams), base)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours.abs().sum() > 0


# ----------------------------------------------------------------------------- inter-camera loss
def inter_oracle(mem, rows, labels, hard_negatives):
    total = 0.0
    for i in range(rows.shape[0]):
        q = rows[i] / rows[i].norm()
        s = [q @ mem.proxies[p] for p in range(mem.num_proxies)]
        pos = [p for p in range(mem.num_proxies) if int(mem.proxy_labels[p]) == int(labels[i])]
        foreign = [p for p in range(mem.num_proxies) if int(mem.proxy_labels[p]) != int(labels[i])]
        neg = sorted(foreign, key=lambda p: -float(s[p].detach()))[:hard_negatives]
        log_denominator = torch.logsumexp(torch.stack([s[p] / mem.temperature for p in pos + neg]), 0)
        total = total - sum(s[p] / mem.temperature - log_denominator for p in pos) / len(pos)
    return total / rows.shape[0]


@pytest.mark.parametrize("labels_n,cams_n,dim,batch,temp,k", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_inter_loss_and_gradient_match_loop(labels_n, cams_n, dim, batch, temp, k, seed):
    mem, pairs = make_memory(seed, labels_n, cams_n, dim, temperature=temp, hard_negatives=k)
    rows, labels, cams = make_batch(pairs, batch, dim, seed + 60)
    base = rows.clone().requires_grad_()
    ours, g_ours = loss_and_grad(lambda f: mem.inter_loss(f, labels, cams), base)
    ref, g_ref = loss_and_grad(lambda f: inter_oracle(mem, f, labels, k), base)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours.abs().sum() > 0


def online_oracle(mem, rows, labels, hard_negatives, online, weight):
    """Loop version of the inter-camera loss with O2CAP's online positives (docstring of inter_loss)."""
    cameras = sorted({int(c) for c in mem.proxy_cams})
    count = min(online, len(cameras) - 1)
    total = 0.0
    for i in range(rows.shape[0]):
        q = rows[i] / rows[i].norm()
        s = [q @ mem.proxies[p] for p in range(mem.num_proxies)]
        y = int(labels[i])
        pos = [p for p in range(mem.num_proxies) if int(mem.proxy_labels[p]) == y]
        own_cams = {int(mem.proxy_cams[p]) for p in pos}
        others = [p for p in range(mem.num_proxies) if int(mem.proxy_cams[p]) not in own_cams]
        assoc = sorted(others, key=lambda p: -float(s[p].detach()))[:max(count, 0)]
        rest = [p for p in range(mem.num_proxies) if p not in pos and p not in assoc]
        neg = sorted(rest, key=lambda p: -float(s[p].detach()))[:hard_negatives]
        log_den = torch.logsumexp(torch.stack([s[p] / mem.temperature for p in pos + assoc + neg]), 0)
        terms = [s[p] / mem.temperature - log_den for p in pos] + [weight * (s[p] / mem.temperature - log_den)
                                                                  for p in assoc]
        total = total - sum(terms) / (len(pos) + weight * len(assoc))
    return total / rows.shape[0]


@pytest.mark.parametrize("labels_n,cams_n,dim,batch,temp,k", SIZES)
@pytest.mark.parametrize("online,weight", [(1, 1.0), (2, 0.5), (5, 0.25)])
def test_inter_loss_online_positives_match_loop(labels_n, cams_n, dim, batch, temp, k, online, weight):
    mem, pairs = make_memory(3, labels_n, cams_n, dim, temperature=temp, hard_negatives=k)
    rows, labels, cams = make_batch(pairs, batch, dim, 80)
    base = rows.clone().requires_grad_()
    ours, g_ours = loss_and_grad(lambda f: mem.inter_loss(f, labels, cams, online=online, online_weight=weight),
                                 base)
    ref, g_ref = loss_and_grad(lambda f: online_oracle(mem, f, labels, k, online, weight), base)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_online_positives_two_cameras_take_the_nearest_other_camera_proxy_only():
    # labels 0, 1 in camera 0; labels 2, 3 in camera 1; label 4 in both. Row of label 0 is closest to
    # proxy (3, cam 1), then (2, cam 1): with two cameras only the first becomes a positive even when
    # three are asked for (O2CAP's default would turn the second into a positive too).
    e = torch.eye(6, dtype=torch.float64)
    proxies = torch.stack([e[0], e[1], e[2], 0.9 * e[0] + 0.1 * e[3], e[4], e[5]])
    mem = CameraProxyMemory(proxies, torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([0, 0, 1, 1, 0, 1]))
    sims = F.normalize(torch.tensor([[1.0, 0, 0.5, 0, 0, 0]], dtype=torch.float64), dim=1) @ mem.proxies.t()
    chosen = mem.online_positives(sims, torch.tensor([0]), 3)
    assert chosen.tolist() == [[False, False, False, True, False, False]]
    # a cluster seen by both cameras gains nothing; 0 asks for nothing
    assert not mem.online_positives(sims, torch.tensor([4]), 3).any()
    assert not mem.online_positives(sims, torch.tensor([0]), 0).any()


def test_online_positives_one_camera_gain_nothing_and_leave_the_loss_unchanged():
    mem, pairs = make_memory(5, labels=6, cams=1, dim=5, hard_negatives=3)
    rows, labels, cams = make_batch(pairs, 8, 5, 81)
    torch.testing.assert_close(mem.inter_loss(rows, labels, cams, online=2), mem.inter_loss(rows, labels, cams))


def test_online_positive_lowers_the_loss_of_a_row_near_its_other_view():
    # The row sits nearer a foreign-label proxy in cam 1 than its own proxy (cam 0): with that proxy a
    # positive rather than a negative, the loss drops.
    e = torch.eye(3, dtype=torch.float64)
    mem = CameraProxyMemory(torch.stack([e[0], e[1], e[2]]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]),
                            temperature=0.1)
    row = (e[0] + 2 * e[1]).unsqueeze(0)
    off = mem.inter_loss(row, torch.tensor([0]), torch.tensor([0]))
    on = mem.inter_loss(row, torch.tensor([0]), torch.tensor([0]), online=1)
    assert float(on) < float(off) - 1.0


def test_inter_loss_hard_negatives_matter():
    """With k smaller than the foreign proxies, the loss uses only the hardest ones."""
    mem, pairs = make_memory(4, labels=9, cams=3, dim=6, hard_negatives=2, temperature=0.2)
    rows, labels, cams = make_batch(pairs, 10, 6, 70)
    foreign_min = min(sum(1 for p in range(mem.num_proxies) if int(mem.proxy_labels[p]) != int(y)) for y in labels)
    assert foreign_min > 2
    all_neg = CameraProxyMemory(mem.proxies, mem.proxy_labels, mem.proxy_cams, temperature=0.2,
                                hard_negatives=mem.num_proxies)
    ours = mem.inter_loss(rows, labels, cams)
    torch.testing.assert_close(ours, inter_oracle(mem, rows, labels, 2))
    torch.testing.assert_close(all_neg.inter_loss(rows, labels, cams), inter_oracle(mem, rows, labels, 10 ** 6))
    assert float(ours) < float(all_neg.inter_loss(rows, labels, cams))  # fewer negatives, smaller denominator


def test_inter_loss_with_fewer_negatives_than_requested_and_single_camera_label():
    # label 0 only in camera 0; label 1 in cameras 0 and 1; only two foreign proxies at most (k = 50)
    proxies = unit(3, 4, seed=9)
    mem = CameraProxyMemory(proxies, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), temperature=0.07)
    rows = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    labels, cams = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 0, 1])
    base = rows.clone().requires_grad_()
    ours, g_ours = loss_and_grad(lambda f: mem.inter_loss(f, labels, cams), base)
    ref, g_ref = loss_and_grad(lambda f: inter_oracle(mem, f, labels, 50), base)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.isfinite(ours)


def test_inter_loss_single_label_has_no_negatives():
    # every proxy is a positive: loss_i = -mean_p log softmax over the positives only
    proxies = unit(3, 5, seed=11)
    mem = CameraProxyMemory(proxies, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), temperature=0.1)
    rows = unit(4, 5, seed=12)
    labels, cams = torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(mem.inter_loss(rows, labels, cams), inter_oracle(mem, rows, labels, 50))


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("temp", [0.07, 0.5, 1.0])
def test_closed_form_one_camera_two_orthogonal_proxies(temp):
    e = torch.eye(3, dtype=torch.float64)
    mem = CameraProxyMemory(e[:2].clone(), torch.tensor([0, 1]), torch.tensor([0, 0]), temperature=temp)
    f = e[:1]
    expected = torch.tensor(math.log1p(math.exp(-1.0 / temp)), dtype=torch.float64)  # -log(e^{1/τ}/(e^{1/τ}+e^0))
    torch.testing.assert_close(mem.intra_loss(f, torch.tensor([0]), torch.tensor([0])), expected)
    torch.testing.assert_close(mem.inter_loss(f, torch.tensor([0]), torch.tensor([0])), expected)


@pytest.mark.parametrize("k,temp", [(1, 0.07), (2, 0.07), (50, 0.3)])
def test_closed_form_two_cameras(k, temp):
    """f = e0 (label 0, camera 0). Proxies: (0,c0)=e0, (0,c1)=e1, (1,c0)=e2, (1,c1)=(e0+e2)/√2."""
    e = torch.eye(4, dtype=torch.float64)
    proxies = torch.stack([e[0], e[1], e[2], (e[0] + e[2]) / math.sqrt(2)])
    mem = CameraProxyMemory(proxies, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]),
                            temperature=temp, hard_negatives=k)
    f, y, c = e[:1], torch.tensor([0]), torch.tensor([0])
    # intra: camera 0 holds e0 (own) and e2; the very similar camera-1 proxy is masked out
    intra = math.log1p(math.exp(-1.0 / temp))
    torch.testing.assert_close(mem.intra_loss(f, y, c), torch.tensor(intra, dtype=torch.float64))
    # inter: positives e0 (s=1), e1 (s=0); negatives by similarity: (e0+e2)/√2 (s=1/√2), then e2 (s=0)
    terms = [math.exp(1 / temp), math.exp(0.0), math.exp(1 / (math.sqrt(2) * temp))] + ([1.0] if k >= 2 else [])
    log_den = math.log(sum(terms))
    inter = -0.5 * ((1 / temp - log_den) + (0.0 - log_den))
    torch.testing.assert_close(mem.inter_loss(f, y, c), torch.tensor(inter, dtype=torch.float64))


# ----------------------------------------------------------------------------- update
def update_oracle(mem, rows, labels, cams, momentum):
    new = mem.proxies.clone()
    targets = [find_proxy(mem, int(y), int(c)) for y, c in zip(labels, cams)]
    for p in sorted(set(targets)):
        members = [rows[i] / rows[i].norm() for i in range(rows.shape[0]) if targets[i] == p]
        mean = sum(members) / len(members)
        v = momentum * mem.proxies[p] + (1 - momentum) * mean
        new[p] = v / v.norm()
    return new, set(targets)


@pytest.mark.parametrize("momentum", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_matches_loop(momentum, seed):
    mem, pairs = make_memory(seed, labels=8, cams=3, dim=5, momentum=momentum)
    rows, labels, cams = make_batch(pairs, 16, 5, seed + 80)
    assert len({(int(y), int(c)) for y, c in zip(labels, cams)}) < 16  # repeated pairs
    before = mem.proxies.clone()
    expected, touched = update_oracle(mem, rows, labels, cams, momentum)
    assert len(touched) < mem.num_proxies  # some proxies stay untouched
    mem.update(rows, labels, cams)
    torch.testing.assert_close(mem.proxies, expected)
    untouched = [p for p in range(mem.num_proxies) if p not in touched]
    torch.testing.assert_close(mem.proxies[untouched], before[untouched])
    torch.testing.assert_close(mem.proxies.norm(dim=1), torch.ones(mem.num_proxies, dtype=torch.float64))


def test_update_is_order_independent_and_mean_based():
    mem, pairs = make_memory(5, labels=5, cams=2, dim=4, momentum=0.3)
    rows, labels, cams = make_batch(pairs, 20, 4, 90)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    other = CameraProxyMemory(mem.proxies, mem.proxy_labels, mem.proxy_cams, momentum=0.3)
    mem.update(rows, labels, cams)
    other.update(rows[perm], labels[perm], cams[perm])
    torch.testing.assert_close(mem.proxies, other.proxies)
    # a pair seen twice with rows a, b moves like one row (a/|a| + b/|b|)/2, not like two sequential moves
    e = torch.eye(3, dtype=torch.float64)
    one = CameraProxyMemory(e[:1].clone(), torch.tensor([0]), torch.tensor([0]), momentum=0.5)
    one.update(torch.stack([2 * e[1], e[2]]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    torch.testing.assert_close(one.proxies[0], F.normalize(0.5 * e[0] + 0.25 * e[1] + 0.25 * e[2], dim=0))


def test_update_with_empty_batch_is_a_no_op():
    mem, _ = make_memory(0)
    before = mem.proxies.clone()
    mem.update(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
               torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(mem.proxies, before)


# ----------------------------------------------------------------------------- autograd, buffers, dtypes
def test_losses_send_no_gradient_into_buffers():
    mem, pairs = make_memory(1, dim=6)
    rows, labels, cams = make_batch(pairs, 8, 6, 3)
    base = rows.clone().requires_grad_()
    before = mem.proxies.clone()
    (mem.intra_loss(base, labels, cams) + mem.inter_loss(base, labels, cams)).backward()
    assert base.grad is not None and base.grad.abs().sum() > 0
    assert not mem.proxies.requires_grad and mem.proxies.grad is None
    assert list(mem.parameters()) == []
    torch.testing.assert_close(mem.proxies, before)


def test_buffers_in_state_dict_and_restorable():
    mem, pairs = make_memory(2, dtype=torch.float32, temperature=0.05, hard_negatives=4)
    state = mem.state_dict()
    assert set(state) == {"proxies", "proxy_labels", "proxy_cams", "index"}
    assert state["index"].dtype == torch.long and state["index"].shape == (mem.num_labels, mem.num_cameras)
    restored = CameraProxyMemory(state["proxies"], state["proxy_labels"], state["proxy_cams"],
                                 temperature=0.05, hard_negatives=4)
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    rows, labels, cams = make_batch(pairs, 6, 6, 4, dtype=torch.float32)
    assert torch.equal(restored.inter_loss(rows, labels, cams), mem.inter_loss(rows, labels, cams))
    converted = mem.to(torch.float64)  # .to() moves float buffers, keeps the integer tables
    assert converted.proxies.dtype == torch.float64 and converted.index.dtype == torch.long
    text = repr(restored)
    assert f"proxies={mem.num_proxies}" in text and "hard_negatives=4" in text and "temperature=0.05" in text


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_agrees_with_float64(seed):
    mem64, pairs = make_memory(seed, labels=7, cams=3, dim=8, hard_negatives=5, momentum=0.2)
    mem32 = CameraProxyMemory(mem64.proxies.float(), mem64.proxy_labels, mem64.proxy_cams,
                              hard_negatives=5, momentum=0.2)
    assert mem32.proxies.dtype == torch.float32
    rows, labels, cams = make_batch(pairs, 16, 8, seed + 5)
    for name in ("intra_loss", "inter_loss"):
        base64 = rows.clone().requires_grad_()
        base32 = rows.float().requires_grad_()
        l64 = getattr(mem64, name)(base64, labels, cams)
        l32 = getattr(mem32, name)(base32, labels, cams)
        assert l32.dtype == torch.float32
        torch.testing.assert_close(l32.double(), l64.detach(), rtol=1e-5, atol=1e-5)
        (g64,) = torch.autograd.grad(l64, base64)
        (g32,) = torch.autograd.grad(l32, base32)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)
    mem64.update(rows, labels, cams)
    mem32.update(rows.float(), labels, cams)
    torch.testing.assert_close(mem32.proxies.double(), mem64.proxies, rtol=1e-5, atol=1e-6)


def test_half_features_are_computed_in_float32():
    mem, pairs = make_memory(3, dtype=torch.float32)
    rows, labels, cams = make_batch(pairs, 6, 6, 7, dtype=torch.float32)
    half = rows.half()
    loss = mem.inter_loss(half, labels, cams)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, mem.inter_loss(half.float(), labels, cams))


# ----------------------------------------------------------------------------- errors
def test_constructor_rejects_bad_settings():
    proxies = unit(3, 4)
    labels, cams = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    for kwargs in ({"temperature": 0}, {"temperature": -0.1}, {"temperature": float("nan")},
                   {"momentum": -0.1}, {"momentum": 1.5}, {"hard_negatives": 0},
                   {"hard_negatives": 2.5}, {"hard_negatives": True}):
        with pytest.raises(ValueError):
            CameraProxyMemory(proxies, labels, cams, **kwargs)
    CameraProxyMemory(proxies, labels, cams, temperature=np.float32(0.1), hard_negatives=np.int64(3))
    with pytest.raises(ValueError):  # duplicate (label, camera) pair
        CameraProxyMemory(proxies, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError):  # negative label
        CameraProxyMemory(proxies, torch.tensor([-1, 1, 1]), cams)
    with pytest.raises(ValueError):  # negative camera
        CameraProxyMemory(proxies, labels, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError):  # length mismatch
        CameraProxyMemory(proxies, torch.tensor([0, 1]), cams)
    with pytest.raises(ValueError):  # not (P, D)
        CameraProxyMemory(proxies[0], labels[:1], cams[:1])
    with pytest.raises(ValueError):  # empty
        CameraProxyMemory(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError):  # float labels
        CameraProxyMemory(proxies, labels.double(), cams)


def test_from_features_rejects_outliers_and_bad_shapes():
    x = unit(4, 3)
    with pytest.raises(ValueError, match="outliers"):
        CameraProxyMemory.from_features(x, torch.tensor([0, -1, 1, 1]), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError):
        CameraProxyMemory.from_features(x, torch.tensor([0, 1, 1, 1]), torch.tensor([0, -1, 1, 1]))
    with pytest.raises(ValueError):
        CameraProxyMemory.from_features(x, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError):
        CameraProxyMemory.from_features(x, torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError):
        CameraProxyMemory.from_features(x[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def test_missing_pair_and_bad_batches_are_rejected():
    mem = CameraProxyMemory(unit(3, 4), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    rows = unit(2, 4, seed=1)
    bad_pairs = [((0, 1), "label 0 in camera 1"),  # pair absent from the table
                 ((2, 0), "label 2 in camera 0"),  # label beyond the table
                 ((1, 5), "label 1 in camera 5"),  # camera beyond the table
                 ((-1, 0), "label -1 in camera 0")]  # outlier label
    for (y, c), message in bad_pairs:
        labels, cams = torch.tensor([1, y]), torch.tensor([0, c])
        for call in (lambda: mem.proxy_of(labels, cams), lambda: mem.intra_loss(rows, labels, cams),
                     lambda: mem.inter_loss(rows, labels, cams), lambda: mem.update(rows, labels, cams)):
            with pytest.raises(ValueError, match=message):
                call()
    ok_labels, ok_cams = torch.tensor([0, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError):  # rows vs labels
        mem.intra_loss(unit(3, 4), ok_labels, ok_cams)
    with pytest.raises(ValueError):  # feature dimension
        mem.inter_loss(unit(2, 5), ok_labels, ok_cams)
    with pytest.raises(ValueError):  # 1-D features
        mem.update(rows[0], ok_labels[:1], ok_cams[:1])
    with pytest.raises(ValueError):  # labels vs cameras
        mem.proxy_of(ok_labels, torch.tensor([0]))
    with pytest.raises(ValueError):  # 2-D labels
        mem.proxy_of(ok_labels.unsqueeze(0), ok_cams)
    with pytest.raises(TypeError):  # float camera ids
        mem.intra_loss(rows, ok_labels, ok_cams.float())
    with pytest.raises(TypeError):  # integer features
        mem.inter_loss(torch.ones(2, 4, dtype=torch.long), ok_labels, ok_cams)


# ----------------------------------------------------------------------------- associate_clusters
def oracle_gate(centre: dict, seen: dict) -> float:
    """"auto": median over clusters of the best cosine to another cluster sharing a camera (inf: none)."""
    null = [max(float(centre[a] @ centre[b]) for b in centre if b != a and seen[a] & seen[b])
            for a in centre if any(b != a and seen[a] & seen[b] for b in centre)]
    return float(np.median(null)) if null else float("inf")


def oracle_centres(x, labels, cams):
    centre, seen = {}, {}
    for c in sorted({int(v) for v in labels if v >= 0}):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        m = sum(x[i].double() for i in rows)
        centre[c] = m / m.norm()
        seen[c] = {int(cams[i]) for i in rows}
    return centre, seen


def associate_oracle(x, labels, cams, min_sim, pairs: Optional[list] = None):
    """Loops in float64: centres, each cluster's most similar cluster sharing no camera, mutual pairs
    at >= min_sim merged, clusters renumbered by their smallest old label. ``pairs``, when given,
    receives (similarity, merged) of every mutual pair in order of its smaller label. min_sim "auto":
    the median over clusters of the best similarity to another cluster sharing a camera (inf: none)."""
    ids = sorted({int(v) for v in labels if v >= 0})
    centre, seen = oracle_centres(x, labels, cams)
    partner, best = {}, {}
    for a in ids:
        for b in ids:  # first maximum wins, as torch's max over the row
            if seen[a] & seen[b]:
                continue
            s = float(centre[a] @ centre[b])
            if a not in best or s > best[a]:
                partner[a], best[a] = b, s
    if min_sim == "auto":
        min_sim = oracle_gate(centre, seen)
    group = {c: c for c in ids}
    for a in ids:
        b = partner.get(a)
        if b is not None and partner.get(b) == a and a < b:
            if pairs is not None:
                pairs.append((best[a], best[a] >= min_sim))
            if best[a] >= min_sim:
                group[b] = a  # pairs are disjoint: a is the smaller label of its pair
    new_ids = sorted(set(group.values()))
    return np.array([new_ids.index(group[int(v)]) if v >= 0 else -1 for v in labels])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cameras,min_sim,block", [(2, 0.0, 4096), (3, -1.0, 3), (5, 0.2, 2), (2, 0.9, 1),
                                                    (2, "auto", 4096), (3, "auto", 2)])
def test_associate_matches_loop(seed, cameras, min_sim, block):
    g = torch.Generator().manual_seed(seed)
    n = 60
    x = unit(n, 5, seed=seed)
    # labels with gaps and outliers; each cluster mostly from one camera, some from several
    labels = torch.randint(-1, 14, (n,), generator=g).numpy() * 3
    labels[labels < 0] = -1
    cams = torch.randint(0, cameras, (n,), generator=g).numpy()
    pure = torch.rand(n, generator=g).numpy() < 0.8
    cams = np.where(pure, (labels // 3) % cameras, cams) + 10  # camera ids need not start at 0
    ours = associate_clusters(x.float(), labels, cams, min_sim, block_rows=block)
    pairs: list = []
    np.testing.assert_array_equal(ours, associate_oracle(x, labels, cams, min_sim, pairs))
    # the pairs it looked at: every mutual pair, its similarity and whether it was merged
    full = associate(x.float(), labels, cams, min_sim, block_rows=block)
    np.testing.assert_array_equal(full.labels, ours)
    np.testing.assert_allclose(full.similarity, [p[0] for p in pairs], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(full.merged, [p[1] for p in pairs])
    summary = full.summary()
    merged = [p[0] for p in pairs if p[1]]
    rejected = [p[0] for p in pairs if not p[1]]
    assert summary["mutual_pairs"] == len(pairs) and summary["merged"] == len(merged)
    assert summary["below_threshold"] == len(rejected)
    assert summary["merged_similarity_median"] == (pytest.approx(float(np.median(merged)), abs=1e-5) if merged
                                                   else None)
    assert summary["rejected_similarity_median"] == (pytest.approx(float(np.median(rejected)), abs=1e-5)
                                                     if rejected else None)
    # a merged count of 0 would make the comparisons above weak: the cases do merge some pairs
    if min_sim == "auto":
        gate = oracle_gate(*oracle_centres(x, labels, cams))
        assert -1 < gate < 1 and summary["threshold"] == pytest.approx(gate, abs=1e-5)
        np.testing.assert_array_equal(full.merged, full.similarity >= full.threshold)
    else:
        assert summary["threshold"] == pytest.approx(min_sim)
        if min_sim <= 0.2:
            assert summary["merged"] > 0


def test_associate_recovers_identities_across_cameras():
    """Per person one cluster per camera; a shared camera offset and noise on top. Every person's
    two clusters are mutual nearest foreign clusters, so each pair merges; nothing else does."""
    g = torch.Generator().manual_seed(3)
    people, per = 8, 4
    ident = unit(people, 16, seed=7).float()
    offset = torch.stack([torch.zeros(16), 0.8 * unit(16, seed=8).float()])
    rows, labels, cams = [], [], []
    for p in range(people):
        for c in range(2):
            for _ in range(per):
                rows.append(ident[p] + offset[c] + 0.05 * torch.randn(16, generator=g))
                labels.append(2 * p + c)
                cams.append(c)
    x = F.normalize(torch.stack(rows), dim=1)
    out = associate_clusters(x, np.array(labels), np.array(cams), min_similarity=0.3)
    np.testing.assert_array_equal(out, np.repeat(np.arange(people), 2 * per))
    # a threshold above every similarity keeps the clusters as they were
    np.testing.assert_array_equal(associate_clusters(x, np.array(labels), np.array(cams), 1.0), labels)


def _two_view_people(identity: float, camera: float, people: int = 8, per: int = 4):
    """Per person one cluster per camera. A row is ``identity`` along its person's own axis plus
    ``camera`` along its camera's axis (all axes orthogonal) plus a little noise: two people seen by
    one camera have cosine about camera² / (identity² + camera²), a person's two views identity² / (...)."""
    g = torch.Generator().manual_seed(3)
    rows, labels, cams = [], [], []
    for p in range(people):
        for c in range(2):
            for _ in range(per):
                row = 0.01 * torch.randn(people + 2, generator=g)
                row[p] += identity
                row[people + c] += camera
                rows.append(row)
                labels.append(2 * p + c)
                cams.append(c)
    return F.normalize(torch.stack(rows), dim=1), np.array(labels), np.array(cams)


def test_associate_auto_gate_waits_for_the_camera_gap_to_close():
    """"auto" merges a cross-camera pair only when it is closer than the median cluster is to its
    nearest same-camera cluster: shut while the camera dominates the features, open once the identity does."""
    people, per = 8, 4
    x, labels, cams = _two_view_people(identity=1.0, camera=1.5, people=people, per=per)
    shut = associate(x, labels, cams, "auto")
    # every person's two views are mutual nearest foreign clusters, but all below the gate (about 0.69)
    assert shut.summary()["mutual_pairs"] == people and shut.summary()["merged"] == 0
    np.testing.assert_array_equal(shut.labels, labels)
    assert shut.similarity.max() < shut.threshold
    assert shut.threshold == pytest.approx(1.5 ** 2 / (1 + 1.5 ** 2), abs=0.02)
    # a fixed threshold below their similarity (about 0.31) merges them: the gate is what holds them back
    np.testing.assert_array_equal(associate(x, labels, cams, 0.25).labels, np.repeat(np.arange(people), 2 * per))
    x, labels, cams = _two_view_people(identity=1.5, camera=1.0, people=people, per=per)
    opened = associate(x, labels, cams, "auto")
    np.testing.assert_array_equal(opened.labels, np.repeat(np.arange(people), 2 * per))
    assert opened.similarity.min() >= opened.threshold


def test_associate_auto_without_a_same_camera_neighbour_merges_nothing():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1]]), dim=1)
    out = associate(x, np.array([0, 1]), np.array([0, 1]), "auto")
    np.testing.assert_array_equal(out.labels, [0, 1])
    assert out.summary()["threshold"] is None and out.summary()["mutual_pairs"] == 1


def test_associate_never_merges_clusters_sharing_a_camera():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0]]), dim=1)
    labels = np.array([0, 1, 1, 2])
    cams = np.array([0, 1, 0, 1])  # cluster 1 spans both cameras: it shares one with everyone
    out = associate_clusters(x, labels, cams, -1.0)
    np.testing.assert_array_equal(out, [0, 1, 1, 0])  # 0 (cam 0) and 2 (cam 1) merge, 1 stays alone
    # cluster 1 has no candidate at all (every similarity -inf): never counted as a pair
    summary = associate(x, labels, cams, -1.0).summary()
    assert summary == {"mutual_pairs": 1, "merged": 1, "below_threshold": 0,
                       "merged_similarity_median": pytest.approx(0.0, abs=1e-6), "rejected_similarity_median": None,
                       "threshold": -1.0}


def test_associate_outliers_and_empty():
    x = unit(5, 3, seed=1).float()
    np.testing.assert_array_equal(associate_clusters(x, -np.ones(5, dtype=int), np.arange(5), 0.0), -np.ones(5))
    out = associate_clusters(x, np.array([-1, 7, 7, -1, 9]), np.array([0, 0, 0, 1, 1]), -1.0)
    np.testing.assert_array_equal(out, [-1, 0, 0, -1, 0])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"min_similarity": 1.5}, ValueError, "min_similarity"),
    ({"min_similarity": True}, ValueError, "min_similarity"),
    ({"min_similarity": "median"}, ValueError, "min_similarity"),
    ({"labels": np.zeros(3, dtype=int)}, ValueError, "labels must have shape"),
    ({"camids": np.zeros(4)}, TypeError, "camids must hold integers"),
])
def test_associate_errors(kwargs, error, match):
    args = {"features": unit(4, 3).float(), "labels": np.zeros(4, dtype=int), "camids": np.arange(4),
            "min_similarity": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        associate_clusters(**args)


# ----------------------------------------------------------------------------- cross-camera neighbours
@pytest.mark.parametrize("seed, block", [(0, 1), (1, 3), (2, 100)])
def test_nearest_other_camera_matches_loop(seed, block):
    from isereid.clustering.camera import mutual_share, nearest_other_camera

    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(17, 5, generator=g, dtype=torch.float64), dim=1)
    cams = torch.randint(0, 3, (17,), generator=g)
    ours = nearest_other_camera(feats, cams, block_rows=block)
    for i in range(17):
        others = [j for j in range(17) if int(cams[j]) != int(cams[i])]
        want = max(others, key=lambda j: float(feats[i] @ feats[j])) if others else -1
        assert ours[i] == want
    mutual = sum(1 for i in range(17) if ours[i] >= 0 and ours[ours[i]] == i) / 17
    assert mutual_share(ours) == pytest.approx(mutual)


def test_nearest_other_camera_single_camera_and_mutual_pairs():
    from isereid.clustering.camera import mutual_share, nearest_other_camera

    feats = torch.eye(4)
    assert (nearest_other_camera(feats, [0, 0, 0, 0]) == -1).all()
    assert mutual_share(np.array([-1, -1])) == 0.0
    # Two people, each seen once by cameras 0 and 1: every image's partner is mutual.
    feats = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    nn = nearest_other_camera(feats, [0, 0, 1, 1])
    assert nn.tolist() == [2, 3, 0, 1] and mutual_share(nn) == 1.0
    assert mutual_share(np.array([1, 2, 0])) == 0.0  # a cycle of three has no mutual pair
