"""Exact k-nearest-neighbour search for unit-norm features (docs/method.md#jaccard, step 1).

The ranking distance is d_ij = 2 - 2<x_i, x_j> in float32, the squared Euclidean distance
of unit vectors. The distance matrix is formed block by block with a matmul on the features'
device (CPU or CUDA): only the blocks on and above the diagonal are computed, and each serves
both its rows and, transposed, its columns, which halves the multiply-adds. Each row keeps a
running top-k, so the memory cost is O(block^2 + N * k) and no N x N array is ever built.

Tie-breaking is deterministic: among equal distances the smaller index comes first, like
``np.argsort(d_row, kind="stable")[:k]``. A matmul's last bit can depend on where a row sits
in its block, so exact copies of a row are found first (hash of the bits, then a full
comparison) and the search runs over distinct rows only; every copy then gets exactly the
same distances, and copies are ordered by index. (The reference uses faiss, whose order
among ties is unspecified.)
"""
from __future__ import annotations

import logging
import numbers
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import InvalidArgument, MissingDependency
from ..utils import ArrayLike

logger = logging.getLogger("isereid")

KNN_BACKENDS = ("torch", "faiss")

#: Default rows per block: a (2048, 2048) float32 block is 16 MB and keeps the CPU matmul
#: near its peak; accelerators get larger blocks for more parallel work.
_DEFAULT_BLOCK_CPU = 2048
_DEFAULT_BLOCK_ACCELERATOR = 8192
#: Elements of one chunk of expanded (row, neighbour, copy) keys for duplicated rows.
_EXPAND_ELEMENTS = 1 << 22


def as_features(features: ArrayLike) -> torch.Tensor:
    """Validate features and return them as a float32 (N, D) torch tensor on their device.

    NumPy input is wrapped without a copy when it is already C-contiguous float32."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
        if x.is_complex() or x.dtype == torch.bool:
            raise InvalidArgument(f"features must be real numbers, got dtype {x.dtype}")
        x = x.to(torch.float32)
    elif isinstance(features, np.ndarray):
        if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
            raise InvalidArgument(f"features must be real numbers, got dtype {features.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    else:
        raise InvalidArgument(f"features must be a numpy array or a torch tensor, got {type(features).__name__}")
    if x.dim() != 2:
        raise InvalidArgument(f"features must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise InvalidArgument(f"features must have at least one row and one column, got shape {tuple(x.shape)}")
    if not all(bool(torch.isfinite(extreme)) for extreme in torch.aminmax(x)):  # NaN propagates
        raise InvalidArgument("features contain NaN or infinite values")
    return x.contiguous()


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int, or raise InvalidArgument unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def exact_knn(features: ArrayLike, k: int, *, backend: str = "torch",
              block_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row among all rows, the row itself included.

    Args:
        features: (N, D) float32 array or tensor (any device), rows L2-normalised.
        k: neighbours per row; capped at N, so the result has min(k, N) columns.
        backend: ``"torch"`` (blockwise matmul + topk on the features' device) or ``"faiss"``
            (``faiss.IndexFlatL2`` on the CPU; needs the optional faiss package).
        block_size: rows per block; default 2048 on the CPU and 8192 on an accelerator,
            evened out so the blocks have nearly equal sizes.

    Returns:
        distances (N, min(k, N)) float32, ascending along each row, d = 2 - 2<x_i, x_j>;
        indices (N, min(k, N)) int64. Ties are broken by the smaller index first; exact
        copies of a row get identical distances.
    """
    k = check_positive_int(k, "k")
    x = as_features(features)
    n = x.shape[0]
    k = min(k, n)
    if backend == "faiss":
        return _faiss_knn(x, k)
    if backend != "torch":
        raise InvalidArgument(f"unknown kNN backend {backend!r}; expected {' or '.join(map(repr, KNN_BACKENDS))}")
    if block_size is None:
        block_size = _DEFAULT_BLOCK_CPU if x.device.type == "cpu" else _DEFAULT_BLOCK_ACCELERATOR
    block_size = check_positive_int(block_size, "block_size")
    with torch.inference_mode():
        first = _first_equal_row(x)
        if first is None:
            keys = _symmetric_block_knn(x, k, block_size)
        else:  # search among distinct rows, then give every copy the same distances
            distinct = torch.nonzero(first == torch.arange(n, device=x.device)).flatten()
            keys = _symmetric_block_knn(x[distinct], min(k, distinct.numel()), block_size)
            keys = _expand_copies(keys, distinct, first, k)
        distances, indices = _unpack(keys)
    return distances.cpu().numpy(), indices.cpu().numpy()


