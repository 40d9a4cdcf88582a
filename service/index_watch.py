"""Hot reload by watching the index folder: when a writer (``indexer sync``, ``add``, ``remove``, a rebuild)
publishes a new version, the service opens it and swaps it in (:meth:`service.engine.Searcher.reload`); requests
already running finish on the snapshot they started with, so none is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def folder_signature(index_dir: Path) -> tuple[int, ...] | None:
    """What changes when a new version is published: the folder's inode (a swap replaces it) and the manifest's
    inode, size and mtime (written last). None while there is no complete folder."""
    try:
        d = os.stat(index_dir)
        m = os.stat(index_dir / "manifest.json")
    except OSError:
        return None
    return (d.st_ino, d.st_dev, m.st_ino, m.st_size, m.st_mtime_ns)


async def watch_index(state: Any, interval_s: float) -> None:
    """Poll ``state.searcher``'s index folder every ``interval_s`` seconds and reload it when its signature changes.
    A version that cannot be opened (corrupt, another encoder) is logged and the current one keeps serving; the same
    version is not retried until it changes again."""
    searcher = state.searcher
    last = folder_signature(searcher.snapshot.index_dir)
    while True:
        await asyncio.sleep(interval_s)
        index_dir = searcher.snapshot.index_dir
        sig = folder_signature(index_dir)
        if sig is None or sig == last:
            continue
        last = sig
        try:
            snap = await asyncio.to_thread(searcher.reload)
        except Exception as exc:  # keep serving the old snapshot
            log.error("index changed but cannot be loaded: %s: %s", type(exc).__name__, exc,
                      extra={"index_dir": str(index_dir)})
            continue
        state.metrics.index_vectors.set(len(snap.store.ids))
        state.metrics.index_generation.set(snap.generation)
        log.info("index reloaded after a change on disk", extra={"index_dir": str(index_dir),
                                                                 "generation": snap.generation})


@contextlib.asynccontextmanager
async def index_watcher(state: Any, interval_s: float | None):  # type: ignore[no-untyped-def]
    """Run :func:`watch_index` for the duration of the block (nothing when ``interval_s`` is None)."""
    if interval_s is None:
        yield
        return
    task = asyncio.create_task(watch_index(state, interval_s), name="index-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
