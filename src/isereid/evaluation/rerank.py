"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the reference test script applies it.

Reproduces the reference ``re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3)``
(docs/method.md#re-ranking, docs/reference_quirks.md#q29) without its (Q+G)x(Q+G) dense
matrices. With N = Q + G and the rows x_0..x_{N-1} = queries then gallery, the reference
computes:

1. ``A = d**2`` where d is the squared-Euclidean matrix; ``T[i, j] = A[i, j] / max_k A[k, i]``
   (each column divided by its maximum, then transposed; float32). Each row of T is a row
   of A over its own maximum.
2. ``R0`` = argsort of every row of T. Unlike the clustering reference, the ranking is a full
   argsort, so the k1 + 1 and round(k1/2) + 1 forward lists really have those lengths.
3. The k-reciprocal sets, their expansion and query expansion of :mod:`isereid.kreciprocal`
   on R0, with ``V[i, E(i)] = exp(-T[i, E(i)]) / sum exp(-T[i, E(i)])``.
4. For query rows: ``m = sum_k min(V'[i, k], V'[j, k])``, ``jaccard = 1 - m / (2 - m)``
   (not clipped at 0, unlike the clustering reference).
5. ``final = (1 - lambda) * jaccard + lambda * T``, restricted to query rows x gallery columns.

Here the rows of T are produced block by block from the features, keeping only the row
maxima and the first max(k1 + 1, k2) neighbours; V' is a scipy.sparse matrix with O(N k)
entries, and the overlaps of query rows with gallery rows come from the core's min-sum
product over V's shared columns (float32, in the reference's order). Peak memory is the
(Q, G) output plus blocks of a few hundred MB, instead of several (Q+G)^2 matrices.

Ties: the reference's ``np.argsort`` (quicksort) leaves the order of exactly equal distances
unspecified. Here neighbours are ordered by (distance, index); which of several candidates
tied exactly at the k-th place enters the list is unspecified (``torch.topk``). With
continuous features exact ties do not occur apart from duplicate images.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .. import kreciprocal
from ..utils import ArrayLike
from .ranking import query_gallery_tensors

# Elements of a dense (rows x N) distance block, and of the per-block pair and output arrays.
_DISTANCE_BLOCK_ELEMENTS = 1 << 24
_SET_BLOCK_ELEMENTS = 1 << 23