def _first_equal_row(x: torch.Tensor) -> Optional[torch.Tensor]:
    """(N,) int64: the smallest index of a row equal to each row; None if all rows differ.

    Rows are bucketed by an integer hash of the bits of their first 16 values; only rows
    in shared buckets are compared in full (``torch.unique(dim=0)``)."""
    n = x.shape[0]
    bits = (x[:, :16] + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into +0.0
    # Odd weights below 2**27: 16 products of 31-bit values sum below 2**62, no overflow.
    weights = torch.tensor([(c * 0x9E3779B1) % (1 << 27) | 1 for c in range(1, bits.shape[1] + 1)],
                           dtype=torch.int64, device=x.device)
    _, bucket, counts = torch.unique((bits * weights).sum(dim=1), return_inverse=True, return_counts=True)
    suspects = torch.nonzero(counts[bucket] > 1).flatten()
    if suspects.numel() == 0:
        return None
    _, group = torch.unique(x[suspects] + 0.0, dim=0, return_inverse=True)
    smallest = torch.full((int(group.max()) + 1,), n, dtype=torch.int64, device=x.device)
    smallest.scatter_reduce_(0, group, suspects, reduce="amin")
    first = torch.arange(n, device=x.device)
    first[suspects] = smallest[group]
    if bool((first[suspects] == suspects).all()):
        return None  # hash collisions only
    return first


def _expand_copies(keys: torch.Tensor, distinct: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Neighbour keys of all rows from those of the distinct rows.

    Args:
        keys: (U, ku) packed keys of the distinct rows, indices into ``distinct``.
        distinct: (U,) original index of each distinct row (the smallest of its copies).
        first: (N,) original index of the distinct row equal to each row.
        k: neighbours per row in the result.

    Every neighbour stands for all its copies at the same distance; per row the k smallest
    (distance, original index) pairs are kept, so copies are ordered by index."""
    n, device = first.shape[0], keys.device
    group = torch.searchsorted(distinct, first)                        # (N,) distinct id per row
    members = torch.argsort(group, stable=True)                        # rows grouped, by index
    size = torch.bincount(group, minlength=distinct.numel())
    start = torch.cumsum(size, 0) - size                               # first slot of each group
    width = min(k, int(size.max()))                                    # copies that can matter
    best = torch.empty((keys.shape[0], k), dtype=torch.int64, device=device)
    step = max(1, _EXPAND_ELEMENTS // (keys.shape[1] * width))
    offset = torch.arange(width, device=device)
    for lo in range(0, keys.shape[0], step):
        chunk = keys[lo:lo + step]
        neighbour = chunk & 0xFFFFFFFF                                 # distinct ids
        slot = start[neighbour].unsqueeze(-1) + offset                 # (c, ku, width)
        valid = offset < size[neighbour].unsqueeze(-1)
        original = members[slot.clamp_(max=n - 1)]
        expanded = ((chunk >> 32).unsqueeze(-1) << 32) | original      # same distance, copy index
        expanded = expanded.masked_fill_(~valid, torch.iinfo(torch.int64).max).flatten(1)
        best[lo:lo + step] = torch.topk(expanded, k, dim=1, largest=False, sorted=True).values
    return best[group]


def _symmetric_block_knn(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Packed (distance, index) keys of the k nearest rows of every row, (N, k) int64 sorted.

    Each block D[I, J] = 2 - 2 X_I X_J^T with J >= I is formed once and used twice: its
    rows give block I candidates among block J, its columns give block J candidates among
    block I. Per block, the k smallest entries of each row (ties at the k-th value resolved
    by the smaller index) are merged into a running top-k of unique packed keys."""
    n = x.shape[0]
    blocks = -(-n // block_size)
    bounds = [round(b * n / blocks) for b in range(blocks + 1)]  # nearly equal blocks
    best = torch.full((n, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=x.device)
    for a in range(len(bounds) - 1):
        i0, i1 = bounds[a], bounds[a + 1]
        for b in range(a, len(bounds) - 1):
            j0, j1 = bounds[b], bounds[b + 1]
            block = torch.mm(x[i0:i1], x[j0:j1].t()).mul_(-2.0).add_(2.0)   # (|I|, |J|)
            _merge(best, i0, i1, block, j0, k)
            if b != a:
                _merge(best, j0, j1, block.t(), i0, k)
    return best


def _merge(best: torch.Tensor, r0: int, r1: int, block: torch.Tensor, c0: int, k: int) -> None:
    """Merge the block's per-row k smallest (value, column + c0) into ``best[r0:r1]``."""
    vals, idx = _topk_set(block, min(k, block.shape[1]))
    merged = torch.cat([best[r0:r1], _pack(vals, idx + c0)], dim=1)
    best[r0:r1] = torch.topk(merged, k, dim=1, largest=False, sorted=True).values


def _topk_set(block: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, as a set exact in (value, index) order.

    ``torch.topk`` picks an arbitrary subset among ties at the k-th value; the rare rows
    whose (k+1)-th smallest equals the k-th are redone with a full stable sort."""
    width = block.shape[1]
    vals, idx = torch.topk(block, min(k + 1, width), dim=1, largest=False, sorted=True)
    if k < width:
        straddling = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
        if straddling.numel():
            full_vals, full_idx = torch.sort(block[straddling], dim=1, stable=True)
            vals[straddling], idx[straddling] = full_vals[:, :k + 1], full_idx[:, :k + 1]
    return vals[:, :k], idx[:, :k]


def _pack(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (value, index): the float32 bits made order-preserving,
    shifted above a 32-bit index. -0.0 is folded into +0.0 first."""
    bits = (values + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | indices


def _unpack(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack`: (float32 values, int64 indices)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _faiss_knn(x: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """kNN with faiss' exact flat L2 index (squared L2, equal to 2 - 2cos for unit rows)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise MissingDependency("cluster.knn_backend='faiss' needs the faiss package "
                                "(pip install 'isereid[faiss]'), or use knn_backend='torch'") from None
    data = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    distances, indices = index.search(data, k)
    return distances.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)
