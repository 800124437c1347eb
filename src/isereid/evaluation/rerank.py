"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the reference test script applies it.

Reproduces the reference ``re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3)``
(ALGORITHM.md §8.4) without its (Q+G)x(Q+G) dense matrices. With N = Q + G and the rows
x_0..x_{N-1} = queries then gallery, the reference computes:

1. ``A = d**2`` where d is the squared-Euclidean matrix; ``T[i, j] = A[i, j] / max_k A[k, i]``
   (each column divided by its maximum, then transposed; float32). Each row of T is a row
   of A over its own maximum.
2. ``R0`` = argsort of every row of T; ``kr(i, k)`` = members j of ``R0[i, :k+1]`` whose row
   ``R0[j, :k+1]`` contains i (usually including i itself).
3. ``E(i)`` = unique(``kr(i, k1)`` plus ``kr(c, h)`` for each candidate c in ``kr(i, k1)``,
   i included, with ``|kr(c, h) ∩ kr(i, k1)| > 2/3 |kr(c, h)|``), where h = round(k1/2) (half
   to even).
4. ``V[i, E(i)] = exp(-T[i, E(i)]) / sum exp(-T[i, E(i)])``, zero elsewhere.
5. Unless k2 == 1: ``V[i] <- mean(V[R0[i, :k2]])``.
6. For query rows: ``m = sum_k min(V[i, k], V[j, k])``, ``jaccard = 1 - m / (2 - m)``.
7. ``final = (1 - lambda) * jaccard + lambda * T``, restricted to query rows x gallery columns.

Here the rows of T are produced block by block from the features, keeping only the row
maxima and the first max(k1 + 1, k2) neighbours; V is a scipy.sparse matrix with O(N k)
entries, and the Jaccard overlap is accumulated over V's shared columns. Peak memory is the
(Q, G) output plus blocks of a few hundred MB, instead of several (Q+G)^2 matrices.

Ties: the reference's ``np.argsort`` (quicksort) leaves the order of exactly equal distances
unspecified. Here neighbours are ordered by (distance, index); which of several candidates
tied exactly at the k-th place enters the list is unspecified (``torch.topk``). With
continuous features exact ties do not occur apart from duplicate images.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# Elements of a dense (rows x N) distance block, and of the per-block expansion arrays.
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


