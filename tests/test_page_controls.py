"""Each control of the search page in headless Chromium, over a photo collection with folders, EXIF dates and a
calibrated encoder: folder and date filters, the sort toggle, pages / infinite scroll, "more like this", the +/-
syntax and its hint, drag-and-drop of an image, a combined image + text query, and the "show all" toggle.
``SCREENSHOT_DIR=docs/screenshots`` keeps a screenshot of each."""

from __future__ import annotations

import base64
import os
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_support import serving
from test_service_browser import ARGS, CHROMIUM, _wait

from retrieval.file_facts import EXIF_IFD, TAG_DATETIME_ORIGINAL
from service.main import create_app
from service.settings import ServiceSettings

pytestmark = pytest.mark.browser

FOLDERS = ["trips/2019", "trips/2021", "home"]
N = 30


def _taken(i: int) -> date:
    return date(2015, 1, 1) + timedelta(days=70 * i)


def _photos(root: Path) -> list[str]:
    """30 JPEGs in three folders, each with an EXIF DateTimeOriginal 70 days after the previous one."""
    rng = np.random.default_rng(4)
    ids = []
    for i in range(N):
        rel = f"{FOLDERS[i % 3]}/photo_{i:02d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[TAG_DATETIME_ORIGINAL] = _taken(i).strftime("%Y:%m:%d 12:00:00")
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, exif=exif, quality=90)
        ids.append(rel)
    return ids


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_clip_spec):
    """The page over an indexed collection, served by uvicorn; the encoder carries a calibration centred on the
    median score of the test query, so about half the hits fall under the default relevance threshold."""
    from indexer.local_engine import LocalEngine
    from indexer.pipeline import build_index
    from indexer.settings import IndexerSettings
    from retrieval.calibration import Calibration
    from retrieval.encoders import build_encoder
    from retrieval.heads import HeadConfig, HeadPair, save_heads

    root = tmp_path_factory.mktemp("page")
    ids = _photos(root / "photos")
    ckpt = root / "heads.pt"
    save_heads(HeadPair(HeadConfig(kind="residual", image_in=32, text_in=32, out_dim=32)), ckpt,
               extra={"calibration": Calibration("platt", {"a": 1.0, "b": 0.0}).to_dict()})
    encoder = build_encoder(tiny_clip_spec.model_copy(update={"heads": str(ckpt)}))
    # centre the calibration on this encoder's median score for the test query (its weights are random)
    vecs = encoder.encode_images([Image.open(root / "photos" / i).convert("RGB") for i in ids])
    median = float(np.median(vecs @ encoder.encode_text(["a photo"])[0]))
    encoder.calibration = Calibration("platt", {"a": 60.0, "b": -60.0 * median})
    settings = IndexerSettings(batch_size=8, workers=0, progress=False)
    build_index(root / "photos", root / "idx", settings, engine=LocalEngine(encoder, settings))
    # the threshold the page applies is a setting; 0.5 splits this encoder's calibrated hits
    settings = ServiceSettings(index_dir=root / "idx", warmup=False, access_log=False, default_min_relevance=0.5)
    app = create_app(settings, encoder=encoder)
    with serving(app) as base:
        yield base, root, ids


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    base, _, _ = site
    pg = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    pg.goto(base + "/")
    pg.wait_for_selector("#examples button")
    _wait(pg, "document.getElementById('folder').options.length > 1")
    yield pg
    assert not errors, errors
    pg.close()


