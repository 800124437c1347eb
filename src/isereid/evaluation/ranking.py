"""Ranking metrics for re-ID retrieval: mAP and CMC under the Market-1501 protocol.

Protocol (docs/method.md#ranking, docs/reference_quirks.md#q19), per query:

* gallery entries with the same pid **and** the same camera are removed (junk);
* a query with no remaining true match is skipped and counts nowhere;
* AP equals ``sklearn.metrics.average_precision_score(y_true, -dist)`` over the remaining
  entries, including its tie handling: entries at exactly the same distance form one
  threshold, so every positive of a tie group gets the precision measured at the *end* of its
  group;
* CMC is first-match-break: the 0-based rank, among the remaining entries, of the first true
  match. Ties are broken by gallery index (the order of a *stable* argsort), so a negative tied
  with the first positive counts before it only when its gallery index is smaller.

Nothing sorts whole gallery rows. For a block of queries the same-pid entries (positives and
junk, a few per query) are gathered into small padded (C, P) and (C, J) matrices; the sorted
positives' distances s_0 <= s_1 <= ... bin every gallery entry (``searchsorted``), and a
histogram of the bins gives "#entries at distance <= s_i" for every positive i, from which
the junk entries' own counts are subtracted. That is O(G log P) per query instead of the
O(G log G) of a full sort, with no per-query Python loop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..utils import ArrayLike

# Elements of a (queries x gallery) block processed at once: about 10 bytes of temporaries per
# element (the int32 bins, a few bool masks), so ~40 MB per block whatever the gallery size;
# larger blocks are slower on CPU (cache).
_RANKING_BLOCK_ELEMENTS = 1 << 22
_DISTANCE_BLOCK_ELEMENTS = 1 << 24


@dataclass
class RankingResult:
    """Scores of one query/gallery evaluation.

    Attributes:
        mAP: mean of ``average_precision`` over the valid queries, in [0, 1].
        cmc: (max_rank,) float64; ``cmc[k - 1]`` is the rank-k accuracy.
        num_valid_queries: queries with at least one true match left after junk removal.
        average_precision: (Q,) float64 per-query AP, NaN for skipped queries.
        first_match_rank: (Q,) int64 0-based rank of the first true match among the query's
            valid gallery entries, -1 for skipped queries.
    """

    mAP: float
    cmc: np.ndarray
    num_valid_queries: int
    average_precision: np.ndarray
    first_match_rank: np.ndarray

    def rank(self, k: int) -> float:
        """Rank-k accuracy (k is 1-based), i.e. ``cmc[k - 1]``."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k must be in [1, {len(self.cmc)}] (max_rank), got {k}")
        return float(self.cmc[k - 1])

    def to_dict(self) -> Dict[str, float]:
        """{"mAP", "rank1", "rank5", "rank10"} as floats in [0, 1] (ranks beyond max_rank are
        the rank-max_rank value, which is a lower bound)."""
        def capped(k: int) -> float:
            return self.rank(min(k, len(self.cmc)))

        return {"mAP": float(self.mAP), "rank1": capped(1), "rank5": capped(5), "rank10": capped(10)}


def _check_distances(distmat: ArrayLike) -> Tuple[int, int]:
    """Validate a (Q, G) real distance matrix; returns (Q, G)."""
    dtype = distmat.dtype
    if isinstance(distmat, torch.Tensor):
        is_real = dtype != torch.bool and not dtype.is_complex
    else:
        is_real = np.dtype(dtype).kind in "iuf"
    if not is_real:
        raise ValueError(f"distmat must hold real numbers, got dtype {dtype}")
    if len(distmat.shape) != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(distmat.shape)}")
    return int(distmat.shape[0]), int(distmat.shape[1])


