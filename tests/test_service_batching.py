"""The micro-batcher on its own (no HTTP, no model): batching, bounded queue, per-item errors, drain on stop,
and the event loop staying responsive while the batch function runs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from retrieval.errors import BadQuery, Overloaded
from service.batching import DirectRunner, MicroBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def slow_double(delay: float = 0.02):
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int | BaseException]:
        calls.append(list(items))
        time.sleep(delay)  # blocking, like a model call
        return [BadQuery(f"bad {x}") if x < 0 else x * 2 for x in items]

    return fn, calls


async def test_items_are_batched_and_results_routed():
    fn, calls = slow_double()
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=5, queue_size=100)
    await b.start()
    results = await asyncio.gather(*(b.submit(i) for i in range(30)))
    await b.stop()
    assert results == [i * 2 for i in range(30)]
    assert max(len(c) for c in calls) == 8 and len(calls) < 30
    assert sorted(x for c in calls for x in c) == list(range(30))
    assert b.stats.items == 30 and b.stats.mean_batch > 1


async def test_bad_item_fails_alone():
    fn, _ = slow_double(0)
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=5)
    await b.start()
    out = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
    await b.stop()
    assert out[0] == 2 and out[2] == 4 and isinstance(out[1], BadQuery)


async def test_whole_batch_failure_reaches_every_caller():
    def boom(items):
        raise RuntimeError("model crashed")

    b = MicroBatcher(boom, max_batch=4, max_wait_ms=1)
    await b.start()
    out = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    await b.stop()
    assert all(isinstance(e, RuntimeError) for e in out)


async def test_full_queue_raises_overloaded():
    gate = threading.Event()

    def blocked(items):
        gate.wait(5)
        return items

    b = MicroBatcher(blocked, max_batch=1, max_wait_ms=0, queue_size=3)
    await b.start()
    first = asyncio.create_task(b.submit(0))  # taken by the worker, blocks in the thread
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(b.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await b.submit(99)
    assert b.stats.rejected == 1 and b.depth() == 3
    gate.set()
    assert await first == 0 and [await t for t in queued] == [1, 2, 3]
    await b.stop()


async def test_stop_drains_queue_then_refuses():
    fn, _ = slow_double(0.01)
    b = MicroBatcher(fn, max_batch=4, max_wait_ms=1, queue_size=100)
    await b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(20)]
    await asyncio.sleep(0)
    await b.stop()
    assert [t.result() for t in tasks] == [i * 2 for i in range(20)]  # every queued item answered
    with pytest.raises(Overloaded):
        await b.submit(1)


async def test_event_loop_not_blocked_while_encoding():
    fn, _ = slow_double(0.3)
    b = MicroBatcher(fn, max_batch=4, max_wait_ms=0)
    await b.start()
    ticks = 0

    async def heartbeat():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    hb = asyncio.create_task(heartbeat())
    assert await b.submit(5) == 10
    hb.cancel()
    await b.stop()
    assert ticks >= 10  # the loop kept running during the 0.3 s blocking call


async def test_cancelled_caller_does_not_break_the_worker():
    fn, _ = slow_double(0.05)
    b = MicroBatcher(fn, max_batch=2, max_wait_ms=0)
    await b.start()
    t = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.01)
    t.cancel()
    assert await b.submit(3) == 6
    await b.stop()


async def test_direct_runner_bounds_in_flight():
    gate = threading.Event()

    def blocked(items):
        gate.wait(5)
        return items

    r = DirectRunner(blocked, queue_size=2)
    await r.start()
    a = [asyncio.create_task(r.submit(i)) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await r.submit(9)
    gate.set()
    assert [await t for t in a] == [0, 1]
    await r.stop()


def test_invalid_parameters():
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, max_batch=0)


async def test_two_workers_run_two_batches_at_once():
    from concurrent.futures import ThreadPoolExecutor

    running = 0
    peak = 0
    lock = threading.Lock()

    def fn(items: list[int]) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return [x + 1 for x in items]

    pool = ThreadPoolExecutor(max_workers=2)
    b = MicroBatcher(fn, max_batch=4, max_wait_ms=0, workers=2, executor=pool)
    await b.start()
    out = await asyncio.gather(*(b.submit(i) for i in range(16)))
    await b.stop()
    pool.shutdown()
    assert out == [i + 1 for i in range(16)] and peak == 2
