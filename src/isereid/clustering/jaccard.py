"""Sparse k-reciprocal Jaccard distance (ALGORITHM.md §4.2), equal to the dense reference.

Steps, all vectorised over (N, k) index arrays (k = min(k1, N)):

1. R0 = exact top-k neighbours including self (:func:`exact_knn`); only k columns exist, so
   the reference's "k1 + 1" slices really hold k1 entries (parity trap 1).
2. kr(i, m): the members j of R0[i, :m+1] whose own row R0[j, :m+1] contains i, in R0 order.
   R(i) = kr(i, k1), Rh(i) = kr(i, round(k1 / 2)).
3. Expansion: E(i) = sorted unique of R(i) and every Rh(c), c in R(i) (i included), with
   |Rh(c) ∩ R(i)| > 2/3 |Rh(c)| (strict).
4. V[i, E(i)] = softmax(-(2 - 2<x_i, x_j>)) in float32, a CSR matrix.
5. Query expansion (k2 != 1): V'[i] = mean of the rows V[R0[i, :k2]], a sparse product.
6. m_ij = sum_k min(V'[i, k], V'[j, k]); dist = max(0, 1 - m / (2 - m)) in float32.

Memory is O(N * k) plus O(chunk * N) scratch: V and V' hold about k * k2 entries per row and
the Jaccard step works on row chunks, expanding each entry (i, k) of V' against the column k
(an inverted index, like the reference) and summing the minima per pair. Only pairs sharing a
column of V' have a distance below 1, so the result stores exactly those, explicit zeros
included; every pair not stored has distance 1.0.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from .knn import ArrayLike, as_features, check_positive_int, exact_knn

logger = logging.getLogger("isereid")

#: Scratch budget (elements) for the chunked steps.
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
    comparison sklearn's DBSCAN makes; this is all DBSCAN needs and skips storing the far
    pairs, which are the vast majority."""
    k1 = check_positive_int(k1, "k1")
    k2 = check_positive_int(k2, "k2")
    x = as_features(features)
    n = x.shape[0]
    timer = time.perf_counter()
    knn_dist, ranking = exact_knn(x, k1, backend=knn_backend)
    t_knn = time.perf_counter()
    k = ranking.shape[1]
    full = _reciprocal_sets(ranking, min(k1 + 1, k))
    half = _reciprocal_sets(ranking, min(int(np.around(k1 / 2)) + 1, k))
    rows, cols = _expanded_sets(ranking, full, half)
    weights = _softmax_weights(x, rows, cols, knn_dist, ranking)
    v = sp.csr_matrix((weights, cols, np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])),
                      shape=(n, n))
    if k2 != 1:
        v = _query_expansion(v, ranking[:, :min(k2, k)])
    t_v = time.perf_counter()
    upper = _jaccard_upper(v, eps)
    logger.debug("jaccard: N=%d knn %.2fs, sets+weights+QE %.2fs (V' nnz/row %.1f), jaccard %.2fs "
                 "(stored upper nnz/row %.1f)", n, t_knn - timer, t_v - t_knn, v.nnz / n,
                 time.perf_counter() - t_v, upper.nnz / n)
    return upper