def _stable_nearest(values: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """Indices of the ``num_neighbours`` smallest entries of each row, ordered by (value, index).

    values: (C, N). Returns (C, num_neighbours) int64."""
    top_values, top_index = torch.topk(values, num_neighbours, dim=1, largest=False, sorted=True)
    top_index, by_index = top_index.sort(dim=1)
    top_values = top_values.gather(1, by_index)
    by_value = top_values.sort(dim=1, stable=True).indices
    return top_index.gather(1, by_value)


@torch.no_grad()
def _nearest_neighbours(
    features: torch.Tensor, num_neighbours: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Initial ranking and normalisers from one blocked pass over all pairs.

    features: (N, D) float32. Returns ``ranking`` (N, num_neighbours) int64, the nearest rows
    under T ordered as described in the module doc, and ``row_max`` (N,) float32,
    max_j d[i, j]**2.
    """
    num_rows = features.shape[0]
    squared_norms = features.pow(2).sum(dim=1)  # (N,)
    block = max(1, _DISTANCE_BLOCK_ELEMENTS // num_rows)
    ranking = np.empty((num_rows, num_neighbours), dtype=np.int64)
    row_max = np.empty(num_rows, dtype=np.float32)
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        norms = squared_norms[start:stop, None] + squared_norms[None, :]
        dist = torch.addmm(norms, features[start:stop], features.t(), beta=1, alpha=-2)  # (C, N)
        dist_sq = dist * dist
        block_max = dist_sq.max(dim=1).values  # (C,)
        normalised = dist_sq / block_max[:, None]  # rows of T
        ranking[start:stop] = _stable_nearest(normalised, num_neighbours).cpu().numpy()
        row_max[start:stop] = block_max.cpu().numpy()
    return ranking, row_max


@torch.no_grad()
def _pair_distances(features: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Squared-Euclidean d[rows[p], cols[p]] for listed pairs, float32 (P,) computed in float64."""
    out = np.empty(rows.size, dtype=np.float64)
    block = max(1, _SET_BLOCK_ELEMENTS // max(1, features.shape[1]))
    device = features.device
    for start in range(0, rows.size, block):
        stop = min(start + block, rows.size)
        left = features[torch.from_numpy(rows[start:stop]).to(device)].double()
        right = features[torch.from_numpy(cols[start:stop]).to(device)].double()
        out[start:stop] = (left - right).pow(2).sum(dim=1).cpu().numpy()
    return out.astype(np.float32)


def _weights(features: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
             row_max: np.ndarray) -> np.ndarray:
    """exp(-T[i, j]) normalised to sum 1 over each row's set E(i), float32 (nnz,), for the
    entries (rows, cols) of E sorted by row."""
    dist = _pair_distances(features, rows, cols)
    normalised = (dist * dist) / row_max[rows]  # T[i, j], float32
    weight = np.exp(-normalised.astype(np.float64))
    row_sum = np.bincount(rows, weights=weight, minlength=row_max.shape[0])
    return (weight / row_sum[rows]).astype(np.float32)


@torch.no_grad()
def re_ranking(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranked query-gallery distances (reference ``re_ranking``, see module doc).

    Args:
        query_features: (Q, D), gallery_features: (G, D); NumPy or torch (the blocked distance
            pass runs on the device of a tensor input, the sparse steps on the CPU).
        k1: size of the k-reciprocal neighbourhood; k2: query-expansion width (1 = none);
        lambda_value: weight of the normalised original distance in the result.
    Returns:
        (Q, G) float32 array, smaller = more similar.
    """
    if int(k1) != k1 or k1 < 1 or int(k2) != k2 or k2 < 1:
        raise ValueError(f"k1 and k2 must be positive integers, got k1={k1}, k2={k2}")
    k1, k2 = int(k1), int(k2)
    query, gallery = query_gallery_tensors(query_features, gallery_features)
    device = query.device
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if num_query == 0 or num_gallery == 0:
        return np.zeros((num_query, num_gallery), dtype=np.float32)
    features = torch.cat([query, gallery])  # (N, D): queries first, as the reference
    num_all = features.shape[0]

    ranking, row_max = _nearest_neighbours(features, min(max(k1 + 1, k2), num_all))
    weights = kreciprocal.expanded_weights(  # V', (N, N) sparse
        ranking, k1, k2, lambda rows, cols: _weights(features, rows, cols, row_max))
    del ranking
    index = kreciprocal.ColumnIndex(weights)
    begin, fan = index.tails(first_row=num_query)  # for each entry, the gallery rows of its column

    squared_norms = features.pow(2).sum(dim=1)
    row_max_t = torch.from_numpy(row_max).to(device)
    final = np.empty((num_query, num_gallery), dtype=np.float32)

    def work(start: int, stop: int) -> None:
        sums = kreciprocal.min_sums(index, begin, fan, start, stop).tocoo()  # gallery columns only
        overlap = np.zeros((stop - start, num_gallery), dtype=np.float32)
        overlap[sums.row, sums.col - num_query] = sums.data
        jaccard = kreciprocal.overlap_distance(overlap)  # exactly 1 where no column is shared
        with torch.no_grad():  # grad mode is per thread
            norms = squared_norms[start:stop, None] + squared_norms[None, num_query:]
            dist = torch.addmm(norms, query[start:stop], gallery.t(), beta=1, alpha=-2)  # (C, G)
            original = ((dist * dist) / row_max_t[start:stop, None]).cpu().numpy()
        final[start:stop] = jaccard * np.float32(1 - lambda_value) + original * np.float32(lambda_value)

    chunks = kreciprocal.row_chunks(index.row_work(fan)[:num_query], kreciprocal.SCRATCH_ELEMENTS,
                        max_rows=max(1, _SET_BLOCK_ELEMENTS // num_gallery))
    kreciprocal.map_chunks(work, chunks)
    return final
