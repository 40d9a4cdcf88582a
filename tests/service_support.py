"""Helpers for the service tests: a tiny index of generated images, and an app + httpx client with its lifespan."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from conftest import make_images
from PIL import Image

CAPTIONS = ["a red square", "a blue circle", "a green field", "a dog in the snow", "a cat on a sofa",
            "children playing", "a surfer on a wave", "a mountain lake", "a city at night", "a bowl of fruit",
            "a bike on a track", "a bird in the sky"]


def build_test_index(encoder: Any, out: Path, images: Path, n: int = 12, *, seed: int = 0,
                     identity: dict[str, Any] | None = None, meta_override: dict[int, dict[str, Any]] | None = None
                     ) -> list[str]:
    """Generate ``n`` images under ``images`` (if missing), encode them with ``encoder``, write an index to ``out``.
    Returns the ids (file names)."""
    from retrieval.index import write_index

    paths = sorted(images.glob("img_*.jpg"))[:n] if images.is_dir() else []
    if len(paths) < n:
        paths = make_images(images, n, seed=seed)
    vecs = encoder.encode_images([Image.open(p).convert("RGB") for p in paths]).astype(np.float32)
    meta = [{"id": p.name, "path": p.name, "captions": [CAPTIONS[i % len(CAPTIONS)], f"image number {i}"]}
            for i, p in enumerate(paths)]
    for i, extra in (meta_override or {}).items():
        meta[i].update(extra)
    write_index(out, vecs, meta, encoder_identity=identity or encoder.identity(), encoder_label="tiny-test",
                build={"source_root": str(images.resolve())})
    return [m["id"] for m in meta]


@asynccontextmanager
async def running_app(settings: Any, encoder: Any, *, raise_app_exceptions: bool = True
                      ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """``create_app(settings, encoder=...)`` with its lifespan entered, and an httpx client on it.
    ``raise_app_exceptions=False``: an unhandled error becomes the 500 a real client would get."""
    from service.main import create_app

    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 12345),
                                        raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            yield app, client


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import pytest
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def jpeg_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
