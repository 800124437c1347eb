"""The CUDA path against the CPU result, on small seeded data (skipped without CUDA).

Each test runs one building block on the CPU and on the GPU with the same inputs and
compares. Where the arithmetic can be made exact (features that are small multiples of 1/8,
so every dot product is exact in float32 whatever the summation order), the results must be
bit-identical, ties included; elsewhere they must agree to float32 rounding. Small loop
oracles pin down the CPU side where that is cheap.

``ISEREID_CUDA_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU: that proves the
test code itself on a machine without a GPU (benchmarks/gpu_check.py does it in CI).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isereid.camera_memory import CameraProxyMemory
from isereid.clustering import PseudoLabelSettings, exact_knn, jaccard_dbscan, jaccard_distance, pseudo_labels
from isereid.config import ISEConfig, MemoryConfig, ModelConfig
from isereid.distributed import DistContext
from isereid.engine.step import StepParts, ise_losses, train_step
from isereid.evaluation import evaluate_ranking, re_ranking
from isereid.evaluation.ranking import pairwise_distance
from isereid.ise import support_samples
from isereid.losses import label_preserving_loss
from isereid.memory import ClusterMemory
from isereid.models import GhostBatchNorm1d, GhostBatchNorm2d, build_model
from isereid.models.camera_bn import camera_statistics, use_camera_statistics

DEVICE = os.environ.get("ISEREID_CUDA_TEST_DEVICE", "cuda")
RUNS = (("ref", "cpu"), ("dev", DEVICE))  # (result key, device): the CPU reference, then the device

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _full_fp32():
    """TF32 would round convolution and matmul inputs to 10 mantissa bits on the GPU; the
    comparisons are about the code path, so both devices compute in full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quantised(n: int, dim: int, seed: int, levels: int = 3) -> torch.Tensor:
    """(n, dim) float32 with entries k/8, |k| <= levels: all dot products are exact in float32."""
    return torch.randint(-levels, levels + 1, (n, dim), generator=gen(seed)).float() / 8


def quantised_clusters(clusters: int, per_cluster: int, dim: int, seed: int) -> torch.Tensor:
    """Clustered quantised rows: centre entries k/8 (|k| <= 4) plus noise in {-1, 0, 1}/8."""
    g = gen(seed)
    centres = torch.randint(-4, 5, (clusters, dim), generator=g)
    noise = torch.randint(-1, 2, (clusters * per_cluster, dim), generator=g)
    rows = centres.repeat_interleave(per_cluster, 0) + noise
    return rows[torch.randperm(rows.shape[0], generator=g)].float() / 8


