"""`isereid serve`: the JSON API in-process (FastAPI's TestClient) against what the run folder
holds, every bad input of issue 20 (400 / 404 / 413 / 401 / 403, nothing written), and the
command's start-up (URL line, --port 0, one-line errors with exit 2). The browser tests are in
test_serve_browser.py."""
from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isereid.cli import main
from isereid.data.datasets import parse_image_name
from isereid.serve.state import RunView, group_clusters
from serve_fixtures import shared_run

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from isereid.serve.app import Server, create_app, listen  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def view(run_dir):
    return RunView(run_dir)


@pytest.fixture(scope="module")
def client(view):
    return TestClient(create_app(view), base_url="http://127.0.0.1")


def _snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _jpeg(path: str) -> bytes:
    return Path(path).read_bytes()


def test_run_summary_and_epochs(client, view):
    summary = client.get("/api/run").json()
    assert summary["epochs"] == [1, 2] and [r["epoch"] for r in summary["records"]] == [1, 2]
    assert summary["gallery"]["size"] == len(view.index) > 100
    assert summary["gallery"]["first_id"] == len(view.train_paths)
    assert 0 < summary["threshold"] < 2 and summary["threshold_epoch"] == 2
    assert client.get("/api/epochs").json() == {"epochs": [1, 2]}


def _slow_clusters(labels, camids):
    """The oracle: a dict per cluster id of {camera: sorted ids}, and the sorted outliers."""
    out = {}
    for i, (lab, cam) in enumerate(zip(labels, camids)):
        if lab >= 0:
            out.setdefault(int(lab), {}).setdefault(str(int(cam)), []).append(i)
    return out, [i for i, lab in enumerate(labels) if lab < 0]


@pytest.mark.parametrize("epoch", [1, 2])
def test_clusters_match_the_recorded_labels(client, run_dir, view, epoch):
    labels = np.load(run_dir / "labels" / f"epoch_{epoch:03d}.npz")["labels"]
    data = client.get(f"/api/clusters?epoch={epoch}").json()
    expected, outliers = _slow_clusters(labels, view.train_camids)
    assert data["epoch"] == epoch and data["outliers"] == outliers and data["total"] == len(expected)
    assert {c["id"]: c["cameras"] for c in data["clusters"]} == expected
    assert all(c["size"] == sum(map(len, c["cameras"].values())) for c in data["clusters"])
    sizes = [c["size"] for c in data["clusters"]]
    assert sizes == sorted(sizes, reverse=True)
    spread = client.get(f"/api/clusters?epoch={epoch}&sort=cameras").json()["clusters"]
    keys = [(len(c["cameras"]), c["size"]) for c in spread]
    assert keys == sorted(keys, reverse=True)
    # paging: pages concatenate to the whole list
    pages = [client.get(f"/api/clusters?epoch={epoch}&offset={o}&limit=5").json()["clusters"]
             for o in range(0, data["total"], 5)]
    assert [c["id"] for p in pages for c in p] == [c["id"] for c in data["clusters"]]
    assert client.get(f"/api/clusters?epoch={epoch}&outlier_offset=2&outlier_limit=3").json()["outliers"] == \
        outliers[2:5]


def test_group_clusters_camera_spread_order():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2, 2, 2])
    cams = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    grouped = group_clusters(labels, cams)
    assert grouped.order_size.tolist() == [2, 0, 1] and grouped.order_cameras.tolist() == [1, 2, 0]
    assert grouped.outliers.tolist() == [5]


def test_image_by_id(client, view):
    r = client.get("/api/image/3")
    assert r.status_code == 200 and r.content == Path(view.paths[3]).read_bytes()
    last = len(view.paths) - 1
    assert client.get(f"/api/image/{last}").content == Path(view.paths[last]).read_bytes()


def _brute_force(view, query, topk, exclude_cam=-1, exclude_row=-1):
    scores = view.index.features @ query
    order = [i for i in np.argsort(-scores, kind="stable")
             if i != exclude_row and (exclude_cam < 0 or view.index.camids[i] != exclude_cam)]
    return [int(i) + view.gallery_offset for i in order[:topk]]


