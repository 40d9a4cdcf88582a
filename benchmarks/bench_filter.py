"""Filtered vector search: latency at selectivity 1% / 10% / 50% against unfiltered, Flat and IVF, on 8,000 real
vectors and on 1,000,000 synthetic ones; beside it what post-filtering an unfiltered top-10 would have kept.

    python benchmarks/bench_filter.py --data ../shared/data/flickr8k          # both sizes (first run builds, ~10 min)
    python benchmarks/bench_filter.py --data ../shared/data/flickr8k --sizes real

- real: the Flickr8k photos embedded by the default encoder (``out/flickr8k-all``, built once with
  ``python -m indexer build``), queries = Flickr8k test captions.
- synthetic: 1M unit vectors drawn around 4,096 random centres (closer to real embeddings than uniform noise),
  queries = perturbed copies of other draws.
- Metadata: every row gets a ``taken_at`` spread uniformly over 2010-2020 and a folder (one of 100), so the filter
  ``taken_before = the s-quantile`` keeps a fraction ``s`` of the rows (meta.sqlite's date index -> rows -> id
  selector; the "SQL ms" column is that step).

Per row: the SQL filter time (rows fetched), the fused search time (k=10, one query at a time), their total vs the
unfiltered search, recall@10 against exact search over the subset, and how many of an unfiltered top-10 a
post-filter would keep (what the fused search avoids). Prints a markdown table with the CPU; writes
``benchmarks/results/bench_filter.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from retrieval.index import IndexStore, MetaFilter, configure_faiss, filtered_search, read_vectors, write_index

REPO = Path(__file__).resolve().parents[1]
SELECTIVITIES = (1.0, 0.5, 0.1, 0.01)
K = 10
SECONDS_2010 = 1262304000  # 2010-01-01T00:00:00Z
SPAN_S = 10 * 365 * 86400


def cpu_line() -> str:
    """The processor, for the table header (the speed lane's retrieval.encoders.cpu where merged)."""
    try:
        from retrieval.encoders.cpu import cpu_info  # type: ignore[import-not-found]

        return str(cpu_info().describe())
    except ImportError:
        fields: dict[str, str] = {}
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        except OSError:
            pass
        flags = set(fields.get("flags", "").split())
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
        return (f"{fields.get('model name', platform.processor() or 'unknown CPU')} (family "
                f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}): "
                f"{', '.join(isa) or 'flags unknown'}; {os.cpu_count()} cores")


def synthetic_meta(n: int, seed: int = 0) -> list[dict]:
    """Rows with a uniform ``taken_at`` over 2010-2020 and one of 100 folders."""
    from datetime import UTC, datetime

    rng = np.random.default_rng(seed)
    secs = SECONDS_2010 + rng.integers(0, SPAN_S, n)
    folders = rng.integers(0, 100, n)
    fmt = "%Y-%m-%dT%H:%M:%S"
    return [{"id": f"f{f:02d}/{i:07d}.jpg", "taken_at": datetime.fromtimestamp(int(s), UTC).strftime(fmt)}
            for i, (s, f) in enumerate(zip(secs, folders, strict=True))]


