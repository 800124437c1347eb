"""Lightweight torchvision trunks for CPU training: MobileNetV2, MobileNetV3-Large, EfficientNet-B0.

The re-ID trunk is torchvision's ``features`` Sequential (the classifier is dropped), so the
state-dict keys are ``base.<i>.*`` where torchvision has ``features.<i>.*``. "Last stride 1"
removes the stride of the last downsampling convolution, as for ResNets: the final map of a
256x128 input is then 16x8 instead of 8x4 (twice the spatial detail for the same weights).
"""
from __future__ import annotations

import torchvision
from torch import nn

# arch -> channels of the trunk's last feature map (the re-ID feature dimension).
MOBILE_ARCHS = {
    "mobilenet_v2": 1280,
    "mobilenet_v3_large": 960,
    "efficientnet_b0": 1280,
}


def mobile_trunk(arch: str) -> nn.Sequential:
    """torchvision ``arch`` (random init) -> its ``features`` Sequential."""
    return torchvision.models.get_model(arch, weights=None).features


def set_last_stride_mobile(base: nn.Sequential, stride: int) -> None:
    """Set the stride of the last stride-2 convolution of ``base`` to ``stride``.

    torchvision's mobile blocks pad by ``(kernel - 1) // 2 * dilation`` independently of the
    stride, so only the output size changes."""
    convs = [m for m in base.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    if not convs:
        raise ValueError("the trunk has no strided convolution")
    convs[-1].stride = (stride, stride)
