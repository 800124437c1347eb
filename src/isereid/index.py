"""A persistent gallery index: features extracted once, searched many times.

The index is one uncompressed ``.npz`` file, written atomically::

    features  (N, D) float32, rows L2-normalised (the model's output)
    paths     (N,)   str, absolute image paths
    camids    (N,)   int64, 0-based camera (0 when the name carries none)
    pids      (N,)   int64, identity from a Market-style name, -1 when unknown
    meta      ()     str, JSON: format version, the preprocessing (height, width, mean, std),
                     arch, feature_dim, and the checkpoint (path, sha256) the features came from

Search is exact inner product (cosine similarity of normalised rows): faiss's ``IndexFlatIP``
when faiss is installed (for batches of at least :data:`FAISS_MIN_QUERIES` queries with the
default ``backend="auto"``), a torch matrix product otherwise; both give the same ranking.
:func:`label_free_threshold` suggests a "no match" distance from a clustering, without labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import DatasetError, InvalidArgument, MissingDependency
from .utils import atomic_path

INDEX_VERSION = 1
INDEX_KEYS = ("features", "paths", "camids", "pids", "meta")
BACKENDS = ("auto", "faiss", "torch")
#: With ``backend="auto"``, batches of fewer queries go through torch's matrix product: faiss's flat
#: index scans for so few queries one query per thread, so a single query reads the whole index on
#: one core (measured at 100,000 x 2,048 on 2 cores: 57 ms faiss, 25 ms torch; docs/serve.md).
FAISS_MIN_QUERIES = 20


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SearchResult:
    """Top-k of each query, best first: ``indices`` (Q, k) int64 rows of the index (-1 pads a row
    with fewer than k allowed entries), ``scores`` (Q, k) float32 cosine similarities (-inf pads)."""

    indices: np.ndarray
    scores: np.ndarray


@dataclass
class GalleryIndex:
    """Features of gallery images with their paths, cameras and identities (row i = image i)."""

    features: np.ndarray
    paths: np.ndarray
    camids: np.ndarray
    pids: np.ndarray
    meta: dict = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self):
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.paths = np.asarray(self.paths, dtype=str)
        self.camids = np.asarray(self.camids, dtype=np.int64)
        self.pids = np.asarray(self.pids, dtype=np.int64)
        n = len(self.features)
        if self.features.ndim != 2 or not (len(self.paths) == len(self.camids) == len(self.pids) == n):
            raise InvalidArgument(f"index arrays disagree: features {self.features.shape}, {len(self.paths)} paths, "
                                  f"{len(self.camids)} camids, {len(self.pids)} pids")
        if self.backend not in BACKENDS:
            raise InvalidArgument(f"backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        if self.backend == "faiss" and not faiss_available():
            raise MissingDependency("backend faiss needs the faiss package: pip install 'isereid[faiss]'")
        self._faiss = None
        self._torch = None
        self._build_lock = threading.Lock()  # the server searches from several threads

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def uses_faiss(self) -> bool:
        return self.backend == "faiss" or (self.backend == "auto" and faiss_available())

    # ------------------------------------------------------------------ search
    def backend_for(self, queries: int) -> str:
        """``"faiss"`` or ``"torch"``: what a search of ``queries`` queries at once runs on."""
        if self.uses_faiss and (self.backend == "faiss" or queries >= FAISS_MIN_QUERIES):
            return "faiss"
        return "torch"

    def _scores_topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend_for(len(queries)) == "faiss":
            with self._build_lock:  # published only when filled: another thread must not search it half-built
                if self._faiss is None:
                    import faiss

                    built = faiss.IndexFlatIP(self.dim)
                    built.add(self.features)
                    self._faiss = built
            scores, indices = self._faiss.search(queries, k)
            return scores, indices.astype(np.int64)
        if self._torch is None:
            self._torch = torch.from_numpy(self.features)
        sims = torch.from_numpy(queries) @ self._torch.T  # (Q, N)
        scores, indices = torch.topk(sims, k, dim=1)
        return scores.numpy(), indices.numpy().astype(np.int64)

    def search(self, queries, topk: int = 10, exclude_camids: Optional[Sequence[int]] = None,
               exclude_rows: Optional[Sequence[int]] = None) -> SearchResult:
        """The ``topk`` rows of highest inner product with each of ``queries`` (Q, D).

        exclude_camids: per query, a camera whose images are left out (-1: none), for "other
        cameras only". exclude_rows: per query, one index row left out (-1: none), e.g. the query
        image itself. Filtering widens the search until k allowed rows are found (or all are seen).
        """
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise InvalidArgument(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        if topk < 1:
            raise InvalidArgument(f"topk must be >= 1, not {topk}")
        nq, n = len(q), len(self)
        cams = np.full(nq, -1, np.int64) if exclude_camids is None else np.asarray(exclude_camids, np.int64)
        rows = np.full(nq, -1, np.int64) if exclude_rows is None else np.asarray(exclude_rows, np.int64)
        out_idx = np.full((nq, topk), -1, np.int64)
        out_scores = np.full((nq, topk), -np.inf, np.float32)
        if n == 0:
            return SearchResult(out_idx, out_scores)
        pending = np.arange(nq)
        k = int(min(n, topk + int((rows >= 0).any())))
        while len(pending):
            scores, indices = self._scores_topk(q[pending], k)
            unfinished = []
            for j, qi in enumerate(pending):
                idx, sc = indices[j], scores[j]
                allowed = (idx >= 0) & (idx != rows[qi])
                if cams[qi] >= 0:
                    allowed &= self.camids[np.maximum(idx, 0)] != cams[qi]
                idx, sc = idx[allowed][:topk], sc[allowed][:topk]
                if len(idx) < topk and k < n:
                    unfinished.append(qi)
                    continue
                out_idx[qi, :len(idx)] = idx
                out_scores[qi, :len(idx)] = sc
            pending = np.array(unfinished, dtype=np.int64)
            k = int(min(n, 4 * k))
        return SearchResult(out_idx, out_scores)

    # ------------------------------------------------------------------ files
    def extended(self, other: GalleryIndex) -> GalleryIndex:
        """This index followed by the rows of ``other`` (same feature dimension)."""
        if other.dim != self.dim and len(other):
            raise InvalidArgument(f"cannot append {other.dim}-dimensional features to a {self.dim}-dimensional index")
        return GalleryIndex(np.concatenate([self.features, other.features]) if len(other) else self.features,
                            np.concatenate([self.paths, other.paths]), np.concatenate([self.camids, other.camids]),
                            np.concatenate([self.pids, other.pids]), dict(self.meta), self.backend)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` (that exact name) atomically."""
        with atomic_path(path, suffix=".tmp.npz") as tmp:
            np.savez(tmp, features=self.features, paths=self.paths, camids=self.camids, pids=self.pids,
                     meta=np.array(json.dumps(self.meta, sort_keys=True)))


