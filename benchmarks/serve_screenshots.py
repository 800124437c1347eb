"""Screenshots of `isereid serve` for docs/serve.md, from a real training run.

    python benchmarks/serve_screenshots.py RUN_DIR --query IMAGE --output-dir docs/images [--other-cameras]

Starts the server on a free loopback port in this process, opens the run, clusters and search
views in headless Chromium (Debian's ``chromium`` through Playwright's Python package; never
``playwright install``) and writes ``serve_run.png``, ``serve_clusters.png`` and
``serve_search.png``. The search view uploads ``--query`` (with ``--other-cameras``, only
gallery crops of other cameras are ranked: the re-identification question).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

from isereid.serve.app import listen
from isereid.serve.state import RunView


def _wait_until_up(url: str) -> None:
    for _ in range(600):
        try:
            httpx.get(url + "api/epochs", timeout=10)
            return
        except httpx.ConnectError:
            time.sleep(0.1)
    raise SystemExit(f"serve_screenshots: the server at {url} did not answer")


# Every <img> inside the viewport has loaded (the crops are loading="lazy": "networkidle" can
# fire before Chromium has even asked for them).
_VISIBLE_IMAGES_LOADED = """() => Array.from(document.images)
    .filter(i => { const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; })
    .every(i => i.complete && i.naturalWidth > 0)"""


def _settle(page) -> None:
    page.wait_for_load_state("networkidle")
    page.wait_for_function(_VISIBLE_IMAGES_LOADED)
    page.wait_for_timeout(300)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training run folder (checkpoint and labels/)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--query", required=True, help="query image to upload in the search view")
    p.add_argument("--other-cameras", action="store_true", help="tick 'other cameras only' before searching")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = RunView(Path(args.run))
    srv = listen("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, args=(view,), daemon=True)
    thread.start()
    _wait_until_up(srv.url)
    query = args.query
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.set_default_timeout(120_000)
            page.goto(srv.url)
            page.wait_for_selector("#charts svg")
            _settle(page)
            page.screenshot(path=str(out / "serve_run.png"))
            page.click("button[data-view=clusters]")
            page.locator("[data-testid=cluster-card]").first.wait_for()
            _settle(page)
            page.screenshot(path=str(out / "serve_clusters.png"))
            page.click("button[data-view=search]")
            if args.other_cameras:
                page.check("#other-cameras")
            page.set_input_files("[data-testid=query-upload]", str(query))
            page.locator("[data-testid=search-results] [data-testid=result]").first.wait_for()
            _settle(page)
            page.screenshot(path=str(out / "serve_search.png"))
            browser.close()
    finally:
        srv.stop()
        thread.join(timeout=30)
    print(f"wrote serve_run.png, serve_clusters.png, serve_search.png to {out} (query {os.path.basename(query)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
