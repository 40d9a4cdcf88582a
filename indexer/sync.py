"""``python -m indexer sync SRC INDEX``: keep an index in step with a folder that changes.

1. **Plan** (cheap, every run): scan ``SRC`` (captions files are read as in a build) and compare each file with what
   the index recorded: a new id is *added*; an id whose size and mtime match (and whose captions and split did not
   change) is *unchanged*; otherwise the file's content hash decides: the same bytes are *touched* (only the
   metadata is rewritten, e.g. a new mtime or caption; no encoding), other bytes are *changed* (re-encoded). Ids in
   the index with no file any more are *removed*.
2. **Encode** the added and changed images through the same pipeline as a build (engine -> shards in
   ``INDEX.sync.partial/``): an interrupted sync resumes where it stopped and never encodes an image twice.
3. **Publish** one new version of the index folder (add, replace and remove in one atomic write), then drop the work
   folder. A service reading the index picks it up by its hot reload (``SERVICE_WATCH_INDEX_S`` or
   ``POST /api/admin/reload``) without dropping requests.

``--watch SECONDS`` repeats this every SECONDS until interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.pipeline import Engine, encode_into, plan_records, record_metadata, source_root, work_dir_for
from indexer.settings import IndexerSettings
from indexer.shards import ShardStore
from retrieval.datasets import ImageRecord
from retrieval.errors import BadInput
from retrieval.file_facts import content_hash
from retrieval.index import IndexStore, add_to_index

log = logging.getLogger(__name__)

#: mtimes closer than this (seconds) count as equal (filesystems round them differently).
MTIME_TOLERANCE_S = 1e-6


@dataclass
class SyncPlan:
    """What a sync will do. ``touched``: files whose bytes are unchanged but whose metadata is not."""

    added: list[ImageRecord] = field(default_factory=list)
    changed: list[ImageRecord] = field(default_factory=list)
    touched: list[ImageRecord] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    hashed: int = 0

    @property
    def to_encode(self) -> list[ImageRecord]:
        return [*self.added, *self.changed]

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.changed or self.touched or self.removed)


@dataclass
class SyncResult:
    plan: SyncPlan
    encoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    count: int | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        p = self.plan
        tail = f"; index now holds {self.count} images" if self.count is not None else "; nothing to do"
        return (f"added {len(p.added)}, changed {len(p.changed)}, removed {len(p.removed)}, "
                f"metadata only {len(p.touched)}, unchanged {p.unchanged}, skipped {len(self.skipped)} "
                f"(unreadable), encoded {self.encoded}, hashed {p.hashed} in {self.seconds:.1f} s{tail}")


def _stored_state(store: IndexStore) -> dict[str, tuple[Any, Any, Any, list[str], Any]]:
    """id -> (bytes, mtime, content_hash, captions, split) as the index recorded them."""
    meta = store.meta
    cols = [meta.column(c) for c in ("bytes", "mtime", "content_hash", "captions", "extra")]
    out = {}
    for rid, size, mtime, digest, captions, extra in zip(store.ids, *cols, strict=True):
        out[rid] = (size, mtime, digest, json.loads(captions), json.loads(extra).get("split"))
    return out


def plan_sync(records: Sequence[ImageRecord], store: IndexStore) -> SyncPlan:
    """Compare the folder's ``records`` with the index (see the module docstring)."""
    stored = _stored_state(store)
    plan = SyncPlan()
    for rec in records:
        old = stored.get(rec.id)
        if old is None:
            plan.added.append(rec)
            continue
        size, mtime, digest, captions, split = old
        try:
            st = os.stat(rec.path)
        except OSError:  # vanished since the scan: the next sync removes it
            plan.unchanged += 1
            continue
        same_meta = captions == list(rec.captions) and split == rec.split
        if st.st_size == size and mtime is not None and abs(st.st_mtime - mtime) < MTIME_TOLERANCE_S and same_meta:
            plan.unchanged += 1
            continue
        plan.hashed += 1
        try:
            same_bytes = digest is not None and st.st_size == size and content_hash(rec.path) == digest
        except OSError:
            same_bytes = False
        if same_bytes:
            plan.touched.append(rec)
        else:
            plan.changed.append(rec)
    seen = {r.id for r in records}
    plan.removed = [rid for rid in store.ids if rid not in seen]
    return plan


