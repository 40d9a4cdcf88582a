"""A lean HTTP/1.1 load generator: keep-alive connections on raw asyncio streams (uvloop when installed).

The benchmarks run the load generator on the same 2 cores as the server. httpx's AsyncClient spends 3-5 ms of CPU
per request there (measured: more than the service itself), so it caps what any server can show; this client
writes pre-built requests and reads ``Content-Length`` bodies, ~0.2 ms per request. Responses must carry a
``Content-Length`` (FastAPI's and infinity's JSON responses do).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit


def post_json(path: str, body: Any, host: str) -> bytes:
    """The bytes of one ``POST path`` with a JSON body."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    return head + data


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


async def run(url: str, requests: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Send every request once over ``concurrency`` keep-alive connections: latencies (s), statuses, wall (s)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    it = iter(requests)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for req in it:
                t0 = time.perf_counter()
                writer.write(req)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "wall": time.perf_counter() - t0}


def run_blocking(url: str, requests: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """:func:`run` in a fresh event loop (uvloop's when installed)."""
    runner: Callable[..., Any] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    result: dict[str, Any] = runner(run(url, requests, concurrency))
    return result
