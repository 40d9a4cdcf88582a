"""The searcher: owns the encoder and the open index, answers queries synchronously (callers run it in a thread).

Hot reload opens the new index folder completely (manifest checked against the encoder) before swapping one
reference; requests already running keep the snapshot they started with, so nothing is dropped.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.errors import BadInput, BadQuery, IndexNotFound, RetrievalError, UnknownId
from retrieval.images import IMAGE_EXTENSIONS, load_image
from retrieval.index import IndexStore, MetaFilter, set_thread_omp_threads
from service import library
from service.query import SearchSpec, Term
from service.query import normalize_text as normalize_query
from service.searching import Hit, Limits, Page, combine, run_searches

if TYPE_CHECKING:
    from retrieval.encoders import Encoder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------------


class LRUCache:
    """A thread-safe LRU map with hit/miss counters. ``capacity`` 0 disables it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


__all__ = ["Hit", "LRUCache", "Page", "Searcher", "Snapshot", "normalize_query"]


@dataclass
class Snapshot:
    """One loaded index and what goes with it; replaced as a whole on reload."""

    store: IndexStore
    index_dir: Path
    image_root: Path | None
    generation: int
    loaded_at: float = field(default_factory=time.time)
    #: rows of recent filters (pages of one search repeat its filter)
    filter_cache: LRUCache = field(default_factory=lambda: LRUCache(64))

    def rows_for(self, flt: MetaFilter) -> np.ndarray | None:
        """The rows passing ``flt`` (None: every row), cached per snapshot."""
        if flt.is_empty():
            return None
        key = flt.key()
        rows = self.filter_cache.get(key)
        if rows is None:
            rows = self.store.meta.select(flt)
            if rows is not None:
                rows.setflags(write=False)
            self.filter_cache.put(key, rows)
        return rows  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------------------------
# The searcher
# ----------------------------------------------------------------------------------------------------------------


