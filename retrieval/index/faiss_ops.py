"""FAISS plumbing: the process-wide tuning, building and training an index, per-call search parameters, and
reading/writing ``index.faiss``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import BadInput, IndexCorrupt, IndexNotFound
from retrieval.index.choose import MIN_POINTS_PER_CENTROID
from retrieval.index.manifest import INDEX_FILE

#: faiss switches from its own distance loops to BLAS above this many queries. faiss-cpu 1.15.1's default (128000
#: here) makes batched search ~11x slower (docs in STACK.md) and PQ/k-means training up to ~50x slower; 20 fixes both.
BLAS_THRESHOLD = 20
#: Default search effort when the caller gives none (recorded in the manifest at build time). HNSW32 over 1M 640-d
#: embedding-like vectors (make bench-scale, AMD EPYC Zen 4, one thread): recall@10 0.83 / 0.92 / 0.97 at efSearch
#: 128 / 256 / 512 for a batch-1 p50 of 0.62 / 1.07 / 2.32 ms. 256: past 0.9 for well under the ~5 ms a query's
#: text encoding costs.
DEFAULT_EF_SEARCH = 256
DEFAULT_NPROBE_MIN = 16


#: Up to this many queries, a Flat inner-product index is scanned one query at a time with faiss's SIMD kernel
#: (:func:`flat_scan`) instead of ``index.search``: one 640-d query over 8,000 vectors took 2.1-2.6 ms in
#: ``index.search`` (faiss-cpu 1.15.1, BLAS_THRESHOLD 20) and 0.65 ms in the scan; from 4 queries on, the batched
#: search is cheaper per query (AMD EPYC Zen 4, one thread).
FLAT_SCAN_MAX_QUERIES = 2


def flat_scan(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact top-``k`` of ``queries`` ``(q, d)`` float32 (C-contiguous) over a CPU ``IndexFlat`` with the inner-product
    metric: ``(scores, rows)``, each ``(q, min(k, ntotal))``, best first, ties by lower row. None for any other
    index (the caller searches it normally)."""
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal == 0:
        return None
    n, d = int(index.ntotal), int(index.d)
    kk = min(int(k), n)
    xb = index.get_xb()
    dis = np.empty(n, np.float32)
    scores = np.empty((len(queries), kk), np.float32)
    rows = np.empty((len(queries), kk), np.int64)
    for i, q in enumerate(queries):
        faiss.fvec_inner_products_ny(faiss.swig_ptr(dis), faiss.swig_ptr(q), xb, d, n)  # type: ignore[attr-defined]
        part = np.argpartition(-dis, kk - 1)[:kk] if kk < n else np.arange(n)
        order = part[np.lexsort((part, -dis[part]))]
        scores[i], rows[i] = dis[order], order
    return scores, rows


def configure_faiss() -> None:
    """Set faiss's process-wide tuning (:data:`BLAS_THRESHOLD`). The library never calls this: each app calls it
    once at start (the indexer and trainer CLIs, the service lifespan, the benchmarks)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def set_thread_omp_threads(n: int) -> None:
    """OpenMP threads for faiss calls made *from the calling thread* (an OpenMP setting is per thread). Server
    threads that search one small batch at a time use 1: faiss's idle OpenMP workers otherwise spin-wait after every
    search (libgomp's default), which measured ~45 ms of CPU per request on 2 shared cores."""
    faiss.omp_set_num_threads(max(1, int(n)))


def faiss_gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def is_reconstructible(index_key: str) -> bool:
    """Flat and HNSW(Flat) indexes store the float32 vectors and reconstruct them exactly."""
    return "PQ" not in index_key and "SQ" not in index_key and "IVF" not in index_key


def train_size(n: int, nlist: int) -> int:
    """Training sample size for ``nlist`` centroids out of ``n`` vectors."""
    return min(n, max(MIN_POINTS_PER_CENTROID * nlist, min(64 * nlist, 1_000_000), MIN_POINTS_PER_CENTROID * 256))


def nlist_of(index: Any) -> int | None:
    """The number of inverted lists of an IVF index (also behind a pre-transform); None for other index types.
    Anything that is not a faiss index raises (TypeError), never passes for "not IVF"."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else int(ivf.nlist)


def build_faiss(vectors: np.ndarray, index_key: str, seed: int = 1234) -> tuple[Any, dict[str, Any]]:
    """A FAISS index of ``index_key`` (inner product) over ``vectors`` ``(n, d)`` float32, trained on a seeded
    sample where it needs training. Returns the index and what the manifest records (``train_size``, ``nlist``,
    ``nprobe``, ``efSearch``)."""
    n, d = vectors.shape
    try:
        index = faiss.index_factory(d, index_key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise BadInput(f"invalid FAISS index key {index_key!r}: {exc}") from exc
    info: dict[str, Any] = {}
    if not index.is_trained:
        nlist = nlist_of(index) or 1
        size = train_size(n, nlist)
        if n < max(nlist, 1) or n == 0:
            raise BadInput(f"{index_key} needs at least {nlist} vectors to train, got {n}")
        rng = np.random.default_rng(seed)
        sample = vectors if size >= n else vectors[np.sort(rng.choice(n, size, replace=False))]
        index.train(sample)
        info["train_size"] = len(sample)
    if n:
        index.add(vectors)
    ivf_nlist = nlist_of(index)
    if ivf_nlist is not None:
        info["nlist"] = ivf_nlist
        info["nprobe"] = min(ivf_nlist, max(DEFAULT_NPROBE_MIN, ivf_nlist // 16))
    if "HNSW" in index_key:
        info["efSearch"] = DEFAULT_EF_SEARCH
    return index, info


def search_params(index: Any, k: int, nprobe: int | None, ef_search: int | None) -> Any:
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



def read_faiss(path: Path, *, mmap: bool) -> Any:
    """``path/index.faiss``, memory-mapped read-only when ``mmap``."""
    f = path / INDEX_FILE
    if not f.is_file():
        raise IndexNotFound(f"no {INDEX_FILE} in {path}")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(f), flags)
    except RuntimeError as exc:
        raise IndexCorrupt(f"cannot read {f}: {exc}") from exc


def write_faiss(index: Any, folder: Path) -> None:
    """Write ``index`` as ``folder/index.faiss`` through a Python file object, so that a failed write (a full disk,
    a file-size limit) raises :class:`OSError`. faiss's own file writer only prints the error it finds when closing
    and leaves a truncated file behind as if all went well."""
    with open(folder / INDEX_FILE, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))  # type: ignore[attr-defined]
