"""Cluster memory: one L2-normalised centroid per pseudo-identity (docs/method.md#memory).

The memory is rebuilt from the cluster means at every re-clustering (docs/reference_quirks.md#q17) and is never
optimised. The contrastive loss reads it; the trainer writes it with an explicit,
no-grad :meth:`ClusterMemory.update` after the backward pass. The reference does the same
write inside a custom autograd backward; the result is identical because the update only
uses the detached, already computed batch rows and the loss's gradient only uses the
centroids as they were before the update.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgument

MODES = ("hard", "ori")
# memory.cluster_online (docs/camera_aware.md#cluster-online): what a row's cross-camera partner cluster is in L_cc.
CLUSTER_ONLINE = ("negative", "ignore", "positive")


class ClusterMemory(nn.Module):
    """Centroid memory with a cross-entropy loss over all clusters.

    Args:
        centroids: (M, D) initial centres; stored L2-normalised in the persistent buffer
            ``centroids`` (so ``.to()``, ``state_dict`` and DDP handle it).
        temperature: softmax temperature of the contrastive loss (reference 0.05).
        momentum: weight of the OLD centre in ``c <- m*c + (1-m)*x`` (docs/reference_quirks.md#q7).
        mode: ``"hard"`` — one update per label with its least similar row of the batch
            (Market); ``"ori"`` — every row in batch order, sequentially (MSMT)
            (docs/reference_quirks.md#q6).
    """

    centroids: torch.Tensor

    def __init__(self, centroids: torch.Tensor, temperature: float = 0.05, momentum: float = 0.2,
                 mode: str = "hard"):
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be a non-empty (M, D) tensor, got shape {tuple(centroids.shape)}")
        if mode not in MODES:
            raise InvalidArgument(f"unknown memory mode {mode!r}; choose one of {', '.join(MODES)}")
        if temperature <= 0:
            raise InvalidArgument(f"memory temperature must be positive, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise InvalidArgument(f"memory momentum must be in [0, 1], got {momentum}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.mode = mode
        dtype = centroids.dtype if centroids.is_floating_point() else torch.float32
        self.register_buffer("centroids", F.normalize(centroids.detach().clone().to(dtype), dim=1))

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: torch.Tensor, **kwargs) -> "ClusterMemory":
        """Memory from the normalised means of ``features`` (N, D) per label in 0..M-1 (N,)."""
        labels = torch.as_tensor(labels, device=features.device).long()
        if labels.numel() != features.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {features.shape[0]} features")
        if labels.numel() == 0 or int(labels.min()) < 0:
            raise ValueError("from_features needs at least one sample and labels >= 0 (drop outliers first)")
        num = int(labels.max()) + 1
        sums = features.new_zeros(num, features.shape[1], dtype=torch.float32)
        sums.index_add_(0, labels, features.float())
        counts = torch.bincount(labels, minlength=num)
        if bool((counts == 0).any()):
            missing = int(torch.nonzero(counts == 0)[0])
            raise ValueError(f"label {missing} has no sample; labels must be 0..M-1 without gaps")
        return cls(sums / counts.unsqueeze(1), **kwargs)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], **kwargs) -> "ClusterMemory":
        """The memory whose :meth:`state_dict` was ``state`` ({"centroids": (M, D)}), with the
        hyper-parameters ``kwargs`` (those of ``__init__``); the centres are copied bit for bit.
        KeyError / ValueError / TypeError on a bad ``state``."""
        centroids = state["centroids"]
        if not isinstance(centroids, torch.Tensor):
            raise TypeError(f"centroids must be a tensor, got {type(centroids).__name__}")
        memory = cls(centroids, **kwargs)
        # __init__ re-normalises, which can move already unit rows by an ulp; a resumed run must not.
        memory.centroids.copy_(centroids)
        return memory

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(R, D) rows -> (R, M) cosine logits / temperature; no gradient reaches the memory."""
        q = F.normalize(features.to(self.centroids.dtype), dim=1)
        return q @ self.centroids.t() / self.temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of rows ``features`` (R, D) against their cluster ``labels`` (R,)."""
        return F.cross_entropy(self.logits(features), labels.long())

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the centres of the labels in the batch towards its rows (R, D), in place."""
        q = F.normalize(features.detach().to(self.centroids.dtype), dim=1)
        labels = labels.detach().long().to(q.device)
        if q.shape[0] == 0:
            return
        if self.mode == "hard":
            self._update_hard(q, labels)
        else:
            self._update_sequential(q, labels)

    def _move(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        """c[y] <- normalize(m*c[y] + (1-m)*row) for distinct ``labels``."""
        mixed = self.momentum * self.centroids[labels] + (1.0 - self.momentum) * rows
        self.centroids[labels] = F.normalize(mixed, dim=1)

    def _update_hard(self, q: torch.Tensor, labels: torch.Tensor) -> None:
        # Similarity of each row to its own (current) centre; per label the argmin, first on ties.
        sims = (q * self.centroids[labels]).sum(dim=1)
        by_sim = torch.sort(sims, stable=True).indices
        by_label = by_sim[torch.sort(labels[by_sim], stable=True).indices]  # label, then sim, then index
        first = torch.ones(by_label.numel(), dtype=torch.bool, device=q.device)
        first[1:] = labels[by_label[1:]] != labels[by_label[:-1]]
        hardest = by_label[first]
        self._move(q[hardest], labels[hardest])

    def _update_sequential(self, q: torch.Tensor, labels: torch.Tensor) -> None:
        order = torch.sort(labels, stable=True).indices  # rows grouped by label, batch order kept
        sorted_labels = labels[order]
        starts = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
        # The r-th occurrences of all labels touch distinct centres, so they can be applied together;
        # r runs over at most Z*2 positions (occurrences of one label in the batch), not over rows.
        positions = torch.arange(sorted_labels.numel(), device=q.device)
        group_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=0).values
        rank = positions - group_start
        for r in range(int(rank.max()) + 1):
            rows = order[rank == r]
            self._move(q[rows], sorted_labels[rank == r])

    def extra_repr(self) -> str:
        return (f"clusters={self.num_clusters}, dim={self.centroids.shape[1]}, temperature={self.temperature}, "
                f"momentum={self.momentum}, mode={self.mode!r}")


def disjoint_partners(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                      cluster_cameras: torch.Tensor) -> torch.Tensor:
    """Each row's partner cluster (R,) long: the cluster most similar to row r (cosine to its centroid,
    no gradient) among those whose cameras share none with the cameras of the row's own cluster
    ``labels[r]``; -1 where no cluster qualifies (the row's cluster spans every camera, or one camera).

    features: (R, D); labels: (R,) in 0..M-1; centroids: (M, D) unit rows; cluster_cameras: (M, C) bool,
    cluster m holds images of camera c. One person is not two people in one camera, so only a cluster
    seen by none of the row's cluster's cameras can be that person's other view (the rule of the
    association, docs/camera_aware.md#association). Memory O(R·M), as the logits.
    """
    cams = cluster_cameras.to(device=centroids.device, dtype=centroids.dtype)
    labels = labels.long().to(centroids.device)
    disjoint = (cams[labels] @ cams.t()) == 0  # (R, M): no camera in common with the row's cluster
    q = F.normalize(features.detach().to(centroids.dtype), dim=1)
    sims = (q @ centroids.t()).masked_fill(~disjoint, float("-inf"))
    best = sims.max(dim=1)
    return torch.where(torch.isfinite(best.values), best.indices, torch.full_like(best.indices, -1))


def partner_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor,
                          weight: Optional[float]) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (R, M) against ``labels`` (R,), with a partner column per row
    (``partners`` (R,), -1 = none, rows without one get the plain cross-entropy).

    ``weight`` None ("ignore"): the partner column leaves the row's softmax, so it is no longer a
    negative. A number w >= 0 ("positive"): the partner is a second positive,
    loss_r = -(log p_r[y_r] + w·log p_r[partner_r]) / (1 + w), p_r the softmax over all M columns.
    """
    labels = labels.long().to(logits.device)
    partners = partners.long().to(logits.device)
    has = partners >= 0
    if weight is None:
        mask = torch.zeros_like(logits, dtype=torch.bool)
        rows = torch.nonzero(has).squeeze(1)
        mask[rows, partners[rows]] = True
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels)
    log_p = F.log_softmax(logits, dim=1)
    own = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    other = log_p.gather(1, partners.clamp(min=0).unsqueeze(1)).squeeze(1)
    w = has.to(log_p.dtype) * float(weight)
    return (-(own + w * other) / (1.0 + w)).mean()
