"""Identity-balanced batches: the reference RandomMultipleGallerySampler + IterLoader
(docs/method.md#sampler, docs/reference_quirks.md#q15), computed up front as an index matrix.

Randomness: the reference draws from three global RNGs (``torch.randperm`` for the cluster
order, python ``random.choice`` for the anchor, ``np.random.choice`` for the companions).
Here a single ``numpy.random.Generator`` makes the same kinds of draws in the same order
(cluster permutation once per pass, then per cluster: anchor, companions), so an epoch's
batches depend only on ``seed`` and not on any global state; the distribution is the
reference's, the exact streams are not.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np
import torch

from ..errors import ClusteringError

SAMPLERS = ("cluster", "proxy")  # data.sampler: per pseudo-identity (the reference) or per (cluster, camera)


class _Groups:
    """Dataset indices and cameras of every cluster, grouped once with a stable argsort."""

    def __init__(self, labels, camids):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        camids = np.asarray(camids, dtype=np.int64).reshape(-1)
        if labels.shape != camids.shape:
            raise ValueError(f"labels {labels.shape} and camids {camids.shape} differ in length")
        valid = np.flatnonzero(labels >= 0)  # the reference skips labels < 0
        order = valid[np.argsort(labels[valid], kind="stable")]  # indices sorted by label, then position
        _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.indices = [order[s:s + c] for s, c in zip(starts, counts)]
        self.cams = [camids[idx] for idx in self.indices]

    def length(self, num_instances: int) -> int:
        """Entries one pass emits: Z per cluster, 1 per singleton cluster."""
        sizes = np.array([len(idx) for idx in self.indices], dtype=np.int64)
        return int(np.where(sizes > 1, num_instances, 1).sum()) if len(sizes) else 0

    def sample_pass(self, num_instances: int, rng: np.random.Generator) -> np.ndarray:
        z = int(num_instances)
        blocks: List[np.ndarray] = []
        for k in rng.permutation(len(self.indices)):
            idx, cams = self.indices[k], self.cams[k]
            a = int(rng.integers(len(idx)))
            anchor = idx[a:a + 1]
            pool = idx[cams != cams[a]]  # companions from the anchor's other cameras ...
            if pool.size == 0:
                pool = np.delete(idx, a)  # ... else the other images of its camera
                if pool.size == 0:  # singleton cluster: the anchor alone (shifts later blocks)
                    blocks.append(anchor)
                    continue
            picks = rng.choice(pool, size=z - 1, replace=pool.size < z)  # threshold >= Z, not Z-1
            blocks.append(anchor)
            blocks.append(picks)
        if not blocks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(blocks).astype(np.int64, copy=False)


def sample_pass(labels, camids, num_instances: int, rng: np.random.Generator) -> np.ndarray:
    """One pass of the reference sampler over pseudo-labelled samples -> flat int64 indices.

    Clusters come in a random order; each gives a block: a uniformly chosen anchor, then
    ``num_instances - 1`` companions drawn from the cluster's images in *other* cameras
    (without replacement if there are at least ``num_instances`` of them, else with
    replacement); if the cluster has a single camera, from its other images (same rule); a
    singleton cluster gives the anchor only. Labels < 0 are skipped.
    """
    return _Groups(labels, camids).sample_pass(num_instances, rng)


def proxy_labels(labels, camids) -> np.ndarray:
    """(N,) labels of the (cluster, camera) proxies: one label per pair that occurs, -1 for outliers."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    camids = np.asarray(camids, dtype=np.int64).reshape(-1)
    out = np.full(labels.shape, -1, dtype=np.int64)
    valid = labels >= 0
    if valid.any():
        pairs = np.stack([labels[valid], camids[valid]], axis=1)
        out[valid] = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
    return out


def epoch_batches(labels, camids, batch_size: int, num_instances: int, iters: int, seed: int,
                  by: str = "cluster") -> np.ndarray:
    """``(iters, batch_size)`` int64 indices for one epoch.

    Passes of :func:`sample_pass` are cut into ``floor(len / batch_size)`` batches each (the
    DataLoader's drop_last) and a new pass starts whenever one runs out, as the reference's
    IterLoader does. Deterministic given ``seed``.

    ``by="proxy"`` (``data.sampler=proxy``): the groups are the (cluster, camera) proxies instead of
    the clusters, CAP's proxy-balanced sampling: every proxy gives ``num_instances`` images of its
    own camera per pass, so the cameras of a cross-camera cluster are drawn equally often.
    """
    if batch_size < 1 or num_instances < 1 or iters < 0:
        raise ValueError(f"batch_size={batch_size}, num_instances={num_instances}, iters={iters} must be positive")
    if by not in SAMPLERS:
        raise ValueError(f"by must be one of {', '.join(map(repr, SAMPLERS))}, got {by!r}")
    groups = _Groups(proxy_labels(labels, camids) if by == "proxy" else labels, camids)
    per_pass = groups.length(num_instances) // batch_size
    if per_pass == 0:
        n = sum(len(idx) for idx in groups.indices)
        raise ClusteringError(
            f"too few pseudo-labelled images for one batch: {n} images in {len(groups.indices)} clusters give "
            f"{groups.length(num_instances)} sampler entries < data.batch_size={batch_size}; lower data.batch_size "
            "or raise cluster.eps"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((iters, batch_size), dtype=np.int64)
    filled = 0
    while filled < iters:
        flat = groups.sample_pass(num_instances, rng)
        rows = flat[: per_pass * batch_size].reshape(per_pass, batch_size)
        take = min(per_pass, iters - filled)
        out[filled:filled + take] = rows[:take]
        filled += take
    return out


class BatchListSampler(torch.utils.data.Sampler):
    """DataLoader ``batch_sampler`` over precomputed global batches: yields, for each row from
    ``start`` on, this rank's contiguous slice ``row[rank*B/W:(rank+1)*B/W]`` as a list."""

    def __init__(self, batches, rank: int = 0, world_size: int = 1, start: int = 0):
        batches = np.asarray(batches, dtype=np.int64)
        if batches.ndim != 2:
            raise ValueError(f"batches must be a (rows, batch) matrix, got shape {batches.shape}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if batches.shape[1] % world_size:
            raise ValueError(f"batch size {batches.shape[1]} is not divisible by world size {world_size}")
        local = batches.shape[1] // world_size
        self.batches = batches[:, rank * local:(rank + 1) * local]
        self.start = max(0, min(int(start), len(batches)))

    def __iter__(self) -> Iterator[List[int]]:
        for row in self.batches[self.start:]:
            yield row.tolist()

    def __len__(self) -> int:
        return len(self.batches) - self.start
