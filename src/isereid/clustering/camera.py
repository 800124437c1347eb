"""Camera steps of the pseudo-label pipeline (docs/camera_aware.md), and cross-camera diagnostics.

Plain clustering lets a camera's style dominate the features, so clusters become camera-pure.
Two steps around DBSCAN counter that (:func:`isereid.clustering.pseudo_labels` chains them):

* :func:`camera_normalize` removes each camera's mean feature before clustering, a cheap
  offline association that lets one person's views from different cameras fall together;
* :func:`associate_clusters` merges clusters from disjoint cameras that are each other's most
  similar foreign cluster (offline association of pseudo-labels across cameras).

:func:`nearest_other_camera` and :func:`mutual_share` are the label-free cross-camera
diagnostics of each epoch's record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import as_ids, check_feature_tensor, is_real_number, work_dtype

__all__ = ["camera_normalize", "associate_clusters", "associate", "Association", "nearest_other_camera",
           "mutual_share"]


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
    check_feature_tensor(features)
    cams = as_ids(camids, features.shape[0], "camids", features.device)
    x = features.to(work_dtype(features.dtype))
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
    check_feature_tensor(features)
    n = features.shape[0]
    cams = as_ids(camids, n, "camids", features.device)
    x = features.to(work_dtype(features.dtype))
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


@dataclass(frozen=True)
class Association:
    """What :func:`associate` did: the merged labels and every candidate pair it looked at.

    labels: (N,) int64 labels after the merge, numbered as :func:`associate_clusters` says.
    similarity: (P,) cosine similarity of each *mutual* pair (two clusters sharing no camera, each
    the other's most similar such cluster), in order of the pair's smaller old cluster index.
    merged: (P,) bool, the pair was at or above the threshold and became one cluster.
    threshold: the similarity a pair needed: ``min_similarity``, or the one ``"auto"`` chose
    (``inf`` when it had nothing to choose from, so that nothing merged).
    """

    labels: np.ndarray
    similarity: np.ndarray
    merged: np.ndarray
    threshold: float = math.nan

    def summary(self) -> dict:
        """The epoch record's label-free view: ``mutual_pairs`` (P), ``merged``, ``below_threshold``,
        the median similarity of the merged and of the rejected pairs (None when there are none) and
        the ``threshold`` used (None when ``"auto"`` found none). Whether the threshold decides
        anything shows in ``below_threshold``."""

        def median(values: np.ndarray):
            return round(float(np.median(values)), 6) if values.size else None

        merged = int(self.merged.sum())
        return {"mutual_pairs": int(self.merged.size), "merged": merged,
                "below_threshold": int(self.merged.size) - merged,
                "merged_similarity_median": median(self.similarity[self.merged]),
                "rejected_similarity_median": median(self.similarity[~self.merged]),
                "threshold": round(float(self.threshold), 6) if math.isfinite(self.threshold) else None}


def associate_clusters(features, labels, camids, min_similarity: Union[float, str] = 0.5,
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
        min_similarity: cosine threshold in [-1, 1], or ``"auto"``: the median, over clusters, of
            each cluster's similarity to its most similar *other* cluster sharing one of its
            cameras. One camera rarely splits a person, so those neighbours are nearly always two
            people: a cross-camera pair merges only when it is closer than a typical pair of
            different people seen by the same camera. Early in training the camera gap keeps every
            pair below that, so nothing merges; the gate opens as the features learn to bridge
            cameras (docs/camera_aware.md#association-gate). No such neighbour anywhere: no merge.
        block_rows: clusters compared per block: memory is O(block_rows * K), not O(K^2).

    Returns:
        (N,) int64 labels numbered 0..C'-1 in order of each new cluster's smallest old label.
        :func:`associate` returns the same labels with the pairs it considered.
    """
    return associate(features, labels, camids, min_similarity, block_rows).labels


def associate(features, labels, camids, min_similarity: Union[float, str] = 0.5,
              block_rows: int = 4096) -> Association:
    """:func:`associate_clusters`, also returning every mutual pair and whether it was merged."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    check_feature_tensor(features)
    n = features.shape[0]
    auto = isinstance(min_similarity, str) and min_similarity == "auto"
    if not auto and (not is_real_number(min_similarity) or not -1.0 <= min_similarity <= 1.0):
        raise ValueError(f"min_similarity must be a number in [-1, 1] or 'auto', got {min_similarity!r}")
    lab = as_ids(labels, n, "labels", torch.device("cpu")).numpy()
    cams = as_ids(camids, n, "camids", torch.device("cpu")).numpy()
    keep = np.flatnonzero(lab >= 0)
    ids, member = np.unique(lab[keep], return_inverse=True)  # member: (n_kept,) cluster 0..K-1
    k = ids.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if k == 0:
        return Association(out, np.zeros(0), np.zeros(0, dtype=bool), math.inf if auto else float(min_similarity))
    _, cam_group = np.unique(cams[keep], return_inverse=True)
    device = features.device
    x = features.to(torch.float32)[torch.from_numpy(keep).to(device)]
    member_t = torch.from_numpy(member).to(device)
    centres = F.normalize(x.new_zeros(k, x.shape[1]).index_add_(0, member_t, x), dim=1)  # (K, D)
    seen = torch.zeros(k, int(cam_group.max()) + 1, device=device)  # (K, cameras) 1 where seen
    seen[member_t, torch.from_numpy(cam_group).to(device)] = 1.0
    best = torch.empty(k, device=device)
    partner = torch.empty(k, dtype=torch.long, device=device)
    same_best = torch.empty(k, device=device)  # "auto": most similar other cluster sharing a camera
    for start in range(0, k, block_rows):  # blocks of clusters, never K x K at once
        stop = min(k, start + block_rows)
        sim = centres[start:stop] @ centres.T  # (B, K)
        shared = (seen[start:stop] @ seen.T) > 0  # (B, K) a shared camera: not foreign
        if auto:
            same = sim.masked_fill(~shared, float("-inf"))
            same[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = float("-inf")
            same_best[start:stop] = same.max(dim=1).values
        sim.masked_fill_(shared, float("-inf"))
        best[start:stop], partner[start:stop] = sim.max(dim=1)
    best, partner = best.cpu().numpy(), partner.cpu().numpy()
    if auto:
        null = same_best.cpu().numpy()
        null = null[np.isfinite(null)]
        threshold = float(np.median(null)) if null.size else math.inf
    else:
        threshold = float(min_similarity)
    rows = np.arange(k)
    # Mutual pairs are disjoint: each joined pair takes its smaller cluster index as its root, so
    # the sorted unique roots number the new clusters in order of their smallest old label.
    # A row with no cluster sharing none of its cameras has best -inf (its partner index is arbitrary).
    mutual = (partner[partner] == rows) & np.isfinite(best) & (partner > rows)
    joined = mutual & (best >= threshold)
    root = rows.copy()
    root[partner[joined]] = rows[joined]
    _, new_label = np.unique(root, return_inverse=True)
    out[keep] = new_label[member]
    return Association(out, best[mutual].astype(np.float64), joined[mutual], threshold)
