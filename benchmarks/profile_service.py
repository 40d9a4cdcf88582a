"""Where a search request's time goes, two ways, on the ``make bench-service`` index:

1. A CPU ladder (load-independent): the server's CPU seconds per request, read from /proc, for requests that do
   more and more of the work — ``GET /healthz`` (HTTP floor), a repeated query (HTTP + validation + pipeline +
   FAISS + response, the embedding from the cache), a new query (+ tokenise + ONNX Runtime). The differences are
   the stages' costs.
2. A py-spy profile of the new-query run (``py-spy record --threads --format raw``; skipped when py-spy is not
   installed), folded into stages by the frames each sample was in. py-spy samples threads that are not idle by
   wall clock, so on a loaded machine the shares are more trustworthy than the absolute numbers.

    python benchmarks/profile_service.py --data ../shared/data/flickr8k --concurrency 64 --requests 2000

Writes the raw samples to ``out/profile-service.txt``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import loadgen
from benchmarks.bench_service import REPO, Server, ensure_index, load_captions, process_cpu_seconds

RATE_HZ = 200
#: (stage, substring of a frame) in priority order: the first match names the sample's stage.
STAGES = [
    ("encoder: ONNX Runtime run", "onnxruntime_inference_collection.py"),
    ("encoder: tokenise", "FastTokenizer"),
    ("encoder: tokenise", "tokeniz"),
    ("search: FAISS", "faiss"),
    ("search: filters, hits + metadata", "service/searching.py"),
    ("response model + JSON", "serialize_response"),
    ("response model + JSON", "_common.py"),
    ("request validation + routing", "fastapi/"),
    ("middleware", "service/middleware.py"),
    ("pipeline + batchers", "service/batching.py"),
    ("pipeline + batchers", "service/stages.py"),
    ("HTTP: uvicorn/httptools + event loop", "uvicorn"),
    ("HTTP: uvicorn/httptools + event loop", "asyncio"),
]


def ladder(server: Server, captions: list[str], concurrency: int, n: int) -> list[tuple[str, float, float]]:
    """(what, server CPU ms per request, requests/s) for the three request kinds."""
    host = f"127.0.0.1:{server.port}"
    health = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    repeated = [server.raw_request(q, 10) for q in captions[:64]]
    loadgen.run_blocking(server.url, repeated, concurrency)  # fill the cache
    kinds = [("GET /healthz (HTTP floor)", [health] * n),
             ("repeated query (embedding cached)", (repeated * (n // 64 + 1))[:n]),
             ("new query (tokenise + encode)", [server.raw_request(q, 10) for q in captions[64:64 + n]])]
    out = []
    for label, reqs in kinds:
        cpu0 = process_cpu_seconds(server.proc.pid)
        res = loadgen.run_blocking(server.url, reqs, concurrency)
        cpu = process_cpu_seconds(server.proc.pid) - cpu0
        out.append((label, 1000 * cpu / len(reqs), len(reqs) / res["wall"]))
    return out


def stage_of(stack: str) -> str:
    for stage, needle in STAGES:
        if needle in stack:
            return stage
    return "other"


def pyspy_profile(server: Server, captions: list[str], concurrency: int, n: int) -> str | None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return None
    raw = REPO / "out" / "profile-service.txt"
    spy = subprocess.Popen([pyspy, "record", "--pid", str(server.proc.pid), "--threads", "--rate", str(RATE_HZ),
                            "--format", "raw", "--output", str(raw), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    res = loadgen.run_blocking(server.url, [server.raw_request(q, 10) for q in captions], concurrency)
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    spy.wait(60)
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples[stage_of(stack)] += int(count)
    total = sum(samples.values())
    lines = [f"py-spy, {n} new queries at concurrency {concurrency} ({n / res['wall']:.0f} q/s while sampled at "
             f"{RATE_HZ} Hz; wall-clock samples of busy threads)", "", "| stage | share of samples |", "|---|---:|"]
    lines += [f"| {k} | {100 * v / total:.0f}% |" for k, v in samples.most_common()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--index", type=Path, default=REPO / "out" / "bench-flickr8k-index")
    p.add_argument("--encoder", default="default")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--encoder-threads", type=int, default=None)
    args = p.parse_args()
    ensure_index(args.data, args.index, args.encoder)
    captions = load_captions(args.data)
    from retrieval.encoders.cpu import cpu_info

    server = Server(args.index, args.encoder, True, 1, args.encoder_threads)
    try:
        server.wait_ready()
        loadgen.run_blocking(server.url, [server.raw_request(q, 10) for q in captions[-256:]], args.concurrency)
        rows = ladder(server, captions, args.concurrency, args.requests)
        spy = pyspy_profile(server, captions[64 + args.requests:64 + 2 * args.requests], args.concurrency,
                            args.requests)
    finally:
        server.stop()
    print(f"\n### Server CPU per request — concurrency {args.concurrency}, {cpu_info().describe()}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| request | server CPU ms / request | added by this step | requests/s |")
    print("|---|---:|---:|---:|")
    prev = 0.0
    for label, cpu, qps in rows:
        print(f"| {label} | {cpu:.2f} | {cpu - prev:+.2f} | {qps:.0f} |")
        prev = cpu
    if spy:
        print("\n" + spy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
