"""The unit of resume: a work folder of committed shards, owned by one class, :class:`ShardStore`.

Files in the work folder (``OUT.partial/``)::

    state.json          {"encoder": identity, "source_root": path}: a resume with another encoder or source is refused
    shard-000000.npz    one committed shard: ``ids`` (n,) str, ``vectors`` (n, d) float32, ``meta`` (JSON text: the
                        n metadata rows), ``skipped`` (JSON text: [[id, reason], ...] of images that failed)

A shard is one file written through :func:`retrieval.atomic.atomic_path` (a hidden temporary name, fsync, rename),
so it either exists complete or not at all: a process killed at any instant leaves only committed shards (and
perhaps a hidden temporary file, which no glob matches and the next flush ignores). Vectors and skipped images are
buffered by :meth:`ShardStore.append` / :meth:`ShardStore.skip` and committed together by :meth:`ShardStore.flush`.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.atomic import atomic_path, atomic_write_text
from retrieval.errors import BadInput, IndexCorrupt, IndexEncoderMismatch

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-[0-9]*.npz"
STATE_FILE = "state.json"


class HasId(Protocol):
    @property
    def id(self) -> str: ...


class ShardStore:
    """Append, flush, resume and read back the vectors of one job."""

    def __init__(self, work_dir: str | Path, encoder_identity: dict[str, Any], root: str | Path):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / STATE_FILE
        if state_path.is_file():
            try:
                old = json.loads(state_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise IndexCorrupt(f"{state_path} is unreadable ({exc}); delete {self.dir} and rerun") from exc
            if old.get("encoder") != encoder_identity:
                raise IndexEncoderMismatch(
                    f"{self.dir} holds a partial build made with another encoder ({old.get('encoder')}); "
                    f"delete it or build with the same encoder"
                )
            if old.get("source_root") != str(root):
                raise BadInput(f"{self.dir} holds a partial build of {old.get('source_root')}, not of {root}")
        else:
            atomic_write_text(state_path, json.dumps({"encoder": encoder_identity, "source_root": str(root)}, indent=2))
        self.encoder_identity = encoder_identity
        self.root = Path(root)
        # After the work folder was partly deleted (a kill while discarding it), numbers have gaps: never reuse one.
        self._next = max((int(p.stem.split("-")[1]) + 1 for p in self.shard_paths()), default=0)
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._meta: list[dict[str, Any]] = []
        self._skipped: list[tuple[str, str]] = []

    # -- resume --------------------------------------------------------------------------------------------------
    def shard_paths(self) -> list[Path]:
        """Committed shards, in commit order."""
        return sorted(self.dir.glob(SHARD_GLOB))

    def _read(self, path: Path) -> tuple[list[str], np.ndarray, list[dict[str, Any]], list[tuple[str, str]]]:
        try:
            with np.load(path, allow_pickle=False) as z:
                ids = [str(i) for i in z["ids"].tolist()]
                vectors = np.asarray(z["vectors"], np.float32)
                meta = json.loads(str(z["meta"]))
                skipped = [(str(i), str(r)) for i, r in json.loads(str(z["skipped"]))]
        except Exception as exc:  # a committed shard is complete by construction: this is disk damage
            raise IndexCorrupt(f"{path} is unreadable ({exc}); delete {self.dir} and rerun") from exc
        if [m.get("id") for m in meta] != ids or len(vectors) != len(ids):
            raise IndexCorrupt(f"{path}: ids, vectors and metadata disagree; delete {self.dir} and rerun")
        return ids, vectors, meta, skipped

    def done_ids(self) -> set[str]:
        """Ids already committed to shards, encoded or skipped."""
        done: set[str] = set()
        for path in self.shard_paths():
            ids, _, _, skipped = self._read(path)
            done.update(ids)
            done.update(rid for rid, _ in skipped)
        return done

    def pending(self, records: Sequence[HasId]) -> list[Any]:
        """The records this work folder has not committed yet (all of them for a new folder)."""
        done = self.done_ids()
        todo = [r for r in records if r.id not in done]
        if len(todo) < len(records):
            log.info("resuming: %d of %d images already done", len(records) - len(todo), len(records))
        return todo

    # -- write ---------------------------------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Vectors appended since the last flush."""
        return len(self._ids)

    def append(self, record_id: str, vector: np.ndarray, metadata: dict[str, Any]) -> None:
        """Buffer one encoded image: ``vector`` ``(d,)`` float32 and its metadata row (with ``"id" == record_id``)."""
        self._ids.append(record_id)
        self._vectors.append(np.asarray(vector, np.float32).reshape(1, -1))
        self._meta.append(metadata)

    def skip(self, record_id: str, reason: str) -> None:
        """Buffer one image that could not be encoded."""
        self._skipped.append((record_id, reason))

    def flush(self) -> Path | None:
        """Commit everything buffered as one shard (atomically); None when nothing was buffered."""
        if not self._ids and not self._skipped:
            return None
        vectors = np.concatenate(self._vectors) if self._vectors else np.zeros((0, 0), np.float32)
        buf = io.BytesIO()
        np.savez(
            buf,
            ids=np.asarray(self._ids, dtype=str),
            vectors=vectors,
            meta=np.asarray(json.dumps(self._meta, ensure_ascii=False)),
            skipped=np.asarray(json.dumps(self._skipped, ensure_ascii=False)),
        )
        final = self.dir / f"shard-{self._next:06d}.npz"
        with atomic_path(final) as tmp:
            tmp.write_bytes(buf.getbuffer())
        self._next += 1
        self._ids, self._vectors, self._meta, self._skipped = [], [], [], []
        return final

    # -- read back -----------------------------------------------------------------------------------------------
    def read_all(self) -> tuple[np.ndarray, list[dict[str, Any]], list[tuple[str, str]]]:
        """All committed vectors ``(n, d)`` float32, their metadata rows and the skipped (id, reason) pairs, in
        commit order."""
        vecs: list[np.ndarray] = []
        meta: list[dict[str, Any]] = []
        skipped: list[tuple[str, str]] = []
        for path in self.shard_paths():
            _, v, m, s = self._read(path)
            if len(v):
                vecs.append(v)
            meta.extend(m)
            skipped.extend(s)
        vectors = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
        return vectors, meta, skipped

    def discard(self) -> None:
        """Delete the work folder (after its shards went into an index)."""
        shutil.rmtree(self.dir, ignore_errors=True)
