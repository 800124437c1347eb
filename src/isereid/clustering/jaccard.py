"""Sparse k-reciprocal Jaccard distance for pseudo-labels, equal to the dense reference.

The pipeline is the shared core of :mod:`isereid.kreciprocal` (docs/method.md#jaccard) with
the clustering reference's choices, all vectorised:

1. R0 = exact top-k neighbours including self (:func:`exact_knn`), k = min(k1, N); only k
   columns exist, so the reference's "k1 + 1" lists really hold k1 entries
   (docs/reference_quirks.md#q1).
2. Reciprocal sets, expansion and query expansion (k2 rows including self) as in the core;
   the weights are V[i, E(i)] = softmax(-(2 - 2<x_i, x_j>)) in float32
   (docs/reference_quirks.md#q2). Distances not known from the kNN come from a sampled
   matrix product on the features' device.
3. m_ij from the core's min-sum product for all pairs j >= i, added in float32 in the
   reference's order so the sums equal its loop to the last bit; dist = max(0, 1 - m / (2 - m))
   in float32. No original distance is mixed in.

Memory is O(N * k): V and V' hold about k * k2 entries per row and the min-sum step works on
row chunks of bounded size, in parallel threads. Only pairs sharing a column of V' have a
distance below 1, so :func:`jaccard_distance` stores exactly those, explicit zeros included;
every pair not stored has distance 1.0. DBSCAN only needs the pairs within eps, which
:func:`_jaccard_upper_within` finds while summing only a small part of the far pairs.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from .. import kreciprocal
from ..utils import ArrayLike, counts_to_indptr
from .knn import as_features, check_positive_int, exact_knn

logger = logging.getLogger("isereid")

#: Scratch budget (elements) of one chunk of the min-sum step.
_SCRATCH_ELEMENTS = 1 << 22


def jaccard_distance(features: ArrayLike, k1: int = 30, k2: int = 6, *,
                     knn_backend: str = "torch") -> sp.csr_matrix:
    """k-reciprocal Jaccard distance of all pairs of rows, as a sparse matrix.

    Args:
        features: (N, D) float32 array or tensor (any device), rows L2-normalised.
        k1: size of the initial ranking (the reference's k1, default 30).
        k2: query-expansion width including the point itself (1 disables it).
        knn_backend: ``"torch"`` or ``"faiss"``, see :func:`exact_knn`.

    Returns:
        (N, N) float32 CSR matrix with sorted indices holding every pair whose distance is
        below 1 (explicit zeros kept); pairs not stored have distance exactly 1.0.
    """
    return mirror(jaccard_upper(features, k1, k2, knn_backend=knn_backend))


def jaccard_upper(features: ArrayLike, k1: int = 30, k2: int = 6, *, knn_backend: str = "torch",
                  eps: Optional[float] = None) -> sp.csr_matrix:
    """The upper triangle (diagonal included) of :func:`jaccard_distance`.

    With ``eps`` (a Python float below 1) only pairs with ``dist <= eps`` are kept, the
    comparison sklearn's DBSCAN makes; this is all DBSCAN needs, and most far pairs are
    then never summed. Their stored values are the distance or an upper bound of it, all
    <= eps (see :func:`_jaccard_upper_within`)."""
    v, _ = expanded_neighbourhoods(features, k1, k2, knn_backend=knn_backend)
    return upper_from_weights(v, eps)


def expanded_neighbourhoods(features: ArrayLike, k1: int = 30, k2: int = 6, *,
                            knn_backend: str = "torch") -> Tuple[sp.csr_matrix, np.ndarray]:
    """Steps 1-2 of the module doc: V' (N, N) float32 CSR with sorted indices, and the
    initial ranking R0 (N, min(k1, N)) int64 it was built from."""
    k1 = check_positive_int(k1, "k1")
    k2 = check_positive_int(k2, "k2")
    x = as_features(features)
    timer = time.perf_counter()
    knn_dist, ranking = exact_knn(x, k1, backend=knn_backend)
    t_knn = time.perf_counter()
    v = kreciprocal.expanded_weights(ranking, k1, k2,
                         lambda rows, cols: _softmax_weights(x, rows, cols, knn_dist, ranking))
    logger.debug("jaccard: N=%d knn %.2fs, sets+weights+QE %.2fs (V' nnz/row %.1f)", x.shape[0],
                 t_knn - timer, time.perf_counter() - t_knn, v.nnz / x.shape[0])
    return v, ranking


def upper_from_weights(v: sp.csr_matrix, eps: Optional[float] = None) -> sp.csr_matrix:
    """Step 3 of the module doc on V' from :func:`expanded_neighbourhoods`: the upper triangle
    of all distances below 1, or with ``eps`` only the pairs within eps (see :func:`jaccard_upper`)."""
    timer = time.perf_counter()
    upper = _jaccard_upper(v) if eps is None else _jaccard_upper_within(v, eps)
    logger.debug("jaccard: min-sums %.2fs (stored upper nnz/row %.1f)", time.perf_counter() - timer,
                 upper.nnz / max(1, v.shape[0]))
    return upper


def _softmax_weights(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                     knn_dist: np.ndarray, ranking: np.ndarray) -> np.ndarray:
    """softmax_j(-(2 - 2<x_i, x_j>)) over each row's expansion set, float32 (nnz,).

    Distances already known from the kNN are reused; the others are computed on the
    features' device by :func:`_sampled_distances`."""
    n, k = ranking.shape
    nnz = rows.shape[0]
    d = np.empty(nnz, dtype=np.float32)
    if nnz == 0:
        return d
    known_key = (np.arange(n)[:, None] * n + ranking).ravel()
    order = np.argsort(known_key)
    known_key = known_key[order]
    key = rows * n + cols
    pos = np.minimum(np.searchsorted(known_key, key), known_key.shape[0] - 1)
    found = known_key[pos] == key
    d[found] = knn_dist.ravel()[order[pos[found]]]
    missing = np.flatnonzero(~found)
    if missing.size:
        d[missing] = _sampled_distances(x, rows[missing], cols[missing])
    counts = np.bincount(rows, minlength=n)
    starts = counts_to_indptr(counts)[:-1][counts > 0]
    counts = counts[counts > 0]
    neg = -d
    shifted = neg - np.repeat(np.maximum.reduceat(neg, starts), counts)
    e = np.exp(shifted, dtype=np.float32)
    return e / np.repeat(np.add.reduceat(e, starts), counts)


def _sampled_distances(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """2 - 2<x_i, x_j> for the pairs (rows, cols) sorted by row, float32.

    A sampled matrix product (SDDMM): only the requested entries of X X^T are formed,
    without gathering copies of the rows."""
    n = x.shape[0]
    crow = torch.from_numpy(counts_to_indptr(np.bincount(rows, minlength=n)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow.to(x.device), torch.from_numpy(cols).to(x.device),
                                          torch.zeros(rows.size, dtype=x.dtype, device=x.device),
                                          size=(n, n), check_invariants=False)
        with torch.inference_mode():
            dots = torch.sparse.sampled_addmm(pattern, x, x.t(), beta=0.0).values()
    return (2.0 - 2.0 * dots).cpu().numpy()


def _distance(m: np.ndarray) -> np.ndarray:
    """The clustering reference's float32 max(0, 1 - m / (2 - m)) (negatives clipped)."""
    return np.maximum(kreciprocal.overlap_distance(m), np.float32(0.0))


def _stack_rows(n: int, parts: List[sp.csr_matrix]) -> sp.csr_matrix:
    """Row chunks (float32 CSR, sorted indices) stacked into one (N, N) matrix."""
    if not parts:
        return sp.csr_matrix((n, n), dtype=np.float32)
    out = sp.vstack(parts, format="csr")
    out.has_sorted_indices = True
    return out


def _kept(sums: sp.csr_matrix, local_rows: np.ndarray, keep: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
    """The entries of a chunk selected by ``keep``, with ``data`` as values, sorted indices
    (``local_rows``: the chunk row of every stored entry)."""
    counts = np.bincount(local_rows[keep], minlength=sums.shape[0])
    out = sp.csr_matrix((data[keep].astype(np.float32, copy=False), sums.indices[keep],
                         counts_to_indptr(counts)), shape=sums.shape)
    out.sort_indices()
    return out


def _jaccard_upper(v: sp.csr_matrix) -> sp.csr_matrix:
    """Weighted Jaccard distance of the rows of V' for all pairs j >= i below 1.

    Returns:
        (N, N) float32 upper-triangular CSR with sorted indices, explicit zeros kept."""
    index = kreciprocal.ColumnIndex(v)
    begin, fan = index.tails()

    def work(start: int, stop: int) -> sp.csr_matrix:
        sums = kreciprocal.min_sums(index, begin, fan, start, stop)
        dist = _distance(sums.data)
        return _kept(sums, kreciprocal.entry_rows(sums.indptr), dist < np.float32(1.0), dist)
    chunks = kreciprocal.row_chunks(index.row_work(fan), _SCRATCH_ELEMENTS)
    return _stack_rows(v.shape[0], kreciprocal.map_chunks(work, chunks))


def _jaccard_upper_within(v: sp.csr_matrix, eps: float) -> sp.csr_matrix:
    """The pairs j >= i with Jaccard distance <= eps, found without summing most far pairs.

    dist <= eps needs m_ij >= tau = 2(1 - eps) / (2 - eps). Each row i is split into a
    prefix (its largest entries) and a rest of mass S_i < tau / 2. Summing the minima over
    the prefix columns only gives a lower bound m_lo <= m (float32 sums of non-negative terms
    only grow when terms are added) and m <= m_lo + S_i. So a pair is a neighbour when
    dist(m_lo) <= eps, is not one when m_lo + S_i is below tau by more than the float32
    rounding of the sums, and only the few pairs in between get their exact m. A pair that
    shares no prefix column of i has m <= S_i < tau and never appears.

    Returns:
        (N, N) float32 upper-triangular CSR with sorted indices holding exactly the pairs
        with dist <= eps; each value is the distance or an upper bound of it, all <= eps."""
    n = v.shape[0]
    index = kreciprocal.ColumnIndex(v)
    begin, all_fan = index.tails()
    tau = 2.0 * (1.0 - eps) / (2.0 - eps)
    # Prefix: entries in descending value order while the mass from them on is >= tau / 2.
    # Row-major, values descending (float32 bits of positive values sort like the values).
    order = np.argsort((index.entry_rows.astype(np.int64) << 32) | (0x7FFFFFFF - index.values.view(np.int32)))
    mass = index.values[order].astype(np.float64)
    running = np.cumsum(mass)
    row_last = np.repeat(index.row_ptr[1:] - 1, np.diff(index.row_ptr))
    from_here = running[row_last] - running + mass                  # mass of the row from here on
    use = np.zeros(order.size, dtype=bool)
    use[order] = from_here >= tau / 2
    rest = np.bincount(index.entry_rows, weights=np.where(use, 0.0, index.values), minlength=n)
    longest = int(np.diff(index.row_ptr).max()) if n else 0
    slack = 4.0 * longest * 2.0 ** -24 + 1e-6        # float32 rounding of sums of <= longest terms
    fan = np.where(use, all_fan, 0)

    def work(start: int, stop: int) -> sp.csr_matrix:
        sums = kreciprocal.min_sums(index, begin, fan, start, stop)
        local_rows = kreciprocal.entry_rows(sums.indptr)
        rows = start + local_rows
        dist = _distance(sums.data)
        near = dist <= eps
        unsure = np.flatnonzero(~near & (sums.data + rest[rows] >= tau - slack))
        exact = _distance(_exact_min_sums(v, rows[unsure], sums.indices[unsure]))
        near[unsure] = exact <= eps
        dist[unsure] = exact
        return _kept(sums, local_rows, near, dist)
    chunks = kreciprocal.row_chunks(index.row_work(fan), _SCRATCH_ELEMENTS // 4)
    return _stack_rows(n, kreciprocal.map_chunks(work, chunks))


def _exact_min_sums(v: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """m for the given pairs, summed in float32 over the shared columns in ascending order
    (the same arithmetic as :func:`isereid.kreciprocal.min_sums`)."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.float32)
    minima = v[rows].minimum(v[cols])
    return np.asarray(minima @ np.ones(v.shape[1], dtype=np.float32), dtype=np.float32).ravel()


def mirror(upper: sp.csr_matrix) -> sp.csr_matrix:
    """The symmetric matrix from its upper triangle (diagonal included), explicit zeros kept.

    The strict lower part is a structural transpose (scipy's CSR->CSC conversion copies every
    stored entry, zeros included, and yields sorted indices); row i of the result is row i of
    the lower part (columns < i) followed by row i of the upper part (columns >= i)."""
    n = upper.shape[0]
    u_ptr = upper.indptr.astype(np.int64)
    u_rows = kreciprocal.entry_rows(u_ptr)
    strict = upper.indices != u_rows
    s_ptr = counts_to_indptr(np.bincount(u_rows[strict], minlength=n))
    lower = sp.csr_matrix((upper.data[strict], upper.indices[strict], s_ptr), shape=(n, n)).T.tocsr()
    l_ptr = lower.indptr.astype(np.int64)
    l_count, u_count = np.diff(l_ptr), np.diff(u_ptr)
    ptr = l_ptr + u_ptr
    data = np.empty(ptr[-1], dtype=np.float32)
    indices = np.empty(ptr[-1], dtype=upper.indices.dtype)
    l_dest = np.repeat(ptr[:-1] - l_ptr[:-1], l_count) + np.arange(l_ptr[-1])
    u_dest = np.repeat(ptr[:-1] + l_count - u_ptr[:-1], u_count) + np.arange(u_ptr[-1])
    data[l_dest], indices[l_dest] = lower.data, lower.indices
    data[u_dest], indices[u_dest] = upper.data, upper.indices
    out = sp.csr_matrix((data, indices, ptr), shape=(n, n))
    out.has_sorted_indices = True
    return out
