"""Folders and dates, near-duplicates over HTTP, OpenAI-format embeddings, and hot reload by watching the index
folder while requests keep coming (a sync publishes new versions under load: nothing dropped)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time

import numpy as np
import pytest
from PIL import Image
from service_support import build_test_index, jpeg_bytes, running_app

from service.settings import ServiceSettings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def index(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    images = root / "imgs"
    ids = build_test_index(tiny_encoder, root / "idx0", images, n=8)
    # two exact copies of img 0 and one of img 3 under other names: near-duplicates
    (images / "copies").mkdir()
    for src, name in ((0, "copies/a.jpg"), (0, "copies/b.jpg"), (3, "copies/c.jpg")):
        (images / name).write_bytes((images / ids[src]).read_bytes())
    from retrieval.index import write_index

    names = [*ids, "copies/a.jpg", "copies/b.jpg", "copies/c.jpg"]
    vecs = tiny_encoder.encode_images([Image.open(images / n).convert("RGB") for n in names])
    meta = [{"id": n, "path": n, "captions": [f"c {i}"], "taken_at": f"20{10 + i:02d}-01-01T00:00:00"}
            for i, n in enumerate(names)]
    write_index(root / "idx", vecs, meta, encoder_identity=tiny_encoder.identity(), encoder_label="tiny-test",
                build={"source_root": str(images.resolve())})
    return root, names


@pytest.fixture(scope="module")
async def client(index, tiny_encoder):
    root, _ = index
    settings = ServiceSettings(index_dir=root / "idx", warmup=False, max_upload_bytes=64 * 1024,
                               max_embeddings_body_bytes=256 * 1024, max_embedding_inputs=8)
    async with running_app(settings, tiny_encoder) as (_, c):
        yield c


async def test_folders_and_date_range(client):
    body = (await client.get("/api/folders")).json()
    assert body["folders"] == [{"folder": "", "count": 8}, {"folder": "copies", "count": 3}]
    assert body["count"] == 11 and body["earliest"].startswith("2010") and body["latest"].startswith("2020")


async def test_duplicates(client, index):
    _, names = index
    r = await client.get("/api/duplicates", params={"threshold": 0.999})
    assert r.status_code == 200, r.text
    body = r.json()
    groups = [sorted(i["id"] for i in c["items"]) for c in body["clusters"]]
    assert groups == [sorted([names[0], "copies/a.jpg", "copies/b.jpg"]), sorted([names[3], "copies/c.jpg"])]
    assert body["total"] == 2 and body["next_offset"] is None
    assert all(i["score"] > 0.999 for c in body["clusters"] for i in c["items"])
    page = (await client.get("/api/duplicates", params={"threshold": 0.999, "limit": 1})).json()
    assert len(page["clusters"]) == 1 and page["next_offset"] == 1
    assert (await client.get("/api/duplicates", params={"threshold": 0.5})).status_code == 422  # under the minimum
    assert (await client.get("/api/duplicates", params={"threshold": 2})).status_code == 422


def _data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


async def test_embeddings_of_texts_and_images(client, index, tiny_encoder):
    root, names = index
    image = (root / "imgs" / names[2]).read_bytes()
    r = await client.post("/v1/embeddings", json={"input": ["a dog", _data_url(image)], "model": "default"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "default" and [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"]) and body["usage"]["prompt_tokens"] == 2
    text_vec = np.array(body["data"][0]["embedding"], np.float32)
    np.testing.assert_allclose(text_vec, tiny_encoder.encode_text(["a dog"])[0], atol=1e-5)
    img_vec = np.array(body["data"][1]["embedding"], np.float32)
    np.testing.assert_allclose(img_vec, tiny_encoder.encode_images([Image.open(io.BytesIO(image))])[0], atol=1e-4)
    b64 = (await client.post("/v1/embeddings", json={"input": "a dog", "model": "tiny-test",
                                                     "encoding_format": "base64"})).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    np.testing.assert_allclose(struct.unpack(f"<{len(raw) // 4}f", raw), text_vec, atol=1e-6)
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and "default" in [m["id"] for m in models["data"]]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"input": "x", "model": "text-embedding-ada-002"}, 422, "model"),
    ({"input": "x", "model": "default", "dimensions": 7}, 422, "dimensions"),
    ({"input": ["x"] * 9, "model": "default"}, 422, "input"),
    ({"input": [], "model": "default"}, 422, None),
    ({"input": [" "], "model": "default"}, 422, None),
    ({"input": [1, 2, 3], "model": "default"}, 422, None),
    ({"input": "x"}, 422, None),
    ({"input": "data:text/plain;base64,aGk=", "model": "default"}, 422, "input[0]"),
    ({"input": "data:image/png;base64,@@@@", "model": "default"}, 422, "input[0]"),
    ({"input": ["ok", _data_url(b"not an image")], "model": "default"}, 422, "input[1]"),
    ({"input": _data_url(b"\0" * 70_000), "model": "default"}, 422, "limit"),
    ({"input": "y" * 10_000, "model": "default"}, 422, None),
    ({"input": "x", "model": "default", "encoding_format": "int8"}, 422, None),
])
async def test_bad_embeddings_requests(client, body, status, words):
    r = await client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["detail"]


async def test_embeddings_body_limit(client):
    big = _data_url(jpeg_bytes((10, 10)) + b"\0" * 300_000)
    r = await client.post("/v1/embeddings", json={"input": big, "model": "default"})
    assert r.status_code == 413


async def test_file_watch_reloads_a_synced_index_without_dropping_requests(tmp_path, tiny_encoder):
    from indexer.local_engine import LocalEngine
    from indexer.pipeline import build_index
    from indexer.settings import IndexerSettings
    from indexer.sync import sync_index
    from tests.conftest import make_images

    src, out = tmp_path / "photos", tmp_path / "idx"
    make_images(src, 6)
    settings = IndexerSettings(batch_size=4, workers=0, progress=False)
    engine = LocalEngine(tiny_encoder, settings)
    build_index(src, out, settings, engine=engine)
    svc = ServiceSettings(index_dir=out, warmup=False, watch_index_s=0.05, access_log=False)
    async with running_app(svc, tiny_encoder) as (_, c):
        statuses: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                r = await c.post("/api/search", json={"query": "a photo", "top_k": 5})
                statuses.append(r.status_code)
                await asyncio.sleep(0.005)

        workers = [asyncio.create_task(load()) for _ in range(4)]
        counts = []
        for round_ in range(3):
            make_images(src / f"batch{round_}", 2, seed=round_ + 10)
            await asyncio.to_thread(sync_index, src, out, settings, engine=engine)
            deadline = time.monotonic() + 20
            while (s := (await c.get("/api/stats")).json())["count"] != 6 + 2 * (round_ + 1):
                assert time.monotonic() < deadline, s
                await asyncio.sleep(0.05)
            counts.append(s["count"])
        stop.set()
        await asyncio.gather(*workers)
        assert counts == [8, 10, 12] and s["generation"] >= 4
        assert len(statuses) >= 8 and set(statuses) == {200}
        found = (await c.post("/api/search", json={"query": "x", "top_k": 12,
                                                   "filter": {"path_prefix": "batch2/"}})).json()
        assert sorted(h["id"] for h in found["results"]) == ["batch2/img_0000.jpg", "batch2/img_0001.jpg"]
