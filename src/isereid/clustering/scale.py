"""Label-free choice of the DBSCAN radius, ``cluster.eps=auto`` (docs/auto_eps.md).

A point is a DBSCAN core point at radius eps exactly when its *core distance* -- the Jaccard
distance to its (min_samples - 1)-th nearest other point -- is <= eps (the point itself is the
first of the min_samples neighbours). The core distances of a sample of rows are computed
exactly from V' and its inverted index, the structures the Jaccard step builds anyway (every
pair sharing a column of V', so nothing is missed; O(S * work per row), no N x N pass).

Their distribution has two parts: points with min_samples - 1 images of the same person close
by (small core distances) and points without (the bulk, at the level where unrelated
neighbourhoods overlap). eps is the two-class split of that distribution that maximises the
between-class variance (Otsu, 1979), computed exactly on the sorted sample: the points below
the split are the core points, so the radius follows the features as training sharpens them.

Pure array code: numpy, scipy.sparse; no engine or config imports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .. import kreciprocal
from ..errors import ClusteringError
from ..utils import counts_to_indptr

#: Rows whose core distances estimate the distribution (all rows below this many).
SAMPLE_ROWS = 1024
#: Scratch budget (elements) of one chunk of the min-sum step.
_SCRATCH_ELEMENTS = 1 << 22
#: Partition warnings: outlier share, largest cluster's share of clustered images, and its
#: size relative to the median cluster.
OUTLIER_WARNING = 0.9
GIANT_WARNING = 0.5
OVERSIZED_WARNING = 20.0


@dataclass
class ScaleChoice:
    """The radius chosen for one clustering and the statistic behind it.

    eps: the DBSCAN radius used. core_share: fraction of the sampled images that are core
    points at eps (core distance <= eps). core_median: median sampled core distance (the level
    of the bulk). sampled: rows the statistic was computed on."""

    eps: float
    core_share: float
    core_median: float
    sampled: int
    statistic: str = "otsu split of core distances"

    def to_dict(self) -> dict:
        return asdict(self)


def sample_rows(n: int, size: int = SAMPLE_ROWS) -> np.ndarray:
    """``size`` evenly spaced row indices of ``range(n)`` (all rows when n <= size), sorted."""
    if n <= size:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))


def core_distances(v: sp.csr_matrix, min_samples: int, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact core distances of ``rows`` (default all): the (min_samples - 1)-th smallest Jaccard
    distance from each row to another row, 1.0 when fewer others are below 1 (0.0 when
    min_samples is 1).

    Args:
        v: V' from :func:`isereid.clustering.jaccard.expanded_neighbourhoods`, (N, N) float32
            CSR with sorted indices.
        min_samples: DBSCAN's min_samples (the point itself included).
        rows: sorted unique row indices.

    Returns:
        (len(rows),) float32, the same float32 distances as the dense reference matrix.
    """
    n = v.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    rank = min_samples - 1
    if rank == 0:
        return np.zeros(rows.size, dtype=np.float32)
    index = kreciprocal.ColumnIndex(v)
    wanted = np.zeros(n, dtype=bool)
    wanted[rows] = True
    begin = index.col_ptr[index.entry_cols]                         # whole column: every j, not only j >= i
    fan = np.where(wanted[index.entry_rows], index.col_ptr[index.entry_cols + 1] - begin, 0)

    def work(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        sums = kreciprocal.min_sums(index, begin, fan, start, stop)
        local = kreciprocal.entry_rows(sums.indptr)
        other = sums.indices != start + local
        dist = np.maximum(kreciprocal.overlap_distance(sums.data[other]), np.float32(0.0))
        local = local[other]
        order = np.lexsort((dist, local))
        local, dist = local[order], dist[order]
        counts = np.bincount(local, minlength=stop - start)
        found = np.flatnonzero(counts >= rank)
        return start + found, dist[counts_to_indptr(counts)[found] + rank - 1]
    chunks = kreciprocal.row_chunks(index.row_work(fan), _SCRATCH_ELEMENTS)
    core = np.ones(n, dtype=np.float32)                            # 1.0: fewer than `rank` others below 1
    for which, values in kreciprocal.map_chunks(work, chunks):
        core[which] = values
    return core[rows]


def otsu_split(values: np.ndarray) -> float:
    """The largest value of the lower class of the two-class split of ``values`` that maximises
    the between-class variance w0 w1 (mu0 - mu1)^2, over all splits of the sorted values
    between distinct neighbours (ties stay in one class; the first maximum wins)."""
    s = np.sort(np.asarray(values, dtype=np.float64))
    n = s.size
    if n < 2 or s[0] == s[-1]:
        raise ClusteringError("cannot split a distance distribution with fewer than two distinct values")
    k = np.arange(1, n)                                            # lower class = s[:k]
    cum = np.cumsum(s)
    mu0 = cum[:-1] / k
    mu1 = (cum[-1] - cum[:-1]) / (n - k)
    between = k * (n - k) * (mu0 - mu1) ** 2
    between[s[1:] == s[:-1]] = -1.0                                # never split a tie
    return float(s[int(np.argmax(between))])


def choose_eps(v: sp.csr_matrix, min_samples: int, sample: int = SAMPLE_ROWS) -> ScaleChoice:
    """The DBSCAN radius from the core distances of ``sample`` evenly spaced rows of V'.

    Raises ClusteringError (one line, naming the cause) when the distribution cannot be
    split: too few images for min_samples, no image with min_samples - 1 neighbours, or all
    core distances equal (e.g. identical feature rows)."""
    n = v.shape[0]
    if n < 2 * min_samples:
        raise ClusteringError(f"cluster.eps=auto needs at least 2 x min_samples = {2 * min_samples} images, "
                              f"got {n}")
    rows = sample_rows(n, sample)
    core = core_distances(v, min_samples, rows)
    near = core[core < 1.0]
    if near.size < 2:
        raise ClusteringError(f"cluster.eps=auto: {near.size} of {rows.size} sampled images have "
                              f"{min_samples - 1} neighbours with a Jaccard distance below 1; raise cluster.k1 "
                              "or lower cluster.min_samples")
    if near.min() == near.max():
        raise ClusteringError(f"cluster.eps=auto: every sampled image has the same core distance "
                              f"{float(near[0]):.3g}; the features are degenerate (identical rows?)")
    eps = otsu_split(near)
    if eps <= 0.0:  # exact copies only below the split: the smallest positive distance
        eps = float(near[near > 0].min())
    return ScaleChoice(eps=eps, core_share=float((core <= eps).mean()), core_median=float(np.median(core)),
                       sampled=int(rows.size))


def partition_warning(labels: np.ndarray) -> Optional[str]:
    """One line naming the likely cause when a partition is degenerate, else None: nearly all
    images outliers, one cluster holding most clustered images, or a cluster far larger than
    the rest."""
    labels = np.asarray(labels).ravel()
    n = labels.size
    if n == 0:
        return None
    clustered = labels >= 0
    outliers = 1.0 - clustered.mean()
    if outliers >= OUTLIER_WARNING:
        return (f"{100 * outliers:.0f}% of the images are outliers: eps is too small for these features "
                "(or min_samples too large for the images per person)")
    sizes = np.bincount(labels[clustered])
    sizes = sizes[sizes > 0]
    largest = int(sizes.max())
    if sizes.size == 1 or largest >= GIANT_WARNING * clustered.sum():
        return (f"one cluster holds {100 * largest / clustered.sum():.0f}% of the clustered images: eps is too "
                "large for these features, or the features have collapsed")
    median = float(np.median(sizes))
    if largest >= OVERSIZED_WARNING * median:
        return (f"the largest cluster ({largest} images) is {largest / median:.0f}x the median cluster: "
                "chains of neighbours merge people; lower eps or k1")
    return None
