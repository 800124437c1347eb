"""`isereid serve` in a real headless Chromium (Debian's `chromium` through Playwright's Python
package; never `playwright install`): the three views render from the API, an uploaded crop
and a clicked crop give the API's own rank list, the epoch switch changes the clusters. Skipped
where Chromium or playwright is missing. ISEREID_SCREENSHOT_DIR=docs/images writes the three
screenshots of the docs."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_fixtures import shared_run

CHROMIUM = os.environ.get("ISEREID_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("fastapi")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no chromium (apt-get install chromium)")]

from isereid.serve.app import listen  # noqa: E402
from isereid.serve.state import RunView  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = shared_run(tmp_path_factory)
    view = RunView(run)
    srv = listen("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, args=(view,), daemon=True)
    thread.start()
    for _ in range(300):
        try:
            httpx.get(srv.url + "api/epochs", timeout=10)
            break
        except httpx.ConnectError:
            time.sleep(0.1)
    yield srv, view
    srv.stop()
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def _shot(page, name):
    folder = os.environ.get("ISEREID_SCREENSHOT_DIR")
    if folder:
        page.wait_for_load_state("networkidle")  # the lazily loaded crops
        page.screenshot(path=str(Path(folder) / name))


def test_run_and_cluster_views(server, page):
    srv, view = server
    page.goto(srv.url)
    page.wait_for_selector("#charts svg")
    assert page.locator("#charts svg").count() == 4
    assert page.locator("#epoch-table tr").count() == 3  # header + 2 epochs
    _shot(page, "serve_run.png")
    page.click("button[data-view=clusters]")
    cards = page.locator("[data-testid=cluster-card]")
    cards.first.wait_for()
    latest = view.clusters(2, limit=24)
    assert [int(c) for c in cards.evaluate_all("cs => cs.map(c => c.dataset.clusterId)")] == \
        [c["id"] for c in latest["clusters"]]
    _shot(page, "serve_clusters.png")
    page.select_option("[data-testid=epoch-select]", "1")
    first = view.clusters(1, limit=24)["clusters"][0]["id"]
    page.wait_for_function(f"document.querySelector('[data-testid=cluster-card]').dataset.clusterId == '{first}'"
                           " && document.querySelector('#page-info').textContent.includes('"
                           f"{view.clusters(1)['total']} clusters')")


def test_upload_gives_the_api_rank_list(server, page, tmp_path):
    srv, view = server
    page.goto(srv.url)
    page.click("button[data-view=search]")
    page.wait_for_selector("[data-testid=query-upload]")
    query = Path(view.paths[5])
    page.set_input_files("[data-testid=query-upload]", str(query))
    results = page.locator("[data-testid=search-results] [data-testid=result]")
    results.first.wait_for()
    api = view.search(image=view.decode_upload(query.read_bytes()), filename=query.name, topk=10)["results"]
    assert results.evaluate_all("rs => rs.map(r => r.dataset.imageName)") == [r["name"] for r in api]
    classes = results.evaluate_all("rs => rs.map(r => r.className)")
    assert [("match" in c.split()) for c in classes] == [r["match"] is True for r in api]
    # moving the threshold to 0 puts the no-match line before every result
    page.fill("#threshold", "0")
    page.dispatch_event("#threshold", "input")
    assert page.locator("[data-testid=search-results] > :first-child").get_attribute("data-testid") == "no-match"
    page.click("#threshold-reset")
    _shot(page, "serve_search.png")


def test_clicking_a_crop_searches_for_it(server, page):
    srv, view = server
    page.goto(srv.url)
    page.click("button[data-view=clusters]")
    crop = page.locator("[data-testid=cluster-card] img.crop").first
    crop.wait_for()
    image_id = int(crop.get_attribute("src").rsplit("/", 1)[1])
    crop.click()
    page.locator("[data-testid=result]").first.wait_for()
    api = view.search(image_id=image_id, topk=10)["results"]
    names = page.locator("[data-testid=result]").evaluate_all("rs => rs.map(r => r.dataset.imageName)")
    assert names == [r["name"] for r in api]
