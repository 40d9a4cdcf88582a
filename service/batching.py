"""Request micro-batching and the request pipeline, independent of HTTP.

:class:`MicroBatcher` puts each submitted item with an asyncio future on a bounded queue; ``workers`` worker tasks
(one by default) each take up to ``max_batch`` items (waiting at most ``max_wait_ms`` for the batch to fill), run the
batch function in a thread so the event loop never blocks, and resolve the futures. A full queue raises
:class:`Overloaded` at once (HTTP 429).
:class:`DirectRunner` has the same interface with no batching (one thread call per item, bounded in-flight), for
comparison and for deployments that want it.

:class:`Pipeline` chains them: prepare (a bounded decode pool, or inline checks) -> encode (a batcher on the encoder
threads) -> search (a batcher on the search threads), so decoding and searching never wait behind the encoder.

The batch function maps ``list[T]`` to a list of the same length whose entries are results or exception instances
(a bad item fails alone, not its whole batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from retrieval.errors import Overloaded

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

BatchFn = Callable[[list[T]], Sequence[R | BaseException]]


@dataclass
class BatcherStats:
    submitted: int = 0
    rejected: int = 0
    batches: int = 0
    items: int = 0
    max_seen_batch: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class BatchObserver(Protocol):
    def __call__(self, size: int, seconds: float) -> None: ...


class Runner(Protocol):
    """What the routes use: ``await runner.submit(item)``."""

    @property
    def stats(self) -> BatcherStats: ...

    async def submit(self, item: Any) -> Any: ...
    def depth(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: BatchFn[T, R],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        queue_size: int = 256,
        name: str = "batcher",
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
        workers: int = 1,
    ):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError("max_batch, queue_size and workers must be >= 1, max_wait_ms >= 0")
        self.fn = fn
        #: batches in flight at once (each one call of ``fn`` in ``executor``, which needs as many threads)
        self.workers = workers
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.name = name
        self.observer = observer
        self.executor = executor
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._accepting = False

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the queue and the worker tasks on the running loop."""
        if self._workers:
            return
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._accepting = True
        self._workers = [asyncio.create_task(self._run(), name=f"{self.name}-worker-{i}")
                         for i in range(self.workers)]

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let the workers finish everything already queued, then end them."""
        self._accepting = False
        if not self._workers or self._queue is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("%s: %d queued items dropped at shutdown", self.name, self._queue.qsize())
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        while not self._queue.empty():  # only after a timeout: fail the leftovers instead of leaving them hanging
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(Overloaded("the service is shutting down"))

    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # -- use -----------------------------------------------------------------------------------------------------
    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result. Raises :class:`Overloaded` when the queue is full or stopping."""
        if not self._accepting or self._queue is None:
            self.stats.rejected += 1
            raise Overloaded(f"{self.name} is not accepting requests (starting or shutting down)")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(f"{self.name} queue is full ({self.queue_size} waiting); retry later") from None
        self.stats.submitted += 1
        return await fut

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._collect()
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop callers that went away
            try:
                if live:
                    await self._execute(live)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _execute(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in live]
        t0 = time.perf_counter()
        try:
            results: Sequence[R | BaseException] = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.fn, items
            )
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(items)}")
        except Exception as exc:  # the whole batch failed: every caller gets the error
            results = [exc] * len(items)
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.max_seen_batch = max(self.stats.max_seen_batch, len(items))
        if self.observer is not None:
            self.observer(len(items), time.perf_counter() - t0)
        for (_, fut), res in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)


