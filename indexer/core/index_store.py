"""The index folder: write it atomically, open it (memory-mapped), search it, add to it, remove from it.

Folder layout (``SCHEMA_VERSION`` 1)::

    index.faiss     the FAISS index; row ``i`` of the index has FAISS id ``i`` (no IDMap)
    meta.jsonl      one JSON object per row, row-aligned with the index: {"id", "path", "captions", ...extra}
    manifest.json   :class:`Manifest`: schema version, encoder identity + label, dim, metric "ip", index key,
                    count, build parameters, created_at (ISO 8601 UTC)
    vectors.npy     only for indexes that cannot give their vectors back (IVF-PQ): the original vectors as
                    float16, ``(count, dim)``. Costs ``2 * dim`` bytes per vector (1 KiB at d=512, i.e. ~10x the
                    PQ codes); it is what lets :func:`add_to_index` / :func:`remove_from_index` / ``vector(id)`` /
                    :func:`read_vectors` work for every index type. Flat and HNSW indexes keep the exact float32
                    vectors themselves, so they have no ``vectors.npy``.

Every write builds the complete new folder in a hidden temp folder beside the target (``.NAME.tmp-XXXX``), fsyncs
it, then swaps it in (an atomic ``renameat2(RENAME_EXCHANGE)`` where the OS offers it, else "rename the old
aside, rename the new in, delete the old" with a rollback on error). Readers therefore see the old index or the
new one, never a mix. Concurrent *writers* to the same folder are not coordinated: run one writer at a time.

Row ``i`` == FAISS id ``i`` keeps search results trivially mapped to ``ids[i]`` / ``metadata[i]``. Removal keeps
the relative order of the remaining rows and rebuilds the index from the kept vectors (trained IVF/PQ indexes
are reused, not retrained); additions are appended with ``index.add``.

Vectors are inner-product (``metric "ip"``) over L2-normalised float32 embeddings, so scores are cosines.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ValidationError

from indexer.core.errors import BadInput, IndexCorrupt, IndexEncoderMismatch, IndexNotFound, UnknownId

SCHEMA_VERSION = 1

INDEX_FILE = "index.faiss"
META_FILE = "meta.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"

#: Below this many vectors an exact ``Flat`` index is chosen when it fits the memory budget.
FLAT_MAX_VECTORS = 1_000_000
#: Links per node of the HNSW graph (``HNSW32``).
HNSW_M = 32
#: From this many IVF lists on, the coarse quantizer is an HNSW graph and OPQ rotates the vectors first.
IVF_HNSW_QUANTIZER_MIN_NLIST = 8192
#: FAISS wants at least this many training points per centroid (k-means warns below it).
MIN_POINTS_PER_CENTROID = 39
#: Largest number of PQ sub-quantizers the chooser considers (64 bytes per vector with 8-bit codes).
MAX_PQ_M = 64
#: Tolerance on ``| ||v|| - 1 |`` for vectors said to be L2-normalised.
NORM_TOLERANCE = 1e-3
#: faiss switches from its own distance loops to BLAS above this many queries. faiss-cpu 1.15.1's default (128000
#: here) makes batched search ~11x slower (docs in STACK.md) and PQ/k-means training up to ~50x slower; 20 fixes both.
BLAS_THRESHOLD = 20
#: Default search effort when the caller gives none.
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE_MIN = 16


# ----------------------------------------------------------------------------------------------------------------
# Choosing the index type
# ----------------------------------------------------------------------------------------------------------------


def flat_bytes(n: int, dim: int) -> int:
    """Memory of ``Flat``: the float32 vectors."""
    return n * dim * 4


def hnsw_bytes(n: int, dim: int, m: int = HNSW_M) -> int:
    """Memory of ``HNSW{m}``: float32 vectors + level-0 links (2m int32) + upper levels (~4 B) + level/offset (12 B)."""
    return n * (4 * dim + 8 * m + 16)


def ivfpq_bytes(n: int, dim: int, nlist: int, m: int, nbits: int = 8, *, opq_hnsw: bool = False) -> int:
    """Memory of ``IVF{nlist},PQ{m}x{nbits}``: per vector the PQ code + an int64 id in its inverted list;
    fixed: the coarse centroids (nlist x dim float32) and the PQ codebooks (2^nbits x dim float32). The
    ``OPQ{m}_{dim},IVF{nlist}_HNSW32,PQ{m}`` variant adds the dim x dim OPQ matrix and the HNSW graph over the
    centroids."""
    code = math.ceil(m * nbits / 8)
    total = n * (code + 8) + nlist * dim * 4 + (2**nbits) * dim * 4
    if opq_hnsw:
        total += dim * dim * 4 + nlist * (8 * HNSW_M + 16)
    return total


def _pow2_round(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: int) -> int:
    return 2 ** max(0, math.floor(math.log2(max(x, 1))))


def choose_nlist(n: int) -> int:
    """``4 * sqrt(n)`` rounded to a power of 2, clamped so k-means has ``>= 39 * nlist`` training points."""
    nlist = _pow2_round(4 * math.sqrt(max(n, 1)))
    cap = _pow2_floor(max(1, n // MIN_POINTS_PER_CENTROID))
    return max(1, min(nlist, cap))


def pq_nbits(n: int) -> int:
    """8-bit PQ codes need ``39 * 256`` training points; below that use 4-bit codes (16 centroids)."""
    return 8 if n >= MIN_POINTS_PER_CENTROID * 256 else 4


def choose_index_key(n_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """Pick a FAISS index factory key from the vector count, the dimension and a memory budget (None: unlimited).

    Rules (after criteo/autofaiss ``get_optimal_index_keys_v2``), with the memory model of :func:`flat_bytes`,
    :func:`hnsw_bytes` and :func:`ivfpq_bytes`:

    1. ``Flat`` (exact ``IndexFlatIP``) when ``n < FLAT_MAX_VECTORS`` and ``4 * n * dim`` fits the budget;
    2. else ``HNSW32`` when the vectors plus the graph fit;
    3. else ``IVF{nlist},PQ{m}`` (``OPQ{m}_{dim},IVF{nlist}_HNSW32,PQ{m}`` from ``nlist >= 8192``) with
       ``nlist`` from :func:`choose_nlist` and ``m`` the largest divisor of ``dim`` (``<= min(64, dim / 2)``)
       whose index fits; PQ codes are 4-bit (``PQ{m}x4``) below ``39 * 256`` vectors.

    Raises :class:`BadInput` for a negative count, a non-positive dim, or a budget nothing fits.
    """
    if n_vectors < 0 or dim <= 0:
        raise BadInput(f"need n_vectors >= 0 and dim > 0, got n_vectors={n_vectors} dim={dim}")
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    n = n_vectors
    if n < FLAT_MAX_VECTORS and flat_bytes(n, dim) <= budget:
        return "Flat"
    if hnsw_bytes(n, dim) <= budget:
        return f"HNSW{HNSW_M}"
    nlist = choose_nlist(n)
    nbits = pq_nbits(n)
    opq_hnsw = nlist >= IVF_HNSW_QUANTIZER_MIN_NLIST
    max_m = min(MAX_PQ_M, max(1, dim // 2))
    for m in range(max_m, 0, -1):
        if dim % m:
            continue
        if ivfpq_bytes(n, dim, nlist, m, nbits, opq_hnsw=opq_hnsw) <= budget:
            pq = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
            if opq_hnsw:
                return f"OPQ{m}_{dim},IVF{nlist}_HNSW{HNSW_M},{pq}"
            return f"IVF{nlist},{pq}"
    raise BadInput(
        f"no index type fits {n} vectors of dim {dim} in {memory_budget_bytes} bytes "
        f"(smallest IVF-PQ needs {ivfpq_bytes(n, dim, nlist, 1, nbits, opq_hnsw=opq_hnsw)} bytes)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Manifest and encoder check
# ----------------------------------------------------------------------------------------------------------------


class Manifest(BaseModel):
    """``manifest.json``: what the index holds and which encoder made it."""

    schema_version: int
    encoder: dict[str, Any]
    encoder_label: str
    dim: int
    metric: Literal["ip"] = "ip"
    index_key: str
    count: int
    build: dict[str, Any] = {}
    created_at: str


def _fmt(identity: dict[str, Any], keys: Iterable[str]) -> str:
    return " ".join(f"{k}={identity.get(k)}" for k in keys)


def check_encoder(manifest: Manifest, encoder_identity: dict[str, Any]) -> None:
    """Raise :class:`IndexEncoderMismatch` unless ``encoder_identity`` equals the identity the index was built with.

    Every key of both dicts is compared (a key missing on one side counts as None); a ``"dim"`` key is also
    compared with ``manifest.dim``. The message names the differing fields on both sides.
    """
    recorded = {**manifest.encoder, "dim": manifest.encoder.get("dim", manifest.dim)}
    keys = list(dict.fromkeys([*manifest.encoder, *encoder_identity]))
    differing = [
        k for k in keys
        if recorded.get(k) != encoder_identity.get(k) and not (k == "dim" and k not in encoder_identity)
    ]
    if differing:
        raise IndexEncoderMismatch(
            f"index built with {_fmt(recorded, differing)} ({manifest.encoder_label}), "
            f"this encoder is {_fmt(encoder_identity, differing)}: rebuild the index with this encoder "
            f"or search it with the encoder it was built with"
        )


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _validate_vectors(vectors: Any, dim: int | None = None) -> np.ndarray:
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


def _validate_metadata(metadata: Sequence[dict[str, Any]], n: int, existing: Iterable[str] = ()) -> list[str]:
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------------------------
# Building FAISS indexes
# ----------------------------------------------------------------------------------------------------------------


def faiss_gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _is_reconstructible(index_key: str) -> bool:
    """Flat and HNSW(Flat) indexes store the float32 vectors and reconstruct them exactly."""
    return "PQ" not in index_key and "SQ" not in index_key and "IVF" not in index_key


def _train_size(n: int, nlist: int) -> int:
    return min(n, max(MIN_POINTS_PER_CENTROID * nlist, min(64 * nlist, 1_000_000), MIN_POINTS_PER_CENTROID * 256))


def _nlist_of(index: Any) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except Exception:  # not an IVF index
        return None


def _tune_faiss() -> None:
    """Process-wide faiss setting (idempotent): see :data:`BLAS_THRESHOLD`."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def _build_faiss(vectors: np.ndarray, index_key: str, seed: int = 1234) -> tuple[Any, dict[str, Any]]:
    n, d = vectors.shape
    _tune_faiss()
    try:
        index = faiss.index_factory(d, index_key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise BadInput(f"invalid FAISS index key {index_key!r}: {exc}") from exc
    info: dict[str, Any] = {}
    if not index.is_trained:
        nlist = _nlist_of(index) or 1
        size = _train_size(n, nlist)
        if n < max(nlist, 1) or n == 0:
            raise BadInput(f"{index_key} needs at least {nlist} vectors to train, got {n}")
        rng = np.random.default_rng(seed)
        sample = vectors if size >= n else vectors[np.sort(rng.choice(n, size, replace=False))]
        index.train(sample)
        info["train_size"] = len(sample)
    if n:
        index.add(vectors)
    ivf_nlist = _nlist_of(index)
    if ivf_nlist is not None:
        info["nlist"] = ivf_nlist
        info["nprobe"] = min(ivf_nlist, max(DEFAULT_NPROBE_MIN, ivf_nlist // 16))
    if "HNSW" in index_key:
        info["efSearch"] = DEFAULT_EF_SEARCH
    return index, info


def _search_params(index: Any, k: int, nprobe: int | None, ef_search: int | None) -> Any:
    """Per-call SearchParameters (thread-safe: the index is not mutated)."""
    inner = index
    wrap = False
    if isinstance(index, faiss.IndexPreTransform):
        inner = faiss.downcast_index(index.index)
        wrap = True
    params: Any = None
    if isinstance(inner, faiss.IndexIVF):
        quantizer_params = None
        if isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexHNSW):
            quantizer_params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                efSearch=max(ef_search or DEFAULT_EF_SEARCH, nprobe or 1))
        kwargs: dict[str, Any] = {"nprobe": nprobe or 1}
        if quantizer_params is not None:
            kwargs["quantizer_params"] = quantizer_params
        params = faiss.SearchParametersIVF(**kwargs)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=max(ef_search or DEFAULT_EF_SEARCH, k)
        )
    if params is not None and wrap:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        # keep the inner object alive as long as the outer one
        outer._inner = params  # type: ignore[attr-defined]
        params = outer
    return params


