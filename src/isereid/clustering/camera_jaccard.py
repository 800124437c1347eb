"""Camera-aware k-reciprocal neighbourhoods (CA-Jaccard, Chen et al., CVPR 2024; docs/camera_aware.md#ca-jaccard).

The plain k-reciprocal set of an image is drawn from one ranking of all images; in a camera-split
feature space that ranking is filled by the image's own camera, so a person's other view rarely
enters the set and never the Jaccard overlap. Here the set is drawn from two rankings:

1. R_intra(i): the members j of i's ``k1_intra`` nearest images *of its own camera* (i itself
   first, so it is in its own set) whose own list of that length contains i;
   R_inter(i): the members j of i's ``k1_inter`` nearest images *of the other cameras* whose own
   other-camera list of that length contains i. E(i) = R_intra(i) ∪ R_inter(i); no 2/3
   expansion step (the intra and inter lists are short and already reciprocal).
2. V[i, E(i)] = softmax(-(2 - 2<x_i, x_j>)) over E(i), float32, as the plain pipeline.
3. Query expansion: V'[i] = mean of the rows V[q] for q in i's ``k2_intra`` nearest of its own
   camera (itself included) and its ``k2_inter`` nearest of the other cameras.
4. m_ij and the Jaccard distance exactly as the plain pipeline
   (:func:`isereid.clustering.jaccard.upper_from_weights`).

A camera with fewer images than ``k1_intra`` gives its rows shorter own-camera lists, and a
camera with fewer than ``k1_inter`` images outside it shorter other-camera lists (and query
expansions); no camera shortens another's lists. Memory is O(N * k) and the other-camera
search works on row blocks of bounded size.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from .. import kreciprocal
from ..errors import InvalidArgument
from ..utils import ArrayLike, as_ids
from .jaccard import _softmax_weights, mirror, upper_from_weights
from .knn import _pack, _unpack, as_features, check_positive_int, exact_knn

__all__ = ["CameraRanking", "camera_ranking", "camera_expanded_neighbourhoods", "camera_jaccard_distance"]

#: Elements of one (query block, other-camera images) distance block.
_BLOCK_ELEMENTS = 1 << 22


class CameraRanking(NamedTuple):
    """Each row's nearest images of its own camera and of the other cameras.

    intra: (N, Wa) int64, nearest first, the row itself in column 0 (unless it has exact copies);
    intra_dist: (N, Wa) float32, d = 2 - 2<x_i, x_j>; intra_count: (N,) int64, how many leading
    entries of the row are real (a smaller camera's rows are padded with the row itself and its
    distance to itself); inter: (N, We) int64, inter_dist (N, We) float32 and inter_count (N,) the
    same among the images of the other cameras (padding: the last real neighbour repeated).
    Ties: smaller index first."""

    intra: np.ndarray
    intra_dist: np.ndarray
    intra_count: np.ndarray
    inter: np.ndarray
    inter_dist: np.ndarray
    inter_count: np.ndarray


def _check_camids(camids: ArrayLike, n: int) -> np.ndarray:
    try:
        cams = as_ids(camids, n, "camids", torch.device("cpu")).numpy()
    except (TypeError, ValueError) as e:
        raise InvalidArgument(str(e)) from None
    if np.unique(cams).size < 2:
        raise InvalidArgument("camera-aware Jaccard needs images from two or more cameras; the camids hold one")
    return cams


def camera_ranking(features: ArrayLike, camids: ArrayLike, k_intra: int, k_inter: int) -> CameraRanking:
    """The own-camera and other-camera rankings of every row of ``features`` (N, D), L2-normalised.

    ``k_intra`` counts the row itself; widths are capped as the module doc says."""
    x = as_features(features)
    n = x.shape[0]
    cams = _check_camids(camids, n)
    k_intra, k_inter = check_positive_int(k_intra, "k_intra"), check_positive_int(k_inter, "k_inter")
    groups = [np.flatnonzero(cams == c) for c in np.unique(cams)]
    w_intra = min(k_intra, max(g.size for g in groups))
    w_inter = min(k_inter, max(n - g.size for g in groups))
    intra = np.empty((n, w_intra), dtype=np.int64)
    intra_dist = np.empty((n, w_intra), dtype=np.float32)
    intra_count = np.empty(n, dtype=np.int64)
    inter = np.empty((n, w_inter), dtype=np.int64)
    inter_dist = np.empty((n, w_inter), dtype=np.float32)
    inter_count = np.empty(n, dtype=np.int64)
    for rows in groups:  # a loop over cameras, not samples
        index = torch.from_numpy(rows).to(x.device)
        d, local = exact_knn(x[index], w_intra)
        width = d.shape[1]
        intra[rows, :width], intra_dist[rows, :width] = rows[local], d
        intra[rows, width:], intra_dist[rows, width:] = rows[:, None], d[:, :1]  # padding: the row itself
        intra_count[rows] = width
        others = np.flatnonzero(cams != cams[rows[0]])
        width = min(w_inter, others.size)
        d, ids = _cross_knn(x[index], x[torch.from_numpy(others).to(x.device)], others, width)
        inter[rows, :width], inter_dist[rows, :width] = ids, d
        inter[rows, width:], inter_dist[rows, width:] = ids[:, -1:], d[:, -1:]  # padding: a repeat
        inter_count[rows] = width
    return CameraRanking(intra, intra_dist, intra_count, inter, inter_dist, inter_count)


def _cross_knn(queries: torch.Tensor, base: torch.Tensor, base_ids: np.ndarray, k: int):
    """The k nearest rows of ``base`` for every row of ``queries``: distances (Q, k) float32 ascending and
    the ids ``base_ids`` of those rows (Q, k) int64; ties broken by the smaller position in ``base``."""
    step = max(1, _BLOCK_ELEMENTS // max(1, base.shape[0]))
    dist, pos = [], []
    with torch.inference_mode():
        for start in range(0, queries.shape[0], step):
            block = 2.0 - 2.0 * (queries[start:start + step] @ base.t())
            cols = torch.arange(base.shape[0], device=base.device).expand_as(block)
            keys = torch.topk(_pack(block, cols), k, dim=1, largest=False, sorted=True).values
            d, p = _unpack(keys)
            dist.append(d.cpu().numpy())
            pos.append(p.cpu().numpy())
    return np.concatenate(dist), base_ids[np.concatenate(pos)]


def camera_expanded_neighbourhoods(features: ArrayLike, camids: ArrayLike, k1_intra: int = 5, k1_inter: int = 20,
                                   k2_intra: int = 2, k2_inter: int = 4) -> sp.csr_matrix:
    """Steps 1-3 of the module doc: V' (N, N) float32 CSR with sorted indices.

    k1_intra, k2_intra count the image itself; ``k2_intra=1, k2_inter=0`` skips the query expansion.
    Feed the result to :func:`isereid.clustering.jaccard.upper_from_weights` (or to DBSCAN through
    :func:`isereid.clustering.pseudo_labels`)."""
    x = as_features(features)
    k1_intra, k1_inter = check_positive_int(k1_intra, "k1_intra"), check_positive_int(k1_inter, "k1_inter")
    k2_intra = check_positive_int(k2_intra, "k2_intra")
    if isinstance(k2_inter, bool) or int(k2_inter) != k2_inter or k2_inter < 0:
        raise InvalidArgument(f"k2_inter must be an integer >= 0, got {k2_inter!r}")
    rank = camera_ranking(x, camids, max(k1_intra, k2_intra), max(k1_inter, k2_inter, 1))
    sets = kreciprocal.reciprocal_sets(rank.intra, min(k1_intra, rank.intra.shape[1])) + \
        kreciprocal.reciprocal_sets(rank.inter, min(k1_inter, rank.inter.shape[1]))
    sets = sets.tocsr()
    sets.sum_duplicates()  # sorted unique columns (the two parts are disjoint: other cameras)
    ranking = np.hstack([rank.intra, rank.inter])
    known = np.hstack([rank.intra_dist, rank.inter_dist])
    weights = _softmax_weights(x, kreciprocal.entry_rows(sets.indptr), sets.indices.astype(np.int64), known, ranking)
    v = sp.csr_matrix((weights, sets.indices, sets.indptr), shape=sets.shape)
    if k2_intra == 1 and k2_inter == 0:
        return v
    qa, qe = min(k2_intra, rank.intra.shape[1]), min(int(k2_inter), rank.inter.shape[1])
    top = np.hstack([rank.intra[:, :qa], rank.inter[:, :qe]])
    valid = np.hstack([np.arange(qa) < rank.intra_count[:, None],  # never the padding of a short list
                       np.arange(qe) < rank.inter_count[:, None]])
    return kreciprocal.mean_rows(v, top, valid)


def camera_jaccard_distance(features: ArrayLike, camids: ArrayLike, k1_intra: int = 5, k1_inter: int = 20,
                            k2_intra: int = 2, k2_inter: int = 4) -> sp.csr_matrix:
    """The camera-aware Jaccard distance of all pairs, as :func:`isereid.clustering.jaccard_distance`:
    (N, N) float32 CSR holding every pair below 1 (explicit zeros kept); pairs not stored are 1.0."""
    v = camera_expanded_neighbourhoods(features, camids, k1_intra, k1_inter, k2_intra, k2_inter)
    return mirror(upper_from_weights(v))
