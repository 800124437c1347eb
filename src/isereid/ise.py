"""Implicit Sample Extension: support samples by progressive linear interpolation (docs/method.md#supports).

Each sample f of pseudo-identity y gets K support samples pushed from its own centroid
towards the K most similar *other* centroids:

    s = normalize(f + a(t) · (c_nearest − c_y)),   a(t) = 0.25 · λ · ln(1 + (e − 1)·t/T)

The direction is centroid-to-centroid and the nearest centroids are found from the detached
sample (docs/reference_quirks.md#q3, #q4). Supports keep the sample's label and carry gradients into f.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Which foreign centroids a support sample moves towards (config ise.foreign).
FOREIGN = ("any", "same_camera")


def interpolation_weight(step: int, total_steps: int, lambda_base: float = 1.0) -> float:
    """Effective interpolation coefficient a(t) at global iteration ``step`` of ``total_steps``.

    Grows from 0 at t = 0 to 0.25·``lambda_base`` at t = T (both of the reference's 0.5 factors
    are included, docs/reference_quirks.md#q3).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return 0.25 * lambda_base * math.log(1.0 + (math.e - 1.0) * step / total_steps)


def nearest_foreign_centroids(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                              topk: int = 1, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (B, K) of the ``topk`` centroids most similar to each row, its own label excluded.

    ``allowed`` (B, M) bool, optional, restricts each row's candidates (e.g. to clusters that share
    its camera, :func:`same_camera_candidates`); a row with fewer than ``topk`` allowed foreign
    centroids falls back to all of them, so every row always gets ``topk`` foreign centroids.
    """
    num_clusters = centroids.shape[0]
    if not 1 <= topk < num_clusters:
        raise ValueError(f"topk must be in [1, {num_clusters - 1}] for {num_clusters} clusters, got {topk}")
    sims = features.detach().to(centroids.dtype) @ centroids.t()  # (B, M)
    sims = sims.scatter(1, labels.long().view(-1, 1), float("-inf"))
    if allowed is not None:
        if allowed.shape != sims.shape:
            raise ValueError(f"allowed has shape {tuple(allowed.shape)}, expected {tuple(sims.shape)}")
        restricted = sims.masked_fill(~allowed.to(torch.bool), float("-inf"))
        enough = torch.isfinite(restricted).sum(dim=1) >= topk  # (B,)
        sims = torch.where(enough.unsqueeze(1), restricted, sims)
    return sims.topk(topk, dim=1).indices


def same_camera_candidates(camids: torch.Tensor, cluster_cameras: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: cluster m holds images of row b's camera.

    camids: (B,) camera index in 0..C-1 of each row; cluster_cameras: (M, C) bool, cluster m has
    images of camera c. Another cluster seen by the row's own camera is almost surely another
    person (one camera rarely splits a person), whereas the nearest cluster of another camera is
    often the same person's other view (docs/camera_aware.md#camera-aware-ise).
    """
    return cluster_cameras[:, camids.long()].t()


def support_samples(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, weight: float,
                    topk: int = 1, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Support samples (B·K, D) for unit features (B, D) with pseudo-labels (B,) and centroids (M, D).

    Row ``b·K + k`` belongs to sample b and its k-th nearest foreign centroid, so the support
    labels are ``labels.repeat_interleave(K)``. Gradients flow into ``features``, never into
    ``centroids``. ``allowed`` (B, M) bool restricts the foreign centroids (see
    :func:`nearest_foreign_centroids`).
    """
    centroids = centroids.detach()
    nearest = nearest_foreign_centroids(features, labels, centroids, topk, allowed)  # (B, K)
    own = centroids[labels.long()].unsqueeze(1)  # (B, 1, D)
    shift = (centroids[nearest] - own).to(features.dtype)  # (B, K, D)
    supports = features.unsqueeze(1) + weight * shift
    return F.normalize(supports.reshape(-1, features.shape[1]), dim=1)
