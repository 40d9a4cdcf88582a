"""The searcher's work cut into the stages of :class:`service.batching.Pipeline`, and the pipelines the lifespan
starts: text and image search, each ``prepare -> encode -> search`` on separate threads.

- prepare (text): validation, normalisation and the query-embedding cache, inline on the event loop (microseconds);
  a cache hit never reaches the encoder.
- prepare (image): decoding and resizing the upload in the bounded decode pool (never on the encoder thread).
- encode: one encoder call per micro-batch on the encoder threads (ONNX Runtime or torch), for the texts the cache
  lacked and the uploads.
- search: each query of a micro-batch (filters, hybrid ranking, date sort, the page; :mod:`service.searching`) on the
  search threads, overlapping the next encoder batch. A lone text query (an encoder batch of one, nothing queued
  behind it) is searched on the encoder thread right after its encoding: the hand-off to the search thread and back
  cost 0.3 ms of its 8-9 ms at concurrency 1 (measured on 2 cores), and nobody waits for that thread meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.batching import Answered, BatchObserver, DirectRunner, MicroBatcher, Pipeline, Runner
from service.engine import Searcher
from service.query import SearchSpec
from service.searching import Page
from service.settings import ServiceSettings

#: Most queries one search batch takes at once (the search batcher never waits to fill it).
SEARCH_BATCH = 64


@dataclass(frozen=True)
class Encoded:
    """A query's vectors: ``texts`` maps each term text to its ``(dim,)`` float32 embedding; ``image`` is the
    uploaded image's ``(dim,)`` float32 embedding (None for a text search)."""

    texts: dict[str, np.ndarray]
    image: np.ndarray | None = None


@dataclass
class PreparedQuery:
    """A checked spec on its way through the pipeline: the term vectors the query cache already had, the decoded
    upload ``pixels`` ``(3, H, W)`` float32 (image searches), and ``vector`` (an :class:`Encoded`) once nothing is
    left to encode."""

    spec: SearchSpec
    cached: dict[str, np.ndarray] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    vector: Encoded | None = None

    def missing_texts(self) -> list[str]:
        return [t.text for t in self.spec.terms if t.text not in self.cached]


class SearchStages:
    """The stage functions over one :class:`Searcher` (each stage's thread-safety is the searcher's)."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher

    def _prepared(self, checked: SearchSpec, pixels: np.ndarray | None = None) -> PreparedQuery:
        cached = {}
        for term in checked.terms:
            vec = self.searcher.cached_text_vector(term.text)
            if vec is not None:
                cached[term.text] = vec
        p = PreparedQuery(spec=checked, cached=cached, pixels=pixels)
        if pixels is None and not p.missing_texts():
            p.vector = Encoded(cached)  # a cache hit never reaches the encoder
        return p

    def prepare_text(self, spec: SearchSpec) -> PreparedQuery:
        """A spec -> a prepared query, with its vectors when the cache has them all. Raises BadInput/BadQuery."""
        return self._prepared(self.searcher.check_spec(spec))

    def prepare_image(self, item: tuple[bytes, SearchSpec]) -> PreparedQuery:
        """``(image bytes, spec)`` -> a prepared query with decoded pixels. Raises BadInput/BadImage."""
        data, spec = item
        checked = self.searcher.check_spec(spec)  # the cheap checks before the decode
        return self._prepared(checked, self.searcher.decode_upload(data))

    def _texts(self, items: list[PreparedQuery]) -> list[dict[str, np.ndarray]]:
        """Each item's term vectors: one encoder call for the texts of the micro-batch the cache lacked."""
        missing = list(dict.fromkeys(t for it in items for t in it.missing_texts()))
        fresh = dict(zip(missing, self.searcher.encode_and_cache(missing), strict=True)) if missing else {}
        return [{**it.cached, **{t: fresh[t] for t in it.missing_texts()}} for it in items]

    def encode_texts(self, items: list[PreparedQuery]) -> list[Encoded]:
        """One encoder call for a micro-batch of text searches (fills the query cache)."""
        return [Encoded(v) for v in self._texts(items)]

    def encode_images(self, items: list[PreparedQuery]) -> list[Encoded]:
        """One encoder call for a micro-batch of decoded uploads (and one for the texts that go with them)."""
        pixels = np.stack([it.pixels for it in items if it.pixels is not None])
        images = self.searcher.encoder.encode_pixels(pixels)
        return [Encoded(v, img) for v, img in zip(self._texts(items), images, strict=True)]

    def encode_texts_or_answer(self, items: list[PreparedQuery], queued: Callable[[], int]
                               ) -> list[Encoded | Answered | BaseException]:
        """:meth:`encode_texts`, and for a lone query (one item, ``queued()`` 0) its search as well: an
        :class:`Answered` page, or the search's exception in its slot."""
        encoded = self.encode_texts(items)
        if len(items) != 1 or queued():
            return list(encoded)
        (page,) = self.search([(items[0], encoded[0])])
        return [page if isinstance(page, BaseException) else Answered(page)]

    def search(self, items: list[tuple[PreparedQuery, Encoded]]) -> list[Page | BaseException]:
        """The searches of a micro-batch, on the search threads, over one snapshot; the unfiltered ones share one
        index search. A spec the index refuses (an unknown ``image_id``, ``min_relevance`` without a calibration)
        yields its exception in its slot."""
        return self.searcher.answer_many([(p.spec, enc.texts, enc.image) for p, enc in items])


