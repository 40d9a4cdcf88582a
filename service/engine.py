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
import unicodedata
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from retrieval.errors import BadInput, BadQuery, IndexNotFound, UnknownId
from retrieval.images import IMAGE_EXTENSIONS, load_image
from retrieval.index import IndexStore

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


def normalize_query(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped. Case is kept (not every model is uncased)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass(frozen=True)
class Hit:
    """One result: ``row`` in the index, its ``id``, cosine ``score`` and the row's metadata (without the path)."""

    rank: int
    row: int
    id: str
    score: float
    metadata: dict[str, Any]


class Hits(list[Hit]):
    """A query's hits; ``truncated_to``: the text model's token limit when the query was longer and cut to it."""

    truncated_to: int | None = None


class TextQuery(NamedTuple):
    """One text search request (routes may pass a plain ``(text, k, min_score)`` tuple)."""

    text: str
    k: int
    min_score: float | None = None


@dataclass
class Snapshot:
    """One loaded index and what goes with it; replaced as a whole on reload."""

    store: IndexStore
    index_dir: Path
    image_root: Path | None
    generation: int
    loaded_at: float = field(default_factory=time.time)


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
        self.query_cache = LRUCache(cache_size)
        self.thumb_cache = LRUCache(thumb_cache_size)
        self._reload_lock = threading.Lock()
        self._generation = 0
        self._snapshot = self._open(Path(index_dir))

    # -- index lifecycle -----------------------------------------------------------------------------------------
    def _open(self, index_dir: Path) -> Snapshot:
        store = IndexStore.open(index_dir, expected_encoder=self.identity, mmap=self.mmap, gpu=None)
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

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised queries -> ``(n, dim)`` float32. Served from the LRU cache where possible; misses are
        encoded in one call."""
        out: list[np.ndarray | None] = []
        missing: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            vec = self.query_cache.get((self._identity_key, t))
            out.append(vec)
            if vec is None:
                missing.setdefault(t, []).append(i)
        if missing:
            uniq = list(missing)
            vecs = self.encoder.encode_text(uniq)
            for t, v in zip(uniq, vecs, strict=True):
                v = np.array(v, dtype=np.float32)
                v.setflags(write=False)
                self.query_cache.put((self._identity_key, t), v)
                for i in missing[t]:
                    out[i] = v
        if not out:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def search_text_batch(self, queries: Sequence[TextQuery]) -> list[list[Hit] | BaseException]:
        """The micro-batcher's function: one encoder call and one index search for the whole batch. A bad query
        yields its exception in its slot, the others still get answers."""
        results: list[list[Hit] | BaseException] = [[] for _ in queries]
        good: list[int] = []
        texts: list[str] = []
        queries = [TextQuery(*q) for q in queries]
        for i, q in enumerate(queries):
            try:
                self.check_k(q.k)
                texts.append(self.check_query(q.text))
                good.append(i)
            except BadInput as exc:
                results[i] = exc
        if good:
            vecs = self.embed_texts(texts)
            hits = self.search_vectors(vecs, [queries[i].k for i in good], [queries[i].min_score for i in good])
            truncation = getattr(self.encoder, "text_truncation", lambda t: [None] * len(t))(texts)
            for i, h, cut in zip(good, hits, truncation, strict=True):
                results[i] = Hits(h)
                results[i].truncated_to = cut  # type: ignore[union-attr]
        return results

    # -- vectors ---------------------------------------------------------------------------------------------------
    def search_vectors(
        self,
        vectors: np.ndarray,
        ks: int | Sequence[int],
        min_scores: float | Sequence[float | None] | None = None,
        *,
        exclude: Sequence[str | None] | None = None,
        snapshot: Snapshot | None = None,
    ) -> list[list[Hit]]:
        """``(q, dim)`` float32 queries -> hit lists. One index search with the largest ``k``; ``exclude`` drops one
        id per query (the query item itself for "similar")."""
        snap = snapshot or self._snapshot
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dim:
            raise BadInput(f"query vectors must have shape (n, {self.encoder.dim}), got {vectors.shape}")
        n = vectors.shape[0]
        k_list = [ks] * n if isinstance(ks, int) else list(ks)
        ms_list = list(min_scores) if isinstance(min_scores, Sequence) else [min_scores] * n
        ex_list = list(exclude) if exclude is not None else [None] * n
        for k in k_list:
            self.check_k(k)
        k_max = min(max(k_list) + (1 if exclude is not None else 0), max(len(snap.store.ids), 1))
        scores, rows = snap.store.search(vectors, k_max)
        out: list[list[Hit]] = []
        for qi in range(n):
            hits: list[Hit] = []
            for score, row in zip(scores[qi], rows[qi], strict=True):
                row = int(row)
                if row < 0:
                    continue
                ms = ms_list[qi]
                if ms is not None and float(score) < ms:
                    break  # scores come sorted, best first
                meta = snap.store.get(row)
                if ex_list[qi] is not None and meta["id"] == ex_list[qi]:
                    continue
                extra = {key: val for key, val in meta.items() if key not in ("id", "path")}
                hits.append(Hit(rank=len(hits) + 1, row=row, id=str(meta["id"]), score=float(score), metadata=extra))
                if len(hits) >= k_list[qi]:
                    break
            out.append(hits)
        return out

    # -- images ----------------------------------------------------------------------------------------------------
    def search_image_batch(self, items: Sequence[tuple[bytes, int, float | None]]) -> list[list[Hit] | BaseException]:
        """The image batcher's function: ``(encoded image bytes, k, min_score)`` items. Undecodable images
        (not an image, truncated, decompression bombs) yield :class:`BadImage` in their slot."""
        results: list[list[Hit] | BaseException] = [[] for _ in items]
        images: list[Image.Image] = []
        good: list[int] = []
        for i, (data, k, _) in enumerate(items):
            try:
                self.check_k(k)
                images.append(load_image(data, max_pixels=self.max_image_pixels))
                good.append(i)
            except BadInput as exc:
                results[i] = exc
        if good:
            vecs = self.encoder.encode_images(images)
            hits = self.search_vectors(vecs, [items[i][1] for i in good], [items[i][2] for i in good])
            for i, h in zip(good, hits, strict=True):
                results[i] = h
        return results

    def similar(self, item_id: str, k: int, min_score: float | None = None) -> list[Hit]:
        """Nearest neighbours of an indexed item (the item itself left out). Raises UnknownId."""
        snap = self._snapshot
        vec = np.asarray(snap.store.vector(item_id), dtype=np.float32).reshape(1, -1)
        return self.search_vectors(vec, k, min_score, exclude=[item_id], snapshot=snap)[0]

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
            "query_cache": {"size": len(self.query_cache), "hits": self.query_cache.hits,
                            "misses": self.query_cache.misses},
            "thumb_cache": {"size": len(self.thumb_cache), "hits": self.thumb_cache.hits,
                            "misses": self.thumb_cache.misses},
        }
