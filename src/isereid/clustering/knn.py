"""Exact k-nearest-neighbour search for unit-norm features (ALGORITHM.md §4.2 step 1).

The ranking distance is d_ij = 2 - 2<x_i, x_j> in float32, the squared Euclidean distance
of unit vectors. Rows are processed in chunks: one (chunk, N) block of the distance matrix
is formed with a matmul on the features' device (CPU or CUDA) and reduced with ``topk``, so
the memory cost is O(chunk * N + N * k) and no N x N array is ever built.

Tie-breaking is deterministic and stable: among equal distances the smaller index comes
first, exactly like ``np.argsort(d_row, kind="stable")[:k]``. (The reference uses faiss,
whose order among exact ties is unspecified; ties only occur for duplicated features.)
"""
from __future__ import annotations

import logging
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..errors import ConfigError

logger = logging.getLogger("isereid")

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Elements of one (chunk, N) distance block when ``chunk_size`` is not given (~64 MB float32).
_BLOCK_ELEMENTS = 1 << 24


def as_features(features: ArrayLike) -> torch.Tensor:
    """Validate features and return them as a float32 (N, D) torch tensor on their device.

    NumPy input is wrapped without a copy when it is already C-contiguous float32."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
        if x.is_complex() or x.dtype == torch.bool:
            raise ConfigError(f"features must be real numbers, got dtype {x.dtype}")
        x = x.to(torch.float32)
    elif isinstance(features, np.ndarray):
        if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
            raise ConfigError(f"features must be real numbers, got dtype {features.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    else:
        raise ConfigError(f"features must be a numpy array or a torch tensor, got {type(features).__name__}")
    if x.dim() != 2:
        raise ConfigError(f"features must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ConfigError(f"features must have at least one row and one column, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("features contain NaN or infinite values")
    return x.contiguous()


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int, or raise ConfigError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def exact_knn(features: ArrayLike, k: int, *, backend: str = "torch",
              chunk_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row among all rows, the row itself included.

    Args:
        features: (N, D) float32 array or tensor (any device), rows L2-normalised.
        k: neighbours per row; capped at N, so the result has min(k, N) columns.
        backend: ``"torch"`` (chunked matmul + topk on the features' device) or ``"faiss"``
            (``faiss.IndexFlatL2`` on the CPU; needs the optional faiss package).
        chunk_size: rows per distance block; default keeps one block near 2**24 elements.

    Returns:
        distances (N, min(k, N)) float32, ascending along each row, d = 2 - 2<x_i, x_j>;
        indices (N, min(k, N)) int64. Ties are broken by the smaller index first.
    """
    k = check_positive_int(k, "k")
    x = as_features(features)
    n = x.shape[0]
    k = min(k, n)
    if backend == "faiss":
        return _faiss_knn(x, k)
    if backend != "torch":
        raise ConfigError(f"unknown kNN backend {backend!r}; expected 'torch' or 'faiss'")
    if chunk_size is None:
        chunk_size = max(1, min(n, _BLOCK_ELEMENTS // n))
    chunk_size = check_positive_int(chunk_size, "chunk_size")

    distances = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            block = torch.mm(x[start:stop], x.t()).mul_(-2.0).add_(2.0)  # (c, N) = 2 - 2 x_i.x_j
            vals, idx = _stable_topk(block, k)
            distances[start:stop] = vals.cpu().numpy()
            indices[start:stop] = idx.cpu().numpy()
    return distances, indices


def _stable_topk(block: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of ``block`` in stable (value, index) order.

    ``torch.topk`` picks an arbitrary subset among ties at the k-th value and orders ties
    arbitrarily. The order is fixed with a sort by index followed by a stable sort by value;
    the rare rows with a tie straddling the k-th position (seen with k + 1 candidates) fall
    back to a full stable sort of the row."""
    n = block.shape[1]
    vals, idx = torch.topk(block, min(k + 1, n), dim=1, largest=False, sorted=True)
    # A tie straddles position k exactly when the (k+1)-th smallest equals the k-th.
    straddling = vals[:, k] == vals[:, k - 1] if k < n else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    idx, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, stable=True)
    idx = idx.gather(1, perm)
    if bool(straddling.any()):
        rows = torch.nonzero(straddling).flatten()
        full_vals, full_idx = torch.sort(block[rows], dim=1, stable=True)
        vals[rows] = full_vals[:, :k]
        idx[rows] = full_idx[:, :k]
    return vals, idx


def _faiss_knn(x: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """kNN with faiss' exact flat L2 index (squared L2, equal to 2 - 2cos for unit rows)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("cluster.knn_backend='faiss' needs the faiss package "
                          "(pip install 'isereid[faiss]'), or use knn_backend='torch'") from None
    data = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    distances, indices = index.search(data, k)
    return distances.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)
