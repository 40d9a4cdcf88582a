"""Abuse paths: rate limits that cannot be dodged, keys compared in constant time and never logged, files outside
the photo folder never served, crafted ids, security headers on the page, over-long queries."""

from __future__ import annotations

import hmac
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_support import build_test_index, jpeg_bytes, running_app

from retrieval.index import write_index
from service.observability import JsonFormatter
from service.settings import RateLimitSettings, ServiceSettings
from tests.conftest import make_images

pytestmark = pytest.mark.anyio
LIMITED = RateLimitSettings(enabled=True, per_second=0.001, burst=3)


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def index(tiny_encoder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("abuse")
    build_test_index(tiny_encoder, root / "idx", root / "imgs", n=6)
    return root / "idx"


async def _codes(client, n: int, **kw) -> list[int]:
    return [(await client.get("/api/search", params={"q": "x"}, **kw)).status_code for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Rate limit on a validated identity
# --------------------------------------------------------------------------------------------------------------


async def test_a_made_up_key_per_request_does_not_buy_a_fresh_bucket(tiny_encoder, index):
    """Before: the bucket was keyed on any X-API-Key header, valid or not, so a random key per request was never
    limited."""
    settings = ServiceSettings(index_dir=index, warmup=False, rate_limit=LIMITED)
    async with running_app(settings, tiny_encoder) as (_, c):
        codes = [(await c.get("/api/search", params={"q": "x"},
                              headers={"X-API-Key": uuid.uuid4().hex})).status_code for _ in range(6)]
    assert codes == [200, 200, 200, 429, 429, 429]


async def test_each_valid_key_has_its_own_bucket(tiny_encoder, index):
    settings = ServiceSettings(index_dir=index, warmup=False, rate_limit=LIMITED, api_keys=["k-one", "k-two"])
    async with running_app(settings, tiny_encoder) as (_, c):
        assert await _codes(c, 4) == [200, 200, 200, 429]  # the address's bucket
        assert await _codes(c, 4, headers={"X-API-Key": "k-one"}) == [200, 200, 200, 429]
        assert await _codes(c, 1, headers={"X-API-Key": "k-two"}) == [200]
        assert await _codes(c, 1, headers={"X-API-Key": "k-three"}) == [429]  # unknown: the address's bucket


async def test_forwarded_header_is_believed_only_from_a_trusted_proxy(tiny_encoder, index):
    """The test client connects from 127.0.0.1."""
    untrusted = ServiceSettings(index_dir=index, warmup=False, rate_limit=LIMITED)
    async with running_app(untrusted, tiny_encoder) as (_, c):
        codes = [(await c.get("/api/search", params={"q": "x"},
                              headers={"X-Forwarded-For": f"10.0.0.{i}"})).status_code for i in range(5)]
        assert codes == [200, 200, 200, 429, 429]
    trusted = untrusted.model_copy(update={"trusted_proxies": ["127.0.0.0/8"]})
    async with running_app(trusted, tiny_encoder) as (_, c):
        fwd = {"X-Forwarded-For": "203.0.113.7"}
        assert await _codes(c, 4, headers=fwd) == [200, 200, 200, 429]
        assert await _codes(c, 1, headers={"X-Forwarded-For": "198.51.100.2"}) == [200]  # another client
        # a client writing its own X-Forwarded-For: the proxy appends the address it saw, which is what counts
        spoof = {"X-Forwarded-For": "198.51.100.99, 203.0.113.7"}
        assert await _codes(c, 1, headers=spoof) == [429]
        assert await _codes(c, 1, headers={"X-Forwarded-For": "not-an-address"}) == [200]  # the proxy's own


def test_trusted_proxies_must_be_addresses():
    with pytest.raises(ValueError, match="not an address"):
        ServiceSettings(trusted_proxies=["proxy.example.org"])


# --------------------------------------------------------------------------------------------------------------
# Keys: constant-time comparison, never logged
# --------------------------------------------------------------------------------------------------------------


async def test_every_key_is_compared_with_equal_lengths_whatever_matches(tiny_encoder, index, monkeypatch):
    """Before: ``any()`` stopped at the first matching key and compared inputs of different lengths, so timing
    told which key matched and how long it was."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ["first-key", "second-key-longer", "3"]
    settings = ServiceSettings(index_dir=index, warmup=False, api_keys=keys, protect_search=True)
    async with running_app(settings, tiny_encoder) as (_, c):
        for given, status in (("first-key", 200), ("3", 200), ("nope", 401)):
            calls.clear()
            r = await c.get("/api/search", params={"q": "x"}, headers={"X-API-Key": given})
            assert r.status_code == status
            assert len(calls) == len(keys) and len({n for pair in calls for n in pair}) == 1, calls


async def test_api_keys_never_reach_a_log_line(tiny_encoder, index, caplog):
    secret = "s3cret-" + uuid.uuid4().hex
    settings = ServiceSettings(index_dir=index, warmup=False, api_keys=[secret], protect_search=True,
                               rate_limit=LIMITED)
    caplog.set_level(logging.DEBUG)
    async with running_app(settings, tiny_encoder) as (_, c):
        for headers in ({"X-API-Key": secret}, {"X-API-Key": secret + "x"}, {}):
            await c.get("/api/search", params={"q": "x"}, headers=headers)
            await c.post("/api/admin/reload", headers=headers)
            await c.post("/api/search", content=b"{", headers={**headers, "content-type": "application/json"})
            await c.get("/images/nope.jpg", headers=headers)
    fmt = JsonFormatter()
    lines = [fmt.format(r) for r in caplog.records]
    assert any('"route"' in line for line in lines)  # the access log did run
    leaked = [line for line in lines if secret in line]
    assert not leaked, leaked
    assert secret not in repr(settings) and secret not in str(settings.model_dump())


# --------------------------------------------------------------------------------------------------------------
# Files outside the photo folder, crafted ids
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crafted(tiny_encoder, tmp_path_factory):
    """A photo folder with symlinks leading out of it, and an index whose ids/paths try every trick."""
    root = tmp_path_factory.mktemp("crafted")
    photos, outside = root / "photos", root / "outside"
    make_images(photos, 2)
    make_images(outside, 1, seed=9)
    (root / "secret.txt").write_text("top secret")
    os.symlink("/etc/passwd", photos / "passwd.jpg")
    os.symlink(outside / "img_0000.jpg", photos / "outside.jpg")
    os.symlink(outside, photos / "elsewhere")
    os.symlink(photos / "img_0000.jpg", photos / "inside-link.jpg")  # stays inside: fine to serve
    ids = ["img_0000.jpg", "passwd.jpg", "outside.jpg", "elsewhere/img_0000.jpg", "inside-link.jpg",
           "../secret.txt", "/etc/passwd", "a\x00b.jpg", "..%2Fsecret.txt", "．．／secret.txt", "img_0001.jpg/..",
           "..\\secret.txt"]
    vec = tiny_encoder.encode_images([Image.open(photos / "img_0000.jpg").convert("RGB")])[0]
    vectors = np.repeat(vec[None, :], len(ids), axis=0).astype(np.float32)
    write_index(root / "idx", vectors, [{"id": i, "path": i} for i in ids], encoder_identity=tiny_encoder.identity(),
                encoder_label="tiny", build={"source_root": str(photos)})
    return root


SERVED = ["img_0000.jpg", "inside-link.jpg"]
REFUSED = ["passwd.jpg", "outside.jpg", "elsewhere/img_0000.jpg", "..%2Fsecret.txt", "%2e%2e%2fsecret.txt",
           "%2Fetc%2Fpasswd", "a%00b.jpg", "%00", "%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecret.txt", "img_0001.jpg%2F..",
           "..%5Csecret.txt", "%252e%252e%252fsecret.txt", "\u0456mg_0000.jpg", "img_0000.jpg%00.png",
           "%ED%A0%80.jpg", "IMG_0000.JPG"]


async def test_nothing_outside_the_photo_folder_is_served(tiny_encoder, crafted):
    """Symlinks out of the folder (to /etc/passwd, to a file or a folder elsewhere), ids with '..', absolute
    paths, NUL, percent-encoding (single and double), backslashes, full-width and Cyrillic look-alikes: 404,
    never a 5xx, never the file. Before: an indexed id with a NUL byte made a 500."""
    secret_bytes = [b"top secret", b"root:", (crafted / "outside" / "img_0000.jpg").read_bytes()[:64]]
    settings = ServiceSettings(index_dir=crafted / "idx", warmup=False)
    async with running_app(settings, tiny_encoder, raise_app_exceptions=False) as (_, c):
        for item in SERVED:
            assert (await c.get(f"/images/{item}")).status_code == 200, item
        for item in REFUSED:
            for prefix in ("/images/", "/thumbs/"):
                r = await c.get(prefix + item)
                assert r.status_code == 404, (prefix + item, r.status_code, r.text[:200])
                assert not any(s in r.content for s in secret_bytes), prefix + item
            r = await c.get(f"/api/search/similar/{item}")
            assert r.status_code in (200, 404), (item, r.status_code)
        r = await c.post("/api/search", json={"query": "x", "top_k": 20})
        assert r.status_code == 200  # hits whose file cannot be served are still listed, by id only


# --------------------------------------------------------------------------------------------------------------
# The page's headers
# --------------------------------------------------------------------------------------------------------------


async def test_security_headers(tiny_encoder, index):
    async with running_app(ServiceSettings(index_dir=index, warmup=False), tiny_encoder) as (_, c):
        page = await c.get("/")
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "object-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-frame-options"] == "DENY"
        for path in ("/static/app.js", "/api/stats", "/images/img_0000.jpg", "/nope", "/docs"):
            r = await c.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert "default-src 'none'" in (await c.get("/api/stats")).headers["content-security-policy"]


# --------------------------------------------------------------------------------------------------------------
# Queries longer than the text model reads
# --------------------------------------------------------------------------------------------------------------


async def test_queries_longer_than_the_context_are_cut_with_a_warning(tiny_encoder, index):
    """The tiny CLIP reads 77 tokens. Before: the rest was dropped silently."""
    long_query = " ".join(f"word{i}" for i in range(120))  # ~600 characters, well over 77 tokens
    settings = ServiceSettings(index_dir=index, warmup=False, max_query_chars=2000)
    async with running_app(settings, tiny_encoder) as (_, c):
        short = await c.post("/api/search", json={"query": "a dog"})
        assert short.status_code == 200 and "warning" not in short.headers
        for r in (await c.post("/api/search", json={"query": long_query}),
                  await c.get("/api/search", params={"q": long_query})):
            assert r.status_code == 200, r.text
            assert r.headers["x-query-truncated"] == "0" and "77 tokens" in r.headers["warning"]
            assert r.headers["warning"].startswith("299 ")
        r = await c.post("/api/search/batch", json={"queries": ["a cat", long_query, "x " * 200]})
        assert r.status_code == 200 and r.headers["x-query-truncated"] == "1,2"
        assert (await c.post("/api/search", json={"query": "x" * 2001})).status_code == 422  # the hard limit
        cached = await c.post("/api/search", json={"query": long_query})  # served from the cache: still warned
        assert cached.headers["x-query-truncated"] == "0"
        # the routes that add text to an image warn too
        image = await c.post("/api/search/image", files={"file": ("q.jpg", jpeg_bytes(), "image/jpeg")},
                             data={"request": json.dumps({"query": long_query})})
        similar = await c.get("/api/search/similar/img_0001.jpg", params={"q": long_query})
        for r in (image, similar):
            assert r.status_code == 200, r.text
            assert r.headers["x-query-truncated"] == "0" and "77 tokens" in r.headers["warning"]
        plain = await c.get("/api/search/similar/img_0001.jpg")
        assert plain.status_code == 200 and "warning" not in plain.headers


async def test_an_upload_is_not_a_text_query(tiny_encoder, index):
    async with running_app(ServiceSettings(index_dir=index, warmup=False), tiny_encoder) as (_, c):
        r = await c.post("/api/search/image", files={"file": ("q.jpg", jpeg_bytes(), "image/jpeg")})
        assert r.status_code == 200 and "warning" not in r.headers

