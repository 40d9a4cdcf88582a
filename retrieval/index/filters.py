"""Filtered vector search: the rows a metadata filter lets through reach FAISS as an id selector, so the top-k is
taken *within* the subset (never a post-filter of an unfiltered top-k, which returns too few).

How each index type is searched for a subset of ``m`` of ``n`` rows (selectivity ``s = m / n``):

- any type, ``m <= BRUTE_FORCE_MAX_ROWS``: exact inner products of the subset's stored vectors (one matmul);
- ``Flat``: ``SearchParameters(sel=IDSelectorBitmap)``: exact;
- ``IVF*``: brute force up to ``IVF_BRUTE_FORCE_MAX_ROWS``; above, ``SearchParametersIVF(sel=..., nprobe)``, and a
  query that comes back with fewer than ``min(k, m)`` hits (the probed lists held too few subset members) is
  answered by brute force over the subset instead;
- ``HNSW``: below ``HNSW_MIN_SELECTIVITY`` brute force over the subset (the graph walk would visit mostly rejected
  nodes); above it the selector with ``efSearch`` raised to ``k / s``, and the same fallback when short.

Scores are inner products (cosines for unit vectors), float32, descending; rows int64, ``-1`` / ``-inf`` padding
as in :meth:`retrieval.index.IndexStore.search`.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from retrieval.errors import BadInput
from retrieval.index.faiss_ops import search_params
from retrieval.index.store import IndexStore

#: Subsets up to this many rows are scored by one matmul over their vectors (exact, and faster than a selector).
BRUTE_FORCE_MAX_ROWS = 4096
#: IVF indexes: up to this many rows, brute force too. A small subset's nearest rows tend to lie in lists the
#: query's ``nprobe`` does not reach (1% of 1M rows: recall@10 0.89 with the selector), and 32k rows are scored
#: exactly in about the time the selector takes.
IVF_BRUTE_FORCE_MAX_ROWS = 32768
#: HNSW with a selector below this fraction of rows kept: brute force over the subset instead.
HNSW_MIN_SELECTIVITY = 0.05
#: Rows scored per matmul block in brute force (bounds the temporary ``(q, block)`` score matrix).
BRUTE_FORCE_BLOCK = 65536
#: Up to this many queries, subset scores come from ``np.einsum`` rather than BLAS (see :func:`score_rows`).
EINSUM_MAX_QUERIES = 4


def _queries(store: IndexStore, queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != store.dim or not np.issubdtype(q.dtype, np.floating):
        raise BadInput(f"queries must be floats of shape (q, {store.dim}), got {q.dtype} {np.shape(queries)}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise BadInput("queries contain NaN or infinite values")
    return q


def _check_rows(store: IndexStore, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= store.count)):
        raise BadInput(f"rows must be a 1-d array of row numbers in [0, {store.count})")
    return rows


def stored_matrix(index: Any) -> np.ndarray | None:
    """A zero-copy ``(ntotal, d)`` float32 view of the vectors a ``Flat`` (or HNSW-over-Flat) index holds, also when
    memory-mapped; None for other types. Valid while ``index`` lives. Gathering rows from it is plain numpy (faiss's
    ``reconstruct_batch`` runs an OpenMP loop, which costs ~10 ms per call on a busy 2-core machine)."""
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def score_rows(store: IndexStore, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Inner products of each query with the stored vectors of ``rows``: ``(q, len(rows))`` float32."""
    q = _queries(store, queries)
    rows = _check_rows(store, rows)
    out = np.empty((len(q), len(rows)), np.float32)
    matrix = stored_matrix(store.index)
    for start in range(0, len(rows), BRUTE_FORCE_BLOCK):
        block = rows[start:start + BRUTE_FORCE_BLOCK]
        vecs = matrix[block] if matrix is not None else store.vectors(block)
        # A few queries: numpy's own loop. BLAS would start its thread team for a matrix-vector product, which on a
        # busy 2-core machine costs 3-12 ms instead of 0.4 ms (4,000 x 256).
        scores = np.einsum("qd,md->qm", q, vecs) if len(q) <= EINSUM_MAX_QUERIES else q @ vecs.T
        out[:, start:start + len(block)] = scores
    return out


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query the ``k`` best of ``scores`` ``(q, m)`` (ties: lower row first), padded with -inf / -1."""
    q, m = scores.shape
    kk = min(k, m)
    out_s = np.full((q, k), -np.inf, np.float32)
    out_r = np.full((q, k), -1, np.int64)
    if kk == 0:
        return out_s, out_r
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < m else np.tile(np.arange(m), (q, 1))
    for i in range(q):
        cand = part[i]
        order = np.lexsort((rows[cand], -scores[i, cand]))
        out_s[i, :kk] = scores[i, cand[order]]
        out_r[i, :kk] = rows[cand[order]]
    return out_s, out_r


def brute_force(store: IndexStore, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over the stored vectors of ``rows``: ``(q, k)`` scores and rows (padded)."""
    rows = _check_rows(store, rows)
    return _top_k(score_rows(store, queries, rows), rows, k)


