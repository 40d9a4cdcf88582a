"""Choosing the FAISS index type: a pure function of the vector count, the dimension and a memory budget.

After criteo/autofaiss ``get_optimal_index_keys_v2``: exact ``Flat`` while it is small enough, then ``HNSW32``, then
``IVF-PQ``; tested with a table (tests/test_index_store.py). The callers' default budget is the memory this machine
has (:func:`default_memory_budget`), so 50M x 384 does not pick a 90 GB HNSW graph on a 24 GB machine;
``make bench-scale`` measures where the switch points sit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from retrieval.errors import BadInput

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


def machine_memory_bytes(meminfo: str | Path = "/proc/meminfo",
                         cgroup_limit: str | Path = "/sys/fs/cgroup/memory.max") -> int | None:
    """The memory this process can have: the machine's ``MemTotal``, lowered to the cgroup (container) limit where
    one is set. None where neither can be read (then nothing limits the choice)."""
    total: int | None = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        total = None
    if total is None and hasattr(os, "sysconf"):
        try:
            total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            total = None
    try:
        limit_text = Path(cgroup_limit).read_text().strip()
        if limit_text.isdigit():
            limit = int(limit_text)
            total = limit if total is None else min(total, limit)
    except OSError:
        pass
    return total


def default_memory_budget() -> int | None:
    """The budget when the caller gives none: the machine's memory (:func:`machine_memory_bytes`)."""
    return machine_memory_bytes()


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
