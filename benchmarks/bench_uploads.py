"""Text queries while sixteen clients upload 40-megapixel photos: text-query latency with and without the uploads,
and the service's peak RSS.

    python benchmarks/bench_uploads.py --data ../shared/data/flickr8k          # (also: make bench-uploads)

1. The benchmark index of ``bench_service.py`` (built once, reused).
2. A 40-MP JPEG (a real Flickr8k photo scaled to 7,300 x 5,475, quality 90) in ``out/``.
3. ``python -m service`` in a subprocess (micro-batcher on, torch threads 1, upload limit raised to fit the file).
4. Phase "alone": text queries (distinct captions, so the cache never answers) at a fixed concurrency.
   Phase "with uploads": the same number of text queries while ``--uploaders`` clients upload the 40-MP JPEG back
   to back until the text phase ends. The two phases alternate (alone, uploads, uploads, alone) so the other
   tenants' load on a shared machine hits both alike.
5. Reported: text p50/p99 for both phases and their ratio (the target: p99 with uploads within 2x of alone), the
   uploads answered and their statuses and latency, and the server's peak RSS (``VmHWM``) before and after.

Numbers on a shared 2-core machine move by +-20% run to run; the CPU and its flags head the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_service import Server, add_index_args, ensure_index, load_captions  # noqa: E402

MEGAPIXELS_40 = (7_300, 5_475)


def cpu_line() -> str:
    """The processor and its speed-relevant flags (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def make_upload(data: Path, out: Path) -> Path:
    """A 40-MP JPEG made from the first Flickr8k photo (made once)."""
    if out.is_file():
        return out
    src = sorted((data / "images").glob("*.jpg"))[0]
    Image.open(src).convert("RGB").resize(MEGAPIXELS_40, Image.Resampling.BICUBIC).save(out, quality=90)
    return out


def vm_hwm(pid: int) -> int:
    """Peak resident set size of process ``pid`` in bytes (Linux ``VmHWM``), 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def phase(url: str, queries: list[str], concurrency: int, upload: bytes | None, uploaders: int
                ) -> dict[str, Any]:
    """Text queries ``concurrency`` at a time; with ``upload``, ``uploaders`` clients upload it until they end."""
    text_lat: list[float] = []
    up_lat: list[float] = []
    statuses: Counter[str] = Counter()
    it = iter(queries)
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency + uploaders + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def texter() -> None:
            for q in it:
                t0 = time.perf_counter()
                r = await client.post("/api/search", json={"query": q, "top_k": 10})
                text_lat.append(time.perf_counter() - t0)
                statuses[f"text {r.status_code}"] += 1

        async def uploader() -> None:
            assert upload is not None
            while not done.is_set():
                t0 = time.perf_counter()
                r = await client.post("/api/search/image", files={"file": ("big.jpg", upload, "image/jpeg")})
                up_lat.append(time.perf_counter() - t0)
                statuses[f"upload {r.status_code}"] += 1

        ups = [asyncio.create_task(uploader()) for _ in range(uploaders if upload else 0)]
        if ups:
            await asyncio.sleep(2.0)  # let the uploads fill the pipeline first
        t0 = time.perf_counter()
        await asyncio.gather(*(texter() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*ups)
    return {"text": text_lat, "uploads": up_lat, "statuses": statuses, "wall": wall}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_index_args(p)
    p.add_argument("--uploaders", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4, help="concurrent text clients")
    p.add_argument("--requests", type=int, default=200, help="text queries per phase (split in two rounds)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "uploads.json")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (REPO / "out").mkdir(exist_ok=True)
    ensure_index(args.data, args.index, args.encoder, args.limit)
    upload_path = make_upload(args.data, REPO / "out" / "upload-40mp.jpg")
    upload = upload_path.read_bytes()
    captions = load_captions(args.data)
    need = 2 * args.requests + 4 * args.concurrency
    half = args.requests // 2
    server = Server(args.index, args.encoder, True, args.torch_threads,
                    extra_env={"SERVICE_MAX_UPLOAD_BYTES": str(len(upload) + (1 << 20)),
                               "SERVICE_MAX_IMAGE_PIXELS": str(MEGAPIXELS_40[0] * MEGAPIXELS_40[1])})
    print(f"{cpu_line()}\nindex {args.index}, upload {upload_path.name} {len(upload) / 1e6:.1f} MB "
          f"({MEGAPIXELS_40[0]}x{MEGAPIXELS_40[1]}), {args.uploaders} uploaders, {args.concurrency} text clients, "
          f"{args.requests} text queries per phase", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"alone": [], "with uploads": []}
    try:
        server.wait_ready()
        asyncio.run(phase(server.url, captions[need:need + 2 * args.concurrency], args.concurrency, None, 0))
        rss_idle = vm_hwm(server.proc.pid)
        pos = 0
        for mode in ("alone", "with uploads", "with uploads", "alone"):
            qs = captions[pos:pos + half]
            pos += half
            res = asyncio.run(phase(server.url, qs, args.concurrency, upload if mode != "alone" else None,
                                    args.uploaders))
            results[mode].append(res)
            print(f"  {mode:13s} text p50 {pct(res['text'], 50):7.1f} ms  p99 {pct(res['text'], 99):7.1f} ms  "
                  f"uploads {len(res['uploads'])}  {dict(res['statuses'])}", flush=True)
        rss_peak = vm_hwm(server.proc.pid)
    finally:
        server.stop()

    def merged(mode: str, key: str) -> list[float]:
        return [x for r in results[mode] for x in r[key]]

    alone, loaded, ups = merged("alone", "text"), merged("with uploads", "text"), merged("with uploads", "uploads")
    statuses: Counter[str] = Counter()
    for r in results["alone"] + results["with uploads"]:
        statuses.update(r["statuses"])
    five_xx = sum(n for k, n in statuses.items() if k.split()[1].startswith("5"))
    ratio = pct(loaded, 99) / pct(alone, 99)
    summary = {
        "cpu": cpu_line(), "uploaders": args.uploaders, "upload_bytes": len(upload), "concurrency": args.concurrency,
        "text_alone_p50_ms": pct(alone, 50), "text_alone_p99_ms": pct(alone, 99),
        "text_loaded_p50_ms": pct(loaded, 50), "text_loaded_p99_ms": pct(loaded, 99), "p99_ratio": ratio,
        "uploads_answered": len(ups), "upload_p50_ms": pct(ups, 50), "upload_p99_ms": pct(ups, 99),
        "statuses": dict(statuses), "server_5xx": five_xx,
        "server_peak_rss_mb_idle": rss_idle / 2**20, "server_peak_rss_mb": rss_peak / 2**20,
    }
    print(f"\n### Text queries under {args.uploaders} concurrent 40-MP uploads ({cpu_line()})\n")
    print("| phase | text p50 (ms) | text p99 (ms) | uploads answered | upload p50 (ms) | upload p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| alone | {pct(alone, 50):.1f} | {pct(alone, 99):.1f} | - | - | - |")
    print(f"| with uploads | {pct(loaded, 50):.1f} | {pct(loaded, 99):.1f} | {len(ups)} | {pct(ups, 50):.0f} "
          f"| {pct(ups, 99):.0f} |")
    print(f"\ntext p99 with / without uploads: {ratio:.2f}x (target <= 2x); server 5xx: {five_xx}; server peak RSS "
          f"{rss_peak / 2**20:.0f} MiB ({rss_idle / 2**20:.0f} MiB before the uploads)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"results: {args.out}")
    return 0 if five_xx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