def _distance_block(distmat: ArrayLike, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a contiguous float32/float64 tensor on distmat's device.

    Integers become float64 (exact below 2**53) and half precision float32 (exact), so ties
    are exactly those of the input."""
    if isinstance(distmat, torch.Tensor):
        block = distmat[start:stop].detach()
        if not block.is_floating_point():
            block = block.to(torch.float64)
        elif block.dtype in (torch.float16, torch.bfloat16):
            block = block.to(torch.float32)
        return block.contiguous()
    block = distmat[start:stop]
    dtype = np.float32 if block.dtype in (np.float16, np.float32) else np.float64
    if block.dtype == dtype and block.flags.c_contiguous and block.flags.writeable:
        return torch.from_numpy(block)  # shared memory, only ever read
    return torch.from_numpy(np.array(block, dtype=dtype, order="C"))


def _label_tensor(labels: ArrayLike, length: int, name: str, device: torch.device) -> torch.Tensor:
    """1-D integer labels (pids or camera ids) of the given length as an int64 tensor."""
    if isinstance(labels, torch.Tensor):
        tensor = labels.detach()
        is_integer = not (tensor.is_floating_point() or tensor.is_complex())
    else:
        array = np.asarray(labels)
        is_integer = array.dtype.kind in "iub" or array.size == 0  # [] parses as float64
        tensor = torch.from_numpy(array.astype(np.int64)) if is_integer else None
    if not is_integer:
        raise ValueError(f"{name} must hold integers")
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match distmat, got {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.int64)


def _pad_rows(rows: torch.Tensor, values: torch.Tensor, num_rows: int, fill) -> torch.Tensor:
    """Scatter a row-sorted ragged list into a (num_rows, max count) matrix padded with ``fill``.

    rows: (M,) non-decreasing row ids; values: (M,). Row r holds its values in list order."""
    counts = torch.bincount(rows, minlength=num_rows)
    width = int(counts.max()) if rows.numel() else 0
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out = torch.full((num_rows, width), fill, dtype=values.dtype, device=values.device)
    out[rows, slot] = values
    return out


def _score_block(
    dist: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    query_camids: torch.Tensor,
    gallery_camids: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """AP and first-match rank for a block of queries.

    Args:
        dist: (C, G) finite distances. query_*: (C,), gallery_*: (G,) int64.
    Returns:
        (C,) float64 AP (NaN where skipped) and (C,) int64 first-match rank (-1 where skipped).

    Dense work is four passes over the block (pid compare, searchsorted, histogram, tie test);
    the same-pid entries (positives and junk) are few and handled as short padded lists, and
    junk is removed by subtracting its counts rather than by masking the whole block.
    """
    num_rows, num_gallery = dist.shape
    average_precision = torch.full((num_rows,), float("nan"), dtype=torch.float64, device=dist.device)
    first_rank = torch.full((num_rows,), -1, dtype=torch.int64, device=dist.device)

    rows, cols = (query_pids[:, None] == gallery_pids[None, :]).nonzero(as_tuple=True)  # row-major
    is_match = query_camids[rows] != gallery_camids[cols]
    pos_rows, pos_cols = rows[is_match], cols[is_match]
    junk_rows, junk_cols = rows[~is_match], cols[~is_match]
    num_pos = torch.bincount(pos_rows, minlength=num_rows)  # (C,)
    if pos_rows.numel() == 0:
        return average_precision, first_rank
    pos_dist = _pad_rows(pos_rows, dist[pos_rows, pos_cols], num_rows, float("inf"))  # (C, P)
    pos_col = _pad_rows(pos_rows, pos_cols, num_rows, num_gallery)  # (C, P)
    junk_dist = _pad_rows(junk_rows, dist[junk_rows, junk_cols], num_rows, float("inf"))  # (C, J)
    sorted_pos = pos_dist.sort(dim=1).values  # (C, P) ascending, padding last
    has_pos = num_pos > 0

    ap, all_at_most = _block_average_precision(dist, sorted_pos, junk_dist, num_pos)
    average_precision = torch.where(has_pos, ap, average_precision)
    # First match: valid entries strictly closer than the nearest positive s_0, plus valid
    # entries tied with s_0 whose gallery index is below the first (lowest-index) positive at s_0.
    nearest = sorted_pos[:, :1]  # (C, 1)
    first_col = torch.where(pos_dist == nearest, pos_col, num_gallery).min(dim=1).values  # (C,)
    tie_rows, tie_cols = (dist == nearest).nonzero(as_tuple=True)  # few: the positive itself, rare ties
    num_tied = torch.bincount(tie_rows, minlength=num_rows)
    tie_is_junk = (gallery_pids[tie_cols] == query_pids[tie_rows]) & (
        gallery_camids[tie_cols] == query_camids[tie_rows]
    )
    tie_counts = ~tie_is_junk & (tie_cols < first_col[tie_rows])
    tied_before = torch.bincount(tie_rows[tie_counts], minlength=num_rows)
    junk_closer = (junk_dist < nearest).sum(dim=1)
    rank = all_at_most[:, 0] - num_tied - junk_closer + tied_before
    return average_precision, torch.where(has_pos, rank, first_rank)


def _block_average_precision(
    dist: torch.Tensor, sorted_pos: torch.Tensor, junk_dist: torch.Tensor, num_pos: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """AP of each row of a block, and the count of entries at distance <= each positive.

    dist: (C, G); sorted_pos: (C, P) the row's positive distances ascending, +inf padded;
    junk_dist: (C, J) +inf padded; num_pos: (C,). Returns (C,) float64 AP (0 for a row without
    positives) and (C, P) int64 ``all_at_most[c, i]`` = #entries (junk included) <= s_i.
    """
    num_rows, max_pos = sorted_pos.shape
    device = dist.device
    # Sorted positive i sits in the tie group that ends where distances > s_i start, so its
    # precision is (#positives <= s_i) / (#valid entries <= s_i).
    # bins[c, j] = #positives closer than entry j; entry j is <= s_i  <=>  bins[c, j] <= i.
    bins = torch.searchsorted(sorted_pos, dist, out_int32=True)  # (C, G) in [0, P]
    row_offset = (max_pos + 1) * torch.arange(num_rows, dtype=torch.int32, device=device)
    histogram = torch.bincount((bins + row_offset[:, None]).view(-1), minlength=num_rows * (max_pos + 1))
    all_at_most = histogram.view(num_rows, max_pos + 1).cumsum(dim=1)[:, :max_pos]  # (C, P), junk included
    junk_at_most = (junk_dist[:, :, None] <= sorted_pos[:, None, :]).sum(dim=1)  # (C, P)
    valid_at_most = all_at_most - junk_at_most
    pos_at_most = torch.searchsorted(sorted_pos, sorted_pos, right=True)  # (C, P)
    precision = pos_at_most.to(torch.float64) / valid_at_most.clamp(min=1).to(torch.float64)
    real_slot = torch.arange(max_pos, device=device)[None, :] < num_pos[:, None]  # (C, P)
    ap_sum = torch.where(real_slot, precision, 0.0).sum(dim=1)
    return ap_sum / num_pos.clamp(min=1), all_at_most


@torch.no_grad()
def evaluate_ranking(
    distmat: ArrayLike,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_camids: ArrayLike,
    max_rank: int = 50,
    chunk_size: Optional[int] = None,
) -> RankingResult:
    """mAP and CMC of a query-to-gallery distance matrix (Market-1501 protocol, see module doc).

    Args:
        distmat: (Q, G) NumPy array or torch tensor, smaller = more similar; computed on the
            tensor's device. Must be finite.
        query_pids, query_camids: (Q,) integer ids. gallery_pids, gallery_camids: (G,).
        max_rank: length of the returned CMC curve (may exceed G; the curve then saturates).
        chunk_size: queries per block; default keeps each block near 4M elements.
    Returns:
        :class:`RankingResult`. If no query has a valid match, a ``RuntimeWarning`` is issued and
        mAP is 0.0, the CMC all zeros and ``num_valid_queries`` 0.
    Raises:
        ValueError: on mismatched shapes, non-integer ids, non-finite distances or max_rank < 1.
    """
    if not isinstance(distmat, torch.Tensor):
        distmat = np.asarray(distmat)
    num_query, num_gallery = _check_distances(distmat)
    device = distmat.device if isinstance(distmat, torch.Tensor) else torch.device("cpu")
    if int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank}")
    max_rank = int(max_rank)
    query_pids_t = _label_tensor(query_pids, num_query, "query_pids", device)
    gallery_pids_t = _label_tensor(gallery_pids, num_gallery, "gallery_pids", device)
    query_camids_t = _label_tensor(query_camids, num_query, "query_camids", device)
    gallery_camids_t = _label_tensor(gallery_camids, num_gallery, "gallery_camids", device)
    if chunk_size is None:
        chunk_size = max(1, _RANKING_BLOCK_ELEMENTS // max(1, num_gallery))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    average_precision = torch.full((num_query,), float("nan"), dtype=torch.float64)
    first_rank = torch.full((num_query,), -1, dtype=torch.int64)
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        block = _distance_block(distmat, start, stop)
        if not bool(torch.isfinite(block).all()):
            raise ValueError("distmat contains NaN or infinite values")
        block_ap, block_rank = _score_block(
            block, query_pids_t[start:stop], gallery_pids_t, query_camids_t[start:stop], gallery_camids_t
        )
        average_precision[start:stop] = block_ap.cpu()
        first_rank[start:stop] = block_rank.cpu()

    return _summarise(average_precision.numpy(), first_rank.numpy(), max_rank)


def _summarise(average_precision: np.ndarray, first_rank: np.ndarray, max_rank: int) -> RankingResult:
    """mAP and CMC from per-query AP (Q,) and first-match ranks (Q,), -1 for skipped queries."""
    is_valid = first_rank >= 0
    num_valid = int(is_valid.sum())
    if num_valid == 0:
        warnings.warn(
            "evaluate_ranking: no query has a true match in the gallery (after removing same-pid "
            "same-camera entries); returning mAP 0 and an all-zero CMC",
            RuntimeWarning,
            stacklevel=4,  # _summarise, evaluate_ranking, torch.no_grad's wrapper, the caller
        )
        return RankingResult(0.0, np.zeros(max_rank), 0, average_precision, first_rank)
    counted = first_rank[is_valid & (first_rank < max_rank)]
    cmc = np.bincount(counted, minlength=max_rank)[:max_rank].cumsum() / num_valid
    mean_ap = float(average_precision[is_valid].mean())
    return RankingResult(mean_ap, cmc.astype(np.float64), num_valid, average_precision, first_rank)


@torch.no_grad()
def pairwise_distance(
    query_features: ArrayLike, gallery_features: ArrayLike, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """Squared Euclidean distances ||q||^2 + ||g||^2 - 2<q, g> (float32, docs/method.md#eval-features).

    Args:
        query_features: (Q, D); gallery_features: (G, D). NumPy arrays or tensors; a NumPy input
            is moved to the device of a tensor input, otherwise the work is on the CPU.
        chunk_size: query rows per block (default keeps blocks near 16M elements).
    Returns:
        (Q, G) float32 tensor on the inputs' device. Values may be slightly negative from
        rounding, as in the reference.
    """
    query, gallery = query_gallery_tensors(query_features, gallery_features)
    device = query.device
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, num_gallery))
    query_sq = query.pow(2).sum(dim=1)  # (Q,)
    gallery_sq = gallery.pow(2).sum(dim=1)  # (G,)
    out = torch.empty((num_query, num_gallery), dtype=torch.float32, device=device)
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        norms = query_sq[start:stop, None] + gallery_sq[None, :]  # (C, G)
        out[start:stop] = torch.addmm(norms, query[start:stop], gallery.t(), beta=1, alpha=-2)
    return out


def query_gallery_tensors(query_features: ArrayLike, gallery_features: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) and (G, D) features as float32 tensors on one device: that of a tensor input (the
    query's first), else the CPU. Raises ValueError unless both are 2-D with the same D."""
    device = next(
        (x.device for x in (query_features, gallery_features) if isinstance(x, torch.Tensor)),
        torch.device("cpu"),
    )
    query = torch.as_tensor(query_features).detach().to(device=device, dtype=torch.float32)
    gallery = torch.as_tensor(gallery_features).detach().to(device=device, dtype=torch.float32)
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "query_features and gallery_features must be (Q, D) and (G, D) with the same D, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    return query, gallery