class Searcher:
    """Encoder + index. Every method is synchronous and thread-safe; run them off the event loop."""

    def __init__(
        self,
        encoder: Encoder,
        index_dir: str | Path,
        *,
        image_root: str | Path | None = None,
        cache_size: int = 4096,
        thumb_cache_size: int = 1024,
        thumb_size: int = 256,
        max_query_chars: int = 512,
        max_top_k: int = 100,
        max_image_pixels: int = 40_000_000,
        mmap: bool = True,
        omp_threads: int = 1,
        max_offset: int = 1000,
        limits: Limits | None = None,
        fusion_head: str | Path | None = None,
    ):
        self.encoder = encoder
        self.identity = encoder.identity()
        self._identity_key = json.dumps(self.identity, sort_keys=True)
        self.image_root_override = Path(image_root) if image_root else None
        self.max_query_chars = max_query_chars
        self.max_top_k = max_top_k
        self.max_image_pixels = max_image_pixels
        self.thumb_size = thumb_size
        self.mmap = mmap
        #: faiss OpenMP threads for searches made by this searcher, set per calling thread (see
        #: :func:`~retrieval.index.set_thread_omp_threads`: idle OpenMP workers spin after every search)
        self.omp_threads = omp_threads
        self.max_offset = max_offset
        self.limits = limits or Limits()
        #: score -> probability of relevance, from the encoder's head checkpoint (None: not calibrated)
        self.calibration = getattr(encoder, "calibration", None)
        #: composes image + text queries (retrieval.fusion), when the service has one
        self.fusion: Any = None
        if fusion_head is not None:
            from retrieval.fusion import load_fusion  # torch: only when a head is configured

            self.fusion, _ = load_fusion(fusion_head, expected_encoder=self.identity)
        self.query_cache = LRUCache(cache_size)
        self.thumb_cache = LRUCache(thumb_cache_size)
        self._reload_lock = threading.Lock()
        self._generation = 0
        self._snapshot = self._open(Path(index_dir))

    # -- index lifecycle -----------------------------------------------------------------------------------------
    def _open(self, index_dir: Path) -> Snapshot:
        store = IndexStore.open(index_dir, expected_encoder=self.identity, mmap=self.mmap, gpu=None)
        store.meta.dates()  # the date index of the filters, read now rather than by the first dated query
        root = self.image_root_override
        if root is None:
            src = (store.manifest.build or {}).get("source_root")
            root = Path(src) if src else None
        self._generation += 1
        return Snapshot(store=store, index_dir=index_dir, image_root=root.resolve() if root else None,
                        generation=self._generation)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def store(self) -> IndexStore:
        return self._snapshot.store

    def reload(self, index_dir: str | Path | None = None) -> Snapshot:
        """Open ``index_dir`` (default: the current folder again) and swap it in. Raises IndexNotFound,
        IndexCorrupt or IndexEncoderMismatch and keeps the current index when the new one is refused."""
        with self._reload_lock:
            target = Path(index_dir) if index_dir is not None else self._snapshot.index_dir
            if not target.is_dir():
                raise IndexNotFound(f"no index folder at {target}")
            new = self._open(target)
            old, self._snapshot = self._snapshot, new  # one reference assignment: atomic for readers
            log.info("index reloaded", extra={"index_dir": str(target), "count": len(new.store.ids),
                                              "previous_generation": old.generation, "generation": new.generation})
            return new

    # -- text ----------------------------------------------------------------------------------------------------
    def check_query(self, text: str) -> str:
        if not isinstance(text, str):
            raise BadQuery("the query must be a string")
        norm = normalize_query(text)
        if not norm:
            raise BadQuery("the query is empty")
        if len(norm) > self.max_query_chars:
            raise BadQuery(f"the query has {len(norm)} characters; the limit is {self.max_query_chars}")
        return norm

    def check_k(self, k: int) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise BadInput("top_k must be a positive integer")
        if k > self.max_top_k:
            raise BadInput(f"top_k is {k}; the limit is {self.max_top_k}")
        return k

    def cached_text_vector(self, text: str) -> np.ndarray | None:
        """The cached embedding of a normalised query (read-only ``(dim,)`` float32), or None."""
        vec: np.ndarray | None = self.query_cache.get((self._identity_key, text))
        return vec

    def encode_and_cache(self, texts: Sequence[str]) -> np.ndarray:
        """Encode normalised queries in one encoder call (duplicates once) and cache them: ``(n, dim)`` float32."""
        uniq = list(dict.fromkeys(texts))
        vecs = self.encoder.encode_text(uniq) if uniq else np.zeros((0, self.encoder.dim), np.float32)
        by_text: dict[str, np.ndarray] = {}
        for t, v in zip(uniq, vecs, strict=True):
            v = np.array(v, dtype=np.float32)
            v.setflags(write=False)
            self.query_cache.put((self._identity_key, t), v)
            by_text[t] = v
        if not texts:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([by_text[t] for t in texts])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised queries -> ``(n, dim)`` float32. Served from the LRU cache where possible; misses are
        encoded in one call."""
        out = [self.cached_text_vector(t) for t in texts]
        missing = [t for t, v in zip(texts, out, strict=True) if v is None]
        if missing:
            fresh = dict(zip(missing, self.encode_and_cache(missing), strict=True))
            out = [v if v is not None else fresh[t] for t, v in zip(texts, out, strict=True)]
        if not out:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def check_spec(self, spec: SearchSpec) -> SearchSpec:
        """The spec with each term's text normalized; :class:`BadInput` / :class:`BadQuery` for limits the service
        sets below the schema's ceilings (top_k, offset, query length)."""
        self.check_k(spec.k)
        if spec.offset > self.max_offset:
            raise BadInput(f"offset is {spec.offset}; the limit is {self.max_offset}")
        terms = tuple(Term(self.check_query(t.text), t.weight) for t in spec.terms)
        return replace(spec, terms=terms)

    def term_vectors(self, specs: Sequence[SearchSpec]) -> dict[str, np.ndarray]:
        texts = list(dict.fromkeys(t.text for s in specs for t in s.terms))
        return dict(zip(texts, self.embed_texts(texts), strict=True)) if texts else {}

    def _query(self, spec: SearchSpec, vectors: dict[str, np.ndarray], snap: Snapshot,
               image_vector: np.ndarray | None) -> tuple[SearchSpec, np.ndarray, bool]:
        """(the spec with its query image excluded, the query vector ``(dim,)`` float32, whether the fusion head
        composed it)."""
        if spec.image_id is not None:
            if image_vector is not None:
                raise BadInput("image_id: give an indexed image or upload one, not both")
            try:
                image_vector = snap.store.vector(spec.image_id)
            except UnknownId:
                raise UnknownId(f"image_id: no item with id {spec.image_id!r} in the index") from None
            spec = replace(spec, exclude=(*spec.exclude, spec.image_id))
        term_vecs = np.stack([vectors[t.text] for t in spec.terms]) if spec.terms else np.zeros((0, self.encoder.dim))
        weights = [t.weight for t in spec.terms]
        fuse = image_vector is not None and bool(spec.terms) and (
            spec.compose == "fusion" or (spec.compose == "auto" and self.fusion is not None))
        if fuse and self.fusion is None:
            raise BadInput("compose: this service has no fusion head (set SERVICE_FUSION_HEAD), use sum or auto")
        if fuse:
            return spec, self.fusion.compose(image_vector, combine(term_vecs, weights))[0], True
        return spec, combine(term_vecs, weights, image_vector, spec.image_weight), False

    def answer_many(self, items: Sequence[tuple[SearchSpec, dict[str, np.ndarray], np.ndarray | None]],
                    snap: Snapshot | None = None) -> list[Page | BaseException]:
        """Checked specs, each with its term vectors (text -> ``(dim,)`` float32) and an uploaded image's vector (or
        None) -> pages over ``snap`` (default: the current snapshot); the unfiltered vector searches among them
        share one index search (:func:`~service.searching.run_searches`). A spec that fails yields its
        :class:`RetrievalError` in its slot."""
        snap = snap or self._snapshot
        out: list[Page | BaseException] = [Page([], None) for _ in items]
        ready: list[tuple[int, SearchSpec, np.ndarray, bool]] = []
        for i, (spec, vectors, image_vector) in enumerate(items):
            try:
                ready.append((i, *self._query(spec, vectors, snap, image_vector)))
            except RetrievalError as exc:
                out[i] = exc
        if ready:
            set_thread_omp_threads(self.omp_threads)  # this thread's faiss OpenMP team (idle workers spin otherwise)
            pages = run_searches(snap.store, [spec for _, spec, _, _ in ready], np.stack([q for _, _, q, _ in ready]),
                                 rows_for=snap.rows_for, calibration=self.calibration, limits=self.limits)
            for (i, spec, _, fused), page in zip(ready, pages, strict=True):
                out[i] = page if isinstance(page, BaseException) else replace(
                    page, compose="fusion" if fused else "sum", truncated_to=self._truncated_to(spec))
        return out

    def _truncated_to(self, spec: SearchSpec) -> int | None:
        """The text model's token limit when a term of ``spec`` is longer and was cut to it (else None)."""
        texts = [t.text for t in spec.terms]
        cuts = getattr(self.encoder, "text_truncation", lambda t: [None] * len(t))(texts) if texts else []
        return next((c for c in cuts if c), None)

    def search_specs(self, specs: Sequence[SearchSpec]) -> list[Page | BaseException]:
        """Specs -> pages, here and now: one encoder call for the term texts the query cache lacks, then each
        search (the service runs specs with texts through its pipelines, :mod:`service.stages`, and specs with
        only an indexed image here). A bad spec yields its exception in its slot; the others still get answers."""
        snap = self._snapshot
        results: list[Page | BaseException] = [Page([], None) for _ in specs]
        checked: dict[int, SearchSpec] = {}
        for i, spec in enumerate(specs):
            try:
                checked[i] = self.check_spec(spec)
            except RetrievalError as exc:
                results[i] = exc
        vectors = self.term_vectors(list(checked.values()))
        pages = self.answer_many([(spec, vectors, None) for spec in checked.values()], snap)
        for i, page in zip(checked, pages, strict=True):
            results[i] = page
        return results

    # -- images ----------------------------------------------------------------------------------------------------
    def decode_upload(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the encoder's input pixels ``(3, H, W)`` float32. Raises :class:`BadImage`
        (not an image, truncated, a decompression bomb). CPU-bound: the service runs it in its decode pool."""
        image = load_image(data, max_pixels=self.max_image_pixels, draft=self.encoder.decode_draft())
        return np.asarray(self.encoder.image_transform(image), dtype=np.float32)

    # -- files -----------------------------------------------------------------------------------------------------
    def image_path(self, item_id: str) -> Path:
        """The image file of an indexed id. Only ids in the index are served, and the file, symlinks resolved, must
        lie inside the image root: a crafted index (``..``, absolute paths, NUL bytes) or a symlink in the photo
        folder pointing out of it gets :class:`UnknownId` (404) like an unknown id."""
        snap = self._snapshot
        row = snap.store.row_of(item_id)  # UnknownId for anything not indexed, including "../../etc/passwd"
        meta = snap.store.get(row)
        if snap.image_root is None:
            raise UnknownId(f"{item_id!r}: the index records no image root and none is configured")
        rel = str(meta.get("path") or meta["id"])
        try:
            if "\x00" in rel:
                raise ValueError("NUL byte")
            path = (snap.image_root / rel).resolve()
            inside = path.is_relative_to(snap.image_root) and path.suffix.lower() in IMAGE_EXTENSIONS
            exists = inside and path.is_file()
        except (OSError, ValueError, RuntimeError):  # NUL, a symlink loop, a name too long...
            inside = exists = False
        if not inside:
            log.warning("refused image path outside the root", extra={"id": item_id, "path": rel})
            raise UnknownId(f"{item_id!r} has no servable image")
        if not exists:
            raise UnknownId(f"the image file of {item_id!r} is missing")
        return path

    def thumbnail(self, item_id: str) -> bytes:
        """A JPEG whose longest side is ``thumb_size``; cached by file path, size and mtime."""
        path = self.image_path(item_id)
        try:
            st = path.stat()
        except OSError as exc:  # deleted since image_path looked
            raise UnknownId(f"the image file of {item_id!r} is missing") from exc
        key = (str(path), st.st_mtime_ns, st.st_size, self.thumb_size)
        cached = self.thumb_cache.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        img = load_image(path, max_pixels=self.max_image_pixels)
        img.thumbnail((self.thumb_size, self.thumb_size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        self.thumb_cache.put(key, data)
        return data

    # -- library -------------------------------------------------------------------------------------------------
    def duplicates(self, threshold: float) -> tuple[int, list[Any]]:
        """(generation, near-duplicate clusters at cosine ``>= threshold``), computed once per snapshot and
        threshold (:func:`service.library.duplicates`)."""
        snap = self._snapshot
        key = ("dupes", round(float(threshold), 6))
        clusters = snap.filter_cache.get(key)
        if clusters is None:
            clusters = library.duplicates(snap.store, threshold)
            snap.filter_cache.put(key, clusters)
        return snap.generation, clusters  # type: ignore[return-value]

    def library_info(self) -> library.Library:
        """Folders and date range of the current snapshot (for the page's filters)."""
        return library.library(self._snapshot.store)

    def embed(self, inputs: Sequence[str], max_image_bytes: int) -> np.ndarray:
        """Texts and ``data:`` URL images -> ``(n, dim)`` float32 (``POST /v1/embeddings``)."""
        return library.embed_inputs(self.encoder, inputs, max_image_bytes=max_image_bytes,
                                    max_pixels=self.max_image_pixels, check_text=self.check_query)

    # -- housekeeping ----------------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One text query, one image and one index search, so the first real request is not the slow one."""
        vec = self.encoder.encode_text(["warm up"])
        self.encoder.encode_images([Image.new("RGB", (64, 64), (128, 128, 128))])
        if len(self.store.ids):
            self.store.search(vec, 1)

    def stats(self) -> dict[str, Any]:
        snap = self._snapshot
        m = snap.store.manifest
        return {
            "count": int(m.count),
            "dim": int(m.dim),
            "encoder": m.encoder_label,
            "index_key": m.index_key,
            "created_at": str(m.created_at),
            "index_dir": str(snap.index_dir),
            "generation": snap.generation,
            "loaded_at": snap.loaded_at,
            "calibrated": self.calibration is not None,
            "fusion": self.fusion is not None,
            "query_cache": {"size": len(self.query_cache), "hits": self.query_cache.hits,
                            "misses": self.query_cache.misses},
            "thumb_cache": {"size": len(self.thumb_cache), "hits": self.thumb_cache.hits,
                            "misses": self.thumb_cache.misses},
        }