def id_selector(rows: np.ndarray, n: int) -> tuple[Any, np.ndarray]:
    """A FAISS ``IDSelectorBitmap`` over ``n`` ids with ``rows`` set, and the bitmap it reads (keep it alive as
    long as the selector)."""
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    bits = np.packbits(mask, bitorder="little")  # faiss: bit (i & 7) of byte (i >> 3)
    return faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)), bits


def _innermost(params: Any) -> Any:
    """The parameters the index that scans the vectors reads (inside an ``IndexPreTransform``: its inner ones)."""
    return getattr(params, "_inner", params)


def _selector_search(store: IndexStore, q: np.ndarray, k: int, rows: np.ndarray, nprobe: int | None,
                     ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
    sel, bits = id_selector(rows, store.count)
    build = store.manifest.build
    params = search_params(store.index, k, nprobe if nprobe is not None else build.get("nprobe"),
                           ef_search if ef_search is not None else build.get("efSearch"))
    if params is None:
        params = faiss.SearchParameters()
    _innermost(params).sel = sel
    scores, found = store.index.search(q, k, params=params)
    del bits  # the search is done; the bitmap may go
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    found = np.ascontiguousarray(found, dtype=np.int64)
    scores[found < 0] = -np.inf
    return scores, found


def filtered_search(
    store: IndexStore,
    queries: np.ndarray,
    k: int,
    rows: np.ndarray | None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each query among ``rows`` (ascending unique int64 row numbers; None = every row).

    Returns ``(scores, rows)``, each ``(q, min(k, m))`` (see the module docstring for the method per index type).
    Exact for Flat and for subsets scored by brute force; for IVF and HNSW as exact as the index's own search,
    never returning fewer than ``min(k, m)`` hits.
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise BadInput(f"k must be a positive integer, got {k!r}")
    if rows is None:
        return store.search(queries, int(k), nprobe=nprobe, ef_search=ef_search)
    q = _queries(store, queries)
    rows = _check_rows(store, rows)
    m = len(rows)
    kk = min(int(k), m)
    if kk == 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if m == store.count:
        return store.search(q, kk, nprobe=nprobe, ef_search=ef_search)
    key = store.manifest.index_key
    selectivity = m / store.count
    ivf = "IVF" in key
    if (m <= BRUTE_FORCE_MAX_ROWS or (ivf and m <= IVF_BRUTE_FORCE_MAX_ROWS)
            or ("HNSW" in key and not ivf and selectivity < HNSW_MIN_SELECTIVITY)):
        return brute_force(store, q, kk, rows)
    if "HNSW" in key and not ivf:
        ef = max(ef_search or store.manifest.build.get("efSearch") or 64, math.ceil(kk / selectivity))
        ef_search = min(ef, store.count)
    scores, found = _selector_search(store, q, kk, rows, nprobe, ef_search)
    short = np.flatnonzero((found >= 0).sum(axis=1) < kk)
    if len(short):  # approximate index: the probed part held too few subset members
        s2, r2 = brute_force(store, q[short], kk, rows)
        scores[short], found[short] = s2, r2
    return scores, found
