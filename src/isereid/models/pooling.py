"""Global pooling heads: average pooling (ISE default) and GeM (Cluster Contrast default).

See docs/reference_quirks.md#q13.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import POOLINGS
from ..errors import ConfigError


class GeneralizedMeanPooling(nn.Module):
    """GeM pooling with a trainable scalar exponent ``p`` (state key ``p``, shape (1,)).

    ``clamp(x, min=eps) ** p`` -> adaptive average -> ``** (1/p)``, as the reference
    ``GeneralizedMeanPoolingP``. Output (B, C, 1, 1) like ``nn.AdaptiveAvgPool2d(1)``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, output_size: int = 1):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), self.output_size).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.4f}, output_size={self.output_size}, eps={self.eps}"


def build_pooling(name: str) -> nn.Module:
    """``"avg"`` -> ``nn.AdaptiveAvgPool2d(1)`` (no state), ``"gem"`` -> :class:`GeneralizedMeanPooling`."""
    if name == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if name == "gem":
        return GeneralizedMeanPooling()
    raise ConfigError(f"unknown model.pooling {name!r}; choose one of {', '.join(POOLINGS)}")
