"""The web page in headless Chromium (Debian ``chromium`` + Playwright): type a query, see results, open an image,
search by upload; screenshot into tmp_path."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from service_support import build_test_index, serving

from service.main import create_app
from service.settings import ServiceSettings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    ids = build_test_index(tiny_encoder, root / "idx", root / "imgs", n=12)
    app = create_app(ServiceSettings(index_dir=root / "idx", warmup=False, access_log=False), encoder=tiny_encoder)
    with serving(app) as base:
        yield base, root, ids


def _wait(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` until truthy. (``page.wait_for_function`` evaluates its text with ``new Function``,
    which the page's Content-Security-Policy forbids; ``page.evaluate`` goes through the debugger instead.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def test_search_page(server, tmp_path: Path):
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    base, root, ids = server
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # the page works under its own strict Content-Security-Policy: no violation is ever reported
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(base + "/")
            page.wait_for_selector("#examples button")  # stats loaded, example queries shown
            assert "12 images" in page.inner_text("#stats")

            page.fill("#q", "a dog in the snow")
            page.click("#go")
            page.wait_for_selector(".card img")
            _wait(
                page, "Array.from(document.querySelectorAll('.card img')).every(i => i.complete && i.naturalWidth > 0)"
            )
            cards = page.locator(".card")
            assert cards.count() == 12
            assert "results for" in page.inner_text("#status")
            assert page.locator(".card .score").first.inner_text().startswith("#1 · ")

            shot = tmp_path / "results.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("SCREENSHOT_DIR"):  # keep a copy to look at
                shutil.copy(shot, Path(os.environ["SCREENSHOT_DIR"]) / "service-results.png")
            img = Image.open(shot).convert("L")
            assert img.size[0] >= 1000 and img.size[1] >= 600
            lo, hi = img.getextrema()
            assert hi - lo > 100 and len(set(img.resize((64, 64)).getdata())) > 50  # not a blank page

            # click a result: the full image opens in the viewer
            cards.first.click()
            _wait(
                page, "document.getElementById('viewer').open && document.getElementById('viewer-img').naturalWidth > 0"
            )
            page.click("#viewer-similar")
            _wait(page, "document.getElementById('status').textContent.includes('images like')")

            # search by uploading one of the indexed images: it comes first
            page.set_input_files("#upload", str(root / "imgs" / ids[5]))
            _wait(page, "document.getElementById('status').textContent.includes('image “')")
            assert page.locator(".card").first.get_attribute("data-id") == ids[5]

            # the upload stays as the query's image until cleared; then a blank query gives a message, not a request
            assert page.is_visible("#image-chip")
            page.click("#image-chip-clear")
            page.fill("#q", "   ")
            page.click("#go")
            assert "Type something" in page.inner_text("#status")
            page.fill("#q", "x" * 1000)  # over the limit: the server's 422 is shown
            page.click("#go")
            _wait(page, "document.getElementById('status').classList.contains('error')")
            assert "422" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()
