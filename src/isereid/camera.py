"""Camera-aware proxies: per-camera feature normalisation and a (cluster, camera) proxy memory.

Plain cluster memories let a camera's style dominate the features, so clusters become
camera-pure. Two remedies live here (see ``docs/camera_aware.md``):

* :func:`camera_normalize` removes each camera's mean feature before clustering, a cheap
  offline association that lets one person's views from different cameras fall together;
* :func:`associate_clusters` merges clusters from disjoint cameras that are each other's most
  similar foreign cluster (offline association of pseudo-labels across cameras);
* :class:`CameraProxyMemory` keeps one proxy per (cluster, camera) pair and provides the
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["camera_normalize", "associate_clusters", "nearest_other_camera", "CameraProxyMemory"]


def _as_ids(values, count: int, name: str, device: torch.device) -> torch.Tensor:
    """``values`` as a (count,) int64 tensor on ``device``; TypeError/ValueError otherwise."""
    ids = torch.as_tensor(values)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},), got {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.long)


def _check_features(features: torch.Tensor, name: str = "features") -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be an (N, D) tensor, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {features.dtype}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/half/bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def camera_normalize(features: torch.Tensor, camids) -> torch.Tensor:
    """Subtract each camera's mean feature from its rows, then L2-normalise the rows again.

    Args:
        features: (N, D) rows (normally unit length), a tensor or a NumPy array.
        camids: (N,) integer camera ids (any values; they only group the rows).

    Returns:
        (N, D) unit rows on the device of ``features``, float32 (float64 input stays float64).
        A row equal to its camera's mean (e.g. the only image of a camera) has no residual
        direction; it is returned unchanged (re-normalised) instead of becoming a zero row.
    """
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    _check_features(features)
    cams = _as_ids(camids, features.shape[0], "camids", features.device)
    x = features.to(_work_dtype(features.dtype))
    if x.shape[0] == 0:
        return x.clone()
    _, group = torch.unique(cams, return_inverse=True)  # (N,) camera -> 0..C-1
    num = int(group.max()) + 1
    sums = x.new_zeros(num, x.shape[1]).index_add_(0, group, x)  # (C, D)
    counts = torch.bincount(group, minlength=num).to(x.dtype)  # (C,)
    residual = x - (sums / counts.unsqueeze(1))[group]  # (N, D)
    norms = residual.norm(dim=1, keepdim=True)  # (N, 1)
    # Relative threshold: a residual at rounding-noise level carries no direction.
    tiny = norms <= 1e-6 * x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return F.normalize(torch.where(tiny, x, residual), dim=1)


def nearest_other_camera(features, camids, block_rows: int = 2048) -> np.ndarray:
    """Index of each row's most similar row from another camera (cosine; -1 when there is none).

    Args:
        features: (N, D) rows (tensor on any device, or NumPy), normally unit length.
        camids: (N,) integer camera ids.
        block_rows: rows compared per block: memory O(block_rows * N), never N x N.

    Returns (N,) int64. The label-free cross-camera diagnostics read it: the share of images whose
    nearest other-camera image has them as its own nearest (mutual) grows as training learns to
    match people across cameras; with true identities, the share whose neighbour is the same person.
    """
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    _check_features(features)
    n = features.shape[0]
    cams = _as_ids(camids, n, "camids", features.device)
    x = features.to(_work_dtype(features.dtype))
    out = torch.full((n,), -1, dtype=torch.long, device=features.device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        sim = x[start:stop] @ x.T  # (B, N)
        sim.masked_fill_(cams[start:stop].unsqueeze(1) == cams.unsqueeze(0), float("-inf"))
        best, idx = sim.max(dim=1)
        out[start:stop] = torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1))
    return out.cpu().numpy()


def mutual_share(neighbour: np.ndarray) -> float:
    """Share of rows i with a neighbour j = neighbour[i] >= 0 and neighbour[j] == i (0.0 for no rows)."""
    neighbour = np.asarray(neighbour, dtype=np.int64)
    has = neighbour >= 0
    if not has.any():
        return 0.0
    rows = np.flatnonzero(has)
    return float((neighbour[neighbour[rows]] == rows).sum() / neighbour.size)


def associate_clusters(features, labels, camids, min_similarity: float = 0.5,
                       block_rows: int = 4096) -> np.ndarray:
    """Merge pairs of clusters that see a person from different cameras (offline association).

    Each cluster is summarised by the L2-normalised mean of its rows. Two clusters are merged
    when they share no camera, each is the other's most similar cluster among those sharing
    none of its cameras (mutual nearest neighbours), and their cosine similarity is at least
    ``min_similarity``. Merged pairs are disjoint, so one call at most halves a cluster count;
    clusters already spanning cameras take part like any other.

    Args:
        features: (N, D) rows (tensor on any device, or NumPy), normally the clustering features.
        labels: (N,) int cluster labels, -1 for outliers (kept as they are).
        camids: (N,) integer camera ids.
        min_similarity: cosine threshold in [-1, 1].
        block_rows: clusters compared per block: memory is O(block_rows * K), not O(K^2).

    Returns:
        (N,) int64 labels numbered 0..C'-1 in order of each new cluster's smallest old label.
    """
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    _check_features(features)
    n = features.shape[0]
    if not _is_number(min_similarity) or not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be a number in [-1, 1], got {min_similarity!r}")
    lab = _as_ids(labels, n, "labels", torch.device("cpu")).numpy()
    cams = _as_ids(camids, n, "camids", torch.device("cpu")).numpy()
    keep = np.flatnonzero(lab >= 0)
    ids, member = np.unique(lab[keep], return_inverse=True)  # member: (n_kept,) cluster 0..K-1
    k = ids.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if k == 0:
        return out
    _, cam_group = np.unique(cams[keep], return_inverse=True)
    device = features.device
    x = features.to(torch.float32)[torch.from_numpy(keep).to(device)]
    member_t = torch.from_numpy(member).to(device)
    centres = F.normalize(x.new_zeros(k, x.shape[1]).index_add_(0, member_t, x), dim=1)  # (K, D)
    seen = torch.zeros(k, int(cam_group.max()) + 1, device=device)  # (K, cameras) 1 where seen
    seen[member_t, torch.from_numpy(cam_group).to(device)] = 1.0
    best = torch.empty(k, device=device)
    partner = torch.empty(k, dtype=torch.long, device=device)
    for start in range(0, k, block_rows):  # blocks of clusters, never K x K at once
        stop = min(k, start + block_rows)
        sim = centres[start:stop] @ centres.T  # (B, K)
        sim.masked_fill_((seen[start:stop] @ seen.T) > 0, float("-inf"))  # a shared camera: not foreign
        best[start:stop], partner[start:stop] = sim.max(dim=1)
    best, partner = best.cpu().numpy(), partner.cpu().numpy()
    rows = np.arange(k)
    # Mutual pairs are disjoint: each joined pair takes its smaller cluster index as its root, so
    # the sorted unique roots number the new clusters in order of their smallest old label.
    joined = (partner[partner] == rows) & (best >= min_similarity) & (partner > rows)
    root = rows.copy()
    root[partner[joined]] = rows[joined]
    _, new_label = np.unique(root, return_inverse=True)
    out[keep] = new_label[member]
    return out


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
    (M = max label + 1, C = max camera + 1). To restore a memory, build it from the first three.
    """

    proxies: torch.Tensor
    proxy_labels: torch.Tensor
    proxy_cams: torch.Tensor
    index: torch.Tensor

    def __init__(self, proxies: torch.Tensor, proxy_labels, proxy_cams, temperature: float = 0.07,
                 momentum: float = 0.2, hard_negatives: int = 50):
        super().__init__()
        _check_features(proxies, "proxies")
        if proxies.shape[0] < 1:
            raise ValueError("proxies must hold at least one row")
        if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"camera temperature must be a positive number, got {temperature!r}")
        if not (_is_number(momentum) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"camera momentum must be in [0, 1], got {momentum!r}")
        if not (isinstance(hard_negatives, numbers.Integral) and not isinstance(hard_negatives, bool)
                and hard_negatives >= 1):
            raise ValueError(f"hard_negatives must be an integer >= 1, got {hard_negatives!r}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.hard_negatives = int(hard_negatives)
        num = proxies.shape[0]
        labels = _as_ids(proxy_labels, num, "proxy_labels", proxies.device)
        cams = _as_ids(proxy_cams, num, "proxy_cams", proxies.device)
        if int(labels.min()) < 0 or int(cams.min()) < 0:
            raise ValueError("proxy labels and cameras must be >= 0 (drop outliers first)")
        index = torch.full((int(labels.max()) + 1, int(cams.max()) + 1), -1, dtype=torch.long,
                           device=proxies.device)
        index[labels, cams] = torch.arange(num, device=proxies.device)
        if int((index >= 0).sum()) != num:
            raise ValueError("each (label, camera) pair may have only one proxy")
        dtype = _work_dtype(proxies.dtype)
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
        _check_features(features)
        labels = _as_ids(labels, features.shape[0], "labels", features.device)
        cams = _as_ids(camids, features.shape[0], "camids", features.device)
        if labels.numel() == 0:
            raise ValueError("from_features needs at least one sample")
        if int(labels.min()) < 0:
            raise ValueError("from_features needs labels >= 0 (drop outliers first)")
        if int(cams.min()) < 0:
            raise ValueError("camera ids must be >= 0")
        num_cams = int(cams.max()) + 1
        keys, group = torch.unique(labels * num_cams + cams, return_inverse=True)  # sorted: (label, cam)
        x = features.detach().to(_work_dtype(features.dtype))
        sums = x.new_zeros(keys.numel(), x.shape[1]).index_add_(0, group, x)  # (P, D)
        counts = torch.bincount(group, minlength=keys.numel()).to(x.dtype)  # (P,)
        return cls(sums / counts.unsqueeze(1), keys // num_cams, keys % num_cams, **kwargs)

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
        labels = _as_ids(labels, count, "labels", self.index.device)
        cams = _as_ids(camids, count, "camids", self.index.device)
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
        _check_features(features)
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
