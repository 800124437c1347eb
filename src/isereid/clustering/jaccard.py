"""Sparse k-reciprocal Jaccard distance (ALGORITHM.md §4.2), equal to the dense reference.

Steps, all vectorised (loops run over chunks of rows, never over samples), k = min(k1, N):

1. R0 = exact top-k neighbours including self (:func:`exact_knn`); only k columns exist, so
   the reference's "k1 + 1" slices really hold k1 entries (parity trap 1).
2. kr(i, m): the members j of R0[i, :m+1] whose own row R0[j, :m+1] contains i, in R0 order.
   R(i) = kr(i, k1), Rh(i) = kr(i, round(k1 / 2)).
3. Expansion: E(i) = sorted unique of R(i) and every Rh(c), c in R(i) (i included), with
   |Rh(c) ∩ R(i)| > 2/3 |Rh(c)| (strict); the counts come from one sparse product R @ Rh^T.
4. V[i, E(i)] = softmax(-(2 - 2<x_i, x_j>)) in float32, a CSR matrix; distances not known
   from the kNN come from a sampled matrix product on the features' device.
5. Query expansion (k2 != 1): V'[i] = mean of the rows V[R0[i, :k2]], a sparse product.
6. m_ij = sum_k min(V'[i, k], V'[j, k]); dist = max(0, 1 - m / (2 - m)) in float32. The sums
   are a sparse product over the inverted index of V' (see :func:`_upper_min_sums`), added in
   float32 in the reference's order, so they equal its loop to the last bit.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from .knn import ArrayLike, as_features, check_positive_int, exact_knn

logger = logging.getLogger("isereid")

T = TypeVar("T")

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
    comparison sklearn's DBSCAN makes; this is all DBSCAN needs, and most far pairs are
    then never summed. Their stored values are the distance or an upper bound of it, all
    <= eps (see :func:`_jaccard_upper_within`)."""
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
    expanded = _expanded_sets(full, half)
    weights = _softmax_weights(x, _entry_rows(expanded.indptr), expanded.indices.astype(np.int64),
                               knn_dist, ranking)
    v = sp.csr_matrix((weights, expanded.indices, expanded.indptr), shape=(n, n))
    if k2 != 1:
        v = _query_expansion(v, ranking[:, :min(k2, k)])
    t_v = time.perf_counter()
    upper = _jaccard_upper(v) if eps is None else _jaccard_upper_within(v, eps)
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


def _entry_rows(indptr: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """The row of every stored entry of a CSR matrix with this ``indptr``."""
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=dtype), np.diff(indptr))


def _set_matrix(sets: Tuple[np.ndarray, np.ndarray]) -> sp.csr_matrix:
    """The sets of :func:`_reciprocal_sets` as an (N, N) binary float32 CSR matrix."""
    forward, mask = sets
    n = forward.shape[0]
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    return sp.csr_matrix((np.ones(indptr[-1], dtype=np.float32), forward[mask], indptr), shape=(n, n))


def _expanded_sets(full: Tuple[np.ndarray, np.ndarray],
                   half: Tuple[np.ndarray, np.ndarray]) -> sp.csr_matrix:
    """The expanded sets E(i) as the pattern of an (N, N) CSR matrix with sorted indices.

    With R and Rh the set matrices, (R @ Rh^T)[i, c] = |R(i) ∩ Rh(c)|; the candidates
    c in R(i) whose count exceeds 2/3 |Rh(c)| are accepted, and E is the pattern of
    R + Accepted @ Rh."""
    reciprocal, half_sets = _set_matrix(full), _set_matrix(half)
    n = reciprocal.shape[0]
    shared = reciprocal.multiply(reciprocal @ half_sets.T).tocoo()      # c in R(i), with counts
    accepted = shared.data > (2.0 / 3.0) * np.diff(half_sets.indptr)[shared.col]
    chosen = sp.csr_matrix((np.ones(int(accepted.sum()), dtype=np.float32),
                            (shared.row[accepted], shared.col[accepted])), shape=(n, n))
    expanded = (reciprocal + chosen @ half_sets).tocsr()
    expanded.sum_duplicates()  # canonical: sorted, unique columns per row
    return expanded


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
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
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
    crow = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow.to(x.device), torch.from_numpy(cols).to(x.device),
                                          torch.zeros(rows.size, dtype=x.dtype, device=x.device),
                                          size=(n, n), check_invariants=False)
        with torch.inference_mode():
            dots = torch.sparse.sampled_addmm(pattern, x, x.t(), beta=0.0).values()
    return (2.0 - 2.0 * dots).cpu().numpy()


def _query_expansion(v: sp.csr_matrix, top: np.ndarray) -> sp.csr_matrix:
    """V'[i] = mean of V[top[i]] (float32 sum in ranking order, then divided), sorted CSR."""
    n, q = top.shape
    avg = sp.csr_matrix((np.ones(n * q, dtype=np.float32), top.ravel(), np.arange(0, n * q + 1, q)),
                        shape=(n, n))
    out = (avg @ v).tocsr()
    out.data /= np.float32(q)
    out.sort_indices()
    return out