def on(t: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of ``t`` on ``device``: never the same tensor, so the two runs share nothing."""
    return t.detach().to(device, copy=True)


def back(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of a result."""
    return t.detach().to("cpu", copy=True)


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=gen(seed)), dim=1)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """||actual - expected|| <= tol * ||expected|| (actual moved to the CPU first)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    err = float((actual - expected).norm())
    scale = float(expected.norm())
    assert err <= tol * max(scale, 1e-12), f"{what}: relative error {err / max(scale, 1e-12):.2e} > {tol}"


# ----------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("block_size", [64, None])  # None: each device's default block
def test_exact_knn_is_bit_identical_with_ties_and_copies(block_size):
    x = quantised(300, 16, seed=1)
    x[200:215] = x[:15]  # exact copies: the copy-expansion path
    k = 20
    d_cpu, i_cpu = exact_knn(x, k, block_size=block_size)
    d_dev, i_dev = exact_knn(x.to(DEVICE), k, block_size=block_size)
    # oracle: float64 dense distances (exact here), stable argsort = smaller index first on ties
    dense = 2.0 - 2.0 * (x.double() @ x.double().t()).numpy()
    order = np.argsort(dense, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(i_cpu, order)
    np.testing.assert_array_equal(d_cpu, np.take_along_axis(dense, order, 1).astype(np.float32))
    assert isinstance(i_dev, np.ndarray) and isinstance(d_dev, np.ndarray)
    np.testing.assert_array_equal(i_dev, i_cpu)
    np.testing.assert_array_equal(d_dev, d_cpu)
    assert (dense[0] == dense[0, order[0, 1]]).sum() > 1  # the data really has ties


def test_exact_knn_random_unit_features_agree():
    x = unit(1500, 64, seed=2)
    k = 31
    d_cpu, i_cpu = exact_knn(x, k)
    d_dev, i_dev = exact_knn(x.to(DEVICE), k)
    np.testing.assert_allclose(d_dev, d_cpu, rtol=0, atol=2e-6)
    # float32 rounding may only swap near-ties: every neighbour found on the device is as
    # near (exactly, in float64) as the true neighbour at its rank
    exact = 2.0 - 2.0 * (x.double() @ x.double().t()).numpy()
    true_sorted = np.sort(exact, axis=1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(exact, i_dev, 1), true_sorted, rtol=0, atol=2e-6)
    assert (i_dev == i_cpu).mean() > 0.999


# ----------------------------------------------------------------------------- Jaccard + DBSCAN
def test_jaccard_distance_and_dbscan_labels_are_identical():
    x = quantised_clusters(clusters=25, per_cluster=16, dim=12, seed=3)
    cpu = jaccard_distance(x, k1=20, k2=6)
    dev = jaccard_distance(x.to(DEVICE), k1=20, k2=6)
    np.testing.assert_array_equal(dev.indptr, cpu.indptr)
    np.testing.assert_array_equal(dev.indices, cpu.indices)
    np.testing.assert_array_equal(dev.data, cpu.data)  # exact inputs: bit-identical float32 distances
    labels_cpu = jaccard_dbscan(x, eps=0.5, k1=20, k2=6, min_samples=4)
    labels_dev = jaccard_dbscan(x.to(DEVICE), eps=0.5, k1=20, k2=6, min_samples=4)
    np.testing.assert_array_equal(labels_dev, labels_cpu)
    assert labels_cpu.max() + 1 >= 10  # a real partition, not one blob or all outliers


# ----------------------------------------------------------------------------- memory
def memory_oracle(centroids, feats, labels, momentum, mode):
    """Loop version of ClusterMemory.update in float64."""
    c = centroids.double().clone()
    q = F.normalize(feats.double(), dim=1)
    if mode == "hard":
        for y in sorted(set(labels.tolist())):
            rows = [i for i in range(len(labels)) if int(labels[i]) == y]
            hardest = min(rows, key=lambda i: (float(q[i] @ c[y]), i))
            c[y] = F.normalize(momentum * c[y] + (1 - momentum) * q[hardest], dim=0)
    else:
        for i in range(len(labels)):
            y = int(labels[i])
            c[y] = F.normalize(momentum * c[y] + (1 - momentum) * q[i], dim=0)
    return c


@pytest.mark.parametrize("mode", ["hard", "ori"])
def test_memory_update_and_loss(mode):
    centroids = unit(10, 32, seed=4)
    feats = unit(64, 32, seed=5).requires_grad_()
    labels = torch.randint(0, 10, (64,), generator=gen(6))
    memories = {key: ClusterMemory(on(centroids, d), temperature=0.05, momentum=0.2, mode=mode)
                for key, d in RUNS}
    losses, grads = {}, {}
    for key, d in RUNS:
        memory = memories[key]
        f = on(feats, d).requires_grad_()
        loss = memory(f, on(labels, d))
        loss.backward()
        losses[key], grads[key] = back(loss), back(f.grad)
        memory.update(f.detach(), on(labels, d))
    torch.testing.assert_close(losses["dev"], losses["ref"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["dev"], grads["ref"], rtol=1e-4, atol=1e-6)
    expected = memory_oracle(centroids, feats.detach(), labels, 0.2, mode).float()
    torch.testing.assert_close(memories["ref"].centroids, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(memories["dev"].centroids.cpu(), memories["ref"].centroids, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- supports + LP
@pytest.mark.parametrize("topk", [1, 2])
def test_support_samples(topk):
    feats = unit(48, 32, seed=7)
    labels = torch.arange(12).repeat_interleave(4)
    centroids = unit(12, 32, seed=8)
    weight_grad = torch.randn(48 * topk, 32, generator=gen(9))
    out, grads = {}, {}
    for key, d in RUNS:
        f = on(feats, d).requires_grad_()
        s = support_samples(f, on(labels, d), on(centroids, d), 0.2, topk=topk)
        (s * on(weight_grad, d)).sum().backward()
        out[key], grads[key] = back(s), back(f.grad)
    torch.testing.assert_close(out["dev"], out["ref"], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads["dev"], grads["ref"], rtol=1e-5, atol=1e-6)
    # the shift really moves the samples (a wrong nearest centroid would show above)
    assert float((out["ref"][::topk] - feats).abs().max()) > 1e-2


@pytest.mark.parametrize("negatives", ["per_identity", "all"])
def test_label_preserving_loss_value_and_grads(negatives):
    feats = unit(32, 16, seed=10)
    supports = unit(64, 16, seed=11)  # K = 2 supports per anchor
    labels = torch.arange(8).repeat_interleave(4)
    out = {}
    for key, d in RUNS:
        f = on(feats, d).requires_grad_()
        s = on(supports, d).requires_grad_()
        loss = label_preserving_loss(f, s, on(labels, d), temperature=0.6, negatives=negatives)
        loss.backward()
        out[key] = (back(loss), back(f.grad), back(s.grad))
    for a, b in zip(out["dev"], out["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(out["ref"][1].abs().max()) > 0


def test_ise_losses_step():
    feats = unit(64, 32, seed=12)
    labels = torch.arange(8).repeat_interleave(8)
    centroids = unit(20, 32, seed=13)
    out = {}
    for key, d in RUNS:
        memory = ClusterMemory(on(centroids, d), temperature=0.05, momentum=0.2, mode="hard")
        f = on(feats, d).requires_grad_()
        step = ise_losses(f, on(labels, d), memory, 0.15, ISEConfig(), MemoryConfig())
        step.total.backward()
        memory.update(step.memory_inputs, step.memory_labels)
        out[key] = [step.total.detach(), step.contrastive, step.label_preserving, step.memory_inputs,
                  f.grad, memory.centroids]
    for a, b in zip(out["dev"], out["ref"]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    assert float(out["ref"][2]) > 0  # the LP term is really there


@pytest.mark.parametrize("mode", ["ignore", "positive"])
def test_ise_losses_with_the_cluster_memory_partner(mode):
    feats = unit(64, 32, seed=14)
    labels = torch.arange(8).repeat_interleave(8)
    centroids = unit(20, 32, seed=15)
    cameras = torch.zeros(20, 3, dtype=torch.bool)
    cameras[torch.arange(20), torch.arange(20) % 3] = True
    cameras[0, 1] = True  # one cluster seen by two cameras
    out = {}
    for key, d in RUNS:
        memory = ClusterMemory(on(centroids, d))
        f = on(feats, d).requires_grad_()
        cfg = MemoryConfig(cluster_online=mode, cluster_weight=0.25)
        step = ise_losses(f, on(labels, d), memory, 0.15, ISEConfig(), cfg, None, on(cameras, d))
        step.total.backward()
        out[key] = [step.total.detach(), step.contrastive, f.grad]
    for a, b in zip(out["dev"], out["ref"]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- camera-aware parts
# What the cpu preset trains with (docs/camera_aware.md): (cluster, camera) proxies with the online
# association, supports towards the own camera's clusters, camera-based BatchNorm, the camera steps
# of the pseudo-labels and re-ranked evaluation.
@pytest.mark.parametrize("online", [0, 2])
def test_camera_proxy_memory_losses_and_update(online):
    feats = unit(48, 32, seed=21)
    labels = torch.arange(12).repeat_interleave(4)
    # clusters 0-5 seen by cameras 0 and 1, clusters 6-11 by cameras 0 and 2: every row has a camera
    # its cluster lacks, so the online association has candidates
    cams = torch.tensor([0, 0, 1, 1] * 6 + [0, 2, 0, 2] * 6)
    source = unit(48, 32, seed=22)  # the proxies come from other rows than the batch
    out = {}
    for key, d in RUNS:
        memory = CameraProxyMemory.from_features(on(source, d), on(labels, d), on(cams, d), temperature=0.07,
                                                 momentum=0.2, hard_negatives=5)
        f = on(feats, d).requires_grad_()
        intra = memory.intra_loss(f, on(labels, d), on(cams, d))
        inter = memory.inter_loss(f, on(labels, d), on(cams, d), online=online, online_weight=0.5)
        (2 * intra + inter).backward()
        memory.update(f.detach(), on(labels, d), on(cams, d))
        out[key] = [back(intra), back(inter), back(f.grad), back(memory.proxies)]
    for a, b, what in zip(out["dev"], out["ref"], ("intra", "inter", "grad", "proxies")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)
    if online:  # the associated proxies really enter the loss
        plain = CameraProxyMemory.from_features(source, labels, cams, temperature=0.07, momentum=0.2, hard_negatives=5)
        assert abs(float(plain.inter_loss(feats, labels, cams)) - float(out["ref"][1])) > 1e-3


def _camera_parts(model, centroids, proxies_source, labels, cams, device):
    """StepParts of a camera-aware iteration (as the cpu preset) on ``device``, SGD without momentum."""
    net = copy.deepcopy(model).to(device).train()
    memory_cfg = MemoryConfig(cluster_weight=0.25, camera_aware=True, camera_intra_weight=2.0, camera_inter_weight=1.0,
                              camera_online=1, camera_online_weight=1.0)
    camera_memory = CameraProxyMemory.from_features(on(proxies_source, device), on(labels, device), on(cams, device),
                                                    hard_negatives=8)
    cluster_cameras = torch.zeros(centroids.shape[0], int(cams.max()) + 1, dtype=torch.bool)
    cluster_cameras[labels, cams] = True
    return StepParts(net=net, model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                     scaler=torch.amp.GradScaler(torch.device(device).type, enabled=False),
                     memory=ClusterMemory(on(centroids, device), temperature=0.05, momentum=0.2, mode="hard"),
                     ise=ISEConfig(foreign="same_camera"), memory_cfg=memory_cfg,
                     ctx=DistContext(device=torch.device(device)),
                     camera_memory=camera_memory, cluster_cameras=on(cluster_cameras, device), camera_bn=True)


def test_camera_aware_train_step_with_camera_bn():
    """One whole iteration of the cpu preset's kind: camera-BN MobileNetV2, ISE with same-camera
    supports, cluster memory at a quarter, intra/inter proxy terms with the online association."""
    torch.manual_seed(23)
    model = build_model(ModelConfig(arch="mobilenet_v2", pretrained=False, bn_mode="camera"))
    g = gen(24)
    images = torch.randn(16, 3, 64, 32, generator=g)
    labels = torch.arange(4).repeat_interleave(4)  # 4 clusters in the batch, of 6
    cams = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0])  # rows of both cameras interleaved
    dim = model.num_features
    centroids = unit(6, dim, seed=25)
    proxy_labels = torch.arange(6).repeat_interleave(2)
    proxy_cams = torch.tensor([0, 1] * 4 + [0, 0, 1, 1])
    source = unit(12, dim, seed=26)
    results = {}
    for key, d in RUNS:
        parts = _camera_parts(model, centroids, source, proxy_labels, proxy_cams, d)
        values = train_step(parts, on(images, d), on(labels, d), on(cams, d), weight=0.2)
        grads = {n: back(p.grad) for n, p in parts.net.named_parameters() if p.grad is not None}
        results[key] = (values, grads, back(parts.memory.centroids), back(parts.camera_memory.proxies),
                        {n: back(b) for n, b in parts.net.named_buffers() if b.is_floating_point()})
    values_dev, grads_dev, centroids_dev, proxies_dev, buffers_dev = results["dev"]
    values_cpu, grads_cpu, centroids_cpu, proxies_cpu, buffers_cpu = results["ref"]
    assert values_dev.keys() == values_cpu.keys() >= {"loss_intra", "loss_inter", "loss_lp"}
    for name in values_cpu:
        assert values_dev[name] == pytest.approx(values_cpu[name], rel=1e-4, abs=1e-6), name
    assert values_cpu["loss_lp"] > 0 and values_cpu["loss_inter"] > 0
    assert grads_dev.keys() == grads_cpu.keys() and len(grads_cpu) > 100
    for name in grads_cpu:
        assert_rel_close(grads_dev[name], grads_cpu[name], 2e-3, name)
    assert_rel_close(centroids_dev, centroids_cpu, 1e-5, "centroids")
    assert_rel_close(proxies_dev, proxies_cpu, 1e-5, "proxies")
    for name in buffers_cpu:  # running statistics, updated by each camera group in turn
        assert_rel_close(buffers_dev[name], buffers_cpu[name], 1e-4, name)


def test_camera_bn_statistics_and_extraction():
    torch.manual_seed(27)
    model = build_model(ModelConfig(arch="mobilenet_v2", pretrained=False, bn_mode="camera")).eval()
    g = gen(28)
    batches = [torch.randn(6, 3, 64, 32, generator=g) * 0.5 + 0.2, torch.randn(5, 3, 64, 32, generator=g) * 0.5 + 0.2]
    probe = torch.randn(4, 3, 64, 32, generator=g)
    out = {}
    for key, d in RUNS:
        net = copy.deepcopy(model).to(d).eval()
        stats = camera_statistics(net, [on(b, d) for b in batches])
        with torch.no_grad(), use_camera_statistics(net, stats):
            feats = net(on(probe, d))
        with torch.no_grad():
            running = net(on(probe, d))
        out[key] = ([back(m) for m, _ in stats], [back(v) for _, v in stats], back(feats), back(running))
    means_dev, vars_dev, feats_dev, running_dev = out["dev"]
    means_cpu, vars_cpu, feats_cpu, running_cpu = out["ref"]
    assert len(means_cpu) == len(means_dev) > 30
    for i, (a, b) in enumerate(zip(means_dev, means_cpu)):
        assert_rel_close(a, b, 1e-4, f"mean {i}")
    for i, (a, b) in enumerate(zip(vars_dev, vars_cpu)):
        assert_rel_close(a, b, 1e-4, f"var {i}")
    torch.testing.assert_close(feats_dev, feats_cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(running_dev, running_cpu, rtol=0, atol=1e-4)
    assert float((feats_cpu - running_cpu).abs().max()) > 1e-3  # the camera's statistics were used


def test_camera_aware_pseudo_labels():
    """Camera normalisation, the radius chosen from the features and the association, on features
    handed over on the device: the same labels and the same merges as on the CPU."""
    g = gen(29)
    people, dim = 30, 48
    base = torch.randn(people, dim, generator=g)
    view = torch.randn(people, 2, dim, generator=g) * 0.35  # each person's look in each camera
    offset = torch.randn(2, dim, generator=g) * 1.5  # a per-camera cast: no merge at all without the norm
    pid = torch.arange(people).repeat_interleave(8)
    cam = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).repeat(people)
    rows = base[pid] + view[pid, cam] + offset[cam] + torch.randn(pid.numel(), dim, generator=g) * 0.15
    feats = F.normalize(rows, dim=1)
    settings = PseudoLabelSettings(eps="auto", k1=6, k2=3, min_samples=2, camera_norm=True, associate=True)
    out = {key: pseudo_labels(on(feats, d), cam.numpy(), settings) for key, d in RUNS}
    np.testing.assert_array_equal(np.asarray(out["dev"].labels), np.asarray(out["ref"].labels))
    assert out["dev"].association == out["ref"].association
    labels = np.asarray(out["ref"].labels)
    spanning = {c for c in np.unique(labels[labels >= 0]) if len(set(cam.numpy()[labels == c])) == 2}
    assert len(spanning) >= 5  # the association merged across the cameras


def test_re_ranking_on_device_features():
    # exact distances with many ties: the neighbour lists must break them the same way on both devices
    qf, gf = quantised(40, 8, seed=30, levels=2), quantised(200, 8, seed=31, levels=2)
    ref = re_ranking(qf, gf, k1=20, k2=6, lambda_value=0.3)
    dev = re_ranking(qf.to(DEVICE), gf.to(DEVICE), k1=20, k2=6, lambda_value=0.3)
    assert ref.shape == dev.shape == (40, 200)
    np.testing.assert_allclose(dev, ref, rtol=1e-5, atol=1e-5)
    plain = pairwise_distance(qf, gf).numpy()
    assert np.abs(ref - plain).max() > 1e-2  # re-ranking really changed the distances


# ----------------------------------------------------------------------------- ghost batch norm
def ghost_oracle(x, weight, bias, chunk, eps=1e-5):
    """Per-chunk batch norm written out: biased variance over all dims but 1."""
    out = []
    for part in x.split(chunk):
        dims = [0] + list(range(2, x.dim()))
        mean = part.mean(dim=dims, keepdim=True)
        var = part.var(dim=dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out.append((part - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape))
    return torch.cat(out)


@pytest.mark.parametrize("cls, shape", [(GhostBatchNorm2d, (32, 6, 5, 4)), (GhostBatchNorm1d, (40, 7))])
def test_ghost_batchnorm_layer(cls, shape):
    g = gen(14)
    x = torch.randn(*shape, generator=g) * 2 + torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1)) / 8
    upstream = torch.randn(*shape, generator=g)
    bn = cls(shape[1], chunk=8)
    bn.weight.data.copy_(torch.rand(shape[1], generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(shape[1], generator=g))
    results = {}
    for key, d in RUNS:
        layer = copy.deepcopy(bn).to(d).train()
        xi = on(x, d).requires_grad_()
        y = layer(xi)
        (y * on(upstream, d)).sum().backward()
        results[key] = [y.detach(), xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                      layer.running_var]
        assert int(layer.num_batches_tracked) == 1
    for a, b in zip(results["dev"], results["ref"]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["ref"][0], ghost_oracle(x, bn.weight.detach(), bn.bias.detach(), 8),
                               rtol=1e-5, atol=1e-5)


def test_ghost_bn_model_forward_backward():
    torch.manual_seed(15)
    model = build_model(ModelConfig(arch="resnet18", pretrained=False, bn_mode="chunk", bn_chunk=8))
    x = torch.randn(16, 3, 32, 16, generator=gen(16))
    upstream = torch.randn(16, model.num_features, generator=gen(17))
    results = {}
    for key, d in RUNS:
        net = copy.deepcopy(model).to(d).train()
        out = net(on(x, d))
        (out * on(upstream, d)).sum().backward()
        grads = {n: back(p.grad) for n, p in net.named_parameters() if p.grad is not None}
        buffers = {n: back(b) for n, b in net.named_buffers()}
        results[key] = (back(out), grads, buffers)
    out_dev, grads_dev, buffers_dev = results["dev"]
    out_cpu, grads_cpu, buffers_cpu = results["ref"]
    torch.testing.assert_close(out_dev, out_cpu, rtol=0, atol=1e-4)
    assert grads_dev.keys() == grads_cpu.keys() and len(grads_cpu) > 50
    for name in grads_cpu:
        assert_rel_close(grads_dev[name], grads_cpu[name], 2e-3, name)
    for name in buffers_cpu:
        if buffers_cpu[name].is_floating_point():
            assert_rel_close(buffers_dev[name], buffers_cpu[name], 1e-4, name)
        else:
            assert torch.equal(buffers_dev[name], buffers_cpu[name]), name
    # chunking changes the result: per-chunk statistics are really used on both devices
    plain = copy.deepcopy(model).train()
    for m in plain.modules():
        if isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)):
            m.chunk = 10_000
    with torch.no_grad():
        assert float((plain(x) - out_cpu).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_ranking_on_device_distances():
    g = gen(18)
    qf, gf = quantised(60, 8, seed=19, levels=2), quantised(400, 8, seed=20, levels=2)  # many exact ties
    q_pids = torch.randint(0, 30, (60,), generator=g).numpy()
    g_pids = np.concatenate([q_pids, torch.randint(0, 30, (340,), generator=g).numpy()])
    q_cams = torch.randint(0, 4, (60,), generator=g).numpy()
    g_cams = torch.randint(0, 4, (400,), generator=g).numpy()
    dist_cpu = pairwise_distance(qf, gf)
    dist_dev = pairwise_distance(qf.to(DEVICE), gf.to(DEVICE))
    assert dist_dev.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(dist_dev.cpu(), dist_cpu, rtol=0, atol=0)  # exact inputs
    cpu = evaluate_ranking(dist_cpu, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    dev = evaluate_ranking(dist_dev, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert cpu.num_valid_queries == dev.num_valid_queries > 30
    np.testing.assert_array_equal(dev.first_match_rank, cpu.first_match_rank)
    np.testing.assert_allclose(dev.average_precision, cpu.average_precision, rtol=1e-12, atol=0)
    np.testing.assert_allclose(dev.cmc, cpu.cmc, rtol=0, atol=0)
    assert dev.mAP == pytest.approx(cpu.mAP, rel=1e-12)
    assert 0 < cpu.mAP < 1