def load_index(path: str | os.PathLike, backend: str = "auto") -> GalleryIndex:
    """The :class:`GalleryIndex` saved at ``path``; DatasetError (one line) when it is missing or not
    an index written by :meth:`GalleryIndex.save`."""
    from .features import read_npz

    arrays = read_npz(path, INDEX_KEYS, "isereid index")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError:
        raise DatasetError(f"{path}: unreadable index metadata") from None
    if meta.get("version") != INDEX_VERSION:
        raise DatasetError(f"{path}: index format version {meta.get('version')!r}, this isereid reads {INDEX_VERSION}")
    return GalleryIndex(**arrays, meta=meta, backend=backend)


def label_free_threshold(inside: np.ndarray, between: np.ndarray) -> float:
    """The distance that separates ``inside`` (distances of images to their nearest neighbour in
    the same cluster) from ``between`` (to their nearest neighbour in another cluster) best: the
    equal-error point, where the share of inside distances above it equals the share of between
    distances below it. No labels needed: the clusters stand in for identities."""
    inside, between = np.sort(np.asarray(inside, np.float64)), np.sort(np.asarray(between, np.float64))
    if not len(inside) or not len(between):
        raise InvalidArgument("a threshold needs distances inside and between clusters")
    candidates = np.unique(np.concatenate([inside, between]))
    misses = 1 - np.searchsorted(inside, candidates, side="right") / len(inside)  # inside above t
    false_hits = np.searchsorted(between, candidates, side="right") / len(between)  # between at or below t
    best = int(np.argmin(np.abs(misses - false_hits)))
    return float(candidates[best])


