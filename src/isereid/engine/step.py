"""The losses of one ISE iteration on a (global) batch of features (docs/method.md#training-loop, #supports, #losses).

Kept apart from the trainer so that one iteration can be tested against a hand-written
step, and so that the single-process and distributed paths share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..camera_memory import CameraProxyMemory
from ..config import ISEConfig, MemoryConfig
from ..distributed import DistContext, gather_with_grad
from ..errors import TrainingDiverged
from ..ise import same_camera_candidates, support_samples
from ..losses import label_preserving_loss
from ..memory import ClusterMemory, disjoint_partners, partner_cross_entropy
from ..models.camera_bn import camera_group_sizes, camera_groups


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
    cluster_cameras: Optional[torch.Tensor] = None,
) -> StepLosses:
    """L = w_cc·L_cc + w_lp·L_lp for features f (B, D), unit norm, and pseudo-labels y (B,).

    w_cc is ``memory.cluster_weight`` (1 in the reference). ``allowed`` (B, M) bool restricts the
    foreign centroids of the supports (``ise.foreign=same_camera``); None: all clusters.
    ``cluster_cameras`` (M, C) bool: with ``memory.cluster_online`` on, each L_cc row's partner cluster
    (:func:`isereid.memory.disjoint_partners`) is left out of its softmax or made a second positive
    (:func:`isereid.memory.partner_cross_entropy`); required then, unused otherwise.

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
    if memory_cfg.cluster_online != "negative":
        if cluster_cameras is None:
            raise ValueError("memory.cluster_online needs cluster_cameras, the (M, C) cameras of each cluster")
        partners = disjoint_partners(cc_inputs, cc_labels, memory.centroids, cluster_cameras)
        weight_on = None if memory_cfg.cluster_online == "ignore" else memory_cfg.cluster_online_weight
        contrastive = partner_cross_entropy(memory.logits(cc_inputs), cc_labels, partners, weight_on)
    else:
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
    inter = memory.inter_loss(features, labels, camids, online=memory_cfg.camera_online,
                              online_weight=memory_cfg.camera_online_weight)
    total = memory_cfg.camera_intra_weight * intra + memory_cfg.camera_inter_weight * inter
    return CameraLosses(total, intra.detach(), inter.detach())


@dataclass
class StepParts:
    """What one training iteration works with; built once per epoch by the trainer (or a benchmark).

    net: the (maybe DDP-wrapped) network; model: the bare network (its parameters are clipped);
    memory / camera_memory: read before and written after the step (camera_memory None unless
    camera-aware); cluster_cameras: (M, C) bool, cluster m holds images of camera id c, for
    ``ise.foreign=same_camera`` and ``memory.cluster_online`` (None otherwise); scaler: a GradScaler
    (disabled on CPU).
    """

    net: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    memory: ClusterMemory
    ise: ISEConfig
    memory_cfg: MemoryConfig
    ctx: DistContext
    camera_memory: Optional[CameraProxyMemory] = None
    cluster_cameras: Optional[torch.Tensor] = None
    amp: bool = False
    grad_clip: Optional[float] = None
    channels_last: bool = False
    camera_bn: bool = False  # model.bn_mode=camera: the forward normalises each camera's rows apart


def _forward(parts: StepParts, images: torch.Tensor, camids: Optional[torch.Tensor]) -> torch.Tensor:
    """The network's features (b, D) of ``images``, rows in input order. With camera-based BN the
    rows are sorted by camera for the forward (each BN layer then splits the batch into its camera
    groups) and put back in input order after it."""
    if not parts.camera_bn:
        return parts.net(images)
    if camids is None:
        raise ValueError("model.bn_mode=camera needs the camera ids of the batch")
    order = torch.argsort(camids.cpu(), stable=True)
    with camera_groups(parts.net, camera_group_sizes(camids.cpu()[order])):
        sorted_features = parts.net(images[order.to(images.device)])
    return sorted_features[torch.argsort(order).to(sorted_features.device)]


def train_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, camids: Optional[torch.Tensor],
               weight: float, where: str = "") -> dict[str, float]:
    """One ISE iteration, as the trainer runs it: autocast forward of this rank's ``images`` (b, 3, H, W)
    with pseudo-labels (b,) and camera ids (b,) (None when neither camera option needs them), gather
    of the global batch (with gradient), the ISE losses and the camera terms, the divergence check,
    the scaled backward, clipping, the optimizer step and the memory updates, skipped together with
    a step the gradient scaler skipped. Returns the loss read-outs (``loss``, ``loss_cc``,
    ``loss_lp`` and, camera-aware, ``loss_intra``, ``loss_inter``).

    Raises TrainingDiverged (naming ``where``) when the loss is not finite."""
    device = next(parts.model.parameters()).device
    images = images.to(device, non_blocking=True)
    if parts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, enabled=parts.amp):
        local = _forward(parts, images, camids)
    features = gather_with_grad(local.float(), parts.ctx)
    labels = parts.ctx.all_gather(labels.to(device, non_blocking=True))
    cams = None if camids is None else parts.ctx.all_gather(camids.to(device, non_blocking=True))
    allowed = (same_camera_candidates(cams, parts.cluster_cameras)
               if parts.cluster_cameras is not None and parts.ise.foreign == "same_camera" else None)
    losses = ise_losses(features, labels, parts.memory, weight, parts.ise, parts.memory_cfg, allowed,
                        parts.cluster_cameras)
    cam = None
    if parts.camera_memory is not None:
        cam = camera_losses(features, labels, cams, parts.camera_memory, parts.memory_cfg)
        losses.total = losses.total + cam.total
    if not torch.isfinite(losses.total):
        raise TrainingDiverged(f"loss became {losses.total.item()}{where}; lower optim.lr or disable train.amp")
    parts.optimizer.zero_grad(set_to_none=True)
    # Every rank computes the same global loss; DDP averages gradients, so scale by W.
    parts.scaler.scale(losses.total * parts.ctx.world_size).backward()
    if parts.grad_clip:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    # A step the gradient scaler skipped (inf/NaN gradients under AMP) must not move the memories
    # either: the scale only shrinks when the step was skipped.
    if scale is None or parts.scaler.get_scale() >= scale:
        parts.memory.update(losses.memory_inputs, losses.memory_labels)
        if cam is not None:
            parts.camera_memory.update(features.detach(), labels, cams)
    values = {"loss": losses.total.item(), "loss_cc": losses.contrastive.item(),
              "loss_lp": losses.label_preserving.item()}
    if cam is not None:
        values.update(loss_intra=cam.intra.item(), loss_inter=cam.inter.item())
    return values
