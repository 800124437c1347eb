"""isereid.models: network layout, ghost BN vs a per-chunk oracle, GeM, safe checkpoint import."""
from __future__ import annotations

import copy
import os
import pickle
import random
import socket
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import isereid
from isereid.config import ModelConfig
from isereid.errors import CheckpointError, ConfigError
from isereid.models import (
    GeneralizedMeanPooling,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    ReidNet,
    build_backbone,
    build_model,
    convert_batchnorm,
    extract_state_dict,
    infer_model_config,
    load_model,
    load_model_and_meta,
    safe_load,
    trainable_parameters,
)


def _cfg(**kw) -> ModelConfig:
    base = dict(arch="resnet18", pretrained=False, bn_mode="plain")
    base.update(kw)
    return ModelConfig(**base)


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- network
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_is_unit_norm_feature(mode):
    torch.manual_seed(0)
    model = build_model(_cfg(bn_mode="chunk", bn_chunk=4))
    model.train(mode == "train")
    x = torch.randn(8, 3, 64, 32)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (8, model.num_features) == (8, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8))
    feat, pooled = model.forward_with_pooled(x)
    assert pooled.shape == (8, 512)
    if mode == "eval":
        torch.testing.assert_close(feat, out)
        bn = model.feat_bn
        ref = F.normalize((pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_last_stride():
    x = torch.randn(2, 3, 64, 32)
    base1, _ = build_backbone("resnet18", pretrained=False, last_stride=1)
    base2, _ = build_backbone("resnet18", pretrained=False, last_stride=2)
    assert base1(x).shape == (2, 512, 4, 2)  # 256x128 -> 16x8 at full size
    assert base2(x).shape == (2, 512, 2, 1)
    base50, n = build_backbone("resnet50", pretrained=False, last_stride=1)
    assert n == 2048
    block = base50[7][0]
    assert block.conv2.stride == (1, 1) and block.downsample[0].stride == (1, 1) and block.conv1.stride == (1, 1)
    assert base50[6][0].conv2.stride == (2, 2)


def test_resnet50_layout_and_counts():
    model = build_model(ModelConfig(arch="resnet50", pretrained=False))
    assert isinstance(model, ReidNet) and model.num_features == 2048
    assert len(list(model.parameters())) == 161
    assert len(trainable_parameters(model)) == 160
    state = model.state_dict()
    assert len(state) == 323
    for key in ("base.0.weight", "base.1.running_var", "base.4.0.downsample.0.weight", "base.7.2.conv3.weight",
                "feat_bn.weight", "feat_bn.bias", "feat_bn.num_batches_tracked"):
        assert key in state
    assert not any(k.startswith(("fc.", "gap.", "base.2", "base.3")) for k in state)
    assert [type(m) for m in model.base[:4]] == [nn.Conv2d, GhostBatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(model.feat_bn, GhostBatchNorm1d) and model.feat_bn.chunk == 64
    assert model.feat_bn.bias.requires_grad is False
    assert torch.all(model.feat_bn.weight == 1) and torch.all(model.feat_bn.bias == 0)
    assert all(p is not model.feat_bn.bias for p in trainable_parameters(model))


def test_gem_pooling_matches_formula_and_learns_p():
    torch.manual_seed(0)
    gem = GeneralizedMeanPooling()
    assert gem.p.shape == (1,) and float(gem.p.detach()) == 3.0
    x = torch.randn(3, 5, 4, 2).abs() + 0.01
    x[0, 0, 0, 0] = -1.0  # clamped to 1e-6
    out = gem(x)
    ref = (x.clamp(min=1e-6) ** 3).mean(dim=(2, 3), keepdim=True) ** (1 / 3)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    model = build_model(_cfg(pooling="gem"))
    assert model.state_dict()["gap.p"].shape == (1,)
    assert len(trainable_parameters(model)) == len(trainable_parameters(build_model(_cfg()))) + 1
    with pytest.raises(ConfigError, match="avg, gem"):
        build_model(_cfg(pooling="max"))


def test_unknown_arch():
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50"):
        build_model(_cfg(arch="vgg16"))


# ----------------------------------------------------------------------------- ghost BN
def _oracle_bn(x, weight, bias, running_mean, running_var, chunk, momentum=0.1, eps=1e-5):
    """Per-chunk F.batch_norm, running stats from chunk 0 only (the DataParallel device-0 replica)."""
    parts = x.split(chunk)
    outs = [F.batch_norm(parts[0], running_mean, running_var, weight, bias, True, momentum, eps)]
    outs += [F.batch_norm(p, None, None, weight, bias, True, 0.0, eps) for p in parts[1:]]
    return torch.cat(outs)


@pytest.mark.parametrize("shape,cls", [((12, 6), GhostBatchNorm1d), ((12, 6, 3), GhostBatchNorm1d),
                                       ((12, 6, 4, 3), GhostBatchNorm2d)])
def test_ghost_bn_matches_per_chunk_oracle(shape, cls):
    g = torch.Generator().manual_seed(0)
    chunk = 4
    bn = cls(shape[1], chunk=chunk)
    bn.weight.data.copy_(torch.rand(shape[1], generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(shape[1], generator=g))
    shift = torch.arange(shape[0], dtype=torch.float32).view(-1, *[1] * (len(shape) - 1))
    x = (torch.randn(*shape, generator=g) * 3 + shift).requires_grad_()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x2 = x.detach().clone().requires_grad_()
    bn.train()
    out = bn(x)
    ref = _oracle_bn(x2, w, b, rm, rv, chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a chunk is normalised by its own statistics: shifting chunk 2 changes nothing elsewhere
    assert not torch.allclose(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True), atol=1e-3)
    grad = torch.randn(out.shape, generator=g)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.weight.grad, w.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.bias.grad, b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == 1
    # running stats really come from chunk 0 only
    c0 = x.detach()[:chunk].transpose(0, 1).reshape(shape[1], -1)
    torch.testing.assert_close(bn.running_mean, 0.1 * c0.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * c0.var(1, unbiased=True), atol=1e-6, rtol=1e-5)
    # eval: plain running-stat BN
    bn.eval()
    plain = nn.modules.batchnorm._BatchNorm.forward(bn, x.detach())
    torch.testing.assert_close(bn(x.detach()), plain)
    assert int(bn.num_batches_tracked) == 1


def test_ghost_bn_small_batch_is_plain_bn():
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(3, chunk=8)
    plain = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 2, 2)
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    assert int(ghost.num_batches_tracked) == 1
    cumulative = GhostBatchNorm1d(3, momentum=None, chunk=2)
    xs = [torch.randn(6, 3) for _ in range(2)]
    for x in xs:
        cumulative(x)
    c0 = torch.stack([x[:2].mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(cumulative.running_mean, c0)


def test_ghost_model_equals_plain_model_per_chunk():
    torch.manual_seed(0)
    ghost = build_model(_cfg(bn_mode="chunk", bn_chunk=4)).train()
    plain0 = convert_batchnorm(copy.deepcopy(ghost), "plain")
    plain1 = copy.deepcopy(plain0)
    assert not any(isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)) for m in plain0.modules())
    x = torch.randn(8, 3, 64, 32)
    out = ghost(x)
    ref = torch.cat([plain0(x[:4]), plain1(x[4:])])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for (k, v), (k0, v0) in zip(ghost.state_dict().items(), plain0.state_dict().items()):
        assert k == k0
        torch.testing.assert_close(v, v0, atol=1e-6, rtol=1e-5)  # running stats: chunk 0 only


def test_convert_batchnorm_modes(caplog):
    model = build_model(_cfg())
    keys = list(model.state_dict())
    bias = model.feat_bn.bias
    params = trainable_parameters(model)
    ghost = convert_batchnorm(model, "chunk", 16)
    assert ghost is model and list(ghost.state_dict()) == keys
    assert isinstance(ghost.base[1], GhostBatchNorm2d) and ghost.base[4][0].bn1.chunk == 16
    assert ghost.feat_bn.bias is bias and bias.requires_grad is False
    assert [id(p) for p in trainable_parameters(ghost)] == [id(p) for p in params]
    assert convert_batchnorm(ghost, "chunk", 8).feat_bn.chunk == 8
    with caplog.at_level("INFO", logger="isereid"):
        synced = convert_batchnorm(ghost, "sync")  # no process group: plain BN
    assert "plain" in caplog.text
    assert type(synced.base[1]) is nn.BatchNorm2d and type(synced.feat_bn) is nn.BatchNorm1d
    assert list(synced.state_dict()) == keys and synced.feat_bn.bias.requires_grad is False
    with pytest.raises(ConfigError, match="chunk, sync, plain"):
        convert_batchnorm(model, "group")
    lone = convert_batchnorm(nn.BatchNorm1d(4), "chunk", 2)
    assert isinstance(lone, GhostBatchNorm1d)


# ----------------------------------------------------------------------------- checkpoints
def _reference_state_dict(tv: nn.Module, feat_bn: nn.BatchNorm1d) -> dict:
    """The ISE/CC DataParallel layout of docs/method.md#state-dict, written out by hand."""
    sd = {}
    for prefix, mod in (("base.0", tv.conv1), ("base.1", tv.bn1), ("base.4", tv.layer1), ("base.5", tv.layer2),
                        ("base.6", tv.layer3), ("base.7", tv.layer4), ("feat_bn", feat_bn)):
        for k, v in mod.state_dict().items():
            sd[f"module.{prefix}.{k}"] = v.clone()
    return sd


def _oracle_features(tv: nn.Module, feat_bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    tv.layer4[0].conv2.stride = (1, 1)
    tv.layer4[0].downsample[0].stride = (1, 1)
    tv.eval(), feat_bn.eval()
    with torch.no_grad():
        f = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        return F.normalize(feat_bn(f.mean(dim=(2, 3))), dim=1)


def _rename_in_zip(path, old: bytes, new: bytes) -> None:
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in items:
            z.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)


def test_reference_checkpoint_import(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    _randomise_bn(tv, 1)
    feat_bn = nn.BatchNorm1d(2048)
    _randomise_bn(feat_bn, 2)
    sd = _reference_state_dict(tv, feat_bn)
    assert len(sd) == 323
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": sd, "epoch": 3, "best_mAP": np.float64(0.8)}, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the NumPy scalar
        torch.load(path, weights_only=True)
    loaded = safe_load(path)
    assert loaded["best_mAP"] == 0.8 and loaded["epoch"] == 3
    model = isereid.load_model(path)
    assert isinstance(model, ReidNet) and not model.training and model.num_features == 2048
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _oracle_features(tv, feat_bn, x), atol=1e-5, rtol=1e-4)
    # the same file as written by NumPy 1.x (module numpy.core instead of numpy._core)
    _rename_in_zip(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert float(safe_load(path)["best_mAP"]) == 0.8


def test_numpy_scalars_of_other_dtypes_load(tmp_path):
    path = tmp_path / "s.pt"
    obj = {"a": np.float32(1.5), "b": np.int64(7), "c": np.bool_(True), "d": np.float64(2.0)}
    torch.save(obj, path)
    assert safe_load(path) == obj


def test_own_checkpoint_round_trip(tmp_path):
    from isereid.engine import checkpoint as ckpt

    torch.manual_seed(0)
    model = build_model(_cfg(pooling="gem", bn_mode="chunk", bn_chunk=4))
    model.train()(torch.randn(8, 3, 64, 32))  # move running stats away from init
    opt = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
    model(torch.randn(4, 3, 64, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    model_config = dict(vars(_cfg(pooling="gem", bn_mode="chunk", bn_chunk=4)), future_option=1)
    payload = ckpt.model_payload(model.state_dict(), model_config, 2, np.float64(0.5), [64, 32])
    payload.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=ckpt.rng_state(),
                   history=[{"epoch": 1, "loss": 1.5, "mAP": None}], config={"seed": 1, "name": "x"},
                   python_rng=random.getstate())
    path = tmp_path / "checkpoint_last.pt"
    torch.save(payload, path)
    back = safe_load(path)
    assert back["python_rng"] == random.getstate() or isinstance(back["python_rng"], tuple)
    assert back["history"][0]["loss"] == 1.5 and back["input_size"] == [64, 32]
    loaded = load_model(path)
    assert not loaded.training and type(loaded.feat_bn) is nn.BatchNorm1d
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    # the same weights without model_config: inferred as resnet18 + gem
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "bare.pth")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "bare.pth")(x), model(x))


def test_load_model_and_meta_reads_the_file_once(tmp_path, monkeypatch):
    from isereid.engine import checkpoint as ckpt
    from isereid.models import loading

    torch.manual_seed(0)
    model = build_model(_cfg(pooling="gem")).eval()
    path = tmp_path / "model_best.pt"
    torch.save(ckpt.model_payload(model.state_dict(), vars(_cfg(pooling="gem")), 4, np.float64(0.25), [64, 32]),
               path)
    reads = []
    real_load = loading.safe_load
    monkeypatch.setattr(loading, "safe_load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    loaded, meta = load_model_and_meta(path)
    assert reads == [path]
    assert (meta.input_size, meta.epoch, meta.mAP) == ((64, 32), 4, 0.25)
    assert (meta.model_config.arch, meta.model_config.pooling) == ("resnet18", "gem") and not loaded.training
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # a reference file says nothing but its weights: the layout is inferred, the rest is unknown
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ref.pth.tar")
    _, ref = load_model_and_meta(tmp_path / "ref.pth.tar")
    assert (ref.input_size, ref.epoch, ref.mAP, ref.model_config.pooling) == (None, None, None, "gem")
    # a malformed input size is a one-line CheckpointError naming the file
    torch.save(ckpt.model_payload(model.state_dict(), vars(_cfg(pooling="gem")), 4, None, [64]), path)
    with pytest.raises(CheckpointError, match="model_best.pt: input_size is \\[64\\]"):
        load_model_and_meta(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    obj = {"state_dict": {}, "payload": _Evil(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(CheckpointError) as err:
        isereid.load_model(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    if writer == "torch":
        assert "not allowed for safety" in msg and "system" in msg
    assert not marker.exists()


def test_non_checkpoints_are_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"state_dict": {"a": torch.zeros(100)}}, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    for name in ("noise.pt", "notes.txt", "empty.pt", "truncated.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match="is not a loadable checkpoint") as err:
            load_model(tmp_path / name)
        assert "\n" not in str(err.value)
    torch.save({"epoch": 3, "mAP": 0.5}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_model(tmp_path / "nostate.pt")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="ResNet re-ID layout"):
        load_model(tmp_path / "other.pt")


def test_architecture_mismatch_names_keys(tmp_path):
    small = build_model(_cfg())
    path = tmp_path / "model_best.pt"
    torch.save({"format": "isereid-checkpoint", "state_dict": small.state_dict(),
                "model_config": vars(_cfg(arch="resnet50")), "epoch": 1, "mAP": None}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "\n" not in msg and "resnet50/avg" in msg
    assert "missing keys" in msg and "base.4.0.conv3.weight" in msg
    assert "shape mismatches" in msg
    # a GeM checkpoint is not silently loaded into an avg model
    gem = build_model(_cfg(pooling="gem"))
    torch.save({"state_dict": gem.state_dict(), "model_config": vars(_cfg())}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys gap\.p \(1\)"):
        load_model(path)


def test_infer_model_config():
    for arch in ("resnet18", "resnet34", "resnet50"):
        sd = build_model(_cfg(arch=arch)).state_dict()
        cfg = infer_model_config(sd)
        assert cfg.arch == arch and cfg.pooling == "avg" and cfg.pretrained is False
    gem = build_model(_cfg(pooling="gem")).state_dict()
    sd = extract_state_dict({"model": {f"module.{k}": v for k, v in gem.items()}})
    assert list(sd) == list(gem)
    assert infer_model_config(sd).pooling == "gem"
    tv = torchvision.models.resnext50_32x4d(weights=None)
    sd = {f"base.{i}.{k}": v for i, m in ((0, tv.conv1), (4, tv.layer1), (5, tv.layer2), (6, tv.layer3), (7, tv.layer4))
          for k, v in m.state_dict().items()}
    assert infer_model_config(sd).arch == "resnext50_32x4d"


def test_damaged_reference_checkpoint_names_missing_keys(tmp_path):
    state = build_model(_cfg()).state_dict()
    state = {f"module.{k}": v for k, v in state.items() if not k.startswith("base.7.1.")}
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"does not match resnet18/avg: missing keys base\.7\.1\.conv1\.weight"):
        load_model(path)


def test_pretrained_path_loads_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    _randomise_bn(tv, 4)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, path)  # incl. fc.*
    model = build_model(_cfg(pretrained=True, pretrained_path=str(path), bn_mode="chunk"))
    got = model.state_dict()
    for i, mod in ((0, tv.conv1), (1, tv.bn1), (4, tv.layer1), (7, tv.layer4)):
        for k, v in mod.state_dict().items():
            torch.testing.assert_close(got[f"base.{i}.{k}"], v)
    torch.save({k: v for k, v in tv.state_dict().items() if not k.startswith("layer4.1")}, path)
    with pytest.raises(CheckpointError, match=r"missing keys layer4\.1\..*\(\d+\)"):
        build_model(_cfg(pretrained_path=str(path)))
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        build_model(_cfg(pretrained_path=str(tmp_path / "nope.pth")))


def test_pretrained_download_failure_is_config_error(monkeypatch):
    from torchvision.models._api import WeightsEnum

    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(ConfigError) as err:
        build_model(_cfg(arch="resnet50", pretrained=True))
    msg = str(err.value)
    assert msg.startswith("cannot download ImageNet weights for resnet50 (")
    assert "model.pretrained_path=FILE or model.pretrained=false" in msg and "\n" not in msg
    assert calls and calls[0] == torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    assert socket.getdefaulttimeout() == before


# ----------------------------------------------------------------------------- frozen leading blocks
def test_freeze_blocks_leaves_other_gradients_unchanged_and_keeps_bn_statistics():
    """Oracle: the same network unfrozen. Freezing base[:n] must not change the gradient of any
    other parameter, must leave the frozen weights bit-identical after an Adam step, and must keep
    the frozen blocks' BN running statistics following the data."""
    torch.manual_seed(0)
    free = build_model(_cfg(arch="mobilenet_v2", last_stride=2))
    frozen = build_model(_cfg(arch="mobilenet_v2", last_stride=2, freeze_blocks=4))
    frozen.load_state_dict(free.state_dict())
    x = torch.randn(6, 3, 64, 32)
    for m in (free, frozen):
        m.train()
        m(x).pow(3).sum().backward()
    names = dict(frozen.named_parameters())
    frozen_names = {n for n in names if n.startswith(tuple(f"base.{i}." for i in range(4)))}
    assert frozen_names and all(not names[n].requires_grad and names[n].grad is None for n in frozen_names)
    ids = {id(p) for p in trainable_parameters(frozen)}
    assert all(id(names[n]) not in ids for n in frozen_names)
    assert len(ids) == len(trainable_parameters(free)) - len(frozen_names)
    for n, p in free.named_parameters():
        if n in frozen_names or not p.requires_grad:
            continue
        torch.testing.assert_close(names[n].grad, p.grad, rtol=1e-5, atol=1e-6)
    before = {n: names[n].detach().clone() for n in frozen_names}
    stats = frozen.base[1].conv[0][1].running_mean.clone()
    opt = torch.optim.Adam(trainable_parameters(frozen), lr=0.1)
    opt.step()
    frozen(torch.randn(6, 3, 64, 32))
    assert all(torch.equal(before[n], names[n]) for n in frozen_names)
    assert not torch.equal(stats, frozen.base[1].conv[0][1].running_mean)
    assert not torch.equal(names["base.4.conv.0.0.weight"], free.state_dict()["base.4.conv.0.0.weight"])


def test_freeze_blocks_zero_trains_everything_and_out_of_range_is_a_config_error():
    model = build_model(_cfg(freeze_blocks=0))
    assert len(trainable_parameters(model)) == sum(1 for _ in model.parameters()) - 1  # feat_bn.bias
    with pytest.raises(ConfigError, match=r"model.freeze_blocks must be between 0 and 7 .*got 8"):
        build_model(_cfg(freeze_blocks=8))
    with pytest.raises(ConfigError, match="model.freeze_blocks"):
        build_model(_cfg(freeze_blocks=-1))
