"""The one indexing pipeline: read -> encode -> shard store -> finalize.

::

    plan_records ─► engine.encode(records) ─► ShardStore (append, flush every shard_size) ─► finalize ─► index folder
    (sorted ids)     local: DataLoader + encoder        the unit of resume               write_index (atomic)
                     ray:   decode tasks + actor pool

Engines (:class:`Engine`) only say how batches get encoded: :class:`~indexer.local_engine.LocalEngine` (DataLoader
workers decode, this process encodes) and :class:`~indexer.ray_engine.RayEngine` (a Ray cluster). Everything else —
skipping bad images, shards, resume, the final index — is here, once.

Resumable: vectors go to shards in ``<out>.partial/`` as the job goes; after an interruption (Ctrl-C, a killed
process, a crash) the same call reads the committed shards, skips every image they hold, encodes only the rest,
and never duplicates or loses a vector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from indexer.settings import IndexerSettings
from indexer.shards import ShardStore
from retrieval.datasets import ImageRecord, load_dataset, scan_images
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import BadInput
from retrieval.file_facts import file_facts
from retrieval.index import IndexStore, Manifest, add_to_index, write_index

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedBatch:
    """What an engine yields: ``vectors`` ``(len(indices), d)`` float32 for the records at ``indices`` (positions in
    the list given to :meth:`Engine.encode`), and ``failed`` (position, reason) for images that could not be read."""

    indices: list[int]
    vectors: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)


class Engine(Protocol):
    """How batches get encoded. ``spec``/``identity()`` name the encoder (recorded in shards and the manifest);
    ``build_info`` is added to the manifest's build parameters."""

    spec: EncoderSpec
    build_info: dict[str, Any]

    def identity(self) -> dict[str, Any]: ...

    def encode(self, records: Sequence[ImageRecord]) -> Iterator[EncodedBatch]: ...


# ----------------------------------------------------------------------------------------------------------------
# Read
# ----------------------------------------------------------------------------------------------------------------


def record_metadata(record: ImageRecord) -> dict[str, Any]:
    """The metadata row stored beside a vector: id, path, captions, split, and the file's facts (size, mtime,
    pixel size, taken_at, camera, content hash: :func:`retrieval.file_facts.file_facts`)."""
    row: dict[str, Any] = {"id": record.id, "path": record.id, "captions": list(record.captions)}
    if record.split:
        row["split"] = record.split
    try:
        row.update(file_facts(record.path))
    except OSError as exc:  # vanished since the scan: the encoder reports it as skipped
        log.warning("cannot read the facts of %s: %s", record.path, exc)
    return row