class _ColumnIndex:
    """The inverted index of V' (its CSC layout) and where each CSR entry sits in it.

    Within a column the entries are ordered by row, so the entries of column k that belong
    to rows j >= i are the ones from the position of (i, k) on."""

    def __init__(self, v: sp.csr_matrix):
        n = v.shape[0]
        self.row_ptr = v.indptr.astype(np.int64)
        self.entry_rows = _entry_rows(self.row_ptr, np.int32)
        self.entry_cols = v.indices.astype(np.int64)
        self.values = v.data
        # scipy's CSR -> CSC conversion keeps rows ascending within each column; carrying
        # the CSR positions as data gives the permutation.
        csc = sp.csr_matrix((np.arange(v.nnz, dtype=np.int64), v.indices, v.indptr), shape=v.shape).tocsc()
        order, col_ptr = csc.data, csc.indptr.astype(np.int64)
        self.col_rows = csc.indices.astype(np.int32)
        self.col_values = self.values[order]
        self.csc_pos = np.empty_like(order)
        self.csc_pos[order] = np.arange(order.size)
        #: (nnz,) entries j >= i of the column of each entry (i, k), itself included.
        self.fan = col_ptr[self.entry_cols + 1] - self.csc_pos


def _row_chunks(index: _ColumnIndex, fan: np.ndarray, budget: int) -> List[Tuple[int, int]]:
    """Consecutive row ranges [start, stop) whose summed ``fan`` stays near ``budget``."""
    n = index.row_ptr.shape[0] - 1
    work = np.concatenate([[0], np.cumsum(np.bincount(index.entry_rows, weights=fan, minlength=n))])
    chunks, start = [], 0
    while start < n:
        stop = int(np.searchsorted(work, work[start] + budget, side="right")) - 1
        stop = min(n, max(stop, start + 1))
        chunks.append((start, stop))
        start = stop
    return chunks


def _upper_min_sums(index: _ColumnIndex, fan: np.ndarray, start: int, stop: int) -> sp.csr_matrix:
    """m_ij = sum_k min(V'[i, k], V'[j, k]) for the rows i in [start, stop) and all j >= i.

    Only the entries (i, k) with ``fan > 0`` contribute (``fan`` is ``index.fan`` with the
    unused entries set to 0), so with a mask the sums are partial. The sum is a sparse product
    A @ B: row e of B holds, for one entry e = (i, k), the values min(V'[i, k], V'[j, k]) of
    the rows j >= i of column k, and A adds the rows e of each row i in column order. scipy
    accumulates in float32 in that order, which is exactly the reference's
    ``temp_min[others] += minimum(...)`` loop over the columns of row i.

    Returns:
        (stop - start, N) float32 CSR of sums, indices unsorted within rows.
    """
    n = index.row_ptr.shape[0] - 1
    lo, hi = index.row_ptr[start], index.row_ptr[stop]
    entries = lo + np.flatnonzero(fan[lo:hi])
    entry_fan = fan[entries]
    b_ptr = np.concatenate([[0], np.cumsum(entry_fan)])
    pos = np.repeat(index.csc_pos[entries] - b_ptr[:-1], entry_fan) + np.arange(b_ptr[-1])
    b = sp.csr_matrix((np.minimum(np.repeat(index.values[entries], entry_fan), index.col_values[pos]),
                       index.col_rows[pos], b_ptr), shape=(entries.size, n))
    a_ptr = np.concatenate([[0], np.cumsum(np.bincount(index.entry_rows[entries] - start, minlength=stop - start))])
    a = sp.csr_matrix((np.ones(entries.size, dtype=np.float32), np.arange(entries.size), a_ptr),
                      shape=(stop - start, entries.size))
    return (a @ b).tocsr()


def _map_chunks(work: Callable[[int, int], T], chunks: List[Tuple[int, int]]) -> List[T]:
    """``work(start, stop)`` for every chunk, in order, on torch's number of CPU threads
    (numpy and scipy's sparse kernels release the GIL)."""
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        return [work(start, stop) for start, stop in chunks]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda chunk: work(*chunk), chunks))


def _distance(m: np.ndarray) -> np.ndarray:
    """The reference's float32 max(0, 1 - m / (2 - m))."""
    return np.maximum(np.float32(1.0) - m / (np.float32(2.0) - m), np.float32(0.0))


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
                         np.concatenate([[0], np.cumsum(counts)])), shape=sums.shape)
    out.sort_indices()
    return out


def _jaccard_upper(v: sp.csr_matrix) -> sp.csr_matrix:
    """Weighted Jaccard distance of the rows of V' for all pairs j >= i below 1.

    Returns:
        (N, N) float32 upper-triangular CSR with sorted indices, explicit zeros kept."""
    index = _ColumnIndex(v)

    def work(start: int, stop: int) -> sp.csr_matrix:
        sums = _upper_min_sums(index, index.fan, start, stop)
        dist = _distance(sums.data)
        return _kept(sums, _entry_rows(sums.indptr), dist < np.float32(1.0), dist)
    return _stack_rows(v.shape[0], _map_chunks(work, _row_chunks(index, index.fan, _SCRATCH_ELEMENTS)))


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
    index = _ColumnIndex(v)
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
    fan = np.where(use, index.fan, 0)

    def work(start: int, stop: int) -> sp.csr_matrix:
        sums = _upper_min_sums(index, fan, start, stop)
        local_rows = _entry_rows(sums.indptr)
        rows = start + local_rows
        dist = _distance(sums.data)
        near = dist <= eps
        unsure = np.flatnonzero(~near & (sums.data + rest[rows] >= tau - slack))
        exact = _distance(_exact_min_sums(v, rows[unsure], sums.indices[unsure]))
        near[unsure] = exact <= eps
        dist[unsure] = exact
        return _kept(sums, local_rows, near, dist)
    return _stack_rows(n, _map_chunks(work, _row_chunks(index, fan, _SCRATCH_ELEMENTS // 4)))


def _exact_min_sums(v: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """m for the given pairs, summed in float32 over the shared columns in ascending order
    (the same arithmetic as :func:`_upper_min_sums`)."""
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
    u_rows = _entry_rows(u_ptr)
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
