"""The gallery index: search against a brute-force NumPy oracle (with the camera and self
filters), faiss == torch, save/load, `index add` == `index build` of the union, `search --index`,
the label-free threshold and the cluster distances against slow loops, and the one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from isereid.cli import main
from isereid.errors import InvalidArgument
from isereid.index import (
    GalleryIndex,
    cluster_distances,
    faiss_available,
    label_free_threshold,
    load_index,
)
from serve_fixtures import shared_run


def _random_index(n=500, d=32, cams=4, seed=0, backend="torch"):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return GalleryIndex(feats, [f"/g/{i}.jpg" for i in range(n)], rng.integers(0, cams, n), rng.integers(-1, 50, n),
                        {"version": 1}, backend=backend)


def _oracle(index, query, k, cam=-1, row=-1):
    """Sort every row by inner product, drop the excluded ones, take k: the slow obvious answer."""
    scores = [(float(np.dot(index.features[i].astype(np.float64), query)), i) for i in range(len(index))
              if i != row and (cam < 0 or index.camids[i] != cam)]
    scores.sort(key=lambda t: -t[0])
    return [i for _, i in scores[:k]], [s for s, _ in scores[:k]]


BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 60])
def test_search_equals_brute_force(backend, k):
    index = _random_index(backend=backend)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((6, index.dim)).astype(np.float32)
    cams = np.array([-1, 0, 1, 2, 3, -1])
    rows = np.array([-1, 5, -1, 17, 3, 499])
    found = index.search(queries, k, exclude_camids=cams, exclude_rows=rows)
    for q in range(len(queries)):
        idx, scores = _oracle(index, queries[q], k, cams[q], rows[q])
        assert found.indices[q].tolist() == idx
        np.testing.assert_allclose(found.scores[q], scores, rtol=1e-5, atol=1e-5)


def test_search_pads_when_fewer_rows_are_allowed():
    index = _random_index(n=20, cams=2)
    cam = 0
    allowed = int((index.camids != cam).sum())
    found = index.search(index.features[:1], 30, exclude_camids=[cam])
    assert (found.indices[0] >= 0).sum() == allowed and (found.indices[0, allowed:] == -1).all()
    assert np.isneginf(found.scores[0, allowed:]).all()


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_and_torch_agree():
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((10, 32)).astype(np.float32)
    a = _random_index(n=2000, backend="faiss").search(queries, 25, exclude_camids=[1] * 10)
    b = _random_index(n=2000, backend="torch").search(queries, 25, exclude_camids=[1] * 10)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_save_load_round_trip_and_bad_files(tmp_path, capsys):
    index = _random_index()
    index.save(tmp_path / "g.idx")
    back = load_index(tmp_path / "g.idx")
    for name in ("features", "paths", "camids", "pids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
    assert back.meta == index.meta and not list(tmp_path.glob(".*"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "text.idx").write_text("hello")
    for bad in ("missing.idx", "one.npy", "text.idx"):
        assert main(["search", "--checkpoint", "x.pt", "--index", str(tmp_path / bad), "--query",
                     str(tmp_path / "text.idx")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(InvalidArgument):
        index.search(np.zeros((1, 5), np.float32), 3)


def test_threshold_against_a_slow_scan():
    rng = np.random.default_rng(3)
    inside, between = rng.normal(0.3, 0.1, 300), rng.normal(0.7, 0.1, 200)
    t = label_free_threshold(inside, between)
    best = min(np.concatenate([inside, between]),
               key=lambda c: abs(np.mean(inside > c) - np.mean(between <= c)))
    assert abs(np.mean(inside > t) - np.mean(between <= t)) == pytest.approx(
        abs(np.mean(inside > best) - np.mean(between <= best)))
    assert 0.4 < t < 0.6
    with pytest.raises(InvalidArgument):
        label_free_threshold([], [0.5])


def test_cluster_distances_against_loops():
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((60, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = rng.integers(-1, 6, 60)
    inside, between = cluster_distances(feats, labels, max_samples=1000)
    eligible = [i for i in range(60) if labels[i] >= 0 and (labels == labels[i]).sum() >= 2]
    exp_in = [1 - max(feats[i] @ feats[j] for j in range(60) if j != i and labels[j] == labels[i]) for i in eligible]
    exp_out = [1 - max(feats[i] @ feats[j] for j in range(60) if labels[j] >= 0 and labels[j] != labels[i])
               for i in eligible]
    np.testing.assert_allclose(inside, exp_in, atol=1e-5)
    np.testing.assert_allclose(between, exp_out, atol=1e-5)
    assert len(cluster_distances(feats, np.full(60, -1))[0]) == 0


# ---------------------------------------------------------------------------- the commands on demo images
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


def _split(demo, tmp_path):
    """The demo gallery as two folders of symlinked images: a (first half) and b (the rest)."""
    images = sorted((demo / "bounding_box_test").glob("*.jpg"))[:60]
    halves = {"a": images[:35], "b": images[35:]}
    for name, part in halves.items():
        (tmp_path / name).mkdir()
        for p in part:
            (tmp_path / name / p.name).symlink_to(p)
    return tmp_path / "a", tmp_path / "b"


def test_index_add_equals_build_of_the_union_and_search_uses_it(run_dir, tmp_path, capsys):
    checkpoint = run_dir / "model_best.pt"
    a, b = _split(run_dir.parent / "demo", tmp_path)
    run = ["--workers", "0", "--device", "cpu"]
    assert main(["index", "build", "--checkpoint", str(checkpoint), "--gallery", str(a), "--output",
                 str(tmp_path / "a.idx"), *run]) == 0
    assert main(["index", "add", str(tmp_path / "a.idx"), "--gallery", str(b), "--gallery", str(a), *run]) == 0
    assert main(["index", "build", "--checkpoint", str(checkpoint), "--gallery", str(a), "--gallery", str(b),
                 "--output", str(tmp_path / "ab.idx"), *run]) == 0
    added, union = load_index(tmp_path / "a.idx"), load_index(tmp_path / "ab.idx")
    assert len(added) == 60 and added.paths.tolist() == union.paths.tolist()
    np.testing.assert_allclose(added.features, union.features, atol=1e-5)
    np.testing.assert_array_equal(added.camids, union.camids)
    assert union.meta["height"] == 64 and union.meta["width"] == 32 and union.meta["arch"] == "resnet18"
    assert union.meta["mean"] == [0.485, 0.456, 0.406] and union.meta["feature_dim"] == union.dim == 512
    # adding the same folder again changes nothing and writes nothing
    mtime = (tmp_path / "a.idx").stat().st_mtime_ns
    assert main(["index", "add", str(tmp_path / "a.idx"), "--gallery", str(b), *run]) == 0
    assert (tmp_path / "a.idx").stat().st_mtime_ns == mtime
    # search --index: the same top-k as the features say, drawn to a picture
    query = sorted((run_dir.parent / "demo" / "query").glob("*.jpg"))[0]
    capsys.readouterr()
    assert main(["search", "--checkpoint", str(checkpoint), "--index", str(tmp_path / "ab.idx"), "--query",
                 str(query), "--topk", "4", "--output", str(tmp_path / "r.png")]) == 0
    from isereid import embed

    q = embed(checkpoint, [str(query)]).numpy()[0]
    expected = [union.paths[i].rsplit("/", 1)[1] for i in np.argsort(-(union.features @ q))[:4]]
    assert Image.open(tmp_path / "r.png").size[0] > 4 * 64
    assert main(["search", "--checkpoint", str(checkpoint), "--gallery", str(a), "--query", str(query),
                 "--output", str(tmp_path / "g.png"), "--workers", "0"]) == 0  # --gallery still works
    logged = capsys.readouterr().err
    line = next(x for x in logged.splitlines() if x.startswith(str(query)))
    assert [part.split(" (")[0] for part in line.split(": ", 1)[1].split(", ")] == expected


def test_index_errors_are_one_line(run_dir, tmp_path, capsys):
    a, _ = _split(run_dir.parent / "demo", tmp_path)
    changed = _random_index()  # built with a checkpoint that has changed since
    changed.meta = {"version": 1, "checkpoint": str(run_dir / "model_best.pt"), "checkpoint_sha256": "0" * 64,
                    "height": 64, "width": 32}
    changed.save(tmp_path / "changed.idx")
    cases = [
        ["index", "build", "--checkpoint", str(tmp_path / "none.pt"), "--gallery", str(a), "--output",
         str(tmp_path / "x.idx")],
        ["index", "build", "--checkpoint", str(run_dir / "model_best.pt"), "--gallery", str(tmp_path / "nodir"),
         "--output", str(tmp_path / "x.idx")],
        ["index", "add", str(tmp_path / "none.idx"), "--gallery", str(a)],
        ["index", "add", str(tmp_path / "changed.idx"), "--gallery", str(a)],
        ["search", "--checkpoint", str(run_dir / "model_best.pt"), "--index", str(tmp_path / "changed.idx"),
         "--query", str(next(a.iterdir()))],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.idx").exists()


def test_auto_backend_sends_few_queries_to_torch_and_batches_to_faiss():
    pytest.importorskip("faiss")
    from isereid.index import FAISS_MIN_QUERIES
    index = _random_index(n=800, backend="auto")
    torch_only = _random_index(n=800, backend="torch")
    one = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
    got = index.search(one, 10)
    assert index._faiss is None  # the single query never built the faiss index
    np.testing.assert_array_equal(got.indices, torch_only.search(one, 10).indices)
    batch = np.random.default_rng(4).standard_normal((FAISS_MIN_QUERIES, 32)).astype(np.float32)
    got = index.search(batch, 10)
    assert index._faiss is not None
    np.testing.assert_array_equal(got.indices, torch_only.search(batch, 10).indices)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_concurrent_first_searches_never_see_a_half_built_faiss_index():
    from concurrent.futures import ThreadPoolExecutor
    index = _random_index(n=200_000, d=64, backend="faiss")
    queries = np.random.default_rng(5).standard_normal((4, 1, 64)).astype(np.float32)
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda q: index.search(q, 5).indices, queries))
    want = [_random_index(n=200_000, d=64, backend="torch").search(q, 5).indices for q in queries]
    for got, ref in zip(found, want):
        np.testing.assert_array_equal(got, ref)