def plan_records(
    src: str | Path, *, captions: str | Path | None = None, split: str | None = None, limit: int | None = None
) -> list[ImageRecord]:
    """The images to index, sorted by id (relative path); ``limit`` keeps the first N (for quick runs)."""
    records = load_dataset(src, captions=captions, split=split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise BadInput(f"no images found under {src}" + (f" for split {split!r}" if split else ""))
    return records


def source_root(records: Sequence[ImageRecord]) -> Path:
    """The folder the record ids are relative to."""
    first = records[0]
    return first.path.absolute().parents[len(Path(first.id).parts) - 1]


def work_dir_for(out: str | Path) -> Path:
    """The work folder of the job writing ``out``: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.parent / (out.name + ".partial")


# ----------------------------------------------------------------------------------------------------------------
# Encode into the shard store
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EncodeStats:
    encoded: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def encode_into(
    store: ShardStore,
    records: Sequence[ImageRecord],
    batches: Iterable[EncodedBatch],
    settings: IndexerSettings,
    *,
    on_shard: Callable[[int], None] | None = None,
) -> EncodeStats:
    """Consume an engine's ``batches`` for ``records`` into ``store``, committing a shard every ``shard_size``
    vectors and at the end. Bad images are recorded as skipped, never fatal. ``on_shard(n_committed_this_run)`` is
    called after each shard (tests use it to simulate an interruption)."""
    stats = EncodeStats()
    shards = 0

    def flush() -> None:
        nonlocal shards
        if store.flush() is not None:
            shards += 1
            if on_shard is not None:
                on_shard(shards)

    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="img", desc="encoding", disable=not settings.progress, smoothing=0.1)
    try:
        for batch in batches:
            for idx, reason in batch.failed:
                store.skip(records[idx].id, reason)
            stats.skipped += len(batch.failed)
            for j, idx in enumerate(batch.indices):
                store.append(records[idx].id, batch.vectors[j], record_metadata(records[idx]))
                if store.buffered >= settings.shard_size:
                    flush()
            stats.encoded += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.failed))
            bar.set_postfix(skipped=stats.skipped)
        flush()
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    if stats.encoded + stats.skipped != len(records):
        raise BadInput(f"the engine returned {stats.encoded + stats.skipped} results for {len(records)} images")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Finalize
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    manifest: Manifest
    out: Path
    stats: EncodeStats
    resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def build_params(spec: EncoderSpec, settings: IndexerSettings, root: Path, **extra: Any) -> dict[str, Any]:
    """What the manifest records about how the index was built (spec lets `search` rebuild the encoder)."""
    from retrieval.heads import checkpoint_calibration  # torch: loaded only when an index is written

    return {
        "encoder_spec": spec.model_dump(exclude={"device"}),
        # score -> probability of relevance shipped with the heads (fitted on a dev split by the trainer), or None
        "calibration": checkpoint_calibration(spec.heads),
        "source_root": str(root),
        "batch_size": settings.batch_size,  # None: chosen per device (IndexerSettings.batch_for)
        "workers": settings.workers,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def finalize(
    store: ShardStore,
    out: str | Path,
    spec: EncoderSpec,
    settings: IndexerSettings,
    *,
    n_planned: int,
    stats: EncodeStats | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Manifest, list[tuple[str, str]]]:
    """Build the FAISS index from every committed shard, write the folder atomically (with ``skipped.jsonl``), then
    drop the work folder. Returns the manifest and the skipped (id, reason) pairs."""
    vectors, metadata, skipped = store.read_all()
    if not metadata:
        raise BadInput("no image could be encoded; see the skipped list: "
                       + "; ".join(f"{i}: {r}" for i, r in skipped[:5]))
    params = build_params(
        spec,
        settings,
        store.root,
        planned=n_planned,
        skipped=len(skipped),
        skipped_examples=[{"id": i, "reason": r} for i, r in skipped[:50]],
        images_per_s=round(stats.images_per_s, 2) if stats and stats.encoded else None,
        **(extra or {}),
    )
    budget = int(settings.memory_budget_gb * 2**30) if settings.memory_budget_gb else None
    manifest = write_index(
        out,
        vectors,
        metadata,
        encoder_identity=store.encoder_identity,
        encoder_label=spec.label(),
        index_key=settings.index_key,
        build=params,
        memory_budget_bytes=budget,
        skipped=skipped,
    )
    store.discard()
    return manifest, skipped


# ----------------------------------------------------------------------------------------------------------------
# The jobs
# ----------------------------------------------------------------------------------------------------------------


def build_index(
    src: str | Path,
    out: str | Path,
    settings: IndexerSettings | None = None,
    *,
    captions: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    engine: Engine | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> BuildResult:
    """Index the images under ``src`` into the folder ``out``; resumes a partial build of the same job.

    ``engine``: how to encode (default: a :class:`~indexer.local_engine.LocalEngine` for ``settings.encoder``).
    """
    from indexer.local_engine import LocalEngine

    settings = settings or IndexerSettings()
    records = plan_records(src, captions=captions, split=split, limit=limit)
    engine = engine or LocalEngine.from_settings(settings)
    store = ShardStore(work_dir_for(out), engine.identity(), source_root(records))
    todo = store.pending(records)
    stats = encode_into(store, todo, engine.encode(todo), settings, on_shard=on_shard)
    manifest, skipped = finalize(store, out, engine.spec, settings, n_planned=len(records), stats=stats,
                                 extra=engine.build_info)
    return BuildResult(manifest, Path(out), stats, resumed=len(records) - len(todo), skipped=skipped)


def add_images(
    index_dir: str | Path,
    paths: Iterable[str | Path],
    settings: IndexerSettings | None = None,
    *,
    root: str | Path,
    engine: Engine | None = None,
) -> tuple[Manifest, list[tuple[str, str]]]:
    """Encode the image files ``paths`` (files or folders, ids relative to ``root``) and add them to an existing
    index. Images whose ids the index already holds are left as they are (``sync`` re-encodes changed files), so
    running the same add again, or again after it was killed at any point, changes nothing more. Resumable like
    a build (work folder ``INDEX.add.partial``). Returns the new manifest and the skipped (id, reason) pairs."""
    from indexer.local_engine import LocalEngine

    settings = settings or IndexerSettings()
    root = Path(root).resolve()
    wanted = {Path(p).resolve() for p in paths}
    records = [r for r in scan_images(root) if r.path.resolve() in wanted or any(
        w.is_dir() and r.path.resolve().is_relative_to(w) for w in wanted)]
    if not records:
        raise BadInput(f"no images to add among {sorted(map(str, wanted))[:5]} under {root}")
    engine = engine or LocalEngine.from_settings(settings)
    store = ShardStore(work_dir_for(Path(index_dir).with_name(Path(index_dir).name + ".add")), engine.identity(), root)
    indexed = IndexStore.open(index_dir, expected_encoder=engine.identity())
    new = [r for r in records if r.id not in indexed]
    if len(new) < len(records):
        log.info("%d of %d images are already in the index", len(records) - len(new), len(records))
    todo = store.pending(new)
    encode_into(store, todo, engine.encode(todo), settings)
    vectors, metadata, skipped = store.read_all()
    if not metadata:  # every image is indexed already (a rerun) or could not be encoded (listed in skipped)
        store.discard()
        return indexed.manifest, skipped
    # on_existing="skip": rows this job published before it was killed are in the index already
    manifest = add_to_index(index_dir, vectors, metadata, encoder_identity=engine.identity(), skipped=skipped,
                            on_existing="skip")
    store.discard()
    return manifest, skipped
