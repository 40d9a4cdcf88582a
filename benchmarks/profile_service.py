"""Where a search request's time goes: the service under py-spy while a load generator sends text queries.

    python benchmarks/profile_service.py --data ../shared/data/flickr8k --concurrency 64 --requests 2000

Starts ``python -m service`` (the ``make bench-service`` index) under ``py-spy record --threads --format raw``,
sends ``--requests`` distinct Flickr8k captions at ``--concurrency``, then folds the samples into stages by the
thread that ran them and the frames they were in: HTTP + routing + JSON on the event loop, tokenisation and the
ONNX Runtime call on the encoder thread, the FAISS search and metadata on the search thread. Prints milliseconds of
CPU per request for each stage (markdown) and writes the raw samples to ``out/profile-service.txt``.
Needs py-spy (``pip install py-spy``; the dev extra has it) and permission to ptrace its own child.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_service import REPO, Server, ensure_index, load_captions, run_level

RATE_HZ = 200
#: (stage, substring of a frame) in priority order: the first match names the sample's stage.
STAGES = [
    ("encoder: ONNX Runtime run", "onnxruntime_inference_collection.py"),
    ("encoder: tokenise", "tokeniz"),
    ("encoder: torch", "torch/nn/"),
    ("search: FAISS", "faiss"),
    ("search: hits + metadata", "search_vectors"),
    ("decode upload", "decode_upload"),
    ("HTTP: request/response validation + JSON", "fastapi/routing.py"),
    ("HTTP: uvicorn + middleware", "uvicorn"),
    ("HTTP: starlette", "starlette"),
    ("pipeline + batchers (asyncio)", "service/batching.py"),
    ("asyncio event loop", "asyncio"),
]


def stage_of(stack: str, thread: str) -> str:
    for stage, needle in STAGES:
        if needle in stack:
            return stage
    if thread.startswith("encoder"):
        return "encoder: other"
    if thread.startswith("search"):
        return "search: other"
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--index", type=Path, default=REPO / "out" / "bench-flickr8k-index")
    p.add_argument("--encoder", default="default")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--encoder-threads", type=int, default=None)
    args = p.parse_args()
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        raise SystemExit("needs py-spy: pip install py-spy")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    ensure_index(args.data, args.index, args.encoder)
    captions = load_captions(args.data)
    server = Server(args.index, args.encoder, True, 1, args.encoder_threads)
    try:
        server.wait_ready()
        asyncio.run(run_level(server, captions[:200], args.concurrency))  # warm up
        raw = REPO / "out" / "profile-service.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(server.proc.pid), "--threads", "--rate", str(RATE_HZ),
                                "--format", "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        queries = captions[200:200 + args.requests]
        res = asyncio.run(run_level(server, queries, args.concurrency))
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(60)
    finally:
        server.stop()
    samples: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith("thread") else ""
        name = thread.split("(")[-1].split(")")[0] if "(" in thread else thread
        samples[stage_of(stack, name)] += int(count)
        threads[name.split("_")[0]] += int(count)
    n = len(res["latencies"])
    per_req = {k: 1000 * v / RATE_HZ / n for k, v in samples.items()}
    print(f"\n### CPU per request by stage — concurrency {args.concurrency}, {n} text queries, "
          f"{n / res['wall']:.0f} q/s while profiled (py-spy at {RATE_HZ} Hz)\n")
    print("| stage | CPU ms / request | share |")
    print("|---|---:|---:|")
    total = sum(per_req.values())
    for k, v in sorted(per_req.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {100 * v / total:.0f}% |")
    print(f"| **total (server process)** | **{total:.2f}** | |")
    print(f"\nsamples by thread: {dict(threads.most_common(8))}; raw samples: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
