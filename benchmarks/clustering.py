"""Pseudo-label speed and memory: isereid.clustering.jaccard_dbscan vs the dense reference.

Synthetic clustered unit features (about 17 images per identity centre plus 10 % uniform
noise, float32). The reference is the straightforward dense re-implementation of
docs/method.md#jaccard and #dbscan as the original code does it: the N x N distance matrix, a top-k1
ranking, per-sample loops for the k-reciprocal sets and the expansion, dense N x N V and V',
the inverted-index Jaccard loop into an N x N matrix, then sklearn DBSCAN on it. Ours is
``jaccard_dbscan``; the floor is the bare ``exact_knn(features, k1)``.

Every method runs in its own fresh subprocess that imports the libraries, loads the features
from a .npy file and warms up on 200 rows first (clustering runs every epoch, so the
steady-state cost is what matters); the time is the best of ``--repeats`` calls (default 3;
1 for ``--large``), the peak memory the growth of ru_maxrss over that baseline. Labels of
ours and the reference must be identical.

    python benchmarks/clustering.py                        # N = 12,936 (Market-sized), D = 2048
    python benchmarks/clustering.py --sizes 12936 32621    # also MSMT-sized (dense needs ~13 GB)
    python benchmarks/clustering.py --large                # N = 100,000, D = 512, ours only
    python benchmarks/clustering.py --eps auto [--large]   # cluster.eps=auto against fixed eps

With ``--eps auto`` the label-free radius (jaccard_dbscan_auto, docs/auto_eps.md) is timed
against jaccard_dbscan at the eps it chose, which must give identical labels, within 1.1x.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time

import numpy as np

GIB = 1 << 30


def make_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows: ~n/17 Gaussian clusters on the sphere plus 10 % noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, round(n / 17)), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 4096
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = rng.standard_normal((stop - start, dim), dtype=np.float32)
        clustered = rng.random(stop - start) >= 0.1
        rows[clustered] = centres[rng.integers(0, len(centres), int(clustered.sum()))] \
            + rng.uniform(0.6, 1.2, (int(clustered.sum()), 1)).astype(np.float32) \
            * rows[clustered] / np.float32(np.sqrt(dim))
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


# ----------------------------------------------------------------------------------------------
# The dense reference (docs/method.md#jaccard, loop for loop)
# ----------------------------------------------------------------------------------------------
def dense_jaccard(x: np.ndarray, k1: int = 30, k2: int = 6) -> np.ndarray:
    """The reference's dense (N, N) float32 Jaccard distance (torch kNN instead of faiss)."""
    import torch
    n = x.shape[0]
    feats = torch.from_numpy(x)
    original = 2 - 2 * torch.mm(feats, feats.t())                      # N x N float32
    ranking = torch.topk(original, min(k1, n), dim=1, largest=False)[1].numpy()  # top k1, self incl.
    del original

    def k_reciprocal(i: int, k: int) -> np.ndarray:
        forward = ranking[i, :k + 1]
        backward = ranking[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    half = int(np.around(k1 / 2))
    nn_k1 = [k_reciprocal(i, k1) for i in range(n)]
    nn_half = [k_reciprocal(i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        recip = nn_k1[i]
        expansion = recip
        for candidate in recip:
            cand = nn_half[candidate]
            if len(np.intersect1d(cand, recip)) > 2 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        dist = 2 - 2 * torch.mm(feats[i].unsqueeze(0), feats[expansion].t())
        v[i, expansion] = torch.softmax(-dist, dim=1).view(-1).numpy()
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[ranking[i, :k2], :], axis=0)
        v = v_qe
        del v_qe
    inv_index = [np.where(v[:, col] != 0)[0] for col in range(n)]
    jaccard = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float32)
        nonzero = np.where(v[i] != 0)[0]
        for col in nonzero:
            others = inv_index[col]
            temp_min[0, others] = temp_min[0, others] + np.minimum(v[i, col], v[others, col])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    del v, inv_index
    jaccard[jaccard < 0] = 0.0
    return jaccard


def dense_dbscan(x: np.ndarray, eps: float, k1: int, k2: int, min_samples: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN
    dist = dense_jaccard(x, k1, k2)
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)


# ----------------------------------------------------------------------------------------------
# Measurement in a fresh subprocess
# ----------------------------------------------------------------------------------------------
def _child(method: str, path: str, args: dict, repeats: int, queue) -> None:
    import sklearn.cluster  # noqa: F401  (imports belong to the baseline)
    import torch  # noqa: F401

    from isereid.clustering import exact_knn, jaccard_dbscan, jaccard_dbscan_auto

    def run(x: np.ndarray):
        if method == "auto":
            labels, choice = jaccard_dbscan_auto(x, args["k1"], args["k2"], args["min_samples"])
            return labels, choice.eps
        if method == "ours":
            return jaccard_dbscan(x, args["eps"], args["k1"], args["k2"], args["min_samples"])
        if method == "dense":
            return dense_dbscan(x, args["eps"], args["k1"], args["k2"], args["min_samples"])
        exact_knn(x, args["k1"])
        return None

    x = np.load(path)
    run(np.ascontiguousarray(x[:200]))  # warm-up: lazy imports and first-call set-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels = run(x)
        seconds.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    queue.put((min(seconds), peak_kib * 1024, labels))


def measure(method: str, path: str, args: dict, repeats: int = 1):
    """(best seconds of ``repeats`` runs, peak bytes over baseline, labels or None), measured
    in a fresh process after a warm-up call on 200 rows."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, path, args, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_size(n: int, dim: int, args: argparse.Namespace, tmp: str) -> None:
    path = os.path.join(tmp, f"features_{n}x{dim}.npy")
    np.save(path, make_features(n, dim, seed=args.seed))
    params = dict(eps=args.eps, k1=args.k1, k2=args.k2, min_samples=args.min_samples)
    t_knn, m_knn, _ = measure("knn", path, params, args.repeats)
    t_ours, m_ours, ours = measure("ours", path, params, args.repeats)
    print(f"\nN={n:,} D={dim} eps={args.eps} k1={args.k1} k2={args.k2} min_samples={args.min_samples}")
    print(f"{'method':<26}{'time (s)':>10}{'peak mem (GiB)':>16}{'clusters':>10}{'outliers':>10}")
    print(f"{'exact_knn (floor)':<26}{t_knn:>10.2f}{m_knn / GIB:>16.3f}{'':>10}{'':>10}")
    print(f"{'jaccard_dbscan (ours)':<26}{t_ours:>10.2f}{m_ours / GIB:>16.3f}"
          f"{ours.max() + 1:>10d}{int((ours < 0).sum()):>10d}")
    dense = None
    if n <= args.skip_dense_above:
        t_dense, m_dense, dense = measure("dense", path, params, args.repeats)
        print(f"{'dense reference':<26}{t_dense:>10.2f}{m_dense / GIB:>16.3f}"
              f"{dense.max() + 1:>10d}{int((dense < 0).sum()):>10d}")
    ratio = t_ours / t_knn
    print(f"ours / bare kNN time: {ratio:.2f}x  [{verdict(ratio <= 1.3)}: <= 1.3x]")
    if dense is not None:
        same = bool(np.array_equal(ours, dense))
        speed, mem = t_dense / t_ours, m_dense / max(m_ours, 1)
        print(f"labels identical to dense: {same}  [{verdict(same)}]")
        print(f"speed-up vs dense: {speed:.1f}x  [{verdict(speed >= 4)}: >= 4x]")
        print(f"peak memory vs dense: {mem:.1f}x less  [{verdict(mem >= 4)}: >= 4x]")
    os.remove(path)


def run_auto(n: int, dim: int, args: argparse.Namespace, tmp: str) -> None:
    """cluster.eps=auto against the fixed-eps path at the radius auto chose (same labels)."""
    path = os.path.join(tmp, f"features_{n}x{dim}.npy")
    np.save(path, make_features(n, dim, seed=args.seed))
    params = dict(k1=args.k1, k2=args.k2, min_samples=args.min_samples)
    repeats = 1 if n > 20000 else args.repeats
    t_auto, m_auto, (auto, eps) = measure("auto", path, params, repeats)
    t_fixed, m_fixed, fixed = measure("ours", path, dict(params, eps=eps), repeats)
    print(f"\nN={n:,} D={dim} eps=auto -> {eps:.4f} k1={args.k1} k2={args.k2} min_samples={args.min_samples}")
    print(f"{'method':<30}{'time (s)':>10}{'peak mem (GiB)':>16}{'clusters':>10}{'outliers':>10}")
    for name, t, m, labels in (("jaccard_dbscan (fixed eps)", t_fixed, m_fixed, fixed),
                               ("jaccard_dbscan_auto", t_auto, m_auto, auto)):
        print(f"{name:<30}{t:>10.2f}{m / GIB:>16.3f}{labels.max() + 1:>10d}{int((labels < 0).sum()):>10d}")
    same = bool(np.array_equal(auto, fixed))
    print(f"labels identical to fixed eps: {same}  [{verdict(same)}]")
    print(f"auto / fixed time: {t_auto / t_fixed:.2f}x  [{verdict(t_auto <= 1.1 * t_fixed)}: <= 1.1x]")
    os.remove(path)


def run_large(args: argparse.Namespace, tmp: str) -> None:
    n, dim = 100_000, 512
    path = os.path.join(tmp, f"features_{n}x{dim}.npy")
    np.save(path, make_features(n, dim, seed=args.seed))
    params = dict(eps=args.eps, k1=args.k1, k2=args.k2, min_samples=args.min_samples)
    seconds, peak, labels = measure("ours", path, params)  # one run: it takes minutes
    print(f"\nN={n:,} D={dim} (ours only): {seconds:.1f} s, peak {peak / GIB:.2f} GiB, "
          f"{labels.max() + 1} clusters, {int((labels < 0).sum())} outliers")
    print(f"time < 4 min [{verdict(seconds < 240)}], peak memory < 4 GiB [{verdict(peak < 4 * GIB)}]")
    os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12936])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--eps", type=lambda v: v if v == "auto" else float(v), default=0.6,
                        help="DBSCAN radius, or 'auto' to time cluster.eps=auto against it")
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--min-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dense-above", type=int, default=20000,
                        help="run the dense reference only for N up to this (it needs ~12 N^2 bytes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best time counts")
    parser.add_argument("--large", action="store_true", help="N=100,000 x D=512, ours only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.eps == "auto":
            for n, dim in ([(100_000, 512)] if args.large else [(n, args.dim) for n in args.sizes]):
                run_auto(n, dim, args, tmp)
        elif args.large:
            run_large(args, tmp)
        else:
            for n in args.sizes:
                run_size(n, args.dim, args, tmp)


if __name__ == "__main__":
    main()
