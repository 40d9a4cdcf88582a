"""The rows of an index folder: validating vectors and metadata before a write, and the files that hold them
(``meta.sqlite``, ``vectors.npy``); :func:`commit_folder` writes a complete folder through the one atomic helper."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_folder
from retrieval.errors import BadInput, IndexCorrupt, IndexNotFound
from retrieval.index.faiss_ops import write_faiss
from retrieval.index.manifest import (
    LEGACY_META_FILE,
    MANIFEST_FILE,
    META_FILE,
    SKIPPED_FILE,
    VECTORS_FILE,
    Manifest,
    manifest_json,
)
from retrieval.index.metadata import MetaDB, write_meta_db

log = logging.getLogger(__name__)

#: Tolerance on ``| ||v|| - 1 |`` for vectors said to be L2-normalised.
NORM_TOLERANCE = 1e-3


def validate_vectors(vectors: Any, dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous ``(n, d)`` float32 array, or :class:`BadInput` (wrong type, dtype, shape or
    dim, NaN/inf, rows not L2-normalised within :data:`NORM_TOLERANCE`)."""
    if not isinstance(vectors, np.ndarray):
        raise BadInput(f"vectors must be a numpy array, got {type(vectors).__name__}")
    if vectors.dtype != np.float32:
        raise BadInput(f"vectors must be float32, got {vectors.dtype}")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise BadInput(f"vectors must have shape (n, d) with d > 0, got {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise BadInput(f"vectors have dim {vectors.shape[1]}, the index has dim {dim}")
    if not np.isfinite(vectors).all():
        raise BadInput("vectors contain NaN or infinite values")
    if len(vectors):
        norms = np.linalg.norm(vectors, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if bad.size:
            raise BadInput(f"vectors must be L2-normalised; row {int(bad[0])} has norm {float(norms[bad[0]]):.4f}"
                           f" ({bad.size} rows off)")
    return np.ascontiguousarray(vectors)


def validate_metadata(metadata: Sequence[dict[str, Any]], n: int, existing: Iterable[str] = ()) -> list[str]:
    """The ids of ``n`` metadata rows (dicts with a unique non-empty string ``id``, none in ``existing``), or
    :class:`BadInput`."""
    if len(metadata) != n:
        raise BadInput(f"{len(metadata)} metadata rows for {n} vectors")
    ids: list[str] = []
    for i, row in enumerate(metadata):
        if not isinstance(row, dict):
            raise BadInput(f"metadata row {i} is not a dict")
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            raise BadInput(f"metadata row {i} needs a non-empty string 'id', got {rid!r}")
        ids.append(rid)
    seen = set(existing)
    dup = []
    for rid in ids:
        if rid in seen:
            dup.append(rid)
        seen.add(rid)
    if dup:
        raise BadInput(f"duplicate ids: {sorted(set(dup))[:10]}")
    return ids


def read_legacy_meta(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path/meta.jsonl`` (folders written before ``meta.sqlite``; each a dict with a string ``id``),
    in row order."""
    f = path / LEGACY_META_FILE
    if not f.is_file():
        raise IndexNotFound(f"no {LEGACY_META_FILE} in {path}")
    rows: list[dict[str, Any]] = []
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise IndexNotFound(f"cannot read {f}: {exc}") from exc
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexCorrupt(f"{f} line {lineno} is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise IndexCorrupt(f"{f} line {lineno} is not an object with a string 'id'")
        rows.append(row)
    return rows


def map_vectors(path: Path, manifest: Manifest) -> np.ndarray:
    """``path/vectors.npy`` memory-mapped read-only: ``(count, dim)`` float16 as stored. :class:`IndexCorrupt` when
    it cannot be read or its shape disagrees with the manifest."""
    f = path / VECTORS_FILE
    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexCorrupt(f"cannot read {f}: {exc}") from exc
    if arr.shape != (manifest.count, manifest.dim):
        raise IndexCorrupt(f"{f} has shape {arr.shape}, manifest says ({manifest.count}, {manifest.dim})")
    if arr.dtype not in (np.float16, np.float32):
        raise IndexCorrupt(f"{f} holds {arr.dtype}, not float16/float32 vectors")
    return arr


def write_meta(metadata: Sequence[dict[str, Any]], folder: Path) -> None:
    """The metadata rows as ``folder/meta.sqlite`` (:func:`retrieval.index.metadata.write_meta_db`)."""
    write_meta_db(metadata, folder / META_FILE)


def open_meta(path: Path) -> MetaDB:
    """The metadata of the index folder ``path``, opened read-only: ``meta.sqlite``, or for a folder written before
    it, a private database built from ``meta.jsonl`` (with a one-line hint to migrate it for good).
    :class:`IndexNotFound` when there is neither, :class:`IndexCorrupt` when it cannot be read."""
    if (path / META_FILE).is_file():
        return MetaDB.open(path / META_FILE)
    if not (path / LEGACY_META_FILE).is_file():
        raise IndexNotFound(f"no {META_FILE} in {path}")
    rows = read_legacy_meta(path)
    try:
        db = MetaDB.from_rows(rows)
    except BadInput as exc:
        raise IndexCorrupt(f"{path / LEGACY_META_FILE}: {exc}") from exc
    log.warning("%s has only %s (an older format): filters on dates, folders and cameras see less; run "
                "`python -m indexer migrate %s` to write %s", path, LEGACY_META_FILE, path, META_FILE)
    return db


def commit_folder(
    out_dir: Path,
    index: Any,
    metadata: Sequence[dict[str, Any]],
    manifest: Manifest,
    vectors: np.ndarray | None,
    skipped: Sequence[tuple[str, str]] = (),
) -> None:
    """Write a complete index folder and swap it in atomically (see :func:`retrieval.atomic.atomic_folder`).

    ``vectors`` (``(n, d)``, stored as float16) only for index types that cannot give them back; ``skipped``
    (id, reason) pairs become ``skipped.jsonl``. The manifest is written last: a folder with one is complete.
    """
    with atomic_folder(out_dir) as tmp:
        write_faiss(index, tmp)
        write_meta(metadata, tmp)
        if vectors is not None:
            np.save(tmp / VECTORS_FILE, vectors.astype(np.float16))
        if skipped:
            (tmp / SKIPPED_FILE).write_text(
                "".join(json.dumps({"id": i, "reason": r}) + "\n" for i, r in skipped), encoding="utf-8"
            )
        (tmp / MANIFEST_FILE).write_text(manifest_json(manifest), encoding="utf-8")


def read_skipped(path: Path) -> list[tuple[str, str]]:
    """The (id, reason) pairs of ``path/skipped.jsonl`` (``[]`` when the folder has none)."""
    f = path / SKIPPED_FILE
    if not f.is_file():
        return []
    out: list[tuple[str, str]] = []
    for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((str(obj["id"]), str(obj["reason"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise IndexCorrupt(f"{f} line {lineno} is not a skipped-image record: {exc}") from exc
    return out
