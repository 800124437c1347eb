"""Search latency of `isereid serve` through its HTTP API, and index build vs `isereid extract`.

    python benchmarks/serve.py [--gallery-size N] [--dim D] [--clients C] [--requests R]
                               [--run-images M] [--build-images B] [--backend auto|faiss|torch]
                               [--output FILE.json]

1. A synthetic run folder with M training images in recorded pseudo-labels (paths cycle through a
   few hundred real demo crops) and a gallery index of N random unit vectors of dimension D (the
   paths again cycle through the crops), with a random-init checkpoint whose features have D
   dimensions (resnet50 for 2048, resnet18 for 512).
2. `isereid serve RUN --index IDX --port 0` in a subprocess; one client, then C concurrent clients,
   each sending R searches by image id (`POST /api/search`, topk 10, random gallery ids, every
   other one "other cameras only"); plus a few searches by upload (these include the CNN forward).
3. With playwright and Chromium installed: the time from navigation until the first cluster card
   of the cluster page is painted.
4. With B > 0: `isereid index build` and `isereid extract --images` on the same B demo crops.

FILE.json: {"search_single": {...}, "search_concurrent": {"p50_ms", "p95_ms", "failed", ...},
"search_upload": {...}, "cluster_first_paint_s", "build": {...}, "config": {...}}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"count": 0}
    ms = np.array(latencies) * 1000
    return {"count": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "max_ms": round(float(ms.max()), 2)}


def make_fixture(folder: Path, run_images: int, gallery_size: int, dim: int, seed: int) -> tuple[Path, Path, Path]:
    """(run folder, index file, demo root) for the benchmark."""
    import torch

    from isereid.config import ModelConfig
    from isereid.data.demo import generate_demo_data
    from isereid.engine import checkpoint as ckpt
    from isereid.engine.records import EpochRecord
    from isereid.engine.run_state import RunFolder
    from isereid.index import INDEX_VERSION, GalleryIndex, file_sha256
    from isereid.models import build_model

    demo = folder / "demo"
    generate_demo_data(demo, identities=12, cameras=6, seed=seed)  # crops to show, not to learn from
    crops = sorted(str(p.resolve()) for p in (demo / "bounding_box_train").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    arch = {2048: "resnet50", 512: "resnet18"}.get(dim)
    if arch is None:
        raise SystemExit("--dim must be 2048 (resnet50) or 512 (resnet18)")
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, pretrained=False, bn_mode="plain")
    checkpoint = run / "model_best.pt"
    ckpt.save(checkpoint, ckpt.model_payload(build_model(cfg).state_dict(), dataclasses.asdict(cfg), 1, None,
                                             [256, 128]))
    paths = [crops[i % len(crops)] for i in range(run_images)]
    camids = rng.integers(0, 6, run_images)
    labels = rng.integers(0, max(run_images // 8, 2), run_images)
    labels[rng.random(run_images) < 0.2] = -1  # outliers
    labels = np.where(labels >= 0, np.unique(labels, return_inverse=True)[1].ravel() - 1, -1)
    folder_ = RunFolder(run)
    folder_.write_labels(1, labels, paths, camids)
    folder_.write_metrics([EpochRecord(epoch=1, num_clusters=int(labels.max()) + 1,
                                       num_outliers=int((labels < 0).sum()), loss=1.0, loss_cc=1.0, loss_lp=0.0,
                                       lr=3.5e-4, seconds=1.0, interpolation_weight=0.0)])
    feats = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index = GalleryIndex(feats, [crops[i % len(crops)] for i in range(gallery_size)],
                         rng.integers(0, 6, gallery_size), np.full(gallery_size, -1),
                         {"version": INDEX_VERSION, "height": 256, "width": 128, "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225], "arch": arch, "feature_dim": dim,
                          "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint)})
    index.save(folder / "gallery.idx")
    return run, folder / "gallery.idx", demo


def start_server(run: Path, index: Path, backend: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # what `isereid serve RUN --index IDX --port 0` does, with the backend chosen
    code = ("import sys; from isereid.serve.app import listen; from isereid.serve.state import RunView; "
            "server = listen('127.0.0.1', 0); view = RunView(sys.argv[1], sys.argv[2], backend=sys.argv[3]); "
            "print(server.url, flush=True); server.run(view)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), str(index), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def run_clients(url: str, first_gallery_id: int, gallery_size: int, clients: int, requests: int) -> dict:
    import httpx

    latencies, failed, errors = [], [0], []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            for r in range(requests):
                data = {"image_id": str(first_gallery_id + rng.randrange(gallery_size)), "topk": "10",
                        "other_cameras_only": "true" if r % 2 else "false"}
                started = time.perf_counter()
                try:
                    response = http.post(url + "api/search", data=data)
                    ok = response.status_code == 200 and len(response.json()["results"]) == 10
                except Exception as e:  # noqa: BLE001 - a lost request is what we count
                    ok = False
                    errors.append(repr(e)[:200])
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        failed[0] += 1
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {**_percentiles(latencies), "clients": clients, "requests_per_client": requests,
            "answered": len(latencies), "failed": failed[0], "errors": errors[:3],
            "throughput_per_s": round(len(latencies) / wall, 2)}


def upload_latency(url: str, demo: Path, n: int) -> dict:
    import httpx

    crops = sorted((demo / "query").glob("*.jpg"))[:n]
    latencies = []
    with httpx.Client(timeout=60) as http:
        for path in crops:
            started = time.perf_counter()
            r = http.post(url + "api/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
    return _percentiles(latencies)


def cluster_first_paint(url: str) -> float | None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path(chromium).is_file():
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "#view=clusters", wait_until="commit")
        page.wait_for_selector("[data-testid=cluster-card] img", timeout=120_000)
        seconds = page.evaluate("performance.now()") / 1000  # since navigation start
        browser.close()
    return round(seconds, 3)


def build_throughput(checkpoint: Path, source: Path, images: int, folder: Path) -> dict:
    """images/s of `isereid extract`, `index build` and `extract` again on the first ``images`` JPEGs
    under ``source`` (same process, same order every time); ``build_vs_extract`` = build / mean extract."""
    from isereid.cli import main

    src = folder / "build_images"
    src.mkdir(exist_ok=True)
    crops = sorted(source.rglob("*.jpg"))[:images]
    if not crops:
        raise SystemExit(f"no .jpg under {source}")
    for i, path in enumerate(crops):
        target = src / f"{i:06d}_{path.name}"
        if not target.exists():
            target.symlink_to(path.resolve())
    common = ["--checkpoint", str(checkpoint), "--workers", "2", "--device", "cpu", "--height", "128",
              "--width", "64"]
    out = {}
    for name, argv in (("extract", ["extract", "--images", str(src), "--output", str(folder / "f.npz")]),
                       ("index_build", ["index", "build", "--gallery", str(src), "--output", str(folder / "b.idx")]),
                       ("extract_again", ["extract", "--images", str(src), "--output", str(folder / "f.npz")])):
        started = time.perf_counter()
        if main(argv + common) != 0:
            raise SystemExit(f"{name} failed")
        out[f"{name}_images_per_s"] = round(len(crops) / (time.perf_counter() - started), 2)
    out["images"] = len(crops)
    extract = (out["extract_images_per_s"] + out["extract_again_images_per_s"]) / 2
    out["build_vs_extract"] = round(out["index_build_images_per_s"] / extract, 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery-size", type=int, default=100_000, help="index rows (default: 100000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension, 2048 or 512 (default: 2048)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=50, help="searches per client (default: 50)")
    parser.add_argument("--run-images", type=int, default=100_000, help="training images in the run (default: 100000)")
    parser.add_argument("--build-images", type=int, default=0,
                        help="crops for index build vs extract (default: 0, skipped)")
    parser.add_argument("--build-from", type=Path,
                        help="folder whose JPEGs (recursively, sorted) the build comparison uses (default: the "
                        "fixture's demo crops, a few hundred)")
    parser.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto",
                        help="search backend of the server (default: auto, as `isereid serve`: faiss for "
                       "batches when installed, torch for single queries)")
    parser.add_argument("--output", help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from isereid.index import faiss_available

    # "auto" is what `isereid serve` uses: faiss for batches of queries when installed, torch for single ones
    backend = args.backend
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"config": {**options, "faiss_installed": faiss_available(), "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="isereid-serve-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        run, index, demo = make_fixture(folder, args.run_images, args.gallery_size, args.dim, args.seed)
        result["fixture_seconds"] = round(time.perf_counter() - t0, 1)
        proc, url = start_server(run, index, backend)
        try:
            first = args.run_images
            run_clients(url, first, args.gallery_size, 1, 5)  # warm-up (builds the faiss index when used)
            result["search_single"] = run_clients(url, first, args.gallery_size, 1, args.requests)
            result["search_concurrent"] = run_clients(url, first, args.gallery_size, args.clients, args.requests)
            result["search_upload"] = upload_latency(url, demo, 10)
            result["cluster_first_paint_s"] = cluster_first_paint(url)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if args.build_images:
            source = args.build_from if args.build_from is not None else demo
            result["build"] = build_throughput(run / "model_best.pt", source, args.build_images, folder)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if result["search_concurrent"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
