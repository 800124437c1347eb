"""DBSCAN on the sparse Jaccard graph, equal to DBSCAN on the dense matrix (docs/method.md#dbscan).

The reference runs ``sklearn.cluster.DBSCAN(eps, min_samples, metric="precomputed")`` on the
dense N x N float32 Jaccard matrix. Here the same estimator gets a sparse CSR graph instead:
sklearn then treats only stored entries as neighbours, so the graph holds

* every off-diagonal pair with ``dist <= eps`` (the same float32-array-vs-Python-float
  comparison sklearn makes on the dense matrix; pairs above eps are dropped early), and
* the whole diagonal with its true value (1.0 where the Jaccard matrix stores nothing), since
  DBSCAN makes stored-or-implicit diagonals explicit and would otherwise count an implicit
  diagonal as distance 0.

Rows are sorted by distance beforehand so sklearn does not re-sort them row by row. When
eps reaches 1.0 every pair is a neighbour in the dense case (Jaccard distances never exceed
1), which the sparse graph cannot express; that case is answered directly.
Memory: O(N * k) for the graph, on top of :func:`jaccard_distance`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN
from sklearn.exceptions import EfficiencyWarning

from ..errors import ClusteringError, InvalidArgument
from ..utils import ArrayLike, counts_to_indptr
from .jaccard import expanded_neighbourhoods, jaccard_upper, mirror, upper_from_weights
from .knn import as_features, check_positive_int
from .scale import ScaleChoice, choose_eps


def jaccard_dbscan(features: ArrayLike, eps: float, k1: int = 30, k2: int = 6, min_samples: int = 4, *,
                   knn_backend: str = "torch") -> np.ndarray:
    """Cluster features with DBSCAN on the k-reciprocal Jaccard distance.

    Args:
        features: (N, D) float32 array or tensor (any device), rows L2-normalised.
        eps: DBSCAN radius (> 0); neighbours are pairs with distance <= eps.
        k1, k2: Jaccard parameters, see :func:`jaccard_distance`.
        min_samples: neighbours (the point itself included) that make a core point.
        knn_backend: ``"torch"`` or ``"faiss"``.

    Returns:
        (N,) int64 labels: -1 for outliers, clusters numbered 0..C-1 in sklearn's order.
    """
    eps = _check_eps(eps)
    min_samples = check_positive_int(min_samples, "min_samples")
    k1 = check_positive_int(k1, "k1")
    k2 = check_positive_int(k2, "k2")
    x = as_features(features)
    n = x.shape[0]
    if bool(np.asarray([1.0], dtype=np.float32) <= eps):
        # Every dense distance is <= 1.0 <= eps: all points are mutual neighbours.
        return np.full(n, 0 if n >= min_samples else -1, dtype=np.int64)
    return _dbscan(jaccard_upper(x, k1, k2, knn_backend=knn_backend, eps=eps), eps, min_samples)


def jaccard_dbscan_auto(features: ArrayLike, k1: int = 30, k2: int = 6, min_samples: int = 4, *,
                        knn_backend: str = "torch") -> Tuple[np.ndarray, ScaleChoice]:
    """:func:`jaccard_dbscan` with eps chosen from the features, without labels (docs/auto_eps.md).

    The kNN and V' are computed once; :func:`isereid.clustering.scale.choose_eps` reads the
    core distances of a sample of rows from V', and the partition is then exactly
    ``jaccard_dbscan(features, choice.eps, k1, k2, min_samples)``.

    Returns:
        labels (N,) int64 as :func:`jaccard_dbscan`, and the :class:`ScaleChoice` behind eps.
    Raises ClusteringError (one line) when the features give no usable scale: all rows
    identical, too few images for min_samples, no image with min_samples - 1 neighbours."""
    min_samples = check_positive_int(min_samples, "min_samples")
    x = as_features(features)
    check_not_constant(x)
    v, _ = expanded_neighbourhoods(x, k1, k2, knn_backend=knn_backend)
    labels, choice = neighbourhood_dbscan(v, "auto", min_samples)
    assert choice is not None
    return labels, choice


def check_not_constant(x: torch.Tensor) -> None:
    """ClusteringError when every row of ``x`` (N, D) is the same: no scale can be read from such features."""
    if bool((x == x[:1]).all()):
        raise ClusteringError(f"all {x.shape[0]} feature rows are identical (a collapsed or constant model?): "
                              "nothing to cluster")


def neighbourhood_dbscan(v: sp.csr_matrix, eps: Union[float, str], min_samples: int = 4
                         ) -> Tuple[np.ndarray, Optional[ScaleChoice]]:
    """DBSCAN on the Jaccard distances of the rows of a weight matrix V' (N, N) CSR with sorted indices,
    e.g. from :func:`isereid.clustering.camera_jaccard.camera_expanded_neighbourhoods`.

    ``eps`` is a radius or ``"auto"`` (:func:`isereid.clustering.scale.choose_eps` on V').
    Returns labels (N,) int64 as :func:`jaccard_dbscan` and the ScaleChoice (None for a fixed eps)."""
    min_samples = check_positive_int(min_samples, "min_samples")
    choice = None
    if eps == "auto":
        choice = choose_eps(v, min_samples)
        eps = choice.eps
    eps = _check_eps(eps)
    if bool(np.asarray([1.0], dtype=np.float32) <= eps):
        n = v.shape[0]
        return np.full(n, 0 if n >= min_samples else -1, dtype=np.int64), choice
    return _dbscan(upper_from_weights(v, eps), eps, min_samples), choice


def _check_eps(eps: object) -> float:
    """``eps`` as a Python float (the reference passes one: sklearn then compares in float32), or InvalidArgument."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise InvalidArgument(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _dbscan(upper: sp.csr_matrix, eps: float, min_samples: int) -> np.ndarray:
    """sklearn's DBSCAN on the pairs within eps (upper triangle from ``jaccard_upper(..., eps=eps)``)."""
    graph = eps_graph(mirror(upper), eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EfficiencyWarning)
        labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)
    return np.asarray(labels, dtype=np.int64)


def eps_graph(dist: sp.csr_matrix, eps: float) -> sp.csr_matrix:
    """The DBSCAN input: off-diagonal entries <= eps plus the full diagonal, rows sorted by value.

    Args:
        dist: (N, N) float32 CSR from :func:`jaccard_distance` (missing entries mean 1.0; a
            missing diagonal becomes 1.0, which is equivalent for any diagonal above eps).
        eps: the DBSCAN radius as a Python float.

    Returns:
        (N, N) float32 CSR graph whose stored entries are exactly the dense matrix's
        neighbours within eps, plus the diagonal."""
    n = dist.shape[0]
    coo = dist.tocoo()
    rows, cols, data = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    on_diag = rows == cols
    diag = np.ones(n, dtype=np.float32)
    diag[rows[on_diag]] = data[on_diag]
    keep = ~on_diag & (data <= eps)
    rows = np.concatenate([rows[keep], np.arange(n)])
    cols = np.concatenate([cols[keep], np.arange(n)])
    data = np.concatenate([data[keep], diag]).astype(np.float32)
    order = np.lexsort((cols, data, rows))
    indptr = counts_to_indptr(np.bincount(rows, minlength=n))
    return sp.csr_matrix((data[order], cols[order], indptr), shape=(n, n))
