"""Rewriting an index folder's metadata in place (a new published version): ``python -m indexer migrate INDEX``
turns a folder from before ``meta.sqlite`` (``meta.jsonl`` only) into a current one, and fills in the file facts
(size, mtime, pixel size, EXIF date and camera, content hash) that older builds did not record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrieval.file_facts import file_facts
from retrieval.index.faiss_ops import is_reconstructible, read_faiss
from retrieval.index.folder import commit_folder, read_skipped
from retrieval.index.manifest import LEGACY_META_FILE, META_FILE, Manifest, now_iso
from retrieval.index.store import IndexStore
from retrieval.index.write import read_vectors

log = logging.getLogger(__name__)


def facts_from_files(root: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A row updater that adds the facts of ``root / row["path"]`` the row lacks (rows whose file is gone or lies
    outside ``root`` stay as they are)."""
    real_root = root.resolve()

    def update(row: dict[str, Any]) -> dict[str, Any]:
        path = (real_root / str(row.get("path") or row["id"])).resolve()
        if not path.is_relative_to(real_root) or not path.is_file():
            return row
        try:
            facts = file_facts(path, with_hash="content_hash" not in row)
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return row
        return {**facts, **row}  # what the row already says wins

    return update


def migrate_folder(path: str | Path, update: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Manifest:
    """Publish a new version of the index folder ``path`` with its metadata in ``meta.sqlite``, each row passed
    through ``update`` (default: :func:`facts_from_files` under the manifest's ``source_root``, when it has one).
    Vectors, index and skipped list are carried over unchanged."""
    path = Path(path)
    store = IndexStore.open(path)
    if update is None:
        root = store.manifest.build.get("source_root")
        update = facts_from_files(Path(root)) if root else (lambda row: row)
    rows = [update(dict(r)) for r in store.metadata]
    index = read_faiss(path, mmap=False)
    vectors = None if is_reconstructible(store.manifest.index_key) else read_vectors(path)
    manifest = store.manifest.model_copy(update={"created_at": now_iso()})
    was = META_FILE if (path / META_FILE).exists() else LEGACY_META_FILE
    commit_folder(path, index, rows, manifest, vectors, read_skipped(path))
    log.info("migrated %s: %d rows from %s into %s", path, len(rows), was, META_FILE)
    return manifest
