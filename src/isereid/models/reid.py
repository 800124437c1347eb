"""The re-ID network of docs/method.md#model: ResNet trunk -> pooling -> BatchNorm1d -> L2 norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
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
    """Backbone (pretrained per ``cfg``), pooling, feat_bn, then the BN flavour ``cfg.bn_mode``."""
    base, num_features = build_backbone(cfg.arch, cfg.pretrained, cfg.pretrained_path, cfg.last_stride)
    model = ReidNet(base, num_features, cfg.pooling)
    return convert_batchnorm(model, cfg.bn_mode, cfg.bn_chunk)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (``feat_bn.bias`` is excluded: it stays 0)."""
    return [p for p in model.parameters() if p.requires_grad]
