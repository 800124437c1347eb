"""torchvision ResNet backbones in the reference layout (docs/method.md#architecture).

``base = nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4)``: indices
0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-7 the four stages, so state-dict keys read
``base.0.weight``, ``base.4.0.conv1.weight``, ... exactly as in ISE / Cluster Contrast
checkpoints. With ``last_stride=1`` the stride of the first block of layer4 is removed
(256x128 input -> 16x8 map).
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..errors import CheckpointError, ConfigError, first_line
from .ibn import IBN_A_URL, resnet50_ibn_a
from .mobile import MOBILE_ARCHS, mobile_trunk, set_last_stride_mobile
from .state_io import extract_state_dict, load_state_strict, safe_load

# arch -> (block, blocks per stage, groups, width_per_group), as torchvision builds them.
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}

# Every name ``model.arch`` accepts: the ResNets above (reference key layout), IBN-Net-a
# ResNet-50 (same layout, IBN keys in layer1-3) and the mobile trunks (``base.<i>`` = torchvision
# ``features.<i>``).
IBN_ARCHS = ("resnet50_ibn_a",)
ALL_ARCHS = (*ARCHS, *IBN_ARCHS, *MOBILE_ARCHS)

DOWNLOAD_TIMEOUT_S = 60.0


def _check_arch(arch: str) -> None:
    if arch not in ALL_ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {', '.join(ALL_ARCHS)}")


def _fetch_weights(arch: str) -> dict:
    if arch in IBN_ARCHS:  # not in torchvision: the IBN-Net authors' release
        return torch.hub.load_state_dict_from_url(IBN_A_URL, map_location="cpu", progress=False, check_hash=True)
    # IMAGENET1K_V1: for ResNets the weights the reference used.
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)


def _imagenet_state_dict(arch: str) -> dict:
    """ImageNet weights of ``arch`` (torchvision's weights API, or the IBN-Net release), downloaded or cached."""
    previous = socket.getdefaulttimeout()
    if previous is None:  # torch.hub opens the URL without a timeout: do not hang offline
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return _fetch_weights(arch)
    except Exception as e:  # URLError, HTTPError, timeouts, hash mismatch, ...
        reason = first_line(e)
        raise ConfigError(
            f"cannot download ImageNet weights for {arch} ({reason}); "
            "set model.pretrained_path=FILE or model.pretrained=false"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_backbone_file(path: str | Path) -> dict:
    """A local torchvision-layout state dict: plain, or under ``state_dict`` / ``model``, with
    ``module.`` prefixes stripped (:func:`~isereid.models.state_io.extract_state_dict`)."""
    try:
        return extract_state_dict(safe_load(path, map_location="cpu"))
    except CheckpointError as e:
        raise CheckpointError(f"{path} is not a state dict of backbone weights: {e}") from None


def _load_trunk(net: nn.Module, state: dict, arch: str, source: str) -> None:
    """Strictly load everything but the classifier ``fc`` (unused by the re-ID model)."""
    net.fc = nn.Identity()
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_state_strict(net, trunk, source, f"torchvision {arch}")


def set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    """Set the stride of the first layer4 block (3x3 conv for Bottleneck v1.5, first conv for
    BasicBlock) and of its downsample conv."""
    block = layer4[0]
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _load_features(base: nn.Sequential, state: dict, arch: str, source: str) -> None:
    """Strictly load torchvision's ``features.*`` keys into the mobile trunk (``classifier.*`` is unused)."""
    trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not trunk:
        raise CheckpointError(f"{source} holds no 'features.*' keys of a torchvision {arch} "
                              f"(first keys: {', '.join(list(state)[:3])}); convert it with `isereid weights import`")
    load_state_strict(base, trunk, source, f"torchvision {arch} features")


def build_backbone(arch: str, pretrained: bool, pretrained_path: Optional[str] = None,
                   last_stride: int = 1) -> tuple[nn.Sequential, int]:
    """``(base, num_features)``: the trunk and its output channels.

    ResNets (and IBN-a): ``Sequential(conv1, bn1, relu, maxpool, layer1..layer4)``, the reference
    key layout (2048 features for bottleneck nets, 512 for resnet18/34). Mobile nets: torchvision's
    ``features`` (:data:`~isereid.models.mobile.MOBILE_ARCHS` gives the width).

    ``pretrained_path`` (a local torchvision-layout state dict) takes precedence over ``pretrained``
    (ImageNet weights, downloaded only then; failure -> ConfigError).
    """
    _check_arch(arch)
    if last_stride not in (1, 2):
        raise ConfigError(f"model.last_stride must be 1 or 2 (got {last_stride})")
    state = source = None
    if pretrained_path:
        state, source = load_backbone_file(pretrained_path), str(pretrained_path)
    elif pretrained:
        state, source = _imagenet_state_dict(arch), f"ImageNet weights of {arch}"
    return trunk_from_state(arch, state, source or "", last_stride)


def trunk_from_state(arch: str, state: Optional[dict], source: str,
                     last_stride: int = 1) -> tuple[nn.Sequential, int]:
    """:func:`build_backbone` from an in-memory torchvision-layout ``state`` (None: random init);
    the strict load names missing / unexpected keys of ``source``."""
    if arch in MOBILE_ARCHS:
        base = mobile_trunk(arch)
        if state is not None:
            _load_features(base, state, arch, source)
        if last_stride == 1:
            set_last_stride_mobile(base, 1)
        return base, MOBILE_ARCHS[arch]
    net = resnet50_ibn_a() if arch in IBN_ARCHS else torchvision.models.get_model(arch, weights=None)
    if state is not None:
        _load_trunk(net, state, arch, source)
    set_last_stride(net.layer4, last_stride)
    block = net.layer4[-1]
    assert isinstance(block, (BasicBlock, Bottleneck))
    num_features = block.bn3.num_features if isinstance(block, Bottleneck) else block.bn2.num_features
    base = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return base, int(num_features)
