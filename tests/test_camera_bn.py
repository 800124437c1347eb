"""Camera-based BatchNorm (models/camera_bn.py, ``model.bn_mode=camera``) against slow oracles:
per-camera plain BN in training, exact per-camera statistics at extraction, and the trainer's
use of both on tiny demo data."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from isereid.engine.step import StepParts, _forward
from isereid.features import extract_features
from isereid.models.batchnorm import convert_batchnorm
from isereid.models.camera_bn import (
    CameraBatchNorm1d,
    CameraBatchNorm2d,
    camera_group_sizes,
    camera_groups,
    camera_statistics,
    has_camera_bn,
    use_camera_statistics,
)


def _net(seed: int = 0) -> nn.Module:
    """Conv -> BN2d -> ReLU -> Conv -> BN2d -> pool -> BN1d: two depths of 2d BN and a 1d BN."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 3),
                        nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(6))
    for m in net.modules():  # non-trivial affine parameters, so that sharing them is tested too
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    plain = _net()
    camera = convert_batchnorm(copy.deepcopy(plain), "camera")
    assert has_camera_bn(camera) and not has_camera_bn(plain)
    assert [type(m) for m in camera if "Norm" in type(m).__name__] == [CameraBatchNorm2d, CameraBatchNorm2d,
                                                                       CameraBatchNorm1d]
    assert list(camera.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(camera.state_dict()[key], value), key
    back = convert_batchnorm(camera, "plain")
    assert not has_camera_bn(back)
    assert convert_batchnorm(_net(), "camera")[1].weight is not None


@pytest.mark.parametrize("camids,expected", [
    ([0, 0, 1, 1, 1], [2, 3]),
    ([0, 1, 1, 1, 2, 2, 3], [4, 3]),  # 0 joins the next group, 3 the previous one
    ([4, 4, 4], [3]),
    ([1, 2], [2]),  # two singletons: one group
    ([0, 0, 1, 2, 2], [3, 2]),
])
def test_group_sizes_merge_groups_below_two_rows(camids, expected):
    sizes = camera_group_sizes(torch.tensor(camids))
    assert sizes == expected and sum(sizes) == len(camids)


def test_training_forward_equals_plain_bn_on_each_camera_alone():
    """Oracle: each camera's rows through a plain-BN copy in train mode, alone. The grouped forward
    must give the same rows (input order kept) and the same gradient of the parameters."""
    torch.manual_seed(1)
    x = torch.randn(12, 3, 8, 6)
    camids = torch.tensor([2, 0, 0, 2, 1, 0, 2, 1, 1, 0, 2, 1])
    net = convert_batchnorm(_net(), "camera").train()
    parts = StepParts(net=net, model=net, optimizer=None, scaler=None, memory=None, ise=None, memory_cfg=None,
                      ctx=None, camera_bn=True)
    out = _forward(parts, x, camids)
    out.square().sum().backward()
    oracle = _net().train()
    expected = torch.empty_like(out)
    total = 0
    for c in camids.unique():
        rows = (camids == c).nonzero().flatten()
        y = oracle(x[rows])
        expected[rows] = y.detach()
        total = total + y.square().sum()
    total.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(net.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Without camera groups the layers are plain BN: one set of statistics for the whole batch.
    torch.testing.assert_close(net(x), _net().train()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="camera ids"):
        _forward(parts, x, None)


def test_running_statistics_are_updated_by_every_group_in_turn():
    torch.manual_seed(2)
    x = torch.randn(7, 3, 5, 5)
    net = convert_batchnorm(_net(), "camera").train()
    with camera_groups(net, [3, 4]):
        net(x)
    oracle = _net().train()
    oracle(x[:3])
    oracle(x[3:])
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(layer.groups is None for layer in net if isinstance(layer, (CameraBatchNorm1d, CameraBatchNorm2d)))


def _input_statistics(net: nn.Module, batches: list[torch.Tensor]):
    """Oracle: the inputs of every BN layer of a plain copy run in train mode on each batch, pooled
    over all batches, with numpy's mean and unbiased variance."""
    plain = convert_batchnorm(copy.deepcopy(net), "plain").train()
    seen: dict[int, list[np.ndarray]] = {}
    layers = [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append(
        np.moveaxis(i[0].detach().double().numpy(), 1, -1).reshape(-1, i[0].shape[1])))
        for k, m in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            plain(b)
    for h in hooks:
        h.remove()
    return [(np.concatenate(seen[k]).mean(0), np.concatenate(seen[k]).var(0, ddof=1)) for k in range(len(layers))]


def test_camera_statistics_pool_every_row_and_position_exactly():
    torch.manual_seed(3)
    batches = [torch.randn(5, 3, 6, 4) + 0.7, torch.randn(3, 3, 6, 4) + 0.7]
    net = convert_batchnorm(_net(), "camera").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = camera_statistics(net, batches)
    expected = _input_statistics(net, batches)
    assert len(stats) == 3
    for (mean, var), (m, v) in zip(stats, expected):
        np.testing.assert_allclose(mean.numpy(), m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var.numpy(), v, rtol=1e-5, atol=1e-6)
    for k, v in net.state_dict().items():  # nothing of the model's state moved
        assert torch.equal(v, before[k]), k
    assert not net.training
    # In eval mode with those statistics, each layer normalises with them: a plain copy whose
    # running statistics are the statistics gives the same output.
    oracle = convert_batchnorm(copy.deepcopy(net), "plain").eval()
    for layer, (mean, var) in zip([m for m in oracle if isinstance(m, nn.modules.batchnorm._BatchNorm)], stats):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    x = torch.randn(4, 3, 6, 4)
    with use_camera_statistics(net, stats):
        torch.testing.assert_close(net(x), oracle(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x), convert_batchnorm(copy.deepcopy(net), "plain").eval()(x))  # context left
    with pytest.raises(ValueError):  # one row has no variance (torch's 1d BN refuses it first)
        camera_statistics(net, [torch.randn(1, 3, 6, 4)])
    with pytest.raises(ValueError, match="statistics for 3"):
        with use_camera_statistics(net, stats[:2]):
            pass


def _images(tmp_path, n: int, seed: int) -> list[str]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = tmp_path / f"{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_extraction_normalises_each_camera_with_its_own_images(tmp_path):
    """Oracle: per camera, a plain copy whose running statistics are the exact statistics of that
    camera's images (hooks, numpy), evaluated on them; a camera with one image: the running ones."""
    import torchvision.transforms as T
    from PIL import Image
    paths = _images(tmp_path, 11, 0)
    camids = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 2, 1])  # camera 2: one image
    transform = T.ToTensor()
    net = convert_batchnorm(_net(4), "camera")
    with torch.no_grad():  # running statistics that are not the identity, so the fallback is visible
        for layer in net:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
    feats = extract_features(net, paths, transform, batch_size=3, progress=False, camids=camids)
    plain = convert_batchnorm(copy.deepcopy(net), "plain").eval()
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    for camera in (0, 1):
        rows = np.flatnonzero(camids == camera)
        oracle = copy.deepcopy(plain)
        batches = [images[rows]]  # 5 images, batch_size 3: one calibration batch of 5 (batches of >= 2 rows)
        layers = [m for m in oracle if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for layer, (mean, var) in zip(layers, _input_statistics(net, batches)):
            layer.running_mean.copy_(torch.as_tensor(mean))
            layer.running_var.copy_(torch.as_tensor(var))
        with torch.no_grad():
            torch.testing.assert_close(feats[rows], oracle(images[rows]), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(feats[9:10], plain(images[9:10]), rtol=1e-5, atol=1e-6)
    # Without camera ids: the running statistics for every row, as plain BN.
    with torch.no_grad():
        torch.testing.assert_close(extract_features(net, paths, transform, batch_size=4, progress=False),
                                   plain(images), rtol=1e-5, atol=1e-6)
    # Plain BN ignores camera ids.
    torch.testing.assert_close(extract_features(plain, paths, transform, batch_size=4, progress=False, camids=camids),
                               extract_features(plain, paths, transform, batch_size=4, progress=False))


def test_trainer_groups_batches_by_camera_and_the_saved_model_scores_the_same(tiny_demo, tmp_path, monkeypatch):
    """Every training forward runs with camera groups; the model file keeps camera BN, and
    `evaluate_model` on the loaded file gives the mAP the run recorded for that epoch."""
    import isereid.engine.step as step
    from isereid.config import load_config
    from isereid.data.datasets import build_dataset
    from isereid.distributed import DistContext
    from isereid.engine.evaluate import evaluate_model
    from isereid.engine.trainer import Trainer
    from isereid.models.loading import load_model

    seen = []
    original = step.camera_groups

    def spy(net, sizes):
        seen.append(list(sizes))
        return original(net, sizes)

    monkeypatch.setattr(step, "camera_groups", spy)
    cfg = load_config("demo", ["optim.epochs=1", "optim.iters=2", "eval.every=1", "data.workers=0",
                               "train.progress=false", "train.tensorboard=false", "data.batch_size=32",
                               "data.height=32", "data.width=16", "data.pad=2", "cluster.eps=0.5",
                               "model.bn_mode=camera", f"data.root={tiny_demo}"])
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data.dataset, cfg.data.root)
    history = Trainer.from_config(cfg, dataset, tmp_path / "run", DistContext()).run()
    assert [r.epoch for r in history] == [1] and np.isfinite(history[0].loss)
    assert len(seen) == 2 and all(sum(s) == 32 and len(s) >= 2 for s in seen)
    model = load_model(tmp_path / "run" / "model_best.pt")
    assert has_camera_bn(model)
    best = max(history, key=lambda r: r.mAP)
    again = evaluate_model(model, dataset, cfg, torch.device("cpu"), progress=False)
    assert again.result.mAP == pytest.approx(best.mAP, abs=1e-5)


def test_extraction_of_no_images_with_camera_ids():
    import torchvision.transforms as T
    feats = extract_features(convert_batchnorm(_net(), "camera"), [], T.ToTensor(), progress=False, camids=[])
    assert feats.shape == (0, 0) or feats.shape[0] == 0
    with pytest.raises(ValueError, match="2 camera ids for 1 images"):
        extract_features(convert_batchnorm(_net(), "camera"), ["a.png"], T.ToTensor(), progress=False, camids=[0, 1])


def test_one_camera_trains_as_plain_bn_with_its_own_statistics(tmp_path):
    """bn_mode=camera on single-camera data is no error: the batch is one group (plain BN)."""
    from isereid.config import load_config
    from isereid.engine.trainer import camera_switches_on

    cfg = load_config("demo", ["model.bn_mode=camera", "memory.camera_aware=false", "memory.camera_online=0",
                               "cluster.camera_norm=false", "cluster.associate=false", "ise.foreign=any"])
    assert camera_switches_on(cfg) == {}
    torch.manual_seed(5)
    x = torch.randn(6, 3, 8, 6)
    net = convert_batchnorm(_net(), "camera").train()
    parts = StepParts(net=net, model=net, optimizer=None, scaler=None, memory=None, ise=None, memory_cfg=None,
                      ctx=None, camera_bn=True)
    torch.testing.assert_close(_forward(parts, x, torch.zeros(6, dtype=torch.long)), _net().train()(x))


def test_channels_last_groups_and_statistics_match_the_contiguous_layout():
    """``model.channels_last`` (the cpu preset's faster CPU layout): grouped training, calibration and
    normalisation with the statistics give the contiguous results, and every 2d layer's output stays
    channels-last (a join that fell back to NCHW would make every later convolution convert)."""
    torch.manual_seed(6)
    x = torch.randn(9, 3, 8, 6)
    contiguous = convert_batchnorm(_net(), "camera").train()
    cl = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in cl if isinstance(m, CameraBatchNorm2d)]
    with camera_groups(contiguous, [4, 5]):
        expected = contiguous(x)
    with camera_groups(cl, [4, 5]):
        out = cl(xcl)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    expected.square().sum().backward()
    out.square().sum().backward()
    # One relative error over all parameter gradients: the BN2d bias before the final BN1d has a
    # gradient of exactly 0 in exact arithmetic (BN1d removes a constant shift), where both layouts
    # leave only rounding, so a per-tensor relative tolerance would compare noise with noise.
    grads = torch.cat([p.grad.flatten() for p in contiguous.parameters()])
    grads_cl = torch.cat([q.grad.flatten() for q in cl.parameters()])
    assert (grads_cl - grads).norm() <= 1e-5 * grads.norm()
    batches = [torch.randn(5, 3, 8, 6) - 0.3, torch.randn(4, 3, 8, 6) - 0.3]
    stats = camera_statistics(contiguous.eval(), batches)
    stats_cl = camera_statistics(cl.eval(), [b.contiguous(memory_format=torch.channels_last) for b in batches])
    for (m, v), (mc, vc) in zip(stats, stats_cl):
        torch.testing.assert_close(mc, m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vc, v, rtol=1e-5, atol=1e-6)
    with use_camera_statistics(contiguous, stats), use_camera_statistics(cl, stats_cl):
        torch.testing.assert_close(cl(xcl), contiguous(x), rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    assert layouts and all(layouts)