class DirectRunner(Generic[T, R]):
    """No batching: each item is its own call in a thread; at most ``queue_size`` in flight, then Overloaded."""

    def __init__(
        self,
        fn: BatchFn[T, R],
        *,
        queue_size: int = 256,
        name: str = "direct",
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
    ):
        self.fn = fn
        self.executor = executor
        self.queue_size = queue_size
        self.name = name
        self.observer = observer
        self.stats = BatcherStats()
        self._in_flight = 0
        self._accepting = False
        self._idle: asyncio.Event | None = None

    async def start(self) -> None:
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    async def stop(self, timeout: float = 30.0) -> None:
        self._accepting = False
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def depth(self) -> int:
        return self._in_flight

    async def submit(self, item: T) -> R:
        if not self._accepting or self._in_flight >= self.queue_size:
            self.stats.rejected += 1
            raise Overloaded(f"{self.name}: {self._in_flight} requests in flight; retry later")
        self.stats.submitted += 1
        self._in_flight += 1
        assert self._idle is not None
        self._idle.clear()
        try:
            t0 = time.perf_counter()
            (res,) = await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, [item])
            self.stats.batches += 1
            self.stats.items += 1
            self.stats.max_seen_batch = 1
            if self.observer is not None:
                self.observer(1, time.perf_counter() - t0)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if isinstance(res, BaseException):
            raise res
        return res


@dataclass(frozen=True)
class Answered:
    """What an encode batch function returns in a slot whose search it already ran (a lone query, see
    :func:`service.stages.make_pipelines`): the pipeline returns ``result`` and skips its search stage."""

    result: Any


class Prepared(Protocol):
    """What a pipeline's ``prepare`` returns: ``vector`` is set when the embedding is already known (a cached query),
    which skips the encoder."""

    vector: Any


P = TypeVar("P", bound=Prepared)


class Pipeline(Generic[T, P, R]):
    """A request's way through the service, each stage on its own threads so none waits behind another:

    1. ``prepare(item) -> P`` (validation, decoding an upload): in ``prepare_executor`` with at most
       ``prepare_limit`` items in flight (then :class:`Overloaded`), or inline on the event loop when the executor
       is None (cheap checks). Its exceptions (bad input) reach the caller.
    2. ``encode``: a runner (micro-batcher on the encoder thread) mapping ``P`` to a vector; skipped when ``prepare``
       already found the vector. It may answer instead (an :class:`Answered`), which skips the search stage.
    3. ``search``: a runner (on the search threads) mapping ``(P, vector)`` to the result.

    Same interface as the runners (``submit``, ``depth``, ``stats``, ``start``, ``stop``); ``stats`` counts requests
    and rejections of every stage, and the encoder batches.
    """

    def __init__(
        self,
        prepare: Callable[[T], P],
        encode: Runner,
        search: Runner,
        *,
        prepare_executor: Executor | None = None,
        prepare_limit: int = 64,
        name: str = "pipeline",
    ):
        if prepare_limit < 1:
            raise ValueError("prepare_limit must be >= 1")
        self.prepare = prepare
        self.encode = encode
        self.search = search
        self.prepare_executor = prepare_executor
        self.prepare_limit = prepare_limit
        self.name = name
        self._submitted = 0
        self._rejected = 0
        self._preparing = 0
        self._in_flight = 0

    @property
    def stats(self) -> BatcherStats:
        enc = self.encode.stats
        return BatcherStats(submitted=self._submitted,
                            rejected=self._rejected + enc.rejected + self.search.stats.rejected,
                            batches=enc.batches, items=enc.items, max_seen_batch=enc.max_seen_batch)

    async def start(self) -> None:
        await self.encode.start()
        await self.search.start()

    async def stop(self) -> None:
        await self.encode.stop()
        await self.search.stop()

    def depth(self) -> int:
        return self._in_flight

    async def submit(self, item: T) -> R:
        if self.prepare_executor is not None and self._preparing >= self.prepare_limit:
            self._rejected += 1
            raise Overloaded(f"{self.name}: {self._preparing} requests being prepared; retry later")
        self._submitted += 1
        self._in_flight += 1
        try:
            if self.prepare_executor is None:
                prepared = self.prepare(item)
            else:
                self._preparing += 1
                try:
                    prepared = await asyncio.get_running_loop().run_in_executor(self.prepare_executor, self.prepare,
                                                                                item)
                finally:
                    self._preparing -= 1
            vector = prepared.vector
            if vector is None:
                vector = await self.encode.submit(prepared)
                if isinstance(vector, Answered):
                    answer: R = vector.result
                    return answer
            result: R = await self.search.submit((prepared, vector))
            return result
        finally:
            self._in_flight -= 1