def _shot(pg, name: str) -> None:
    if os.environ.get("SCREENSHOT_DIR"):
        out = Path(os.environ["SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out / f"page-{name}.png"), full_page=False)


def _search(pg, text: str, *, show_all: bool = True, k: str = "48") -> None:
    if pg.is_checked("#show-all") != show_all:
        pg.click("#show-all")
    pg.select_option("#top-k", k)
    pg.fill("#q", text)
    pg.evaluate("document.getElementById('status').textContent = ''")
    pg.click("#go")
    _wait(pg, "document.getElementById('status').textContent.includes('results')")


def _cards(pg) -> list[dict]:
    return pg.eval_on_selector_all(".card", "els => els.map(e => ({id: e.dataset.id, taken: e.dataset.taken, "
                                            "folder: e.dataset.folder, rel: e.dataset.relevance}))")


def _rerun(pg, action) -> None:
    """Do ``action`` (a control change that re-runs the search) and wait for the new answer."""
    pg.evaluate("document.getElementById('status').textContent = ''")
    action()
    _wait(pg, "document.getElementById('status').textContent.includes('results')")


def test_folder_filter(page):
    _search(page, "a photo")
    assert {c["folder"] for c in _cards(page)} == set(FOLDERS)
    _rerun(page, lambda: page.select_option("#folder", "trips/2019"))
    cards = _cards(page)
    assert len(cards) == 10 and {c["folder"] for c in cards} == {"trips/2019"}
    _rerun(page, lambda: page.select_option("#folder", "trips"))
    cards = _cards(page)
    assert len(cards) == 20 and all(c["folder"].startswith("trips/") for c in cards)
    options = page.eval_on_selector_all("#folder option", "os => os.map(o => o.textContent.trim())")
    assert "trips (20)" in options and "2019 (10)" in options
    _shot(page, "folder-filter")


def test_date_filters(page):
    _search(page, "a photo")
    page.fill("#date-from", "2016-01-01")
    _rerun(page, lambda: page.fill("#date-to", "2016-12-31") or page.dispatch_event("#date-to", "change"))
    cards = _cards(page)
    want = {i for i in range(N) if date(2016, 1, 1) <= _taken(i) <= date(2016, 12, 31)}
    assert len(cards) == len(want) and all("2016-01-01" <= c["taken"] < "2017-01-01" for c in cards)
    _rerun(page, lambda: page.click("#clear-filters"))
    assert len(_cards(page)) == N


def test_sort_toggle(page):
    _search(page, "a photo")
    by_score = [c["id"] for c in _cards(page)]
    _rerun(page, lambda: page.select_option("#sort", "date_desc"))
    taken = [c["taken"] for c in _cards(page)]
    assert taken == sorted(taken, reverse=True) and len(taken) == N
    _rerun(page, lambda: page.select_option("#sort", "date_asc"))
    assert [c["taken"] for c in _cards(page)] == sorted(taken)
    _shot(page, "sorted-by-date")
    _rerun(page, lambda: page.select_option("#sort", "score"))
    assert [c["id"] for c in _cards(page)] == by_score


def test_pages_and_infinite_scroll(page):
    _search(page, "a photo", k="12")
    for _ in range(20):
        if page.is_visible("#end"):
            break
        if page.is_visible("#more"):
            page.click("#more")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(150)
    assert page.is_visible("#end") and not page.is_visible("#more")
    ranks = page.eval_on_selector_all(".card .score", "els => els.map(e => parseInt(e.textContent.slice(1)))")
    ids = [c["id"] for c in _cards(page)]
    assert ranks == list(range(1, N + 1)) and len(set(ids)) == N
    assert "30 results" in page.inner_text("#status")


def test_more_like_this_then_a_combined_query(page):
    _search(page, "a photo")
    first = _cards(page)[0]["id"]
    _rerun(page, lambda: page.locator(".card .more-like").first.click())
    assert page.is_visible("#image-chip") and first in page.inner_text("#image-chip")
    assert f"images like {first}" in page.inner_text("#status")
    alone = [c["id"] for c in _cards(page)]
    assert first not in alone and len(alone) == N - 1
    _rerun(page, lambda: (page.fill("#q", "at night"), page.click("#go")))
    assert f"images like {first} + “at night”" in page.inner_text("#status")
    combined = [c["id"] for c in _cards(page)]
    assert first not in combined and combined != alone
    _shot(page, "more-like-this-plus-text")
    _rerun(page, lambda: page.click("#image-chip-clear"))
    assert not page.is_visible("#image-chip") and "images like" not in page.inner_text("#status")


def test_syntax_hint_and_query_arithmetic(page):
    assert "-word" in page.inner_text("#syntax-hint") and "2:word" in page.inner_text("#syntax-hint")
    _search(page, "a photo -snow 2:beach")
    assert "“+a photo −snow +2×beach”" in page.inner_text("#status")
    page.fill("#q", "a photo -")
    page.click("#go")
    _wait(page, "document.getElementById('status').classList.contains('error')")
    assert "422" in page.inner_text("#status") and "query" in page.inner_text("#status")


def test_drag_and_drop_an_image_and_add_text(page, site):
    _, root, ids = site
    data = base64.b64encode((root / "photos" / ids[7]).read_bytes()).decode()
    dt = page.evaluate_handle(
        """([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
             return dt; }""",
        [data, "dropped.jpg"])
    page.dispatch_event("body", "dragenter", {"dataTransfer": dt})
    assert page.is_visible("#drop-overlay")
    _shot(page, "drop-an-image")
    page.evaluate("document.getElementById('status').textContent = ''")
    page.dispatch_event("body", "drop", {"dataTransfer": dt})
    _wait(page, "document.getElementById('status').textContent.includes('results')")
    assert not page.is_visible("#drop-overlay") and "dropped.jpg" in page.inner_text("#image-chip")
    assert _cards(page)[0]["id"] == ids[7]  # the dropped photo is in the index: it comes first
    _rerun(page, lambda: (page.fill("#q", "in the snow"), page.click("#go")))
    assert "image “dropped.jpg” + “in the snow”" in page.inner_text("#status")


def test_show_all_toggle(page):
    _search(page, "a photo", show_all=False)
    hidden = _cards(page)
    assert 0 < len(hidden) < N and all(float(c["rel"]) >= 0.5 for c in hidden)
    assert "less relevant hits hidden" in page.inner_text("#status")
    _shot(page, "relevance-threshold")
    _rerun(page, lambda: page.click("#show-all"))
    shown = _cards(page)
    assert len(shown) == N and any(float(c["rel"]) < 0.5 for c in shown)
    assert [c["id"] for c in shown[: len(hidden)]] == [c["id"] for c in hidden]

