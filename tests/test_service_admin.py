"""Hot reload, encoder mismatch at startup and on reload, API keys, rate limiting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from service_support import build_test_index, running_app

from retrieval.errors import IndexEncoderMismatch, IndexNotFound
from service.settings import RateLimitSettings, ServiceSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def two_indexes(tiny_encoder, tmp_path: Path):
    build_test_index(tiny_encoder, tmp_path / "a", tmp_path / "imgs", n=6)
    build_test_index(tiny_encoder, tmp_path / "b", tmp_path / "imgs", n=10)
    other = {**tiny_encoder.identity(), "model": "some-other-model"}
    build_test_index(tiny_encoder, tmp_path / "other", tmp_path / "imgs", n=4, identity=other)
    return tmp_path


async def test_hot_reload_without_dropping_requests(tiny_encoder, two_indexes):
    settings = ServiceSettings(index_dir=two_indexes / "a", warmup=False)
    async with running_app(settings, tiny_encoder) as (_, c):
        assert (await c.get("/api/stats")).json()["count"] == 6

        async def searches(n: int) -> list[int]:
            out = []
            for i in range(n):
                r = await c.post("/api/search", json={"query": f"q{i % 5}", "top_k": 20})
                out.append(r.status_code)
            return out

        load = [asyncio.create_task(searches(25)) for _ in range(4)]
        await asyncio.sleep(0)
        r = await c.post("/api/admin/reload", json={"index_dir": str(two_indexes / "b")})
        assert r.status_code == 200, r.text
        assert r.json()["count"] == 10 and r.json()["generation"] == 2 and r.json()["previous_generation"] == 1
        statuses = [s for t in load for s in await t]
        assert statuses == [200] * 100
        assert (await c.get("/api/stats")).json()["count"] == 10
        hits = (await c.post("/api/search", json={"query": "x", "top_k": 20})).json()["results"]
        assert len(hits) == 10

        # reload with no body re-opens the current folder
        r = await c.post("/api/admin/reload")
        assert r.status_code == 200 and r.json()["generation"] == 3


async def test_reload_refuses_other_encoder_and_keeps_serving(tiny_encoder, two_indexes):
    async with running_app(ServiceSettings(index_dir=two_indexes / "a", warmup=False), tiny_encoder) as (_, c):
        r = await c.post("/api/admin/reload", json={"index_dir": str(two_indexes / "other")})
        assert r.status_code == 409 and r.json()["error"] == "IndexEncoderMismatch"
        assert "some-other-model" in r.json()["detail"]
        r = await c.post("/api/admin/reload", json={"index_dir": str(two_indexes / "missing")})
        assert r.status_code == 404 and r.json()["error"] == "IndexNotFound"
        (two_indexes / "broken").mkdir()
        (two_indexes / "broken" / "manifest.json").write_text("{not json")
        r = await c.post("/api/admin/reload", json={"index_dir": str(two_indexes / "broken")})
        assert r.status_code in (404, 422)
        assert (await c.post("/api/admin/reload", json={"index_dir": ""})).status_code == 422
        stats = (await c.get("/api/stats")).json()
        assert stats["count"] == 6 and stats["generation"] == 1
        assert (await c.post("/api/search", json={"query": "ok"})).status_code == 200


async def test_startup_refuses_index_of_another_encoder(tiny_encoder, two_indexes):
    with pytest.raises(IndexEncoderMismatch, match="some-other-model"):
        async with running_app(ServiceSettings(index_dir=two_indexes / "other"), tiny_encoder):
            pass
    with pytest.raises(IndexNotFound):
        async with running_app(ServiceSettings(index_dir=two_indexes / "nothing-here"), tiny_encoder):
            pass


async def test_api_keys(tiny_encoder, two_indexes):
    settings = ServiceSettings(index_dir=two_indexes / "a", warmup=False, api_keys=["s3cret", "other"])
    async with running_app(settings, tiny_encoder) as (_, c):
        assert (await c.post("/api/admin/reload")).status_code == 401
        assert (await c.post("/api/admin/reload", headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await c.post("/api/admin/reload", headers={"X-API-Key": "s3cret"})).status_code == 200
        assert (await c.post("/api/search", json={"query": "open"})).status_code == 200  # search stays open
    settings = settings.model_copy(update={"protect_search": True})
    async with running_app(settings, tiny_encoder) as (_, c):
        assert (await c.post("/api/search", json={"query": "closed"})).status_code == 401
        r = await c.post("/api/search", json={"query": "closed"}, headers={"X-API-Key": "other"})
        assert r.status_code == 200
        assert (await c.get("/healthz")).status_code == 200


async def test_rate_limit(tiny_encoder, two_indexes):
    settings = ServiceSettings(index_dir=two_indexes / "a", warmup=False,
                               rate_limit=RateLimitSettings(enabled=True, per_second=0.01, burst=3))
    async with running_app(settings, tiny_encoder) as (_, c):
        codes = [(await c.get("/api/search", params={"q": "x"})).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        r = await c.get("/api/search", params={"q": "x"})
        assert r.headers["retry-after"] == "1" and r.json()["error"] == "RateLimited"
        assert (await c.get("/healthz")).status_code == 200  # never limited
        # a key the service does not know buys no bucket of its own (tests/test_service_abuse.py has the rest)
        assert (await c.get("/api/search", params={"q": "x"}, headers={"X-API-Key": "k"})).status_code == 429


async def test_overloaded_queue_is_429(tiny_encoder, two_indexes):
    settings = ServiceSettings(index_dir=two_indexes / "a", warmup=False, queue_size=2, max_wait_ms=50)
    async with running_app(settings, tiny_encoder) as (_, c):
        rs = await asyncio.gather(*(c.post("/api/search", json={"query": f"q {i}"}) for i in range(40)))
        codes = sorted({r.status_code for r in rs})
        assert codes == [200, 429]
        limited = next(r for r in rs if r.status_code == 429)
        assert limited.json()["error"] == "Overloaded" and limited.headers["retry-after"] == "1"
        assert (await c.post("/api/search", json={"query": "after"})).status_code == 200


async def test_not_ready_is_503(tiny_encoder, two_indexes):
    from service.main import create_app

    app = create_app(ServiceSettings(index_dir=two_indexes / "a"), encoder=tiny_encoder)
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:  # no lifespan
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200
        r = await c.post("/api/search", json={"query": "x"})
        assert r.status_code == 503 and r.json()["error"] == "NotReady"


async def test_startup_checks_manifest_before_loading_weights(tiny_clip_spec, tiny_encoder, two_indexes, monkeypatch):
    import retrieval.encoders as encoders
    from retrieval.settings import EncoderSettings

    monkeypatch.setattr(encoders.spec, "_registry", {**encoders.encoder_configs(), "tiny-service-test": tiny_clip_spec})
    built = []
    monkeypatch.setattr(encoders, "build_encoder", lambda spec: built.append(spec) or tiny_encoder)
    enc = EncoderSettings(name="tiny-service-test", precision="fp32", device="cpu")
    with pytest.raises(IndexEncoderMismatch):
        async with running_app(ServiceSettings(index_dir=two_indexes / "other", encoder=enc), None):
            pass
    assert built == []  # refused from the manifest alone
    async with running_app(ServiceSettings(index_dir=two_indexes / "a", encoder=enc, warmup=False), None) as (_, c):
        assert (await c.post("/api/search", json={"query": "ok"})).status_code == 200
    assert len(built) == 1