def _reciprocal_sets(ranking: np.ndarray, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """kr(i, .) for every i with forward list R0[i, :m].

    Returns (forward (N, m) int64, mask (N, m) bool): the set of row i is
    forward[i][mask[i]], in ranking order."""
    n = ranking.shape[0]
    forward = np.ascontiguousarray(ranking[:, :m])
    mask = np.empty((n, m), dtype=bool)
    step = max(1, _SCRATCH_ELEMENTS // (m * m))
    for start in range(0, n, step):
        stop = min(n, start + step)
        backward = forward[forward[start:stop]]  # (c, m, m): the rows of each forward member
        me = np.arange(start, stop)[:, None, None]
        mask[start:stop] = (backward == me).any(axis=2)
    return forward, mask


def _expanded_sets(ranking: np.ndarray, full: Tuple[np.ndarray, np.ndarray],
                   half: Tuple[np.ndarray, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """The expanded sets E(i) as (rows, cols) int64 arrays sorted by (row, col)."""
    n = ranking.shape[0]
    fwd, fmask = full
    hfwd, hmask = half
    hsize = hmask.sum(axis=1)
    # Per row chunk: a boolean row-membership table of R(i) answers "r in R(i)" in O(1).
    step = max(1, min(n, _SCRATCH_ELEMENTS // n))
    member = np.zeros((min(step, n), n), dtype=bool)
    keys = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        r_rows, r_pos = np.nonzero(fmask[start:stop])          # local row, position in fwd
        r_cols = fwd[start:stop][r_rows, r_pos]                  # members c of R(i), in order
        member[r_rows, r_cols] = True
        cand = hfwd[r_cols]                                      # (P, mh) Rh(c) candidates
        valid = hmask[r_cols]
        inside = member[r_rows[:, None], cand] & valid
        accepted = inside.sum(axis=1) > (2.0 / 3.0) * hsize[r_cols]
        member[r_rows, r_cols] = False
        acc_rows = np.broadcast_to(r_rows[accepted][:, None], cand[accepted].shape)[valid[accepted]]
        acc_cols = cand[accepted][valid[accepted]]
        local = np.concatenate([r_rows, acc_rows]) * n + np.concatenate([r_cols, acc_cols])
        keys.append(np.unique(local) + start * n)
    key = np.concatenate(keys)
    return key // n, key % n


def _softmax_weights(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                     knn_dist: np.ndarray, ranking: np.ndarray) -> np.ndarray:
    """softmax_j(-(2 - 2<x_i, x_j>)) over each row's expansion set, float32 (nnz,).

    Distances already known from the kNN are reused; the others are computed as dot products
    of gathered rows on the features' device."""
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
        step = max(1, (1 << 22) // x.shape[1])
        with torch.inference_mode():
            for start in range(0, missing.size, step):
                sel = missing[start:start + step]
                a = x[torch.from_numpy(rows[sel]).to(x.device)].unsqueeze(1)   # (c, 1, D)
                b = x[torch.from_numpy(cols[sel]).to(x.device)].unsqueeze(2)   # (c, D, 1)
                d[sel] = (2.0 - 2.0 * torch.bmm(a, b).flatten()).cpu().numpy()
    counts = np.bincount(rows, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
    counts = counts[counts > 0]
    neg = -d
    shifted = neg - np.repeat(np.maximum.reduceat(neg, starts), counts)
    e = np.exp(shifted, dtype=np.float32)
    return e / np.repeat(np.add.reduceat(e, starts), counts)


def _query_expansion(v: sp.csr_matrix, top: np.ndarray) -> sp.csr_matrix:
    """V'[i] = mean of V[top[i]] (float32 sum in ranking order, then divided), sorted CSR."""
    n, q = top.shape
    avg = sp.csr_matrix((np.ones(n * q, dtype=np.float32), top.ravel(), np.arange(0, n * q + 1, q)),
                        shape=(n, n))
    out = (avg @ v).tocsr()
    out.data /= np.float32(q)
    out.sort_indices()
    return out


def _jaccard_upper(v: sp.csr_matrix, eps: Optional[float] = None) -> sp.csr_matrix:
    """Weighted Jaccard distance of the rows of V (rows sum to 1) for pairs j >= i.

    m is symmetric, so only pairs j >= i are computed: the entry (i, k) of V meets the part
    of column k's list (sorted by row) from its own position on. Per chunk of rows the minima
    are summed into a (chunk, N - start) float64 scratch. Keeps dist < 1, or dist <= eps.

    Returns:
        (N, N) float32 upper-triangular CSR with sorted indices, explicit zeros kept."""
    n = v.shape[0]
    row_ptr = v.indptr.astype(np.int64)
    row_cols = v.indices.astype(np.int64)
    row_vals = v.data
    # The inverted index (CSC) and the CSC position of every CSR entry.
    order = np.argsort(row_cols, kind="stable")
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_cols, minlength=n))])
    entry_rows = np.repeat(np.arange(n), np.diff(row_ptr))
    col_rows = entry_rows[order]
    col_vals = row_vals[order]
    csc_pos = np.empty_like(order)
    csc_pos[order] = np.arange(order.size)

    index_dtype = np.int32 if n < 2 ** 31 - 1 else np.int64
    step = max(1, min(n, _SCRATCH_ELEMENTS // n))
    data_parts, index_parts, counts = [], [], np.zeros(n, dtype=np.int64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        width = n - start                                         # columns j in [start, n)
        lo, hi = row_ptr[start], row_ptr[stop]
        first = csc_pos[lo:hi]                                    # own position in column k
        fan = col_ptr[row_cols[lo:hi] + 1] - first                # entries j >= i in column k
        total = int(fan.sum())
        pos = np.repeat(first - (np.cumsum(fan) - fan), fan) + np.arange(total)
        mins = np.minimum(np.repeat(row_vals[lo:hi], fan), col_vals[pos])
        pair = np.repeat((entry_rows[lo:hi] - start) * width - start, fan) + col_rows[pos]
        m = np.bincount(pair, weights=mins, minlength=(stop - start) * width)
        nz = np.flatnonzero(m)
        m32 = m[nz].astype(np.float32)
        dist = np.maximum(np.float32(1.0) - m32 / (np.float32(2.0) - m32), np.float32(0.0))
        keep = dist < np.float32(1.0)
        if eps is not None:
            keep &= dist <= eps
        nz, dist = nz[keep], dist[keep]
        data_parts.append(dist)
        index_parts.append((nz % width + start).astype(index_dtype))
        counts[start:stop] = np.bincount(nz // width, minlength=stop - start)
    upper = sp.csr_matrix((np.concatenate(data_parts), np.concatenate(index_parts),
                           np.concatenate([[0], np.cumsum(counts)])), shape=(n, n))
    upper.has_sorted_indices = True
    return upper


def mirror(upper: sp.csr_matrix) -> sp.csr_matrix:
    """The symmetric matrix from its upper triangle (diagonal included), explicit zeros kept.

    The strict lower part is a structural transpose (scipy's CSR->CSC conversion copies every
    stored entry, zeros included, and yields sorted indices); row i of the result is row i of
    the lower part (columns < i) followed by row i of the upper part (columns >= i)."""
    n = upper.shape[0]
    u_ptr = upper.indptr.astype(np.int64)
    u_rows = np.repeat(np.arange(n), np.diff(u_ptr))
    strict = upper.indices != u_rows
    s_ptr = np.concatenate([[0], np.cumsum(np.bincount(u_rows[strict], minlength=n))])
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
