"""The searcher's work cut into the stages of :class:`service.batching.Pipeline`, and the pipelines the lifespan
starts: text and image search, each ``prepare -> encode -> search`` on separate threads.

- prepare (text): validation, normalisation and the query-embedding cache, inline on the event loop (microseconds);
  a cache hit never reaches the encoder.
- prepare (image): decoding and resizing the upload in the bounded decode pool (never on the encoder thread).
- encode: one encoder call per micro-batch on the single encoder thread (ONNX Runtime or torch).
- search: one FAISS search per micro-batch on the search threads, overlapping the next encoder batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching import BatchObserver, DirectRunner, MicroBatcher, Pipeline, Runner
from service.engine import Hit, Searcher, TextQuery
from service.settings import ServiceSettings

#: Most queries one index search takes at once (the search batcher never waits to fill it).
SEARCH_BATCH = 64


@dataclass
class PreparedQuery:
    """A validated request on its way through the pipeline: ``text`` (normalised) or ``pixels`` ``(3, H, W)``
    float32, and ``vector`` ``(dim,)`` float32 once known."""

    k: int
    min_score: float | None
    text: str | None = None
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None


class SearchStages:
    """The stage functions over one :class:`Searcher` (each stage's thread-safety is the searcher's)."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher

    def prepare_text(self, item: Sequence[Any]) -> PreparedQuery:
        """``(text, k, min_score)`` -> a prepared query, with its vector when the cache has it. Raises BadInput."""
        q = TextQuery(*item)
        s = self.searcher
        s.check_k(q.k)
        text = s.check_query(q.text)
        return PreparedQuery(k=q.k, min_score=q.min_score, text=text, vector=s.cached_text_vector(text))

    def prepare_image(self, item: Sequence[Any]) -> PreparedQuery:
        """``(image bytes, k, min_score)`` -> a prepared query with decoded pixels. Raises BadInput/BadImage."""
        data, k, min_score = item
        self.searcher.check_k(k)
        return PreparedQuery(k=k, min_score=min_score, pixels=self.searcher.decode_upload(data))

    def encode_texts(self, items: list[PreparedQuery]) -> list[np.ndarray]:
        """One encoder call for a micro-batch of texts (fills the query cache)."""
        return list(self.searcher.encode_and_cache([it.text or "" for it in items]))

    def encode_images(self, items: list[PreparedQuery]) -> list[np.ndarray]:
        """One encoder call for a micro-batch of decoded uploads."""
        pixels = np.stack([it.pixels for it in items if it.pixels is not None])
        return list(self.searcher.encoder.encode_pixels(pixels))

    def search(self, items: list[tuple[PreparedQuery, np.ndarray]]) -> list[list[Hit]]:
        """One index search for a micro-batch of vectors."""
        vectors = np.stack([v for _, v in items]).astype(np.float32, copy=False)
        return self.searcher.search_vectors(vectors, [p.k for p, _ in items], [p.min_score for p, _ in items])


def _runner(settings: ServiceSettings, fn: Any, name: str, executor: Executor, observer: BatchObserver | None,
            max_batch: int, max_wait_ms: float, workers: int = 1) -> Runner:
    if settings.batching:
        return MicroBatcher(fn, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=settings.queue_size,
                            name=f"{name}-batcher", observer=observer, executor=executor, workers=workers)
    return DirectRunner(fn, queue_size=settings.queue_size, name=f"{name}-direct", observer=observer,
                        executor=executor)


def make_pipelines(searcher: Searcher, settings: ServiceSettings, *, encoder_executor: Executor,
                   decode_executor: Executor, search_executor: Executor, observer: Any = None,
                   encode_workers: int = 1) -> tuple[Pipeline[Any, PreparedQuery, list[Hit]],
                                                  Pipeline[Any, PreparedQuery, list[Hit]]]:
    """The text and image pipelines. ``observer(name)`` returns a batch observer (Prometheus) or None."""
    stages = SearchStages(searcher)

    def obs(name: str) -> BatchObserver | None:
        return observer(name) if observer is not None else None

    def pipeline(kind: str, prepare: Any, encode: Any, decode: Executor | None) -> Pipeline[Any, PreparedQuery,
                                                                                             list[Hit]]:
        enc = _runner(settings, encode, kind, encoder_executor, obs(kind), settings.max_batch, settings.max_wait_ms,
                      encode_workers)
        srch = _runner(settings, stages.search, f"{kind}-search", search_executor, obs(f"{kind}-search"),
                       SEARCH_BATCH, 0.0)
        return Pipeline(prepare, enc, srch, prepare_executor=decode, prepare_limit=settings.decode_queue,
                        name=kind)

    return (pipeline("text", stages.prepare_text, stages.encode_texts, None),
            pipeline("image", stages.prepare_image, stages.encode_images, decode_executor))
