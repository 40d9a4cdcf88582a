"""Search throughput through the gateway with 1 and 2 service replicas, on a running compose stack.

    # the offline stack with both replicas up (docs/DEPLOY.md, "Scaling out"), then:
    python benchmarks/bench_replicas.py --data ../shared/data/flickr8k          # (also: make bench-replicas)

What it does
1. Talks to the gateway (``--url``, default http://127.0.0.1:8080) only. Between runs it changes the gateway's
   replica list in place: ``docker compose exec gateway sh /etc/nginx/gateway-start.sh nginx -s reload`` with
   ``GATEWAY_UPSTREAMS`` set to ``--one`` or ``--two``; both replicas stay up, the idle one costs no CPU.
2. Sends ``--requests`` text searches per run at ``--concurrency`` (64), every query a distinct Flickr8k caption
   (no query-cache hits), from 64 distinct loopback source addresses (127.0.0.2, ...) so that the gateway's
   per-client rate limit (20 r/s each) does not cap the run: it measures the replicas, like 64 separate users.
3. Runs alternate 1, 2, 2, 1, ... (``--rounds`` pairs) so that other tenants' load hits both settings alike, then
   prints a markdown table: answered/s, p50/p99 latency, non-200 answers, and the 2-replica / 1-replica ratio.

The CPU model and flags, core count and load average are printed with the table: on a shared machine the numbers
are provisional. Nothing but 127.0.0.0/8 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from bench_service import load_captions  # the benchmarks folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """CPU model, the SIMD flags that matter for the encoders, cores and load: printed with every table."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    shown = ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"CPU: {model} ({os.cpu_count()} cores; {shown}); load average {load}"


def set_upstreams(compose: list[str], upstreams: str) -> None:
    """Point the running gateway at ``upstreams`` (a reload: open connections finish on the old list)."""
    cmd = [*compose, "exec", "-T", "-e", f"GATEWAY_UPSTREAMS={upstreams}", "gateway",
           "sh", "/etc/nginx/gateway-start.sh", "nginx", "-s", "reload"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or "error" in res.stderr.lower() or "emerg" in res.stderr.lower():
        raise SystemExit(f"could not set the gateway's replicas ({' '.join(cmd)}): {res.stdout}{res.stderr}")
    time.sleep(1.5)  # nginx starts new workers; the old ones drain


async def run(url: str, queries: list[str], concurrency: int) -> dict[str, Any]:
    """Every query once, ``concurrency`` clients at a time, each client from its own loopback address."""
    todo = list(queries)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    async def client(i: int) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{2 + i % 250}")
        async with httpx.AsyncClient(base_url=url, transport=transport, timeout=120) as http:
            while todo:
                q = todo.pop()
                t0 = time.perf_counter()
                try:
                    r = await http.get("/api/search", params={"q": q, "top_k": 10})
                    statuses[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ok": len(latencies), "statuses": dict(statuses), "latencies": latencies}


def summarize(runs: list[dict[str, Any]], replicas: int) -> dict[str, Any]:
    lat = sorted(x for r in runs for x in r["latencies"])
    ok = sum(r["ok"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    other: Counter[str] = Counter()
    for r in runs:
        other.update({k: v for k, v in r["statuses"].items() if k != "200"})
    return {
        "replicas": replicas, "runs": len(runs), "requests": sum(sum(r["statuses"].values()) for r in runs),
        "ok": ok, "qps": ok / wall if wall else 0.0, "per_run_qps": [r["ok"] / r["wall_s"] for r in runs],
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "other": dict(other),
    }


def table(one: dict[str, Any], two: dict[str, Any], concurrency: int) -> str:
    rows = ["| replicas | requests | answered (200) | other answers | searches/s | per run | p50 (ms) | p99 (ms) |",
            "|---:|---:|---:|---|---:|---|---:|---:|"]
    for s in (one, two):
        runs = ", ".join(f"{q:.1f}" for q in s["per_run_qps"])
        other = ", ".join(f"{k}: {v}" for k, v in sorted(s["other"].items())) or "none"
        rows.append(f"| {s['replicas']} | {s['requests']} | {s['ok']} | {other} | {s['qps']:.1f} | {runs} "
                    f"| {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |")
    ratio = two["qps"] / one["qps"] if one["qps"] else float("nan")
    return "\n".join(rows) + f"\n\nconcurrency {concurrency}; 2 replicas / 1 replica: **{ratio:.2f}x** searches/s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    p.add_argument("--one", default="127.0.0.1:8000", help="GATEWAY_UPSTREAMS for the 1-replica runs")
    p.add_argument("--two", default="127.0.0.1:8000 127.0.0.1:8001", help="... for the 2-replica runs")
    p.add_argument("--compose", default="docker compose", help="how to call compose (COMPOSE_FILE from the env)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=256, help="searches per run")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, in the order 1,2 then 2,1 ...")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_replicas.json")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost")):
        raise SystemExit("--url must be on this machine (127.0.0.0/8)")
    compose = args.compose.split()
    captions = load_captions(args.data)
    need = (2 * args.rounds * args.requests) + 2 * 32
    if len(captions) < need:
        raise SystemExit(f"{len(captions)} distinct captions, need {need}: lower --requests or --rounds")
    print(cpu_line(), flush=True)

    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    order = [n for i in range(args.rounds) for n in ((1, 2) if i % 2 == 0 else (2, 1))]
    pos = 0
    for n in order:
        set_upstreams(compose, args.one if n == 1 else args.two)
        warm, pos = captions[pos : pos + 32], pos + 32
        asyncio.run(run(args.url, warm, min(args.concurrency, 32)))  # new nginx workers, warm connections
        batch, pos = captions[pos : pos + args.requests], pos + args.requests
        r = asyncio.run(run(args.url, batch, args.concurrency))
        print(f"  {n} replica(s): {r['ok']}/{args.requests} answered in {r['wall_s']:.1f} s "
              f"({r['ok'] / r['wall_s']:.1f}/s) {r['statuses']}", flush=True)
        results[n].append(r)
    set_upstreams(compose, args.two)  # leave the stack as the docs start it

    one, two = summarize(results[1], 1), summarize(results[2], 2)
    print(f"\n### Gateway throughput, 1 vs 2 service replicas\n\n{cpu_line()}\n")
    print(table(one, two, args.concurrency))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_line(), "concurrency": args.concurrency, "one": one, "two": two,
                                    "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
