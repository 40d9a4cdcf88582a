"""Reading an index folder: :class:`IndexStore` opens it (memory-mapped), checks it, and searches it.

A store is a snapshot: :meth:`IndexStore.open` pins the folder's published version by its directory handle
(:func:`retrieval.atomic.pinned`) and reads or maps every file of it before returning, so an add/remove/sync that
publishes a new version (and deletes this one) while the store is in use changes nothing it reads; the old files
go away when the last store holding them is dropped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.atomic import Pinned
from retrieval.atomic import pinned as pinned_folder
from retrieval.errors import BadInput, IndexCorrupt, IndexNotFound, UnknownId
from retrieval.index.faiss_ops import (
    FLAT_SCAN_MAX_QUERIES,
    faiss_gpu_count,
    flat_scan,
    is_reconstructible,
    read_faiss,
    search_params,
)
from retrieval.index.folder import map_vectors, open_meta
from retrieval.index.manifest import META_FILE, VECTORS_FILE, Manifest, check_encoder, read_manifest
from retrieval.index.metadata import MetaDB


class IndexStore:
    """An opened index folder. Searching is thread-safe (no shared mutable state; per-call search parameters)."""

    def __init__(self, path: Path, manifest: Manifest, index: Any, meta: MetaDB):
        self.path = path
        self.manifest = manifest
        self.index = index
        #: the rows' metadata (``meta.sqlite``, opened read-only with the snapshot)
        self.meta = meta
        self.ids: list[str] = meta.ids()
        self._row: dict[str, int] = {rid: i for i, rid in enumerate(self.ids)}
        self._vectors: np.ndarray | None = None  # vectors.npy, memory-mapped at open (IVF/PQ indexes)
        self._size_bytes = 0
        self._search_index: Any = index  # a GPU copy for Flat indexes when asked for (see open)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @classmethod
    def open(cls, path: str | Path, *, expected_encoder: dict[str, Any] | None = None, mmap: bool = True,
             gpu: bool | None = False) -> IndexStore:
        """Open the index folder at ``path``.

        Raises :class:`IndexNotFound` (folder or a file missing), :class:`IndexCorrupt` (bad manifest, unknown
        schema, unreadable files, or faiss ntotal / meta rows / manifest count / dim disagree) and
        :class:`IndexEncoderMismatch` when ``expected_encoder`` differs from the manifest's encoder identity.
        ``mmap``: map ``index.faiss`` read-only instead of loading it (works for Flat, HNSW and IVF-PQ).
        ``gpu``: search a ``Flat`` index on every GPU faiss sees (faiss-gpu); ``None`` = when there is one,
        ``True`` = required (:class:`BadInput` without one). Other index types and ``vector()`` stay on the CPU.
        """
        path = Path(path)
        for attempt in range(3):
            try:
                pin = pinned_folder(path)
            except OSError as exc:
                raise IndexNotFound(f"no index folder at {path}") from exc
            with pin:
                try:
                    store = cls._open_pinned(pin, expected_encoder, mmap)
                except (IndexNotFound, IndexCorrupt) as exc:
                    # A writer published a new version and deleted this one while it was being read: read again.
                    if attempt < 2 and pin.replaced():
                        continue
                    raise type(exc)(pin.where(str(exc))) from exc
            break
        n_gpus = faiss_gpu_count()
        if gpu and n_gpus == 0:
            raise BadInput("gpu=True but faiss sees no GPU (install the gpu extra, faiss-gpu, on a CUDA machine)")
        if (gpu or gpu is None) and n_gpus > 0 and store.manifest.index_key == "Flat":
            store._search_index = faiss.index_cpu_to_all_gpus(store.index)
        return store

    @classmethod
    def _open_pinned(cls, pin: Pinned, expected_encoder: dict[str, Any] | None, mmap: bool) -> IndexStore:
        """Read every file of the pinned folder now (``vectors.npy`` memory-mapped), so the store never opens a
        file by path again: a later swap cannot change what it reads."""
        path = pin.path
        manifest = read_manifest(path)
        if expected_encoder is not None:
            check_encoder(manifest, expected_encoder)
        index = read_faiss(path, mmap=mmap)
        meta = open_meta(path)
        if index.d != manifest.dim:
            raise IndexCorrupt(f"{path}: index dim {index.d} != manifest dim {manifest.dim}")
        if not (index.ntotal == meta.count == manifest.count):
            raise IndexCorrupt(f"{path}: row counts disagree: faiss {index.ntotal}, {META_FILE} {meta.count}, "
                               f"manifest {manifest.count}")
        vectors = None
        if (path / VECTORS_FILE).is_file():
            vectors = map_vectors(path, manifest)
        elif not is_reconstructible(manifest.index_key):
            raise IndexCorrupt(f"{path}: {VECTORS_FILE} is missing (needed for {manifest.index_key})")
        store = cls(pin.real, manifest, index, meta)
        if len(store._row) != meta.count:
            raise IndexCorrupt(f"{path}: {META_FILE} has duplicate ids")
        store._vectors = vectors
        store._size_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return store

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on GPU(s)."""
        return self._search_index is not self.index

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query.

        ``queries``: ``(q, d)`` (or ``(d,)``, treated as one query) floats, cast to float32. Returns
        ``scores`` ``(q, k')`` float32 (inner products, descending) and ``rows`` ``(q, k')`` int64 with
        ``k' = min(k, count)``; columns with no result for any query are dropped. Approximate indexes
        (IVF with a small ``nprobe``) can still leave ``-1`` rows (score ``-inf``) in some queries: skip
        ``row < 0``. ``nprobe`` (IVF) and ``ef_search`` (HNSW) default to the manifest's ``build`` values.
        """
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadInput(f"queries must have shape (q, {self.dim}), got {np.shape(queries)}")
        if not np.issubdtype(q.dtype, np.floating):
            raise BadInput(f"queries must be floating point, got {q.dtype}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise BadInput("queries contain NaN or infinite values")
        if not isinstance(k, int | np.integer) or k < 1:
            raise BadInput(f"k must be a positive integer, got {k!r}")
        kk = min(int(k), self.count)
        if kk == 0 or len(q) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        build = self.manifest.build
        params = search_params(
            self.index, kk,
            nprobe if nprobe is not None else build.get("nprobe"),
            ef_search if ef_search is not None else build.get("efSearch"),
        )
        scanned = (flat_scan(self.index, q, kk)
                   if len(q) <= FLAT_SCAN_MAX_QUERIES and self._search_index is self.index else None)
        if scanned is not None:
            scores, rows = scanned
        elif params is not None:
            scores, rows = self.index.search(q, kk, params=params)
        else:
            scores, rows = self._search_index.search(q, kk)
        valid_cols = np.flatnonzero((rows >= 0).any(axis=0))
        ncols = int(valid_cols[-1]) + 1 if valid_cols.size else 0
        scores = np.ascontiguousarray(scores[:, :ncols], dtype=np.float32)
        rows = np.ascontiguousarray(rows[:, :ncols], dtype=np.int64)
        scores[rows < 0] = -np.inf
        return scores, rows

    def row_of(self, id: str) -> int:
        """Row of ``id``; :class:`UnknownId` if absent."""
        try:
            return self._row[id]
        except KeyError:
            raise UnknownId(f"no item with id {id!r} in the index") from None

    def vector(self, id: str) -> np.ndarray:
        """The stored vector of ``id``, ``(d,)`` float32 (exact for Flat/HNSW, float16-rounded for IVF-PQ)."""
        return self.vectors(np.array([self.row_of(id)], np.int64))[0]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of ``rows`` (int64, in range), ``(len(rows), d)`` float32, as :meth:`vector`."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        if self._vectors is not None:
            return np.asarray(self._vectors[rows], dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(rows), dtype=np.float32)

    def all_vectors(self) -> np.ndarray:
        """Every stored vector, ``(count, dim)`` float32 in row order (float16-rounded where the folder keeps
        ``vectors.npy``, else reconstructed exactly from the index)."""
        if self._vectors is not None:
            return np.asarray(self._vectors, dtype=np.float32)
        if self.count == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.index.reconstruct_n(0, self.count), dtype=np.float32)

    def get(self, row: int) -> dict[str, Any]:
        """Metadata of ``row``; :class:`UnknownId` when out of range."""
        return self.get_many([row])[0]

    def get_many(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Metadata of ``rows`` in that order (one query); :class:`UnknownId` when one is out of range."""
        for row in rows:
            if not isinstance(row, int | np.integer) or not 0 <= row < self.count:
                raise UnknownId(f"no row {row!r} in the index ({self.count} rows)")
        return self.meta.get_many([int(r) for r in rows])

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """Every row's metadata, in row order (read from ``meta.sqlite`` on each call: for writers)."""
        return self.meta.all_rows()

    def stats(self) -> dict[str, Any]:
        """count, dim, index_key, encoder_label, created_at, size_bytes (all files of the folder when opened)."""
        return {
            "count": self.count,
            "dim": self.dim,
            "index_key": self.manifest.index_key,
            "encoder_label": self.manifest.encoder_label,
            "created_at": self.manifest.created_at,
            "size_bytes": self._size_bytes,
        }