def sync_index(
    src: str | Path,
    index_dir: str | Path,
    settings: IndexerSettings | None = None,
    *,
    engine: Engine | None = None,
    captions: str | Path | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> SyncResult:
    """Bring the index at ``index_dir`` in step with the folder ``src`` (module docstring). ``engine`` must encode
    with the index's encoder (default: a local engine for ``settings.encoder``)."""
    from indexer.local_engine import LocalEngine

    t0 = time.perf_counter()
    settings = settings or IndexerSettings()
    index_dir = Path(index_dir)
    store = IndexStore.open(index_dir)
    try:
        records = plan_records(src, captions=captions)
    except BadInput:
        records = []  # an empty folder: everything was removed
    root = source_root(records).resolve() if records else Path(src).resolve()
    recorded = store.manifest.build.get("source_root")
    if records and recorded and Path(recorded).resolve() != root:
        raise BadInput(f"{index_dir} indexes {recorded}, not {root}: sync the folder it was built from")
    plan = plan_sync(records, store)
    result = SyncResult(plan)
    work = work_dir_for(index_dir.with_name(index_dir.name + ".sync"))
    if plan.is_empty:
        result.seconds = time.perf_counter() - t0
        return result
    if len(plan.removed) == store.count and not plan.to_encode and not plan.touched:
        raise BadInput(f"no images left under {src}: refusing to empty {index_dir} (remove it instead)")
    engine = engine or LocalEngine.from_settings(settings)
    shards = ShardStore(work, engine.identity(), root)
    todo = shards.pending(plan.to_encode)
    stats = encode_into(shards, todo, engine.encode(todo), settings, on_shard=on_shard)
    vectors, metadata, skipped = shards.read_all()
    wanted = {r.id for r in plan.to_encode}  # a resumed work folder may hold files that are gone since
    keep = [i for i, m in enumerate(metadata) if m["id"] in wanted]
    if len(keep) < len(metadata):
        vectors, metadata = vectors[keep], [metadata[i] for i in keep]
    skipped = [(rid, why) for rid, why in skipped if rid in wanted]
    result.encoded, result.skipped = stats.encoded, skipped
    if plan.touched:  # same bytes: keep the stored vector, rewrite the metadata
        rows = np.array([store.row_of(r.id) for r in plan.touched], np.int64)
        old = store.vectors(rows)
        vectors = np.concatenate([vectors, old]) if len(vectors) else old
        metadata = [*metadata, *(record_metadata(r) for r in plan.touched)]
    failed_changes = {rid for rid, _ in skipped} & {r.id for r in plan.changed}
    manifest = add_to_index(
        index_dir, np.ascontiguousarray(vectors, np.float32).reshape(len(metadata), store.dim), metadata,
        encoder_identity=engine.identity(), on_existing="replace", skipped=skipped,
        remove=[*plan.removed, *sorted(failed_changes)],
    )
    shards.discard()
    result.count = manifest.count
    result.seconds = time.perf_counter() - t0
    return result


def watch(src: str | Path, index_dir: str | Path, interval_s: float, run: Callable[[], SyncResult],
          *, print_fn: Callable[[str], None] = print, rounds: int | None = None) -> None:
    """Run ``run()`` (one sync) every ``interval_s`` seconds until interrupted (or ``rounds`` times, for tests);
    prints a line for every sync that changed something. A failing round is reported and the next one tried."""
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        try:
            result = run()
            if not result.plan.is_empty:
                print_fn(f"{time.strftime('%H:%M:%S')} {result.summary()}")
        except Exception as exc:  # keep watching: a file being written, a full disk that gets freed ...
            print_fn(f"{time.strftime('%H:%M:%S')} sync of {src} into {index_dir} failed: "
                     f"{type(exc).__name__}: {exc}")
        done += 1
        if rounds is not None and done >= rounds:
            break
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