def clustered(n: int, d: int, seed: int, centres: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = c[rng.integers(0, centres, m)] + 0.8 * rng.standard_normal((m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ensure(path: Path, vectors_fn, meta_fn, key: str, identity: dict) -> IndexStore:
    """The benchmark index at ``path`` (built once)."""
    if (path / "manifest.json").is_file():
        return IndexStore.open(path, mmap=False)
    t0 = time.perf_counter()
    vectors = vectors_fn()
    write_index(path, vectors, meta_fn(len(vectors)), encoder_identity=identity, encoder_label="bench", index_key=key)
    print(f"  built {path.name} ({key}, {len(vectors):,} vectors) in {time.perf_counter() - t0:.0f} s", flush=True)
    return IndexStore.open(path, mmap=False)


def quantile_date(store: IndexStore, s: float) -> str:
    dates = sorted(store.meta.column("taken_at"))
    return str(dates[min(len(dates) - 1, int(s * len(dates)))])


def measure(store: IndexStore, queries: np.ndarray, vectors: np.ndarray, s: float, nprobe: int | None
            ) -> dict:
    flt = MetaFilter() if s >= 1.0 else MetaFilter(taken_before=quantile_date(store, s))
    store.meta.dates()  # the date index is read at open by the service (0.6 s at 1M rows, once)
    sql_ms, search_ms, recalls, kept = [], [], [], []
    for q in queries:
        t0 = time.perf_counter()
        rows = store.meta.select(flt)  # no cache: every query pays for its SQL
        t1 = time.perf_counter()
        _, found = filtered_search(store, q[None, :], K, rows, nprobe=nprobe)
        t2 = time.perf_counter()
        sql_ms.append((t1 - t0) * 1000)
        search_ms.append((t2 - t1) * 1000)
        subset = rows if rows is not None else np.arange(store.count)
        exact = subset[np.argsort(-(vectors[subset] @ q))[:K]]
        recalls.append(len(set(found[0].tolist()) & set(exact.tolist())) / K)
        _, plain = store.search(q[None, :], K, nprobe=nprobe)
        kept.append(int(np.isin(plain[0], subset).sum()))
    m = len(rows) if rows is not None else store.count
    return {"selectivity": s, "rows": int(m), "sql_ms": float(np.median(sql_ms)),
            "search_ms": float(np.median(search_ms)), "total_ms": float(np.median(np.add(sql_ms, search_ms))),
            "recall_at_10": float(np.mean(recalls)), "post_filter_kept": float(np.mean(kept))}


def run_set(name: str, stores: dict[str, IndexStore], queries: np.ndarray, vectors: np.ndarray) -> list[dict]:
    rows = []
    for key, store in stores.items():
        nprobe = store.manifest.build.get("nprobe")
        base = None
        for s in SELECTIVITIES:
            r = measure(store, queries, vectors, s, nprobe)
            base = base or r["total_ms"]
            r.update({"set": name, "n": store.count, "index": key, "nprobe": nprobe,
                      "vs_unfiltered": r["total_ms"] / base})
            rows.append(r)
            print(f"  {name} {key:>14} s={s:>5.0%} rows={r['rows']:>8,} sql {r['sql_ms']:7.2f} ms search "
                  f"{r['search_ms']:7.2f} ms total {r['total_ms']:7.2f} ms x{r['vs_unfiltered']:.2f} "
                  f"recall {r['recall_at_10']:.3f} post-filter keeps {r['post_filter_kept']:.1f}/10", flush=True)
    return rows


def real_set(data: Path, queries_n: int) -> tuple[dict[str, IndexStore], np.ndarray, np.ndarray]:
    from retrieval.datasets import load_dataset
    from retrieval.encoders import EncoderSpec, build_encoder

    src = REPO / "out" / "flickr8k-all"
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"build {src} first: python -m indexer build {data} --out {src}")
    base = IndexStore.open(src)
    vectors = read_vectors(src)
    stores = {
        "Flat": ensure(REPO / "out" / "bench-filter" / "real-flat", lambda: vectors, synthetic_meta, "Flat",
                       base.manifest.encoder),
        "IVF128,Flat": ensure(REPO / "out" / "bench-filter" / "real-ivf", lambda: vectors, synthetic_meta,
                              "IVF128,Flat", base.manifest.encoder),
    }
    caps = [c for r in load_dataset(data, split="test") for c in r.captions[:1]][:queries_n]
    encoder = build_encoder(EncoderSpec(**base.manifest.build["encoder_spec"]))
    return stores, encoder.encode_text(caps).astype(np.float32), vectors


def synthetic_set(n: int, d: int, queries_n: int) -> tuple[dict[str, IndexStore], np.ndarray, np.ndarray]:
    nlist = 4096
    vec = lambda: clustered(n, d, seed=1)  # noqa: E731
    ident = {"backend": "synthetic", "dim": d}
    stores = {
        "Flat": ensure(REPO / "out" / "bench-filter" / f"syn{n}-flat", vec, synthetic_meta, "Flat", ident),
        f"IVF{nlist},Flat": ensure(REPO / "out" / "bench-filter" / f"syn{n}-ivf", vec, synthetic_meta,
                                   f"IVF{nlist},Flat", ident),
    }
    vectors = read_vectors(REPO / "out" / "bench-filter" / f"syn{n}-flat")
    q = clustered(queries_n, d, seed=2)
    return stores, q, vectors


def markdown(rows: list[dict], cpu: str) -> str:
    lines = [f"### Filtered search, k={K}, one query at a time — {cpu}",
             "",
             "| vectors | index | filter keeps | rows | SQL ms | search ms | total ms | vs unfiltered | recall@10 "
             "| post-filter keeps (of 10) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        keeps = "all (no filter)" if r["selectivity"] >= 1 else f"{r['selectivity']:.0%}"
        lines.append(f"| {r['n']:,} | {r['index']} | {keeps} | {r['rows']:,} | {r['sql_ms']:.2f} | "
                     f"{r['search_ms']:.2f} | {r['total_ms']:.2f} | {r['vs_unfiltered']:.2f}x | "
                     f"{r['recall_at_10']:.3f} | {r['post_filter_kept']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--sizes", default="real,1m", help="comma-separated: real, 1m")
    p.add_argument("--synthetic-n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="faiss's OpenMP threads per search (default 1, as the service runs its searches: "
                        "SERVICE_SEARCH_OMP_THREADS); 0 leaves faiss's own default (= cores)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_filter.json")
    args = p.parse_args(argv)
    configure_faiss()
    if args.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(args.faiss_threads)
    cpu = cpu_line() + (f"; faiss threads {args.faiss_threads}" if args.faiss_threads else "")
    print(cpu, flush=True)
    rows: list[dict] = []
    sizes = args.sizes.split(",")
    dim = None
    if "real" in sizes:
        stores, q, vecs = real_set(args.data, args.queries)
        dim = vecs.shape[1]
        rows += run_set("real", stores, q, vecs)
    if "1m" in sizes:
        stores, q, vecs = synthetic_set(args.synthetic_n, dim or 256, args.queries)
        rows += run_set("synthetic", stores, q, vecs)
    md = markdown(rows, cpu)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "k": K, "queries": args.queries, "rows": rows, "markdown": md,
                                    "command": "python benchmarks/bench_filter.py " + " ".join(argv or sys.argv[1:])},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
