"""The service's request pipeline: uploads are decoded in their own bounded pool, index searches run on their own
threads, and neither waits behind the encoder thread (nor does a cached query)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from service_support import build_test_index, jpeg_bytes, running_app

from service.settings import ServiceSettings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def index(tiny_encoder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    build_test_index(tiny_encoder, root / "idx", root / "imgs", n=12)
    return root / "idx"


class Gate:
    """Blocks the calls it wraps until released; records the threads they ran on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def wait(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.release.wait(20)


async def test_a_slow_upload_decode_does_not_stall_text_search(index, tiny_encoder, monkeypatch):
    import service.engine as engine

    gate = Gate()
    real_load = engine.load_image

    def slow_load(source, **kwargs):
        if isinstance(source, bytes):  # an upload (thumbnails read paths)
            gate.wait()
        return real_load(source, **kwargs)

    monkeypatch.setattr(engine, "load_image", slow_load)
    async with running_app(ServiceSettings(index_dir=index), tiny_encoder) as (_, client):
        upload = asyncio.create_task(client.post("/api/search/image", files={"file": ("a.jpg", jpeg_bytes())}))
        try:
            assert await asyncio.to_thread(gate.entered.wait, 10)
            r = await asyncio.wait_for(client.post("/api/search", json={"query": "a dog in the snow"}), 5)
            assert r.status_code == 200 and r.json()["results"]
        finally:
            gate.release.set()
        assert (await upload).status_code == 200
    assert gate.threads and not any(name.startswith("encoder") for name in gate.threads), gate.threads


async def test_searches_and_cached_queries_do_not_wait_behind_the_encoder(index, tiny_encoder, monkeypatch):
    gate = Gate()
    real_encode = tiny_encoder.encode_text
    search_threads: list[str] = []

    def slow_encode(texts):
        if "slow query" in texts:
            gate.wait()
        return real_encode(texts)

    monkeypatch.setattr(tiny_encoder, "encode_text", slow_encode)
    async with running_app(ServiceSettings(index_dir=index), tiny_encoder) as (app, client):
        store = app.state.service.searcher.store
        real_search = store.search

        def recording_search(*args, **kwargs):
            search_threads.append(threading.current_thread().name)
            return real_search(*args, **kwargs)

        monkeypatch.setattr(store, "search", recording_search)
        assert (await client.post("/api/search", json={"query": "a cat on a sofa"})).status_code == 200  # cached
        slow = asyncio.create_task(client.post("/api/search", json={"query": "slow query"}))
        try:
            assert await asyncio.to_thread(gate.entered.wait, 10)  # the encoder thread is now busy
            before = len(search_threads)
            r = await asyncio.wait_for(client.post("/api/search", json={"query": "a cat on a sofa"}), 5)
            assert r.status_code == 200 and r.json()["results"]
            r = await asyncio.wait_for(client.get("/api/search/similar/img_0001.jpg"), 5)
            assert r.status_code == 200
            while_busy = search_threads[before:]
        finally:
            gate.release.set()
        assert (await slow).status_code == 200
    assert while_busy and not any(name.startswith("encoder") for name in while_busy), while_busy


async def test_a_lone_query_is_searched_on_the_encoder_thread_and_a_queued_one_on_the_search_thread(
        index, tiny_encoder, monkeypatch):
    """A lone query skips the hand-off to the search thread (0.3 ms at concurrency 1); when queries queue up
    behind an encoder batch, their searches go to the search thread, so nothing waits for the encoder thread."""
    gate = Gate()
    real_encode = tiny_encoder.encode_text

    def slow_encode(texts):
        if "slow query" in texts:
            gate.wait()
        return real_encode(texts)

    monkeypatch.setattr(tiny_encoder, "encode_text", slow_encode)
    settings = ServiceSettings(index_dir=index, encode_workers=1)
    async with running_app(settings, tiny_encoder) as (app, client):
        state = app.state.service
        store = state.searcher.store
        real_search = store.search
        threads: list[str] = []

        def recording_search(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return real_search(*args, **kwargs)

        monkeypatch.setattr(store, "search", recording_search)
        r = await client.post("/api/search", json={"query": "a lone query"})
        assert r.status_code == 200 and r.json()["results"]
        assert threads == ["encoder_0"] and state.text_runner.search.stats.submitted == 0
        slow = asyncio.create_task(client.post("/api/search", json={"query": "slow query"}))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        queued = [asyncio.create_task(client.post("/api/search", json={"query": f"queued {i}"})) for i in range(3)]
        while state.text_runner.encode.depth() < 3:
            await asyncio.sleep(0.01)
        gate.release.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(slow, *queued))
    # the slow query found three queued behind it when its encoding ended, and they came as one batch of three:
    # every one of those searches ran on the search thread
    assert len(threads) >= 2 and set(threads[1:]) == {"search_0"}, threads


def test_searches_use_the_configured_openmp_threads_in_whatever_thread_runs_them(index, tiny_encoder):
    """faiss's idle OpenMP workers spin after every search: the searcher pins its calling thread's team size."""
    import faiss
    import numpy as np

    from service.engine import Searcher
    from service.query import SearchSpec, Term

    searcher = Searcher(tiny_encoder, index, omp_threads=1)
    seen: list[int] = []

    def search() -> None:
        faiss.omp_set_num_threads(2)  # what this thread had before the search
        vec = np.ones(tiny_encoder.dim, np.float32) / np.sqrt(tiny_encoder.dim)
        page = searcher.answer_many([(SearchSpec(terms=(Term("x"),), k=3), {"x": vec}, None)])[0]
        assert len(page.hits) == 3
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=search)
    t.start()
    t.join()
    assert seen == [1]


async def test_a_search_request_runs_no_dependency_in_the_thread_pool(index, tiny_encoder, monkeypatch):
    """FastAPI runs a plain ``def`` dependency in its thread pool: two thread hand-offs per search for a few
    attribute reads. The search routes' dependencies are ``async def``; a cached query's only thread is the search
    thread."""
    import fastapi.dependencies.utils as dep_utils

    calls: list[str] = []
    real = dep_utils.run_in_threadpool

    async def counting(func, *args, **kwargs):
        calls.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(dep_utils, "run_in_threadpool", counting)
    async with running_app(ServiceSettings(index_dir=index), tiny_encoder) as (_, client):
        for _ in range(2):  # the second is a cached query
            assert (await client.post("/api/search", json={"query": "a red car"})).status_code == 200
        assert (await client.get("/api/search", params={"q": "a red car"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    assert calls == [], calls
