"""Writing index folders: a new index from vectors, and adding or removing rows (each a new folder swapped in)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from retrieval.atomic import folder_lock
from retrieval.errors import BadInput, UnknownId
from retrieval.index.choose import choose_index_key, default_memory_budget
from retrieval.index.faiss_ops import build_faiss, is_reconstructible
from retrieval.index.folder import commit_folder, read_skipped, validate_metadata, validate_vectors
from retrieval.index.manifest import SCHEMA_VERSION, Manifest, check_encoder, now_iso
from retrieval.index.store import IndexStore


def write_index(
    out_dir: str | Path,
    vectors: np.ndarray,
    metadata: Sequence[dict[str, Any]],
    *,
    encoder_identity: dict[str, Any],
    encoder_label: str,
    index_key: str | None = None,
    build: dict[str, Any] | None = None,
    memory_budget_bytes: int | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> Manifest:
    """Build an index from ``vectors`` ``(n, d)`` float32 (L2-normalised) and row-aligned ``metadata`` (each with a
    unique string ``"id"``) and write it atomically to ``out_dir``, replacing any index there.

    ``index_key`` None: :func:`choose_index_key` (n, d, ``memory_budget_bytes``; default: the machine's memory).
    ``build`` is recorded in the manifest, together with training/search defaults (``nlist``, ``nprobe``,
    ``efSearch``, ``train_size``).
    Raises :class:`BadInput` for bad vectors/metadata/key.
    """
    vectors = validate_vectors(vectors)
    n, d = vectors.shape
    validate_metadata(metadata, n)
    if "dim" in encoder_identity and encoder_identity["dim"] != d:
        raise BadInput(f"encoder identity says dim={encoder_identity['dim']}, vectors have dim {d}")
    if memory_budget_bytes is None and index_key is None:
        memory_budget_bytes = default_memory_budget()
    key = index_key or choose_index_key(n, d, memory_budget_bytes)
    index, info = build_faiss(vectors, key)
    build_params = {**(build or {}), **info}
    if memory_budget_bytes is not None:
        build_params.setdefault("memory_budget_bytes", memory_budget_bytes)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        encoder=dict(encoder_identity),
        encoder_label=encoder_label,
        dim=d,
        index_key=key,
        count=n,
        build=build_params,
        created_at=now_iso(),
    )
    commit_folder(Path(out_dir), index, [dict(m) for m in metadata], manifest,
                  None if is_reconstructible(key) else vectors, skipped)
    return manifest


def _load_for_update(path: Path) -> tuple[IndexStore, Any, np.ndarray | None]:
    store = IndexStore.open(path, mmap=False)
    stored = None if is_reconstructible(store.manifest.index_key) else store.all_vectors()
    return store, store.index, stored


def add_to_index(
    path: str | Path,
    vectors: np.ndarray,
    metadata: Sequence[dict[str, Any]],
    *,
    encoder_identity: dict[str, Any],
    on_existing: Literal["error", "skip", "replace"] = "error",
    skipped: Sequence[tuple[str, str]] = (),
    remove: Iterable[str] = (),
) -> Manifest:
    """Append rows to the index at ``path`` and rewrite it atomically.

    ``remove``: ids to drop in the same write (one new version for a whole sync); an unknown one raises
    :class:`UnknownId` and nothing changes.

    ``skipped``: (id, reason) pairs of images this addition could not encode, merged into ``skipped.jsonl`` (ids
    that now have a row leave it).

    ``encoder_identity`` must match the manifest (:class:`IndexEncoderMismatch`). Ids already in the index:
    ``on_existing="error"`` (default) raises :class:`BadInput` and changes nothing; ``"skip"`` ignores those
    rows; ``"replace"`` removes the old rows and appends the new ones. New rows get the next row numbers; the
    index is not retrained (IVF/PQ keep their trained centroids). ``created_at`` becomes the time of this write.
    """
    path = Path(path)
    with folder_lock(path):  # no other writer between our read and our publish
        return _add(path, vectors, metadata, encoder_identity, on_existing, skipped, list(dict.fromkeys(remove)))


def _add(path: Path, vectors: np.ndarray, metadata: Sequence[dict[str, Any]], encoder_identity: dict[str, Any],
         on_existing: str, skipped: Sequence[tuple[str, str]], removed: list[str]) -> Manifest:
    store, index, stored = _load_for_update(path)
    check_encoder(store.manifest, encoder_identity)
    vectors = validate_vectors(vectors, store.dim)
    new_ids = validate_metadata(metadata, len(vectors))
    present = [i for i, rid in enumerate(new_ids) if rid in store]
    meta = [dict(m) for m in metadata]
    unknown = [i for i in removed if i not in store]
    if unknown:
        raise UnknownId(f"ids to remove are not in the index at {path}: {unknown[:10]}")
    if present and on_existing == "error":
        raise BadInput(f"ids already in the index: {[new_ids[i] for i in present][:10]} "
                       f"(use on_existing='skip' or 'replace')")
    if present and on_existing == "skip":
        keep = np.setdiff1d(np.arange(len(vectors)), present)
        vectors = vectors[keep]
        meta = [meta[i] for i in keep]
    old_meta = list(store.metadata)
    drop = {store.row_of(i) for i in removed}
    if present and on_existing == "replace":
        drop |= {store.row_of(new_ids[i]) for i in present}
    if drop:
        kept_rows = np.array([r for r in range(store.count) if r not in drop], dtype=np.int64)
        index, stored = _rebuild_without(store, index, stored, kept_rows)
        old_meta = [old_meta[r] for r in kept_rows]
    if len(vectors):
        index.add(vectors)
        if stored is not None:
            stored = np.concatenate([stored, vectors])
    all_meta = old_meta + meta
    manifest = store.manifest.model_copy(update={"count": len(all_meta), "created_at": now_iso()})
    indexed = {m["id"] for m in all_meta}
    merged = dict(read_skipped(path))
    merged.update(skipped)
    commit_folder(path, index, all_meta, manifest, stored,
                  [(i, r) for i, r in merged.items() if i not in indexed])
    return manifest


def _rebuild_without(store: IndexStore, index: Any, stored: np.ndarray | None, kept_rows: np.ndarray
                     ) -> tuple[Any, np.ndarray | None]:
    """A fresh index holding only ``kept_rows`` (in order); trained parameters are reused."""
    if isinstance(index, faiss.IndexFlat):  # compacts in place, order kept
        index.remove_ids(faiss.IDSelectorBatch(np.setdiff1d(np.arange(store.count), kept_rows)))
        return index, None
    if stored is not None:
        kept = stored[kept_rows]
    else:
        kept = index.reconstruct_batch(kept_rows) if len(kept_rows) else np.zeros((0, store.dim), np.float32)
    if index.is_trained and not is_reconstructible(store.manifest.index_key):
        fresh = faiss.clone_index(index)
        fresh.reset()
    else:
        fresh = faiss.index_factory(store.dim, store.manifest.index_key, faiss.METRIC_INNER_PRODUCT)
    if len(kept):
        fresh.add(np.ascontiguousarray(kept, dtype=np.float32))
    return fresh, kept if stored is not None else None


def remove_from_index(path: str | Path, ids: Iterable[str]) -> Manifest:
    """Remove the rows with ``ids`` and rewrite the index atomically; the other rows keep their order.

    Any unknown id raises :class:`UnknownId` and nothing changes. ``created_at`` becomes the time of this write.
    """
    path = Path(path)
    with folder_lock(path):  # no other writer between our read and our publish
        return _remove(path, list(dict.fromkeys(ids)))


def _remove(path: Path, wanted: list[str]) -> Manifest:
    store, index, stored = _load_for_update(path)
    missing = [i for i in wanted if i not in store]
    if missing:
        raise UnknownId(f"ids not in the index at {path}: {missing[:10]}")
    drop = {store.row_of(i) for i in wanted}
    kept_rows = np.array([r for r in range(store.count) if r not in drop], dtype=np.int64)
    index, stored = _rebuild_without(store, index, stored, kept_rows)
    meta = [store.metadata[r] for r in kept_rows]
    manifest = store.manifest.model_copy(update={"count": len(meta), "created_at": now_iso()})
    commit_folder(path, index, meta, manifest, stored, read_skipped(path))
    return manifest


def read_vectors(path: str | Path) -> np.ndarray:
    """All vectors of the index at ``path``, ``(count, dim)`` float32, in row order (from ``vectors.npy`` where
    present, float16-rounded; else reconstructed exactly from the index)."""
    return IndexStore.open(path).all_vectors()
