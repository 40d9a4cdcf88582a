"""Screenshots of the search page over real photos, for docs/screenshots/ (headless Chromium).

    python benchmarks/page_screenshots.py --data ../shared/data/flickr8k --out docs/screenshots

Copies 300 Flickr8k test photos into a temporary folder (never into the repository), sorted into folders by what
their captions mention (dogs/, water/, snow/, people/, other/) and given file dates spread over 2016-2024, indexes
them with the default encoder, serves the page and takes: a filtered search, a date-sorted one, "more like this"
plus text, the drop target, and a query with subtraction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TOPICS = (("dogs", ("dog", "puppy")), ("water", ("water", "beach", "ocean", "lake", "pool", "surf")),
          ("snow", ("snow",)), ("people", ("man", "woman", "boy", "girl", "child", "people")))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


def wait(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JS expression until truthy (the page's CSP forbids the ``new Function`` of ``wait_for_function``)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(expression)
        time.sleep(0.05)


def organise(data: Path, dest: Path, n: int) -> None:
    from retrieval.datasets import load_dataset

    start = time.mktime((2016, 1, 1, 12, 0, 0, 0, 0, -1))
    for i, rec in enumerate(load_dataset(data, split="test")[:n]):
        text = " ".join(rec.captions).lower()
        folder = next((name for name, words in TOPICS if any(f" {w}" in f" {text}" for w in words)), "other")
        target = dest / folder / rec.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rec.path, target)
        when = start + (i * 9.7 * 86400)  # about 8 years over 300 photos
        os.utime(target, (when, when))


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from indexer.pipeline import build_index
    from indexer.settings import IndexerSettings
    from retrieval.index import configure_faiss
    from service.main import create_app
    from service.settings import ServiceSettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    configure_faiss()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="page-shots-") as tmp:
        photos, idx = Path(tmp) / "photos", Path(tmp) / "idx"
        organise(args.data, photos, args.n)
        build_index(photos, idx, IndexerSettings(progress=False))
        app = create_app(ServiceSettings(index_dir=idx, access_log=False, torch_threads=1))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}/"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(base)
            wait(page, "document.getElementById('folder').options.length > 1")

            def search(text: str) -> None:
                page.evaluate("document.getElementById('status').textContent = ''")
                page.fill("#q", text)
                page.click("#go")
                wait(page, "document.getElementById('status').textContent.includes('results')")
                wait(page, "Array.from(document.querySelectorAll('.card img')).slice(0, 12)"
                                       ".every(i => i.complete && i.naturalWidth > 0)")

            def rerun(action) -> None:
                page.evaluate("document.getElementById('status').textContent = ''")
                action()
                wait(page, "document.getElementById('status').textContent.includes('results')")
                page.wait_for_timeout(600)

            search("a dog running on the grass")
            page.select_option("#folder", "dogs")
            rerun(lambda: page.dispatch_event("#folder", "change"))
            page.screenshot(path=str(args.out / "search-folder-filter.png"))
            rerun(lambda: page.select_option("#sort", "date_desc"))
            page.fill("#date-from", "2018-01-01")
            rerun(lambda: page.dispatch_event("#date-from", "change"))
            page.screenshot(path=str(args.out / "search-newest-first.png"))
            rerun(lambda: page.click("#clear-filters"))
            search("people at the beach -water")
            page.screenshot(path=str(args.out / "search-arithmetic.png"))
            rerun(lambda: page.locator(".card .more-like").first.click())
            page.fill("#q", "in the snow")
            rerun(lambda: page.click("#go"))
            page.screenshot(path=str(args.out / "search-more-like-this-plus-text.png"))
            page.evaluate("document.getElementById('drop-overlay').hidden = false")
            page.screenshot(path=str(args.out / "search-drop-image.png"))
            browser.close()
        srv.should_exit = True
    print(f"screenshots in {args.out}: " + ", ".join(sorted(f.name for f in args.out.glob("search-*.png"))))


if __name__ == "__main__":
    main()