def test_search_by_gallery_id_is_the_brute_force_ranking(client, view):
    gid = view.gallery_offset + 7
    row = view.index.features[7]
    for other in (False, True):
        data = client.post("/api/search", data={"image_id": str(gid), "topk": "8",
                                                "other_cameras_only": str(other).lower()}).json()
        ids = [r["image_id"] for r in data["results"]]
        assert ids == _brute_force(view, row, 8, view.index.camids[7] if other else -1, 7)
        scores = [r["score"] for r in data["results"]]
        np.testing.assert_allclose(scores, view.index.features[np.array(ids) - view.gallery_offset] @ row, atol=1e-5)
        if other:
            assert all(r["camera"] != view.index.camids[7] for r in data["results"])
        for r in data["results"]:
            assert r["name"] == Path(view.paths[r["image_id"]]).name
            assert r["match"] == (parse_image_name(r["name"])[0] == view.index.pids[7])


def test_search_by_upload_equals_search_by_train_id(client, view):
    """A training crop clicked in the cluster view and the same file uploaded give the same list."""
    path = view.paths[5]
    by_id = client.post("/api/search", data={"image_id": "5", "topk": "5"}).json()["results"]
    upload = client.post("/api/search", files={"image": (Path(path).name, _jpeg(path), "image/jpeg")},
                         data={"topk": "5"}).json()["results"]
    assert [r["image_id"] for r in upload] == [r["image_id"] for r in by_id]
    np.testing.assert_allclose([r["score"] for r in upload], [r["score"] for r in by_id], atol=1e-5)
    # the camera is read from a Market-style name: other_cameras_only leaves that camera out
    cam = parse_image_name(Path(path).name)[1]
    other = client.post("/api/search", files={"image": (Path(path).name, _jpeg(path), "image/jpeg")},
                        data={"topk": "5", "other_cameras_only": "true"}).json()["results"]
    assert other and all(r["camera"] != cam for r in other)


