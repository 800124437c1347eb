"""A (cluster, camera) proxy memory with intra- and inter-camera losses (docs/camera_aware.md).

:class:`CameraProxyMemory` keeps one proxy per (cluster, camera) pair and provides the
intra-camera loss (each row against the proxies of its own camera) and the inter-camera
loss (each row against all proxies of its cluster and its hardest foreign proxies), in the
manner of camera-aware proxy methods (Wang et al., "Camera-aware Proxies for Unsupervised
Person Re-Identification", AAAI 2021).

Like :class:`isereid.memory.ClusterMemory`, the memory is rebuilt at every clustering, never
optimised, read by the losses and written by an explicit no-grad :meth:`CameraProxyMemory.update`
after the backward pass (an in-place write before ``backward`` would invalidate the graph).
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .utils import as_ids, check_feature_tensor, is_real_number, work_dtype

__all__ = ["CameraProxyMemory"]


class CameraProxyMemory(nn.Module):
    """One L2-normalised proxy per (cluster, camera) pair, with intra- and inter-camera losses.

    Args:
        proxies: (P, D) initial proxies; stored L2-normalised in the persistent buffer ``proxies``.
        proxy_labels: (P,) cluster label (>= 0) of each proxy.
        proxy_cams: (P,) camera id (>= 0) of each proxy; each (label, camera) pair at most once.
        temperature: softmax temperature of both losses.
        momentum: weight of the OLD proxy in ``p <- normalize(m*p + (1-m)*mean)`` (as ClusterMemory).
        hard_negatives: number of most similar foreign-cluster proxies in the inter-camera loss.

    Buffers (all persistent): ``proxies`` (P, D), ``proxy_labels`` (P,), ``proxy_cams`` (P,) and
    ``index`` (M, C) int64 with ``index[y, c]`` the proxy of pair (y, c), or -1 where there is none
    (M = max label + 1, C = max camera + 1). :meth:`from_state` restores a memory from its state_dict.
    """

    proxies: torch.Tensor
    proxy_labels: torch.Tensor
    proxy_cams: torch.Tensor
    index: torch.Tensor

    def __init__(self, proxies: torch.Tensor, proxy_labels, proxy_cams, temperature: float = 0.07,
                 momentum: float = 0.2, hard_negatives: int = 50):
        super().__init__()
        check_feature_tensor(proxies, "proxies")
        if proxies.shape[0] < 1:
            raise ValueError("proxies must hold at least one row")
        if not (is_real_number(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"camera temperature must be a positive number, got {temperature!r}")
        if not (is_real_number(momentum) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"camera momentum must be in [0, 1], got {momentum!r}")
        if not (isinstance(hard_negatives, numbers.Integral) and not isinstance(hard_negatives, bool)
                and hard_negatives >= 1):
            raise ValueError(f"hard_negatives must be an integer >= 1, got {hard_negatives!r}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.hard_negatives = int(hard_negatives)
        num = proxies.shape[0]
        labels = as_ids(proxy_labels, num, "proxy_labels", proxies.device)
        cams = as_ids(proxy_cams, num, "proxy_cams", proxies.device)
        if int(labels.min()) < 0 or int(cams.min()) < 0:
            raise ValueError("proxy labels and cameras must be >= 0 (drop outliers first)")
        index = torch.full((int(labels.max()) + 1, int(cams.max()) + 1), -1, dtype=torch.long,
                           device=proxies.device)
        index[labels, cams] = torch.arange(num, device=proxies.device)
        if int((index >= 0).sum()) != num:
            raise ValueError("each (label, camera) pair may have only one proxy")
        dtype = work_dtype(proxies.dtype)
        self.register_buffer("proxies", F.normalize(proxies.detach().clone().to(dtype), dim=1))
        self.register_buffer("proxy_labels", labels.clone())
        self.register_buffer("proxy_cams", cams.clone())
        self.register_buffer("index", index)
        self.cameras_present = int(torch.unique(cams).numel())  # cameras with at least one proxy

    @classmethod
    def from_features(cls, features: torch.Tensor, labels, camids, **kwargs) -> "CameraProxyMemory":
        """Proxies = normalised means of ``features`` (N, D) per (label, camera), ordered by (label, camera).

        ``labels`` (N,) must be >= 0 (the caller drops DBSCAN outliers); ``camids`` (N,) >= 0.
        """
        check_feature_tensor(features)
        labels = as_ids(labels, features.shape[0], "labels", features.device)
        cams = as_ids(camids, features.shape[0], "camids", features.device)
        if labels.numel() == 0:
            raise ValueError("from_features needs at least one sample")
        if int(labels.min()) < 0:
            raise ValueError("from_features needs labels >= 0 (drop outliers first)")
        if int(cams.min()) < 0:
            raise ValueError("camera ids must be >= 0")
        num_cams = int(cams.max()) + 1
        keys, group = torch.unique(labels * num_cams + cams, return_inverse=True)  # sorted: (label, cam)
        x = features.detach().to(work_dtype(features.dtype))
        sums = x.new_zeros(keys.numel(), x.shape[1]).index_add_(0, group, x)  # (P, D)
        counts = torch.bincount(group, minlength=keys.numel()).to(x.dtype)  # (P,)
        return cls(sums / counts.unsqueeze(1), keys // num_cams, keys % num_cams, **kwargs)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], **kwargs) -> "CameraProxyMemory":
        """The memory whose :meth:`state_dict` was ``state``, rebuilt from its ``proxies`` (P, D),
        ``proxy_labels`` (P,) and ``proxy_cams`` (P,) with the hyper-parameters ``kwargs`` (those of
        ``__init__``); ``index`` follows from labels and cameras. The proxies are copied bit for bit.
        KeyError / ValueError / TypeError on a bad ``state``."""
        proxies = state["proxies"]
        if not isinstance(proxies, torch.Tensor):
            raise TypeError(f"proxies must be a tensor, got {type(proxies).__name__}")
        memory = cls(proxies, state["proxy_labels"], state["proxy_cams"], **kwargs)
        # __init__ re-normalises, which can move already unit rows by an ulp; a resumed run must not.
        memory.proxies.copy_(proxies)
        return memory

    @property
    def num_proxies(self) -> int:
        return self.proxies.shape[0]

    @property
    def num_labels(self) -> int:
        return self.index.shape[0]

    @property
    def num_cameras(self) -> int:
        return self.index.shape[1]

    def proxy_of(self, labels, camids) -> torch.Tensor:
        """(B,) proxy index of each (label, camera) pair; ValueError if a pair has no proxy."""
        labels = torch.as_tensor(labels)
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
        return self._lookup(labels, camids, labels.shape[0])

    def _lookup(self, labels, camids, count: int) -> torch.Tensor:
        labels = as_ids(labels, count, "labels", self.index.device)
        cams = as_ids(camids, count, "camids", self.index.device)
        inside = (labels >= 0) & (labels < self.num_labels) & (cams >= 0) & (cams < self.num_cameras)
        idx = torch.full_like(labels, -1)
        idx[inside] = self.index[labels[inside], cams[inside]]
        missing = idx < 0
        if bool(missing.any()):
            row = int(torch.nonzero(missing)[0])
            raise ValueError(f"no proxy for label {int(labels[row])} in camera {int(cams[row])} "
                             f"({int(missing.sum())} of {count} rows have none)")
        return idx

    def _rows(self, features: torch.Tensor, labels, camids) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked (B, D) rows, L2-normalised in the proxies' dtype, and their (B,) proxy indices."""
        check_feature_tensor(features)
        if features.shape[1] != self.proxies.shape[1]:
            raise ValueError(f"features have dimension {features.shape[1]}, proxies {self.proxies.shape[1]}")
        target = self._lookup(labels, camids, features.shape[0])
        return F.normalize(features.to(self.proxies.dtype), dim=1), target

    def intra_loss(self, features: torch.Tensor, labels, camids) -> torch.Tensor:
        """Mean over rows i of the cross-entropy of f_i against the proxies of its own camera.

        Logits are ``f_i·p / temperature`` (rows L2-normalised first), restricted to the proxies
        with ``proxy_cams == camids[i]``; the target is the row's own (label, camera) proxy.
        """
        q, target = self._rows(features, labels, camids)
        cams = self.proxy_cams[target]  # == camids, validated
        logits = q @ self.proxies.t() / self.temperature  # (B, P); no gradient reaches the buffers
        foreign = self.proxy_cams.unsqueeze(0) != cams.unsqueeze(1)  # (B, P)
        return F.cross_entropy(logits.masked_fill(foreign, float("-inf")), target)

    def online_positives(self, sims: torch.Tensor, own: torch.Tensor, count: int) -> torch.Tensor:
        """(B, P) bool: for each row, its ``count`` most similar proxies (by ``sims`` (B, P)) among
        those whose camera the row's own cluster ``own`` (B,) has no proxy in (O2CAP's online
        association). ``count`` is capped at the number of cameras minus one, so that on two cameras a
        row gains at most the nearest proxy of the other camera, never a second, likely wrong one.
        Rows whose cluster already spans every camera gain none.
        """
        count = min(int(count), self.cameras_present - 1)
        chosen = torch.zeros_like(sims, dtype=torch.bool)
        if count < 1:
            return chosen
        covered = self.index[own] >= 0  # (B, C): the row's cluster has a proxy in camera c
        candidate = ~covered[:, self.proxy_cams]  # (B, P); excludes the row's own proxies
        top = sims.masked_fill(~candidate, float("-inf")).topk(min(count, self.num_proxies), dim=1)
        return chosen.scatter_(1, top.indices, torch.isfinite(top.values))

    def inter_loss(self, features: torch.Tensor, labels, camids, online: int = 0,
                   online_weight: float = 1.0) -> torch.Tensor:
        """Mean over rows of the inter-camera loss with hard negative proxies.

        For row i: Pos_i = all proxies of label y_i (every camera), On_i = its ``online`` associated
        proxies (:meth:`online_positives`; none by default), Neg_i = the ``hard_negatives`` proxies of
        other labels most similar to f_i (fewer if fewer exist) outside On_i, and with weights
        w_p = 1 on Pos_i and ``online_weight`` on On_i,
        ``loss_i = -sum_p w_p log(exp(s_ip/τ) / sum_{q in Pos_i ∪ On_i ∪ Neg_i} exp(s_iq/τ)) / sum_p w_p``.
        Online positives and negatives are chosen on detached similarities.
        """
        q, target = self._rows(features, labels, camids)
        own = self.proxy_labels[target]  # (B,) == labels, validated
        sims = q @ self.proxies.t()  # (B, P) cosine similarities; no gradient reaches the buffers
        positive = self.proxy_labels.unsqueeze(0) == own.unsqueeze(1)  # (B, P)
        with torch.no_grad():
            associated = self.online_positives(sims.detach(), own, online)  # (B, P)
            candidates = sims.detach().masked_fill(positive | associated, float("-inf"))
            k = min(self.hard_negatives, self.num_proxies)
            # Rows with fewer than k foreign proxies also pick positives (-inf); harmless, as the
            # denominator below runs over positives and negatives together.
            negative = torch.zeros_like(positive).scatter_(1, candidates.topk(k, dim=1).indices, True)  # (B, P)
            weight = positive.to(sims.dtype) + float(online_weight) * associated.to(sims.dtype)  # (B, P)
        logits = sims / self.temperature
        inside = positive | associated | negative
        log_denominator = logits.masked_fill(~inside, float("-inf")).logsumexp(dim=1)  # (B,)
        positive_mean = (logits * weight).sum(dim=1) / weight.sum(dim=1)  # (B,)
        return (log_denominator - positive_mean).mean()

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels, camids) -> None:
        """Move each proxy touched by the batch towards the mean of its (normalised) rows, in place.

        ``p <- normalize(m*p + (1-m)*mean)``; the result does not depend on the order of the rows.
        """
        q, target = self._rows(features, labels, camids)  # no_grad: q carries no graph
        if target.numel() == 0:
            return
        touched, group = torch.unique(target, return_inverse=True)  # (U,), (B,)
        # Sums by a one-hot product rather than index_add_: its reduction order is fixed, so every
        # DDP rank holding the same global batch computes bit-identical proxies (atomics would not).
        member = (group.unsqueeze(0) == torch.arange(touched.numel(), device=q.device).unsqueeze(1)).to(q.dtype)
        means = (member @ q) / member.sum(dim=1, keepdim=True)  # (U, D)
        mixed = self.momentum * self.proxies[touched] + (1.0 - self.momentum) * means
        self.proxies[touched] = F.normalize(mixed, dim=1)

    def extra_repr(self) -> str:
        return (f"proxies={self.num_proxies}, labels={self.num_labels}, cameras={self.num_cameras}, "
                f"dim={self.proxies.shape[1]}, temperature={self.temperature}, momentum={self.momentum}, "
                f"hard_negatives={self.hard_negatives}")
