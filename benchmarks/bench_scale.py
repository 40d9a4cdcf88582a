"""Cost as the collection grows: what the index chooser picks at 100k, 1M and 10M vectors, against exact Flat.

    python benchmarks/bench_scale.py --data ../shared/data/flickr8k                  # make bench-scale
    python benchmarks/bench_scale.py --data ../shared/data/flickr8k --sizes 100000   # one size

Vectors are drawn to look like real embeddings, not uniform noise (on which recall means nothing): each is a random
blend (Dirichlet weights) of three real Flickr8k image embeddings of the default encoder (train + dev photos), moved
by Gaussian noise shaped like the real embeddings' covariance, then normalised. Queries are real Flickr8k *test*
captions (never a source of the database), encoded by the same encoder. Searches use one OpenMP thread
(``--omp-threads``), as the service does. For each size: the chooser's pick under this machine's memory (the default
budget), and exact Flat; for each index: build time, bytes per vector (the written file), resident memory added by
the built index, recall@10 against exact search, latency at batch 1 (p50) and batch 64 (ms per batch). Vectors are
generated and added in chunks, so the peak is the index itself; an index that would not fit in the memory available
now is skipped with the reason (the machine is shared).

Embeddings come from ``--index`` (default ``out/bench-flickr8k-index``, the one ``make bench-service`` builds; built
here once when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np

from retrieval.encoders import build_encoder, parse_spec
from retrieval.encoders.cpu import cpu_info
from retrieval.index import (
    IndexStore,
    choose_index_key,
    configure_faiss,
    machine_memory_bytes,
    set_thread_omp_threads,
)
from retrieval.index.choose import FLAT_MAX_VECTORS, HNSW_M, flat_bytes, hnsw_bytes, ivfpq_bytes
from retrieval.index.faiss_ops import (
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE_MIN,
    flat_scan,
    nlist_of,
    search_params,
    train_size,
)

REPO = Path(__file__).resolve().parents[1]
CHUNK = 100_000
#: Real photo embeddings blended into each generated vector.
MIX = 3
GiB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def load_embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(database sources: train+dev image vectors, queries: test caption vectors) of the default encoder."""
    from indexer.pipeline import plan_records

    if not (args.index / "manifest.json").is_file():
        print(f"building {args.index} once ...", flush=True)
        subprocess.run([sys.executable, "-m", "indexer", "build", str(args.data), "--out", str(args.index),
                        "--encoder", args.encoder, "--no-progress"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    store = IndexStore.open(args.index)
    test = plan_records(args.data, split="test")
    test_ids = {r.id for r in test}
    sources = np.stack([store.vector(i) for i in store.ids if i not in test_ids]).astype(np.float32)
    enc = build_encoder(parse_spec(args.encoder, device="cpu"))
    caps = [c for r in test for c in r.captions][: args.queries]
    queries = np.concatenate([enc.encode_text(caps[i:i + 256]) for i in range(0, len(caps), 256)])
    return sources, queries.astype(np.float32)


class Generator:
    """Chunk ``i`` of the synthetic database, the same on every call (seeded per chunk)."""

    def __init__(self, sources: np.ndarray, noise: float, seed: int = 0):
        self.sources = sources
        centred = sources - sources.mean(0)
        # noise shaped like the real embeddings: N(0, cov) through the data's own principal axes
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        self.basis = (vt.T * (s / np.sqrt(len(sources)))).astype(np.float32)  # (d, d): z @ basis.T ~ N(0, cov)
        self.noise = noise
        self.seed = seed

    def chunk(self, i: int, size: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        # a random blend of MIX real photos (Dirichlet weights): a continuum between real embeddings rather than
        # tight clusters of copies of 7,000 photos (which made exact top-10 a coin toss among near-duplicates)
        weights = rng.dirichlet(np.ones(MIX), size).astype(np.float32)
        picks = rng.integers(0, len(self.sources), (size, MIX))
        base = np.einsum("nm,nmd->nd", weights, self.sources[picks])
        z = rng.standard_normal((size, self.basis.shape[0]), dtype=np.float32)
        x = base + self.noise * (z @ self.basis.T)  # noise 1: as far as the real photos spread
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def chunks(self, n: int) -> Any:
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self.chunk(i, min(CHUNK, n - start))


def exact_top10(gen: Generator, n: int, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k rows per query over the generated database (chunked matmul)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    offset = 0
    for x in gen.chunks(n):
        s = queries @ x.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + offset], 1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        offset += x.shape[0]
    return best_i


def estimate_bytes(key: str, n: int, dim: int) -> int:
    if key == "Flat":
        return flat_bytes(n, dim)
    if key.startswith("HNSW"):
        return hnsw_bytes(n, dim)
    return ivfpq_bytes(n, dim, 1, 1) + n * 64  # generous upper bound for the PQ codes


def build(key: str, gen: Generator, n: int, dim: int) -> tuple[Any, dict[str, Any]]:
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    info: dict[str, Any] = {}
    if not index.is_trained:
        size = train_size(n, nlist_of(index) or 1)
        sample = np.concatenate([gen.chunk(10_000 + i, min(CHUNK, size - i * CHUNK))
                                 for i in range(-(-size // CHUNK))])
        index.train(sample)
    for x in gen.chunks(n):
        index.add(x)
    nl = nlist_of(index)
    if nl is not None:
        info["nprobe"] = min(nl, max(DEFAULT_NPROBE_MIN, nl // 16))
    if "HNSW" in key:
        info["efSearch"] = DEFAULT_EF_SEARCH
    return index, info


#: OpenMP threads for searches (set from --omp-threads); builds use every core, like the indexer.
SEARCH_OMP = {"threads": 1}


def measure(key: str, gen: Generator, n: int, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    dim = queries.shape[1]
    rss0 = rss_bytes()
    set_thread_omp_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    index, info = build(key, gen, n, dim)
    build_s = time.perf_counter() - t0
    set_thread_omp_threads(SEARCH_OMP["threads"])
    resident = rss_bytes() - rss0
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/i.faiss")
        file_bytes = os.path.getsize(f"{tmp}/i.faiss")
    row = {"key": key, "n": n, "build_s": build_s, "bytes_per_vector": file_bytes / n, "resident_mb": resident / 2**20,
           **info, **search_costs(index, queries, truth, info.get("nprobe"), info.get("efSearch"))}
    # the search effort's trade-off: recall and latency around the default (IVF: nprobe, with the HNSW quantizer's
    # efSearch raised to it by search_params; HNSW: efSearch)
    row["sweep"] = [{**effort, **search_costs(index, queries, truth, effort.get("nprobe"), effort.get("efSearch"))}
                    for effort in sweep_efforts(info, nlist_of(index))]
    del index
    return row


def sweep_efforts(info: dict[str, Any], nlist: int | None) -> list[dict[str, int]]:
    """Search efforts to measure beside the default ``info``: an IVF index varies ``nprobe`` (1/4, 1/2 and 2x the
    default, within 1..nlist), keeping its quantizer's efSearch; an HNSW index varies ``efSearch`` (1/2, 2x, 4x)."""
    if "nprobe" in info and nlist:
        default = int(info["nprobe"])
        probes = sorted({min(nlist, max(1, int(default * f))) for f in (0.25, 0.5, 2)} - {default})
        return [{"nprobe": p, **({"efSearch": info["efSearch"]} if "efSearch" in info else {})} for p in probes]
    if "efSearch" in info:
        return [{"efSearch": int(int(info["efSearch"]) * f)} for f in (0.5, 2, 4)]
    return []


def search_costs(index: Any, queries: np.ndarray, truth: np.ndarray, nprobe: int | None,
                 ef_search: int | None) -> dict[str, float]:
    """recall@10 against exact search, batch-1 p50 latency and batch-64 time, with the retrieval code's search
    parameters."""
    params = search_params(index, 10, nprobe, ef_search)
    _, found = index.search(queries, 10, params=params)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    lat1 = []
    for q in queries[:200]:  # one query the way IndexStore.search answers it (a Flat index: faiss's SIMD scan)
        t = time.perf_counter()
        if flat_scan(index, q[None, :], 10) is None:
            index.search(q[None, :], 10, params=params)
        lat1.append(time.perf_counter() - t)
    batches = [queries[i:i + 64] for i in range(0, min(len(queries), 640), 64)]
    t = time.perf_counter()
    for b in batches:
        index.search(b, 10, params=params)
    per_batch = (time.perf_counter() - t) / len(batches)
    return {"recall@10": recall, "p50_ms_batch1": 1000 * float(np.median(lat1)), "ms_batch64": 1000 * per_batch,
            "qps_batch64": 64 / per_batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--index", type=Path, default=REPO / "out" / "bench-flickr8k-index")
    p.add_argument("--encoder", default="default")
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--queries", type=int, default=1000, help="test captions used as queries")
    p.add_argument("--noise", type=float, default=0.3, help="perturbation scale (1: the real photos' own spread)")
    p.add_argument("--budget-gb", type=float, default=None, help="chooser budget (default: this machine's memory)")
    p.add_argument("--omp-threads", type=int, default=1,
                   help="faiss OpenMP threads for searching (the service's default is 1 per search thread)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_scale.json")
    args = p.parse_args()
    configure_faiss()
    SEARCH_OMP["threads"] = args.omp_threads
    cpu = cpu_info()
    budget = int(args.budget_gb * GiB) if args.budget_gb else machine_memory_bytes()
    sources, queries = load_embeddings(args)
    dim = queries.shape[1]
    gen = Generator(sources, args.noise)
    sample = gen.chunk(0, 2000)
    nearest = (sample @ sources.T).max(1)
    budget_gib = budget / GiB if budget else float("inf")
    print(f"{cpu.describe()}; budget {budget_gib:.1f} GiB; dim {dim}; {len(sources)} source photos; "
          f"{len(queries)} caption queries; generated vectors' cosine to their nearest source: median "
          f"{np.median(nearest):.3f}", flush=True)
    switch_hnsw_ivf = budget // (4 * dim + 8 * HNSW_M + 16) if budget else None
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"\n{n:,} vectors: exact ground truth ...", flush=True)
        truth = exact_top10(gen, n, queries)
        chosen = choose_index_key(n, dim, budget)
        for key, why in ((chosen, "chosen"), ("Flat", "exact")):
            if key == "Flat" and chosen == "Flat" and why == "exact":
                continue
            need = estimate_bytes(key, n, dim)
            if need > 0.7 * available_bytes():
                row = {"key": key, "n": n, "role": why,
                       "skipped": f"needs ~{need / GiB:.1f} GiB, {available_bytes() / GiB:.1f} GiB available now"}
                print(f"  {key}: skipped ({row['skipped']})", flush=True)
            else:
                row = {**measure(key, gen, n, queries, truth), "role": why}
                print(f"  {key} ({why}): build {row['build_s']:.1f} s, {row['bytes_per_vector']:.0f} B/vector, "
                      f"resident {row['resident_mb']:.0f} MB, recall@10 {row['recall@10']:.3f}, "
                      f"batch 1 p50 {row['p50_ms_batch1']:.2f} ms, batch 64 {row['ms_batch64']:.1f} ms", flush=True)
            rows.append(row)
            write_results(args.out, cpu.describe(), budget, rows, table(rows, cpu.describe(), dim, budget_gib,
                                                                         switch_hnsw_ivf))  # partial runs keep rows

    md = table(rows, cpu.describe(), dim, budget_gib, switch_hnsw_ivf)
    print("\n" + md)
    write_results(args.out, cpu.describe(), budget, rows, md)
    print(f"\nresults: {args.out}")
    return 0


def write_results(out: Path, cpu: str, budget: int | None, rows: list[dict[str, Any]], md: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "budget_bytes": budget, "rows": rows, "markdown": md}, indent=2))


def table(rows: list[dict[str, Any]], cpu: str, dim: int, budget_gib: float, switch_hnsw_ivf: int | None) -> str:
    """The markdown table of the measured rows."""
    lines = [f"### Index cost as the collection grows — {cpu}",
             "",
             f"dim {dim} (default encoder), chooser budget {budget_gib:.1f} GiB (this machine's memory); "
             f"switch points at this budget: Flat -> HNSW{HNSW_M} at {FLAT_MAX_VECTORS:,} vectors, HNSW -> IVF-PQ "
             f"above {switch_hnsw_ivf:,} vectors" if switch_hnsw_ivf else "",
             "",
             "| vectors | index | role | build s | bytes/vector | resident MB | recall@10 | batch 1 p50 ms "
             "| batch 64 ms (q/s) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | {r['key']} | {r['role']} | skipped: {r['skipped']} | | | | | |")
        else:
            effort = "".join(f", {k} {r[k]}" for k in ("efSearch", "nprobe") if k in r)
            lines.append(f"| {r['n']:,} | {r['key']} | {r['role']}{effort} | {r['build_s']:.1f} "
                         f"| {r['bytes_per_vector']:.0f} | {r['resident_mb']:.0f} | {r['recall@10']:.3f} "
                         f"| {r['p50_ms_batch1']:.2f} | {r['ms_batch64']:.1f} ({r['qps_batch64']:.0f}) |")
            for sw in r.get("sweep", []):
                effort = ", ".join(f"{k} {sw[k]}" for k in ("efSearch", "nprobe") if k in sw)
                lines.append(f"| | | same index, {effort} | | | | {sw['recall@10']:.3f} | {sw['p50_ms_batch1']:.2f} "
                             f"| {sw['ms_batch64']:.1f} ({sw['qps_batch64']:.0f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