def test_bad_inputs_answer_one_line_and_write_nothing(client, run_dir, view):
    before = _snapshot(run_dir)
    png = io.BytesIO()
    Image.new("RGB", (32, 64), "red").save(png, format="PNG")
    truncated = png.getvalue()[: len(png.getvalue()) // 2]
    cases = [
        (client.post("/api/search", files={"image": ("a.jpg", b"this is not an image", "image/jpeg")}), 400),
        (client.post("/api/search", files={"image": ("a.png", truncated, "image/png")}), 400),
        (client.post("/api/search", files={"image": ("big.jpg", b"\xff" * (view.max_upload_bytes + 200_000))}), 413),
        (client.post("/api/search", data={"image_id": "999999"}), 404),
        (client.post("/api/search", data={"image_id": "../../etc/passwd"}), 400),
        (client.post("/api/search", data={"image_id": "1", "topk": "0"}), 400),
        (client.post("/api/search", data={}), 400),
        (client.get("/api/clusters?epoch=99"), 404),
        (client.get("/api/clusters?epoch=1&sort=name"), 400),
        (client.get("/api/image/999999"), 404),
        (client.get("/api/image/-1"), 404),
        (client.get("/api/clusters?epoch=x"), 400),
        (client.get("/api/clusters"), 400),
        (client.get("/api/clusters?epoch=1&limit=many"), 400),
        (client.get("/api/image/abc"), 400),
        (client.get("/api/image/abc/info"), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail
    assert client.get("/api/clusters?epoch=x").json()["detail"].startswith("bad parameter epoch: ")
    assert client.get("/api/image/abc").json()["detail"].startswith("bad parameter image_id: ")
    # paths in parameters never reach the file system: not a route, not an id
    for url in ("/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/../../etc/passwd", "/static/../../../etc/passwd",
                "/static/%2e%2e/%2e%2e/cli.py", f"/api/image/{run_dir}/model_best.pt"):
        r = client.get(url)
        assert r.status_code in (400, 404) and b"root:" not in r.content and b"argparse" not in r.content, url
    assert client.get("/api/run").status_code == 200  # still serving
    assert _snapshot(run_dir) == before


def test_loopback_mode_refuses_other_host_names(view):
    rebinding = TestClient(create_app(view), base_url="http://evil.example")
    assert rebinding.get("/api/run").status_code == 403
    assert TestClient(create_app(view), base_url="http://localhost:8000").get("/api/run").status_code == 200


def test_token_is_checked_on_every_page_and_api_call(view):
    client = TestClient(create_app(view, token="s3cret"), base_url="http://192.168.1.20")
    for method, url in (("get", "/"), ("get", "/api/run"), ("get", "/api/image/0"), ("get", "/static/app.js"),
                        ("get", "/api/clusters?epoch=1"), ("post", "/api/search")):
        assert getattr(client, method)(url).status_code == 401, url
    assert client.get("/api/run?token=wrong").status_code == 401
    assert client.get("/api/run", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = client.get("/?token=s3cret")  # the printed URL: sets a cookie the page's own requests carry
    assert first.status_code == 200 and b'data-testid="epoch-select"' in first.content
    assert client.get("/api/image/0").status_code == 200


def test_page_and_assets_ship_in_the_package(client):
    page = client.get("/").text
    for testid in ("epoch-select", "query-upload", "search-results"):
        assert f'data-testid="{testid}"' in page
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", client.get("/static/app.js").text)
    assert "<script src=\"http" not in page and "cdn" not in page.lower()


# ---------------------------------------------------------------------------- the command
def test_serve_without_labels_or_checkpoint_is_a_one_line_error(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", str(empty), "--port", "0"]) == 2
    assert "model_best.pt" in capsys.readouterr().err
    no_labels = tmp_path / "nolabels"
    no_labels.mkdir()
    (no_labels / "model_best.pt").write_bytes((run_dir / "model_best.pt").read_bytes())
    assert main(["serve", str(no_labels), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pseudo-labels" in err


def test_serve_prints_url_and_port_in_use_is_exit_2(run_dir, monkeypatch, capsys):
    """`isereid serve --port 0` picks a free port and prints it before serving; a second server on
    that port fails in one line, exit 2."""
    servers = []
    run = Server.run

    def run_and_record(self, view):
        servers.append(self)
        run(self, view)

    monkeypatch.setattr(Server, "run", run_and_record)
    thread = threading.Thread(target=main, args=(["serve", str(run_dir), "--port", "0"],), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            match = re.search(r"http://127\.0\.0\.1:(\d+)", capsys.readouterr().out)
            if match or not thread.is_alive():
                break
            time.sleep(0.1)
        assert match
        port = int(match.group(1))
        assert _get(f"http://127.0.0.1:{port}/api/epochs").json() == {"epochs": [1, 2]}
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert "in use" in err and len(err.strip().splitlines()) == 1
    finally:
        for server in servers:
            server.stop()
        thread.join(timeout=30)


def _get(url: str):
    """GET ``url``, waiting for a server thread that is still starting."""
    for _ in range(300):
        try:
            return httpx.get(url, timeout=30)
        except httpx.ConnectError:
            time.sleep(0.1)
    return httpx.get(url, timeout=30)


def test_other_host_needs_the_printed_token(view):
    lines = []
    server = listen("0.0.0.0", 0, say=lines.append)
    thread = threading.Thread(target=server.run, args=(view,), daemon=True)
    thread.start()
    try:
        assert len(lines) == 1 and "visible to that network" in lines[0]
        token = re.search(r"\?token=([\w-]+)$", server.url).group(1)
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/api/epochs").status_code == 401
        assert httpx.get(f"{base}/api/epochs?token={token}", timeout=30).status_code == 200
    finally:
        server.stop()
        thread.join(timeout=30)
