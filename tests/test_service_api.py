"""The HTTP API end to end (httpx + ASGITransport, lifespan entered), with the tiny random-weight encoder."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from service_support import build_test_index, jpeg_bytes, running_app

from service.settings import ServiceSettings

pytestmark = pytest.mark.anyio

UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def index(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    ids = build_test_index(tiny_encoder, root / "idx", root / "imgs", n=12)
    (root / "secret.txt").write_text("top secret")
    return root, ids


@pytest.fixture(scope="module")
async def client(index, tiny_encoder):
    root, _ = index
    settings = ServiceSettings(index_dir=root / "idx", max_upload_bytes=UPLOAD_LIMIT, max_query_chars=500,
                               max_top_k=50, cors_origins=["http://example.org"])
    async with running_app(settings, tiny_encoder) as (_, c):
        yield c


# --------------------------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------------------------


async def test_text_search_returns_ranked_hits(client):
    r = await client.post("/api/search", json={"query": "a dog in the snow", "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["results"]
    assert body["query"] == "a dog in the snow" and body["top_k"] == 5 and len(hits) == 5
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    h = hits[0]
    assert h["image_url"] == f"/images/{h['id']}" and h["thumb_url"] == f"/thumbs/{h['id']}"
    assert h["metadata"]["captions"] and h["metadata"]["path"] == h["id"] and h["metadata"]["folder"] == ""
    assert {"taken_at", "width", "height"} <= set(h["metadata"])
    assert body["next_offset"] == 5 and body["terms"] == [{"text": "a dog in the snow", "weight": 1.0}]


async def test_get_variant_and_min_score(client):
    r = await client.get("/api/search", params={"q": "a cat", "top_k": 12})
    assert r.status_code == 200
    scores = [h["score"] for h in r.json()["results"]]
    cut = (scores[3] + scores[4]) / 2
    r2 = await client.get("/api/search", params={"q": "a cat", "top_k": 12, "min_score": cut})
    assert [h["score"] for h in r2.json()["results"]] == scores[:4]


async def test_top_k_larger_than_index(client):
    r = await client.post("/api/search", json={"query": "anything", "top_k": 50})
    assert r.status_code == 200 and len(r.json()["results"]) == 12


async def test_batch_search(client):
    r = await client.post("/api/search/batch", json={"queries": ["a dog", "a cat", "a dog"], "top_k": 3})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["query"] for x in res] == ["a dog", "a cat", "a dog"]
    assert res[0]["results"] == res[2]["results"]


async def test_query_cache_hits(client):
    before = (await client.get("/api/stats")).json()["query_cache"]
    for _ in range(3):
        assert (await client.post("/api/search", json={"query": "  cached   query  "})).status_code == 200
    assert (await client.post("/api/search", json={"query": "cached query"})).status_code == 200
    after = (await client.get("/api/stats")).json()["query_cache"]
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 3


async def test_image_upload_finds_itself(client, index):
    root, ids = index
    data = (root / "imgs" / ids[4]).read_bytes()
    r = await client.post("/api/search/image", params={"top_k": 3}, files={"file": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == ids[4]
    assert r.json()["results"][0]["score"] > 0.99


async def test_similar_by_id_excludes_itself(client, index):
    _, ids = index
    r = await client.get(f"/api/search/similar/{ids[0]}", params={"top_k": 4})
    assert r.status_code == 200
    got = [h["id"] for h in r.json()["results"]]
    assert len(got) == 4 and ids[0] not in got


async def test_images_and_thumbs(client, index):
    root, ids = index
    r = await client.get(f"/images/{ids[1]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (root / "imgs" / ids[1]).read_bytes()
    t = await client.get(f"/thumbs/{ids[1]}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size[0] <= 256
    t2 = await client.get(f"/thumbs/{ids[1]}")
    assert t2.content == t.content


async def test_health_ready_stats_metrics_page(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    s = (await client.get("/api/stats")).json()
    assert s["count"] == 12 and s["dim"] == 32 and s["generation"] == 1 and s["examples"]
    m = await client.get("/metrics")
    assert m.status_code == 200 and "http_requests_total" in m.text and "encoder_batch_size" in m.text
    page = await client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert (await client.get("/static/app.js")).status_code == 200
    assert "x-request-id" in page.headers


async def test_cors(client):
    r = await client.options("/api/search", headers={"Origin": "http://example.org",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") == "http://example.org"
    r = await client.get("/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear 4xx, and nothing else breaks
# --------------------------------------------------------------------------------------------------------------

BAD_JSON_BODIES = [
    ({"query": ""}, 422),
    ({"query": "   \t\n "}, 422),
    ({"query": "x" * 10_000}, 422),
    ({"query": "x" * 600}, 422),  # under the schema ceiling, over the configured max_query_chars
    ({"query": "dog", "top_k": 0}, 422),
    ({"query": "dog", "top_k": -3}, 422),
    ({"query": "dog", "top_k": 10**12}, 422),
    ({"query": "dog", "top_k": 60}, 422),  # under the schema ceiling, over the configured max_top_k
    ({"query": "dog", "top_k": "ten"}, 422),
    ({"query": "dog", "top_k": 2.5}, 422),
    ({"query": "dog", "top_k": True}, 422),
    ({"query": "dog", "top_k": "5"}, 422),
    ({"query": "dog", "min_score": 7}, 422),
    ({"query": 42}, 422),
    ({"query": ["a"]}, 422),
    ({"query": None}, 422),
    ({}, 422),
    ({"query": "dog", "unexpected": 1}, 422),
    ([], 422),
]


@pytest.mark.parametrize(("body", "status"), BAD_JSON_BODIES, ids=range(len(BAD_JSON_BODIES)))
async def test_bad_search_bodies(client, body, status):
    r = await client.post("/api/search", json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


MALFORMED = [b"{", b"not json", b'{"query": "dog",}', b"\xff\xfe", b"", b'{"query": "x", "min_score": NaN}',
             b'{"query": "x", "top_k": Infinity}', b'{"query": "x", "top_k": 1e999}']


@pytest.mark.parametrize("raw", MALFORMED)
async def test_malformed_json(client, raw):
    r = await client.post("/api/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422


async def test_wrong_content_type(client):
    r = await client.post("/api/search", content=b"query=dog", headers={"content-type": "text/plain"})
    assert r.status_code == 422


@pytest.mark.parametrize("params", [{"q": ""}, {"q": " "}, {"q": "dog", "top_k": "abc"}, {"q": "dog", "top_k": 0},
                                    {"q": "dog", "top_k": -1}, {"q": "dog", "top_k": 99999999999999999999}, {}])
async def test_bad_get_params(client, params):
    assert (await client.get("/api/search", params=params)).status_code == 422


@pytest.mark.parametrize("body", [{"queries": []}, {"queries": ["ok", " "]}, {"queries": ["x"] * 65},
                                  {"queries": ["x"] * 40}, {"queries": "dog"}, {"queries": ["y" * 3000]}])
async def test_bad_batch(client, body):
    assert (await client.post("/api/search/batch", json=body)).status_code == 422


def _png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims a huge picture (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"this is not an image", 422),
        (jpeg_bytes()[:200], 422),  # truncated
        (_png_bomb(), 422),
        (b"", 422),
        (b"\x00" * (UPLOAD_LIMIT + 10), 413),
    ],
    ids=["text", "truncated", "bomb", "empty", "oversized"],
)
async def test_bad_uploads(client, data, status):
    r = await client.post("/api/search/image", files={"file": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == status, r.text


async def test_oversized_upload_refused_by_content_length(client):
    big = b"\x00" * (UPLOAD_LIMIT + 128 * 1024)
    r = await client.post("/api/search/image", files={"file": ("x.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"


async def test_upload_without_file_field(client):
    r = await client.post("/api/search/image", data={"other": "x"})
    assert r.status_code == 422


async def test_oversized_json_body(client):
    r = await client.post("/api/search", content=json.dumps({"query": "a" * 300_000}),
                          headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    "item_id",
    ["../secret.txt", "..%2Fsecret.txt", "%2e%2e/secret.txt", "/etc/passwd", "..\\secret.txt", "img_0001.jpg/..",
     "nope.jpg", "img_0001", "IMG_0001.JPG", "%00", "img_0001.jpg%00.png"],
)
async def test_path_traversal_and_unknown_ids(client, item_id):
    for prefix in ("/images/", "/thumbs/", "/api/search/similar/"):
        r = await client.get(prefix + item_id)
        assert r.status_code in (404, 422), (prefix, item_id, r.status_code)
        assert b"top secret" not in r.content


async def test_still_healthy_after_abuse(client):
    r = await client.post("/api/search", json={"query": "still fine"})
    assert r.status_code == 200
    assert (await client.get("/readyz")).status_code == 200


# --------------------------------------------------------------------------------------------------------------
# Index paths that leave the image root are refused even for indexed ids
# --------------------------------------------------------------------------------------------------------------


async def test_index_path_outside_root_is_not_served(tiny_encoder, tmp_path: Path):
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes())
    ids = build_test_index(tiny_encoder, tmp_path / "idx", tmp_path / "imgs", n=3,
                           meta_override={0: {"path": "../outside.jpg"}, 1: {"path": "/etc/passwd"}})
    async with running_app(ServiceSettings(index_dir=tmp_path / "idx", warmup=False), tiny_encoder) as (_, c):
        for i in (0, 1):
            assert (await c.get(f"/images/{ids[i]}")).status_code == 404
            assert (await c.get(f"/thumbs/{ids[i]}")).status_code == 404
        assert (await c.get(f"/images/{ids[2]}")).status_code == 200


async def test_concurrent_requests_all_answered(client):
    rs = await asyncio.gather(*(client.post("/api/search", json={"query": f"query {i % 7}", "top_k": 3})
                                for i in range(60)))
    assert [r.status_code for r in rs] == [200] * 60


async def test_default_top_k_setting_applies_where_the_request_gives_none(index, tiny_encoder):
    root, ids = index
    settings = ServiceSettings(index_dir=root / "idx", default_top_k=3, warmup=False)
    async with running_app(settings, tiny_encoder) as (_, c):
        for r in (await c.get("/api/search", params={"q": "a dog"}),
                  await c.post("/api/search", json={"query": "a dog"}),
                  await c.get(f"/api/search/similar/{ids[0]}")):
            assert r.status_code == 200, r.text
            assert r.json()["top_k"] == 3 and len(r.json()["results"]) == 3
        batch = await c.post("/api/search/batch", json={"queries": ["a", "b"]})
        assert [len(x["results"]) for x in batch.json()["results"]] == [3, 3]
        explicit = await c.post("/api/search", json={"query": "a dog", "top_k": 5})
        assert len(explicit.json()["results"]) == 5
