"""The re-ID network of docs/method.md#model: ResNet trunk -> pooling -> BatchNorm1d -> L2 norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .backbones import build_backbone
from .batchnorm import convert_batchnorm
from .pooling import build_pooling


class ReidNet(nn.Module):
    """``base`` (ResNet trunk, reference key layout), ``gap`` (avg or GeM), ``feat_bn``
    (BatchNorm1d, bias frozen at 0).

    ``forward`` returns only the L2-normalised post-BN feature, in train and eval mode alike
    (docs/reference_quirks.md#q12: the reference returns a tuple whose second element no caller uses);
    :meth:`forward_with_pooled` also returns the pooled pre-BN feature.
    """

    def __init__(self, base: nn.Sequential, num_features: int, pooling: str = "avg"):
        super().__init__()
        self.base = base
        self.gap = build_pooling(pooling)
        self.feat_bn = nn.BatchNorm1d(num_features)
        nn.init.constant_(self.feat_bn.weight, 1.0)
        nn.init.constant_(self.feat_bn.bias, 0.0)
        self.feat_bn.bias.requires_grad_(False)
        self.num_features = int(num_features)

    def forward_with_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normalize(feat_bn(pooled)), pooled)``; pooled is the (B, num_features) pre-BN feature."""
        pooled = self.gap(self.base(x)).flatten(1)
        return F.normalize(self.feat_bn(pooled), dim=1), pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.feat_bn(self.gap(self.base(x)).flatten(1)), dim=1)


def build_model(cfg: ModelConfig) -> ReidNet:
    """Backbone (pretrained per ``cfg``), pooling, feat_bn, the BN flavour ``cfg.bn_mode``, then the
    first ``cfg.freeze_blocks`` trunk children frozen."""
    base, num_features = build_backbone(cfg.arch, cfg.pretrained, cfg.pretrained_path, cfg.last_stride)
    model = convert_batchnorm(ReidNet(base, num_features, cfg.pooling), cfg.bn_mode, cfg.bn_chunk)
    freeze_leading(model.base, cfg.freeze_blocks)
    return model


def freeze_leading(base: nn.Sequential, n: int) -> None:
    """Stop the weights of ``base[:n]`` from training (``requires_grad`` off).

    Their BatchNorm layers stay in train mode, so running (and camera-BN) statistics still adapt.
    Nothing before them needs a gradient either, so autograd skips the backward through them."""
    if not 0 <= n < len(base):
        raise ConfigError(f"model.freeze_blocks must be between 0 and {len(base) - 1} for this trunk "
                          f"({len(base)} children; got {n})")
    for child in list(base)[:n]:
        for p in child.parameters():
            p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (``feat_bn.bias`` is excluded: it stays 0; so are the
    trunk children frozen by ``model.freeze_blocks``)."""
    return [p for p in model.parameters() if p.requires_grad]
