"""The k-reciprocal core shared by pseudo-labelling and re-ranking (Zhong et al., CVPR 2017).

:func:`isereid.clustering.jaccard_distance` and :func:`isereid.evaluation.re_ranking` both turn
an initial ranking R0 (N, W) into a sparse weight matrix V' and compare its rows with a
weighted Jaccard distance. They differ in how R0 and the weights are obtained and in which
pairs they need; the steps in between live here (docs/method.md#jaccard):

1. kr(i, m): the members j of R0[i, :m] whose own list R0[j, :m] contains i, in R0 order
   (:func:`reciprocal_mask`). R(i) uses m = k1 + 1 and Rh(i) m = round(k1 / 2) + 1 (half to
   even), both capped at the W columns of R0 (:func:`set_widths`): a ranking with only k1
   columns gives the clustering reference's "k1 + 1 is really k1"
   (docs/reference_quirks.md#q1).
2. E(i) = sorted unique of R(i) and of every Rh(c), c in R(i) (i itself included), with
   |Rh(c) ∩ R(i)| > 2/3 |Rh(c)| (strict) (:func:`expanded_sets`).
3. V[i, E(i)] = the caller's weights, e.g. a softmax over E(i) (:func:`expanded_weights`).
4. Unless k2 == 1: V'[i] = mean of the rows V[R0[i, :k2]], summed in float32 in ranking
   order and then divided, as numpy's mean (:func:`query_expansion`).
5. m_ij = sum_k min(V'[i, k], V'[j, k]) over the shared columns, added in float32 in
   ascending k exactly as the reference's inverted-index loop (:func:`min_sums`), and
   dist = 1 - m / (2 - m) (:func:`overlap_distance`).

Memory is O(N * k): V and V' hold about k * k2 entries per row, and the blocked steps work on
row chunks of bounded size (loops run over chunks, never over samples). Pure array code on
numpy, scipy.sparse and torch (only for its CPU thread count); no models, data or files.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from .utils import counts_to_indptr

T = TypeVar("T")

#: Default scratch budget (elements) of one chunk of the blocked steps.
SCRATCH_ELEMENTS = 1 << 22

#: ``weigh(rows, cols)`` -> (nnz,) float32 weights of the entries (rows[e], cols[e]) of E,
#: rows ascending and the columns of each row ascending (both int64).
Weigh = Callable[[np.ndarray, np.ndarray], np.ndarray]


def entry_rows(indptr: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """The row of every stored entry of a CSR matrix with this ``indptr`` (nnz,)."""
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=dtype), np.diff(indptr))


def set_widths(k1: int, columns: int) -> Tuple[int, int]:
    """Forward-list lengths (of R(i), of Rh(i)): k1 + 1 and round(k1 / 2) + 1, half to even
    (``np.around``), each capped at the ``columns`` of the ranking."""
    return min(k1 + 1, columns), min(int(np.around(k1 / 2)) + 1, columns)


def reciprocal_mask(ranking: np.ndarray, width: int,
                    block_elements: int = SCRATCH_ELEMENTS) -> np.ndarray:
    """Which members of each forward list ``ranking[i, :width]`` are k-reciprocal.

    ranking: (N, >= width) int64. Returns (N, width) bool: j = ranking[i, a] is kept when
    ranking[j, :width] contains i; the set of row i is ``ranking[i, :width][mask[i]]``."""
    n = ranking.shape[0]
    forward = np.ascontiguousarray(ranking[:, :width])
    mask = np.empty((n, width), dtype=bool)
    step = max(1, block_elements // (width * width))
    for start in range(0, n, step):
        stop = min(n, start + step)
        backward = forward[forward[start:stop]]  # (C, width, width): the lists of each member
        mask[start:stop] = (backward == np.arange(start, stop)[:, None, None]).any(axis=2)
    return mask


def reciprocal_sets(ranking: np.ndarray, width: int) -> sp.csr_matrix:
    """The k-reciprocal sets of forward length ``width`` as an (N, N) binary float32 CSR."""
    n = ranking.shape[0]
    forward = ranking[:, :width]
    mask = reciprocal_mask(ranking, width)
    indptr = counts_to_indptr(mask.sum(axis=1))
    return sp.csr_matrix((np.ones(indptr[-1], dtype=np.float32), forward[mask], indptr), shape=(n, n))


def expanded_sets(ranking: np.ndarray, k1: int) -> sp.csr_matrix:
    """The expanded sets E(i) as an (N, N) float32 CSR pattern (sorted unique columns, values 1).

    With R and Rh the set matrices, (R @ Rh^T)[i, c] = |R(i) ∩ Rh(c)|; the candidates c in
    R(i) whose count exceeds 2/3 |Rh(c)| are accepted, and E is the pattern of
    R + Accepted @ Rh (one sparse product, no per-sample loop)."""
    width, half_width = set_widths(k1, ranking.shape[1])
    reciprocal, half_sets = reciprocal_sets(ranking, width), reciprocal_sets(ranking, half_width)
    n = reciprocal.shape[0]
    shared = reciprocal.multiply(reciprocal @ half_sets.T).tocoo()      # c in R(i), with counts
    accepted = shared.data > (2.0 / 3.0) * np.diff(half_sets.indptr)[shared.col]
    chosen = sp.csr_matrix((np.ones(int(accepted.sum()), dtype=np.float32),
                            (shared.row[accepted], shared.col[accepted])), shape=(n, n))
    expanded = (reciprocal + chosen @ half_sets).tocsr()
    expanded.sum_duplicates()  # canonical: sorted, unique columns per row
    expanded.data[:] = 1.0
    return expanded


def query_expansion(v: sp.csr_matrix, ranking: np.ndarray, k2: int) -> sp.csr_matrix:
    """V'[i] = mean of the rows V[ranking[i, :k2]] (float32 sum in ranking order, then divided
    by the count, as ``np.mean``), as CSR with sorted indices; ``v`` itself when k2 == 1.

    The list usually starts with i itself; with k2 == 1 the reference skips the step rather
    than copying row ranking[i, 0], which differs from i when exact duplicates exist."""
    if k2 == 1:
        return v
    return mean_rows(v, ranking[:, :min(k2, ranking.shape[1])])


def mean_rows(v: sp.csr_matrix, top: np.ndarray, valid: Optional[np.ndarray] = None) -> sp.csr_matrix:
    """Row i of the result = mean of the rows ``v[top[i]]`` (top: (N, Q) int64), summed in float32 in
    ``top`` order and divided by the count, as ``np.mean``; CSR with sorted indices. ``valid`` (N, Q)
    bool, optional: only those entries of each row count (every row needs at least one)."""
    n, q = top.shape
    if valid is None:
        avg = sp.csr_matrix((np.ones(n * q, dtype=np.float32), top.ravel(), np.arange(0, n * q + 1, q)),
                            shape=(n, n))
        out = (avg @ v).tocsr()
        out.data /= np.float32(q)
    else:
        counts = valid.sum(axis=1)
        avg = sp.csr_matrix((np.ones(int(counts.sum()), dtype=np.float32), top[valid], counts_to_indptr(counts)),
                            shape=(n, n))
        out = (avg @ v).tocsr()
        out.data /= np.repeat(counts, np.diff(out.indptr)).astype(np.float32)
    out.sort_indices()
    return out


def expanded_weights(ranking: np.ndarray, k1: int, k2: int, weigh: Weigh) -> sp.csr_matrix:
    """Steps 1-4 of the module doc: V' as an (N, N) float32 CSR with sorted indices.

    ranking: (N, W) int64 initial ranking (row i's nearest first, usually i itself);
    weigh: the caller's weights of the entries of E (see :data:`Weigh`)."""
    pattern = expanded_sets(ranking, k1)
    weights = weigh(entry_rows(pattern.indptr), pattern.indices.astype(np.int64))
    v = sp.csr_matrix((weights, pattern.indices, pattern.indptr), shape=pattern.shape)
    return query_expansion(v, ranking, k2)


class ColumnIndex:
    """The inverted index of V' (its CSC layout) and where each CSR entry sits in it.

    Within a column the entries are ordered by row, so the entries of column k that belong
    to rows j >= i are the ones from the position of (i, k) on. V' must have sorted indices."""

    def __init__(self, v: sp.csr_matrix):
        self.shape = v.shape
        self.row_ptr = v.indptr.astype(np.int64)
        self.entry_rows = entry_rows(self.row_ptr, np.int32)
        self.entry_cols = v.indices.astype(np.int64)
        self.values = v.data
        # scipy's CSR -> CSC conversion keeps rows ascending within each column; carrying
        # the CSR positions as data gives the permutation.
        csc = sp.csr_matrix((np.arange(v.nnz, dtype=np.int64), v.indices, v.indptr), shape=v.shape).tocsc()
        order = csc.data
        self.col_ptr = csc.indptr.astype(np.int64)
        self.col_rows = csc.indices.astype(np.int32)
        self.col_values = self.values[order]
        #: (nnz,) position of each CSR entry in the CSC layout.
        self.csc_pos = np.empty_like(order)
        self.csc_pos[order] = np.arange(order.size)

    def tails(self, first_row: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """For every stored entry (i, k), the CSC range [begin, begin + fan) of the entries of
        column k whose row j >= max(i, first_row) (the entry itself included when
        i >= first_row). Returns (begin, fan), (nnz,) int64 each."""
        begin = self.csc_pos
        if first_row > 0:
            below = np.bincount(self.entry_cols[self.entry_rows < first_row], minlength=self.shape[1])
            begin = np.maximum(begin, (self.col_ptr[:-1] + below)[self.entry_cols])
        return begin, self.col_ptr[self.entry_cols + 1] - begin

    def row_work(self, fan: np.ndarray) -> np.ndarray:
        """(N,) float64 summed ``fan`` of each row's entries: the size of its min-sum work."""
        return np.bincount(self.entry_rows, weights=fan, minlength=self.shape[0])


def row_chunks(row_work: np.ndarray, budget: int, max_rows: Optional[int] = None) -> List[Tuple[int, int]]:
    """Consecutive row ranges [start, stop) over ``len(row_work)`` rows whose summed work stays
    near ``budget`` (a row heavier than the budget is a chunk of its own), at most ``max_rows``
    rows each."""
    n = row_work.shape[0]
    work = counts_to_indptr(row_work)
    chunks, start = [], 0
    while start < n:
        stop = int(np.searchsorted(work, work[start] + budget, side="right")) - 1
        stop = min(n, max(stop, start + 1))
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        chunks.append((start, stop))
        start = stop
    return chunks


def min_sums(index: ColumnIndex, begin: np.ndarray, fan: np.ndarray, start: int, stop: int) -> sp.csr_matrix:
    """m_ij = sum_k min(V'[i, k], V'[j, k]) for the rows i in [start, stop) and the rows j of
    each entry's column range from :meth:`ColumnIndex.tails`.

    Only the entries (i, k) with ``fan > 0`` contribute (a caller may zero ``fan`` of unused
    entries, and the sums are then partial). The sum is a sparse product A @ B: row e of B
    holds, for one entry e = (i, k), the values min(V'[i, k], V'[j, k]) of the rows j in its
    range, and A adds the rows e of each row i in column order. scipy accumulates in float32
    in that order, which is exactly the reference's ``temp_min[others] += minimum(...)`` loop
    over the columns of row i.

    Returns:
        (stop - start, N) float32 CSR of sums, indices unsorted within rows.
    """
    n = index.shape[1]
    lo, hi = index.row_ptr[start], index.row_ptr[stop]
    entries = lo + np.flatnonzero(fan[lo:hi])
    entry_fan = fan[entries]
    b_ptr = counts_to_indptr(entry_fan)
    pos = np.repeat(begin[entries] - b_ptr[:-1], entry_fan) + np.arange(b_ptr[-1])
    b = sp.csr_matrix((np.minimum(np.repeat(index.values[entries], entry_fan), index.col_values[pos]),
                       index.col_rows[pos], b_ptr), shape=(entries.size, n))
    a_ptr = counts_to_indptr(np.bincount(index.entry_rows[entries] - start, minlength=stop - start))
    a = sp.csr_matrix((np.ones(entries.size, dtype=np.float32), np.arange(entries.size), a_ptr),
                      shape=(stop - start, entries.size))
    return (a @ b).tocsr()


def overlap_distance(m: np.ndarray) -> np.ndarray:
    """The Jaccard distance 1 - m / (2 - m) of min-sums ``m``, in m's precision (float32 in,
    float32 out, the reference's arithmetic). Not clipped: rounding can make it slightly
    negative for (near-)identical rows."""
    return np.float32(1.0) - m / (np.float32(2.0) - m)


def map_chunks(work: Callable[[int, int], T], chunks: List[Tuple[int, int]]) -> List[T]:
    """``work(start, stop)`` for every chunk, in order, on torch's number of CPU threads
    (numpy and scipy's sparse kernels release the GIL)."""
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        return [work(start, stop) for start, stop in chunks]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda chunk: work(*chunk), chunks))