# ----------------------------------------------------------------------------------------------------------------
# Atomic folder writes
# ----------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync directories
        _fsync_file(path)


def _write_faiss(index: Any, folder: Path) -> None:
    faiss.write_index(index, str(folder / INDEX_FILE))


def _write_meta(metadata: Sequence[dict[str, Any]], folder: Path) -> None:
    with open(folder / META_FILE, "w", encoding="utf-8") as fh:
        for row in metadata:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")


def _write_vectors(vectors: np.ndarray, folder: Path) -> None:
    np.save(folder / VECTORS_FILE, vectors.astype(np.float16))


def _write_manifest(manifest: Manifest, folder: Path) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n", encoding="utf-8")


_RENAME_EXCHANGE = 2
_libc: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def _swap_in(tmp: Path, out: Path) -> None:
    """Make ``tmp`` (a complete folder) become ``out``; the previous ``out``, if any, is deleted afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    if _exchange(tmp, out):  # tmp now holds the old folder
        _fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # roll back
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _commit_folder(
    out_dir: Path,
    index: Any,
    metadata: Sequence[dict[str, Any]],
    manifest: Manifest,
    vectors: np.ndarray | None,
) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_faiss(index, tmp)
        _write_meta(metadata, tmp)
        if vectors is not None:
            _write_vectors(vectors, tmp)
        _write_manifest(manifest, tmp)  # last: a folder with a manifest is complete
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Public write API
# ----------------------------------------------------------------------------------------------------------------


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
) -> Manifest:
    """Build an index from ``vectors`` ``(n, d)`` float32 (L2-normalised) and row-aligned ``metadata`` (each with a
    unique string ``"id"``) and write it atomically to ``out_dir``, replacing any index there.

    ``index_key`` None: :func:`choose_index_key` (n, d, ``memory_budget_bytes``). ``build`` is recorded in the
    manifest, together with training/search defaults (``nlist``, ``nprobe``, ``efSearch``, ``train_size``).
    Raises :class:`BadInput` for bad vectors/metadata/key.
    """
    vectors = _validate_vectors(vectors)
    n, d = vectors.shape
    _validate_metadata(metadata, n)
    if "dim" in encoder_identity and encoder_identity["dim"] != d:
        raise BadInput(f"encoder identity says dim={encoder_identity['dim']}, vectors have dim {d}")
    key = index_key or choose_index_key(n, d, memory_budget_bytes)
    index, info = _build_faiss(vectors, key)
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
        created_at=_now(),
    )
    _commit_folder(Path(out_dir), index, [dict(m) for m in metadata], manifest,
                   None if _is_reconstructible(key) else vectors)
    return manifest


def _load_for_update(path: Path) -> tuple[IndexStore, Any, np.ndarray | None]:
    store = IndexStore.open(path, mmap=False)
    stored = None
    if not _is_reconstructible(store.manifest.index_key):
        stored = read_vectors(path)
    return store, store.index, stored


def add_to_index(
    path: str | Path,
    vectors: np.ndarray,
    metadata: Sequence[dict[str, Any]],
    *,
    encoder_identity: dict[str, Any],
    on_existing: Literal["error", "skip", "replace"] = "error",
) -> Manifest:
    """Append rows to the index at ``path`` and rewrite it atomically.

    ``encoder_identity`` must match the manifest (:class:`IndexEncoderMismatch`). Ids already in the index:
    ``on_existing="error"`` (default) raises :class:`BadInput` and changes nothing; ``"skip"`` ignores those
    rows; ``"replace"`` removes the old rows and appends the new ones. New rows get the next row numbers; the
    index is not retrained (IVF/PQ keep their trained centroids). ``created_at`` becomes the time of this write.
    """
    path = Path(path)
    store, index, stored = _load_for_update(path)
    check_encoder(store.manifest, encoder_identity)
    vectors = _validate_vectors(vectors, store.dim)
    new_ids = _validate_metadata(metadata, len(vectors))
    present = [i for i, rid in enumerate(new_ids) if rid in store._row]
    meta = [dict(m) for m in metadata]
    if present and on_existing == "error":
        raise BadInput(f"ids already in the index: {[new_ids[i] for i in present][:10]} "
                       f"(use on_existing='skip' or 'replace')")
    if present and on_existing == "skip":
        keep = np.setdiff1d(np.arange(len(vectors)), present)
        vectors = vectors[keep]
        meta = [meta[i] for i in keep]
    old_meta = list(store.metadata)
    if present and on_existing == "replace":
        drop = {store._row[new_ids[i]] for i in present}
        kept_rows = np.array([r for r in range(store.count) if r not in drop], dtype=np.int64)
        index, stored = _rebuild_without(store, index, stored, kept_rows)
        old_meta = [old_meta[r] for r in kept_rows]
    if len(vectors):
        index.add(vectors)
        if stored is not None:
            stored = np.concatenate([stored, vectors])
    all_meta = old_meta + meta
    manifest = store.manifest.model_copy(update={"count": len(all_meta), "created_at": _now()})
    _commit_folder(path, index, all_meta, manifest, stored)
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
    if index.is_trained and not _is_reconstructible(store.manifest.index_key):
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
    store, index, stored = _load_for_update(path)
    wanted = list(dict.fromkeys(ids))
    missing = [i for i in wanted if i not in store._row]
    if missing:
        raise UnknownId(f"ids not in the index at {path}: {missing[:10]}")
    drop = {store._row[i] for i in wanted}
    kept_rows = np.array([r for r in range(store.count) if r not in drop], dtype=np.int64)
    index, stored = _rebuild_without(store, index, stored, kept_rows)
    meta = [store.metadata[r] for r in kept_rows]
    manifest = store.manifest.model_copy(update={"count": len(meta), "created_at": _now()})
    _commit_folder(path, index, meta, manifest, stored)
    return manifest


def read_vectors(path: str | Path) -> np.ndarray:
    """All vectors of the index at ``path``, ``(count, dim)`` float32, in row order (from ``vectors.npy`` where
    present, float16-rounded; else reconstructed exactly from the index)."""
    path = Path(path)
    manifest = _read_manifest(path)
    vec_file = path / VECTORS_FILE
    if vec_file.exists():
        arr = np.load(vec_file, mmap_mode="r")
        if arr.shape != (manifest.count, manifest.dim):
            raise IndexCorrupt(f"{vec_file} has shape {arr.shape}, manifest says ({manifest.count}, {manifest.dim})")
        return np.asarray(arr, dtype=np.float32)
    if not _is_reconstructible(manifest.index_key):
        raise IndexCorrupt(f"{vec_file} is missing (needed for index type {manifest.index_key})")
    index = _read_faiss(path, mmap=True)
    if index.ntotal == 0:
        return np.zeros((0, manifest.dim), np.float32)
    return index.reconstruct_n(0, index.ntotal)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> Manifest:
    if not path.is_dir():
        raise IndexNotFound(f"no index folder at {path}")
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise IndexNotFound(f"no {MANIFEST_FILE} in {path}")
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorrupt(f"{mf} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise IndexCorrupt(f"{mf} is not a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise IndexCorrupt(f"{mf} has schema_version {raw.get('schema_version')!r}; this code reads "
                           f"{SCHEMA_VERSION}: rebuild the index")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexCorrupt(f"{mf} is invalid: {exc}") from exc


def _read_faiss(path: Path, *, mmap: bool) -> Any:
    f = path / INDEX_FILE
    if not f.is_file():
        raise IndexNotFound(f"no {INDEX_FILE} in {path}")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(f), flags)
    except RuntimeError as exc:
        raise IndexCorrupt(f"cannot read {f}: {exc}") from exc


def _read_meta(path: Path) -> list[dict[str, Any]]:
    f = path / META_FILE
    if not f.is_file():
        raise IndexNotFound(f"no {META_FILE} in {path}")
    rows: list[dict[str, Any]] = []
    with open(f, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IndexCorrupt(f"{f} line {lineno} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise IndexCorrupt(f"{f} line {lineno} is not an object with a string 'id'")
            rows.append(row)
    return rows


class IndexStore:
    """An opened index folder. Searching is thread-safe (no shared mutable state; per-call search parameters)."""

    def __init__(self, path: Path, manifest: Manifest, index: Any, metadata: list[dict[str, Any]]):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.metadata = metadata
        self.ids: list[str] = [m["id"] for m in metadata]
        self._row: dict[str, int] = {rid: i for i, rid in enumerate(self.ids)}
        self._vectors: np.ndarray | None = None
        self._search_index: Any = index  # a GPU copy for Flat indexes when asked for (see open)

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
        manifest = _read_manifest(path)
        if expected_encoder is not None:
            check_encoder(manifest, expected_encoder)
        index = _read_faiss(path, mmap=mmap)
        metadata = _read_meta(path)
        if index.d != manifest.dim:
            raise IndexCorrupt(f"{path}: index dim {index.d} != manifest dim {manifest.dim}")
        if not (index.ntotal == len(metadata) == manifest.count):
            raise IndexCorrupt(f"{path}: row counts disagree: faiss {index.ntotal}, {META_FILE} {len(metadata)}, "
                               f"manifest {manifest.count}")
        if not _is_reconstructible(manifest.index_key) and not (path / VECTORS_FILE).is_file():
            raise IndexCorrupt(f"{path}: {VECTORS_FILE} is missing (needed for {manifest.index_key})")
        store = cls(path, manifest, index, metadata)
        if len(store._row) != len(metadata):
            raise IndexCorrupt(f"{path}: {META_FILE} has duplicate ids")
        _tune_faiss()  # batched search ~11x faster
        n_gpus = faiss_gpu_count()
        if gpu and n_gpus == 0:
            raise BadInput("gpu=True but faiss sees no GPU (install the gpu extra, faiss-gpu, on a CUDA machine)")
        if (gpu or gpu is None) and n_gpus > 0 and manifest.index_key == "Flat":
            store._search_index = faiss.index_cpu_to_all_gpus(index)
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
        params = _search_params(
            self.index, kk,
            nprobe if nprobe is not None else build.get("nprobe"),
            ef_search if ef_search is not None else build.get("efSearch"),
        )
        if params is not None:
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
        row = self.row_of(id)
        vec_file = self.path / VECTORS_FILE
        if vec_file.exists():
            if self._vectors is None:
                self._vectors = np.load(vec_file, mmap_mode="r")
            return np.asarray(self._vectors[row], dtype=np.float32)
        return np.asarray(self.index.reconstruct(row), dtype=np.float32)

    def get(self, row: int) -> dict[str, Any]:
        """Metadata of ``row``; :class:`UnknownId` when out of range."""
        if not isinstance(row, int | np.integer) or not 0 <= row < self.count:
            raise UnknownId(f"no row {row!r} in the index ({self.count} rows)")
        return self.metadata[int(row)]

    def stats(self) -> dict[str, Any]:
        """count, dim, index_key, encoder_label, created_at, size_bytes (all files of the folder)."""
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return {
            "count": self.count,
            "dim": self.dim,
            "index_key": self.manifest.index_key,
            "encoder_label": self.manifest.encoder_label,
            "created_at": self.manifest.created_at,
            "size_bytes": size,
        }