@torch.no_grad()
def cluster_distances(features, labels: np.ndarray, max_samples: int = 512,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (1 - similarity) from up to ``max_samples`` clustered images to their nearest
    neighbour inside their own cluster and to the nearest image of any other cluster ->
    ``(inside, between)``, float32 arrays of equal length (empty when fewer than two clusters of
    two or more). ``features`` (N, D) L2-normalised rows, on any device; ``labels`` (N,), -1 = outlier."""
    feats = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    sizes = np.bincount(labels[keep]) if len(keep) else np.zeros(0, np.int64)
    eligible = keep[sizes[labels[keep]] >= 2]
    if (sizes >= 2).sum() < 2:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(eligible, size=min(max_samples, len(eligible)), replace=False))
    kept = feats[torch.as_tensor(keep, device=feats.device)].float()
    kept_labels = torch.as_tensor(labels[keep], device=feats.device)
    inside, between = [], []
    for start in range(0, len(picked), 128):
        rows = picked[start:start + 128]
        sims = feats[torch.as_tensor(rows, device=feats.device)].float() @ kept.T  # (b, K)
        same = kept_labels[None, :] == torch.as_tensor(labels[rows], device=feats.device)[:, None]
        self_mask = torch.as_tensor(keep[None, :] == rows[:, None], device=feats.device)
        inside.append(1 - sims.masked_fill(~same | self_mask, -2).amax(1))
        between.append(1 - sims.masked_fill(same, -2).amax(1))
    return torch.cat(inside).cpu().numpy().astype(np.float32), torch.cat(between).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------- building from images
def _samples(folders: Sequence[str | os.PathLike]):
    from .data.datasets import images_in_folder

    samples = []
    for folder in folders:
        samples += images_in_folder(folder)
    return samples


def _extract(model, prep, paths: Sequence[str], batch_size: int, workers: int, device) -> np.ndarray:
    from .features import extract_features

    feats = extract_features(model.to(device), list(paths), prep.transform(), batch_size=batch_size,
                             workers=workers, device=device, desc="index")
    return feats.numpy()


def build_index(checkpoint: str | os.PathLike, folders: Sequence[str | os.PathLike], batch_size: int = 128,
                workers: int = 2, device: torch.device = torch.device("cpu"),
                height: Optional[int] = None, width: Optional[int] = None) -> GalleryIndex:
    """Extract the features of every image under ``folders`` (recursive, sorted; a path listed twice
    is indexed once) with the network of ``checkpoint`` into a new :class:`GalleryIndex`."""
    from .embedding import load_embedder

    if not Path(checkpoint).is_file():
        raise DatasetError(f"checkpoint not found: {checkpoint}")
    model, prep = load_embedder(checkpoint, height, width)
    samples = _unique(_samples(folders), set())
    feats = _extract(model, prep, [s.path for s in samples], batch_size, workers, device)
    meta = {"version": INDEX_VERSION, **prep.to_dict(), "feature_dim": int(feats.shape[1]),
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint)}
    return GalleryIndex(feats, [s.path for s in samples], [s.camid for s in samples], [s.pid for s in samples], meta)


def _unique(samples, known: set):
    """``samples`` with absolute paths, minus those in ``known`` and repeats (first kept)."""
    out, seen = [], set(known)
    for s in samples:
        path = str(Path(s.path).resolve())
        if path not in seen:
            seen.add(path)
            out.append(s._replace(path=path))
    return out


def add_to_index(index: GalleryIndex, folders: Sequence[str | os.PathLike], batch_size: int = 128,
                 workers: int = 2, device: torch.device = torch.device("cpu")) -> tuple[GalleryIndex, int]:
    """``index`` followed by the images under ``folders`` that it does not hold yet, extracted with
    the checkpoint and preprocessing it was built with -> (new index, number of images added).
    DatasetError when that checkpoint is gone or has changed since."""
    from .embedding import Preprocessing, load_embedder

    meta = index.meta
    checkpoint = meta.get("checkpoint", "")
    if not Path(checkpoint).is_file():
        raise DatasetError(f"the index was built with {checkpoint}, which no longer exists")
    if file_sha256(checkpoint) != meta.get("checkpoint_sha256"):
        raise DatasetError(f"{checkpoint} changed since the index was built; build a new index")
    samples = _unique(_samples(folders), set(index.paths.tolist()))
    if not samples:
        return index, 0
    model, _ = load_embedder(checkpoint)
    prep = Preprocessing(height=meta["height"], width=meta["width"], arch=meta.get("arch", "unknown"))
    feats = _extract(model, prep, [s.path for s in samples], batch_size, workers, device)
    added = GalleryIndex(feats, [s.path for s in samples], [s.camid for s in samples], [s.pid for s in samples])
    return index.extended(added), len(samples)
