"""The losses of one ISE iteration on a (global) batch of features (docs/method.md#training-loop, #supports, #losses).

Kept apart from the trainer so that one iteration can be tested against a hand-written
step, and so that the single-process and distributed paths share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..camera import CameraProxyMemory
from ..config import ISEConfig, MemoryConfig
from ..ise import support_samples
from ..losses import label_preserving_loss
from ..memory import ClusterMemory


def _fp32(features: torch.Tensor) -> torch.Tensor:
    """Half-precision autocast output -> float32; the losses and memories work in float32."""
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


@dataclass
class StepLosses:
    total: torch.Tensor  # scalar, with grad
    contrastive: torch.Tensor  # scalar L_cc
    label_preserving: torch.Tensor  # scalar L_lp (0 when ise.lp is off)
    memory_inputs: torch.Tensor  # (R, D) detached rows for ClusterMemory.update
    memory_labels: torch.Tensor  # (R,)


def ise_losses(
    features: torch.Tensor,
    labels: torch.Tensor,
    memory: ClusterMemory,
    weight: float,
    ise: ISEConfig,
    memory_cfg: MemoryConfig,
    allowed: Optional[torch.Tensor] = None,
) -> StepLosses:
    """L = w_cc·L_cc + w_lp·L_lp for features f (B, D), unit norm, and pseudo-labels y (B,).

    w_cc is ``memory.cluster_weight`` (1 in the reference). ``allowed`` (B, M) bool restricts the
    foreign centroids of the supports (``ise.foreign=same_camera``); None: all clusters.

    * ``ise.pil``: supports s = normalize(f + weight·(c_nearest − c_own)) join f in the
      contrastive loss (2B rows, labels cat(y, y)) and, with
      ``memory.update_with_supports``, in the memory update.
    * ``ise.lp``: the label-preserving loss between anchors f and supports s (supports are
      generated even when ``pil`` is off; they then stay out of L_cc and the memory).
    * Both off: plain Cluster Contrast.
    Supports are computed from the memory *before* this iteration's update.
    """
    features = _fp32(features)
    need_supports = ise.pil or ise.lp
    supports = (support_samples(features, labels, memory.centroids, weight, topk=ise.topk, allowed=allowed)
                if need_supports else None)
    if ise.pil:
        support_labels = labels.repeat_interleave(ise.topk)
        cc_inputs = torch.cat([features, supports])
        cc_labels = torch.cat([labels, support_labels])
    else:
        cc_inputs, cc_labels = features, labels
    contrastive = memory(cc_inputs, cc_labels)
    if ise.lp:
        lp = label_preserving_loss(features, supports, labels, temperature=ise.lp_temperature,
                                   negatives=ise.lp_negatives)
    else:
        lp = features.new_zeros(())
    total = memory_cfg.cluster_weight * contrastive + ise.lp_weight * lp
    if ise.pil and memory_cfg.update_with_supports:
        mem_inputs, mem_labels = cc_inputs, cc_labels
    else:
        mem_inputs, mem_labels = features, labels
    return StepLosses(total, contrastive.detach(), lp.detach(), mem_inputs.detach(), mem_labels)


@dataclass
class CameraLosses:
    total: torch.Tensor  # scalar, with grad: w_intra·L_intra + w_inter·L_inter
    intra: torch.Tensor  # scalar, detached
    inter: torch.Tensor  # scalar, detached


def camera_losses(features: torch.Tensor, labels: torch.Tensor, camids: torch.Tensor,
                  memory: CameraProxyMemory, memory_cfg: MemoryConfig) -> CameraLosses:
    """The camera-aware terms (docs/camera_aware.md) on the real samples f (B, D) only.

    Supports stay out: they interpolate between identities in the cluster memory and have no camera."""
    features = _fp32(features)
    intra = memory.intra_loss(features, labels, camids)
    inter = memory.inter_loss(features, labels, camids)
    total = memory_cfg.camera_intra_weight * intra + memory_cfg.camera_inter_weight * inter
    return CameraLosses(total, intra.detach(), inter.detach())