def _reciprocal_mask(ranking: np.ndarray, width: int) -> np.ndarray:
    """Which of ``ranking[i, :width]`` are k-reciprocal neighbours of i.

    ranking: (N, >= width). Returns (N, width) bool: j = ranking[i, a] is kept when
    ranking[j, :width] contains i."""
    num_rows = ranking.shape[0]
    forward = ranking[:, :width]
    mask = np.empty((num_rows, width), dtype=bool)
    block = max(1, _SET_BLOCK_ELEMENTS // (width * width))
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        backward = forward[forward[start:stop]]  # (C, width, width)
        mask[start:stop] = (backward == np.arange(start, stop)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(ranking: np.ndarray, k1: int) -> sp.csr_matrix:
    """E(i) of the module doc as the sparsity pattern of an (N, N) CSR matrix (sorted, unique)."""
    num_rows = ranking.shape[0]
    width = min(k1 + 1, ranking.shape[1])
    half_width = min(int(round(k1 / 2)) + 1, ranking.shape[1])  # round() is half-to-even, like np.around
    members = ranking[:, :width]
    member_mask = _reciprocal_mask(ranking, width)  # (N, width)
    half_members = ranking[:, :half_width]
    half_mask = _reciprocal_mask(ranking, half_width)  # (N, half_width)

    rows_out, cols_out = [], []
    block = max(1, _SET_BLOCK_ELEMENTS // (width * width * half_width))
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        own = members[start:stop]  # (C, W) candidates c
        own_mask = member_mask[start:stop]
        cand_half = half_members[own]  # (C, W, H) kr(c, h) padded
        cand_half_mask = half_mask[own]
        in_own = ((cand_half[..., None] == own[:, None, None, :]) & own_mask[:, None, None, :]).any(axis=3)
        overlap = (in_own & cand_half_mask).sum(axis=2)  # |kr(c, h) ∩ kr(i, k1)|, (C, W)
        size = cand_half_mask.sum(axis=2)
        accepted = own_mask & (overlap > 2.0 / 3.0 * size)  # strict, float64 as the reference
        row_ids = np.arange(start, stop)
        own_rows = np.broadcast_to(row_ids[:, None], own.shape)[own_mask]
        added = accepted[:, :, None] & cand_half_mask  # (C, W, H)
        added_rows = np.broadcast_to(row_ids[:, None, None], cand_half.shape)[added]
        rows_out += [own_rows, added_rows]
        cols_out += [own[own_mask], cand_half[added]]
    rows = np.concatenate(rows_out)
    cols = np.concatenate(cols_out)
    pattern = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(num_rows, num_rows))
    pattern.sum_duplicates()
    return pattern


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


def _weights(features: torch.Tensor, pattern: sp.csr_matrix, row_max: np.ndarray) -> sp.csr_matrix:
    """V: on E(i), exp(-T[i, j]) normalised to sum 1 per row; (N, N) float32 CSR."""
    rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
    cols = pattern.indices.astype(np.int64)
    dist = _pair_distances(features, rows, cols)
    normalised = (dist * dist) / row_max[rows]  # T[i, j], float32
    weight = np.exp(-normalised.astype(np.float64))
    row_sum = np.bincount(rows, weights=weight, minlength=pattern.shape[0])
    data = (weight / row_sum[rows]).astype(np.float32)
    return sp.csr_matrix((data, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)


def _query_expansion(weights: sp.csr_matrix, ranking: np.ndarray, k2: int) -> sp.csr_matrix:
    """V'[i] = mean of V over rows ranking[i, :k2] (the i-th row itself usually among them)."""
    num_rows = weights.shape[0]
    width = min(k2, ranking.shape[1])
    selector = sp.csr_matrix(
        (np.full(num_rows * width, 1.0 / width, dtype=np.float32),
         ranking[:, :width].reshape(-1),
         np.arange(0, num_rows * width + 1, width)),
        shape=(num_rows, num_rows),
    )
    expanded = (selector @ weights).tocsr()
    expanded.sum_duplicates()
    return expanded


def _jaccard_block(query_rows: sp.csr_matrix, gallery_by_column: sp.csc_matrix) -> np.ndarray:
    """1 - m / (2 - m) with m = sum_k min(V[q, k], V[g, k]) for a block of queries.

    query_rows: (C, N) CSR rows of V' for the queries; gallery_by_column: (G, N) CSC rows of V'
    for the gallery. Returns (C, G) float64; pairs sharing no column get exactly 1."""
    num_rows, num_gallery = query_rows.shape[0], gallery_by_column.shape[0]
    entry_row = np.repeat(np.arange(num_rows), np.diff(query_rows.indptr))  # one per stored V[q, k]
    column = query_rows.indices
    col_start = gallery_by_column.indptr[column]
    col_count = gallery_by_column.indptr[column + 1] - col_start  # gallery rows sharing column k
    total = int(col_count.sum())
    first_of_entry = np.cumsum(col_count) - col_count
    position = np.repeat(col_start - first_of_entry, col_count) + np.arange(total)
    pair_row = np.repeat(entry_row, col_count)
    pair_gallery = gallery_by_column.indices[position]
    pair_min = np.minimum(np.repeat(query_rows.data, col_count), gallery_by_column.data[position])
    overlap = np.bincount(
        pair_row * num_gallery + pair_gallery, weights=pair_min, minlength=num_rows * num_gallery
    ).reshape(num_rows, num_gallery)
    return 1.0 - overlap / (2.0 - overlap)


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
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if num_query == 0 or num_gallery == 0:
        return np.zeros((num_query, num_gallery), dtype=np.float32)
    features = torch.cat([query, gallery])  # (N, D): queries first, as the reference
    num_all = features.shape[0]

    ranking, row_max = _nearest_neighbours(features, min(max(k1 + 1, k2), num_all))
    weights = _weights(features, _expanded_sets(ranking, k1), row_max)
    if k2 != 1:
        weights = _query_expansion(weights, ranking, k2)
    del ranking
    gallery_by_column = weights[num_query:].tocsc()
    gallery_by_column.sort_indices()

    squared_norms = features.pow(2).sum(dim=1)
    final = np.empty((num_query, num_gallery), dtype=np.float32)
    block = max(1, _SET_BLOCK_ELEMENTS // num_gallery)
    for start in range(0, num_query, block):
        stop = min(start + block, num_query)
        norms = squared_norms[start:stop, None] + squared_norms[None, num_query:]
        dist = torch.addmm(norms, query[start:stop], gallery.t(), beta=1, alpha=-2)  # (C, G)
        original = ((dist * dist) / torch.from_numpy(row_max[start:stop]).to(device)[:, None]).cpu().numpy()
        jaccard = _jaccard_block(weights[start:stop], gallery_by_column).astype(np.float32)
        final[start:stop] = jaccard * np.float32(1 - lambda_value) + original * np.float32(lambda_value)
    return final