def _runner(settings: ServiceSettings, fn: Any, name: str, executor: Executor, observer: BatchObserver | None,
            max_batch: int, max_wait_ms: float, workers: int = 1) -> Runner:
    if settings.batching:
        return MicroBatcher(fn, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=settings.queue_size,
                            name=f"{name}-batcher", observer=observer, executor=executor, workers=workers)
    return DirectRunner(fn, queue_size=settings.queue_size, name=f"{name}-direct", observer=observer,
                        executor=executor)


def make_pipelines(searcher: Searcher, settings: ServiceSettings, *, encoder_executor: Executor,
                   decode_executor: Executor, search_executor: Executor, observer: Any = None,
                   encode_workers: int = 1) -> tuple[Pipeline[Any, PreparedQuery, Page],
                                                  Pipeline[Any, PreparedQuery, Page]]:
    """The text and image pipelines. ``observer(name)`` returns a batch observer (Prometheus) or None."""
    stages = SearchStages(searcher)

    def obs(name: str) -> BatchObserver | None:
        return observer(name) if observer is not None else None

    def pipeline(kind: str, prepare: Any, encode: Any, decode: Executor | None,
                 workers: int) -> Pipeline[Any, PreparedQuery, Page]:
        enc = _runner(settings, encode, kind, encoder_executor, obs(kind), settings.max_batch, settings.max_wait_ms,
                      workers)
        srch = _runner(settings, stages.search, f"{kind}-search", search_executor, obs(f"{kind}-search"),
                       SEARCH_BATCH, 0.0)
        return Pipeline(prepare, enc, srch, prepare_executor=decode, prepare_limit=settings.decode_queue,
                        name=kind)

    # Image batches (tens of ms each) run on one encoder thread fewer than text ones, so with two or more encoder
    # threads a text query never waits for the uploads' batches to finish.
    # With micro-batching, a lone text query is answered on the encoder thread (``queued`` reads the text batcher's
    # queue once it exists); without it (the naive way, for comparison) the stages stay apart.
    text_batcher: list[Runner] = []

    def encode_texts(items: list[PreparedQuery]) -> list[Encoded | Answered | BaseException]:
        return stages.encode_texts_or_answer(items, text_batcher[0].depth)

    text = pipeline("text", stages.prepare_text, encode_texts if settings.batching else stages.encode_texts, None,
                    encode_workers)
    text_batcher.append(text.encode)
    return (text,
            pipeline("image", stages.prepare_image, stages.encode_images, decode_executor, max(1, encode_workers - 1)))
