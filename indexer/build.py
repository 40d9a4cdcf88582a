"""The offline indexing job: read -> encode in batches -> write shards -> build the FAISS index.

Resumable: vectors are written to shards in ``<out>.partial/`` as the job goes. Each shard is committed by an
atomic rename, so after an interruption (Ctrl-C, a killed process, a crash) a rerun reads the committed shards,
skips every image they hold, encodes only the rest, and never duplicates or loses a vector. The final index folder
is written atomically by :func:`indexer.core.index_store.write_index`; the work folder is removed afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from indexer.core.datasets import ImageLoadDataset, ImageRecord, collate_skipping, load_dataset
from indexer.core.encoders import Encoder, EncoderSpec, build_encoder
from indexer.core.errors import BadInput, IndexEncoderMismatch
from indexer.core.index_store import Manifest, add_to_index, write_index
from indexer.core.settings import IndexerSettings

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.npz"


def record_metadata(record: ImageRecord) -> dict[str, Any]:
    """The metadata row stored beside a vector."""
    row: dict[str, Any] = {"id": record.id, "path": record.id, "captions": list(record.captions)}
    if record.split:
        row["split"] = record.split
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
    out = Path(out)
    return out.parent / (out.name + ".partial")


class ShardWriter:
    """Append-only shards of ``(ids, vectors)`` + metadata in a work folder; the unit of resume.

    Files: ``state.json`` (encoder identity, source root), ``shard-000000.npz`` (``ids`` (n,) str, ``vectors`` (n, d)
    float32) with ``shard-000000.jsonl`` (metadata rows, written first), and ``skipped.jsonl`` (id, reason).
    A shard exists only once its ``.npz`` has been renamed into place.
    """

    def __init__(self, work_dir: str | Path, encoder_identity: dict[str, Any], root: str | Path):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / "state.json"
        state = {"encoder": encoder_identity, "source_root": str(root)}
        if state_path.is_file():
            old = json.loads(state_path.read_text())
            if old.get("encoder") != encoder_identity:
                raise IndexEncoderMismatch(
                    f"{self.dir} holds a partial build made with another encoder ({old.get('encoder')}); "
                    f"delete it or build with the same encoder"
                )
            if old.get("source_root") != str(root):
                raise BadInput(f"{self.dir} holds a partial build of {old.get('source_root')}, not of {root}")
        else:
            _atomic_write_text(state_path, json.dumps(state, indent=2))
        self.encoder_identity = encoder_identity
        self.root = Path(root)
        self._next = len(self.shard_paths())

    def pending(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """The records this work folder has not committed or skipped yet (all of them for a new folder)."""
        done = self.done_ids()
        todo = [r for r in records if r.id not in done]
        if len(todo) < len(records):
            log.info("resuming: %d of %d images already done", len(records) - len(todo), len(records))
        return todo

    def shard_paths(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB))

    def done_ids(self) -> set[str]:
        """Ids already committed to shards or recorded as skipped."""
        done: set[str] = set()
        for path in self.shard_paths():
            with np.load(path) as z:
                done.update(z["ids"].tolist())
        done.update(rid for rid, _ in self.skipped())
        return done

    def write(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]]) -> Path:
        """Commit one shard; ``vectors`` is ``(len(ids), d)`` float32."""
        if not (len(ids) == len(vectors) == len(metadata)):
            raise ValueError("ids, vectors and metadata must have the same length")
        name = f"shard-{self._next:06d}"
        meta_path = self.dir / f"{name}.jsonl"
        _atomic_write_text(meta_path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in metadata))
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, ids=np.asarray(list(ids), dtype=str), vectors=np.asarray(vectors, np.float32))
        _fsync(tmp)
        final = self.dir / f"{name}.npz"
        tmp.replace(final)
        self._next += 1
        return final

    def skip(self, rid: str, reason: str) -> None:
        with open(self.dir / "skipped.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"id": rid, "reason": reason}) + "\n")

    def skipped(self) -> list[tuple[str, str]]:
        path = self.dir / "skipped.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                rows.append((obj["id"], obj["reason"]))
        return rows

    def read_all(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """All committed vectors ``(n, d)`` float32 and metadata rows, in shard order."""
        vecs: list[np.ndarray] = []
        meta: list[dict[str, Any]] = []
        for path in self.shard_paths():
            with np.load(path) as z:
                ids = z["ids"].tolist()
                vecs.append(z["vectors"])
            rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()]
            if [r["id"] for r in rows] != ids:
                raise RuntimeError(f"{path}: metadata and vectors disagree; delete {self.dir} and rebuild")
            meta.extend(rows)
        if not vecs:
            return np.zeros((0, 0), np.float32), []
        return np.concatenate(vecs), meta


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    tmp.replace(path)


@dataclass
class EncodeStats:
    encoded: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def encode_records(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    writer: ShardWriter,
    settings: IndexerSettings,
    *,
    on_shard: Callable[[int], None] | None = None,
) -> EncodeStats:
    """Encode ``records`` in batches through a DataLoader and commit them to ``writer`` in shards.

    Corrupt, truncated or oversized images are recorded as skipped, never fatal. ``on_shard(n_committed)`` is
    called after each shard (tests use it to simulate an interruption).
    """
    stats = EncodeStats()
    if not records:
        return stats
    dataset = ImageLoadDataset(records, encoder.image_transform, max_pixels=settings.max_image_pixels)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_for(encoder.device.type),
        num_workers=settings.workers,
        collate_fn=collate_skipping,
        pin_memory=encoder.device.type == "cuda",
        persistent_workers=False,
    )
    buf_ids: list[str] = []
    buf_vecs: list[np.ndarray] = []
    buf_meta: list[dict[str, Any]] = []
    shards = 0

    def flush() -> None:
        nonlocal shards
        if buf_ids:
            writer.write(buf_ids, np.concatenate(buf_vecs), buf_meta)
            shards += 1
            buf_ids.clear()
            buf_vecs.clear()
            buf_meta.clear()
            if on_shard is not None:
                on_shard(shards)

    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="img", desc="encoding", disable=not settings.progress, smoothing=0.1)
    try:
        for batch in loader:
            for idx, reason in batch.failed:
                writer.skip(records[idx].id, reason)
                stats.skipped += 1
            if batch.indices:
                vecs = encoder.encode_pixels(batch.pixels)
                for j, idx in enumerate(batch.indices):
                    buf_ids.append(records[idx].id)
                    buf_meta.append(record_metadata(records[idx]))
                    buf_vecs.append(vecs[j : j + 1])
                    if len(buf_ids) >= settings.shard_size:
                        flush()
                stats.encoded += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.failed))
            bar.set_postfix(skipped=stats.skipped)
        flush()
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class BuildResult:
    manifest: Manifest
    out: Path
    stats: EncodeStats
    resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def build_params(spec: EncoderSpec, settings: IndexerSettings, root: Path, **extra: Any) -> dict[str, Any]:
    """What the manifest records about how the index was built (spec lets `search` rebuild the encoder)."""
    return {
        "encoder_spec": spec.model_dump(exclude={"device"}),
        "source_root": str(root),
        "batch_size": settings.batch_size,  # None: chosen per device (IndexerSettings.batch_for)
        "workers": settings.workers,
        "torch": torch.__version__,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def build_index(
    src: str | Path,
    out: str | Path,
    settings: IndexerSettings | None = None,
    *,
    captions: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    encoder: Encoder | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> BuildResult:
    """Index the images under ``src`` into the folder ``out``; resumes a partial build of the same job."""
    settings = settings or IndexerSettings()
    records = plan_records(src, captions=captions, split=split, limit=limit)
    root = source_root(records)
    encoder = encoder or build_encoder(settings.encoder.spec())
    writer = ShardWriter(work_dir_for(out), encoder.identity(), root)
    todo = writer.pending(records)
    stats = encode_records(encoder, todo, writer, settings, on_shard=on_shard)
    skipped = writer.skipped()
    manifest = finalize(writer, out, encoder, settings, n_planned=len(records), stats=stats)
    return BuildResult(manifest, Path(out), stats, resumed=len(records) - len(todo), skipped=skipped)


def finalize(
    writer: ShardWriter,
    out: str | Path,
    encoder: Encoder | None,
    settings: IndexerSettings,
    *,
    n_planned: int,
    stats: EncodeStats | None = None,
    encoder_label: str | None = None,
    encoder_spec: EncoderSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Build the FAISS index from every committed shard, write the folder atomically, drop the work folder."""
    vectors, metadata = writer.read_all()
    if not metadata:
        raise BadInput("no image could be encoded; see the skipped list")
    skipped = writer.skipped()
    spec = encoder_spec or (encoder.spec if encoder is not None else None)
    if spec is None:
        raise ValueError("finalize needs an encoder or an encoder_spec")
    params = build_params(
        spec,
        settings,
        writer.root,
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
        encoder_identity=writer.encoder_identity,
        encoder_label=encoder_label or spec.label(),
        index_key=settings.index_key,
        build=params,
        memory_budget_bytes=budget,
    )
    if skipped:
        (Path(out) / "skipped.jsonl").write_text(
            "".join(json.dumps({"id": i, "reason": r}) + "\n" for i, r in skipped), encoding="utf-8"
        )
    _remove_tree(writer.dir)
    return manifest


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def add_images(
    index_dir: str | Path,
    paths: Iterable[str | Path],
    settings: IndexerSettings | None = None,
    *,
    root: str | Path,
    encoder: Encoder | None = None,
) -> tuple[Manifest, list[tuple[str, str]]]:
    """Encode the image files ``paths`` (ids relative to ``root``) and add them to an existing index.

    Returns the new manifest and the skipped (id, reason) pairs.
    """
    from indexer.core.datasets import scan_images

    settings = settings or IndexerSettings()
    root = Path(root).resolve()
    wanted = {Path(p).resolve() for p in paths}
    records = [r for r in scan_images(root) if r.path.resolve() in wanted or any(
        w.is_dir() and r.path.resolve().is_relative_to(w) for w in wanted)]
    if not records:
        raise BadInput(f"no images to add among {sorted(map(str, wanted))[:5]} under {root}")
    encoder = encoder or build_encoder(settings.encoder.spec())
    work = work_dir_for(Path(index_dir).with_name(Path(index_dir).name + ".add"))
    writer = ShardWriter(work, encoder.identity(), root)
    todo = writer.pending(records)
    encode_records(encoder, todo, writer, settings)
    vectors, metadata = writer.read_all()
    skipped = writer.skipped()
    if not metadata:
        _remove_tree(writer.dir)
        raise BadInput("none of the images could be encoded: " + "; ".join(f"{i}: {r}" for i, r in skipped[:5]))
    manifest = add_to_index(index_dir, vectors, metadata, encoder_identity=encoder.identity())
    _remove_tree(writer.dir)
    return manifest, skipped
