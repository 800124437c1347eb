"""IBN-Net "a" ResNet-50 (Pan et al., "Two at Once: Enhancing Learning and Generalization
Capacities via IBN-Net", ECCV 2018).

IBN-a replaces the first BatchNorm of every bottleneck in the first three stages by an
:class:`IBN` layer: half of the channels are instance-normalised (removing per-image
style such as a camera's colour cast), the other half batch-normalised (keeping content
discrimination). Everything else is torchvision's ResNet-50 v1.5, so the module names and
state-dict keys are torchvision's with ``bn1.IN.*`` / ``bn1.BN.*`` in place of ``bn1.*`` in
layer1-layer3 blocks, as in the official IBN-Net release.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

# The official ImageNet weights of the IBN-Net authors (torchvision layout + IBN keys).
IBN_A_URL = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth"


class IBN(nn.Module):
    """Instance norm on the first ``int(channels * ratio)`` channels, batch norm on the rest.

    (B, C, H, W) -> (B, C, H, W). State keys ``IN.{weight,bias}`` and ``BN.*``.
    """

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


def resnet50_ibn_a() -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet-50 turned into IBN-a (layer1-layer3)."""
    net = torchvision.models.resnet50(weights=None)
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            block.bn1 = IBN(block.bn1.num_features)
    return net
