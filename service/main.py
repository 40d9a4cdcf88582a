"""The FastAPI app. ``create_app(settings)`` wires routes, error handlers and middleware; the lifespan builds the
encoder, opens the index (manifest checked against the encoder identity), warms up and starts the micro-batchers.
``main()`` is the ``retrieval-serve`` command (uvicorn)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from retrieval.cli_flags import add_settings_flags, settings_from_flags
from service.api.deps import ServiceState
from service.api.routes import admin, embeddings, health, images, library, pages, search
from service.auth import KeyRing, TrustedProxies
from service.errors import install_error_handlers
from service.index_watch import index_watcher
from service.middleware import (
    AccessLogMiddleware,
    BodyLimitMiddleware,
    RateLimitMiddleware,
    SecurityHeadersMiddleware,
    TokenBuckets,
)
from service.observability import Metrics, configure_logging
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from retrieval.encoders import Encoder

log = logging.getLogger("service")

MULTIPART_OVERHEAD = 64 * 1024


def _lifespan(encoder: Encoder | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.engine import Searcher
        from service.searching import Limits
        from service.stages import make_pipelines

        state: ServiceState = app.state.service
        cfg = state.settings
        try:
            from retrieval.index import configure_faiss

            configure_faiss()  # process-wide faiss tuning, once, here at start
            if cfg.torch_threads:
                import torch  # the lifespan, not a route: routes never import torch

                torch.set_num_threads(cfg.torch_threads)
            if encoder is None:
                from retrieval.encoders import build_encoder
                from retrieval.index import IndexStore

                spec = cfg.encoder.spec()
                if spec.threads is None:  # half the cores encode; the rest serve HTTP, decode and search
                    from retrieval.encoders.cpu import usable_cores

                    spec = spec.model_copy(update={"threads": max(1, usable_cores() // 2)})
                # Fail fast, before loading any weights: the manifest must name this encoder.
                await asyncio.to_thread(IndexStore.open, cfg.index_dir, expected_encoder=spec.identity())
                enc = await asyncio.to_thread(build_encoder, spec)
            else:
                enc = encoder
            searcher = await asyncio.to_thread(
                lambda: Searcher(
                    enc, cfg.index_dir, image_root=cfg.image_root, cache_size=cfg.cache_size,
                    thumb_cache_size=cfg.thumb_cache_size, thumb_size=cfg.thumb_size,
                    max_query_chars=cfg.max_query_chars, max_top_k=cfg.max_top_k,
                    max_image_pixels=cfg.max_image_pixels, omp_threads=cfg.search_omp_threads,
                    max_offset=cfg.max_offset,
                    limits=Limits(max_sort_candidates=cfg.max_sort_candidates, hybrid_pool=cfg.hybrid_pool),
                    fusion_head=cfg.fusion_head,
                )
            )
        except Exception as exc:
            log.error("cannot start the service: %s: %s", type(exc).__name__, exc,
                      extra={"index_dir": str(cfg.index_dir), "encoder": cfg.encoder.name})
            raise
        if cfg.warmup:
            await asyncio.to_thread(searcher.warmup)
        state.searcher = searcher
        # The encoder threads run every encoder call (text and image): `workers` batches at once, each with the
        # encoder's intra-op threads (half the cores by default, so two batches keep a 2-core machine encoding under
        # load). Uploads are decoded in their own bounded pool and index searches run on their own threads, so
        # neither waits behind the encoder.
        from retrieval.encoders.cpu import usable_cores

        workers = cfg.encode_workers or max(1, usable_cores() // (enc.spec.threads or usable_cores()))
        await asyncio.to_thread(enc.allow_parallel_calls, workers, usable_cores())  # a lone query gets every core
        executors = [ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encoder"),
                     ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode"),
                     ThreadPoolExecutor(max_workers=cfg.search_threads, thread_name_prefix="search")]
        state.text_runner, state.image_runner = make_pipelines(
            searcher, cfg, encoder_executor=executors[0], decode_executor=executors[1],
            search_executor=executors[2], observer=state.metrics.batch_observer, encode_workers=workers)
        await state.text_runner.start()
        await state.image_runner.start()
        state.metrics.index_vectors.set(len(searcher.store.ids))
        state.metrics.index_generation.set(searcher.snapshot.generation)
        state.ready = True
        log.info("service ready", extra={"index_dir": str(cfg.index_dir), "count": len(searcher.store.ids),
                                         "encoder": searcher.store.manifest.encoder_label,
                                         "runtime": enc.runtime_label(), "batching": cfg.batching})
        try:
            async with index_watcher(state, cfg.watch_index_s):
                yield
        finally:
            state.ready = False  # readiness fails first, then queued work drains
            await state.text_runner.stop()
            await state.image_runner.stop()
            for executor in executors:
                executor.shutdown(wait=True)
            log.info("service stopped")

    return lifespan


def create_app(settings: ServiceSettings | None = None, *, encoder: Encoder | None = None) -> FastAPI:
    """Build the app. ``encoder``: an already built encoder to use instead of building ``settings.encoder``
    (tests, embedding the service); it must match the index's manifest like any other."""
    settings = settings or ServiceSettings()
    app = FastAPI(
        title="Text-to-image retrieval",
        version="0.1.0",
        description="Search an indexed image collection by text, by image upload or by indexed id.",
        lifespan=_lifespan(encoder),
        redirect_slashes=False,
    )
    metrics = Metrics()
    keys = KeyRing(settings.api_keys)
    trusted = TrustedProxies(settings.trusted_proxies)
    app.state.service = ServiceState(settings=settings, metrics=metrics, keys=keys)

    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(library.router)
    app.include_router(embeddings.router)
    app.include_router(health.router)
    app.include_router(images.router)
    app.include_router(admin.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")

    # Middleware: the last added runs first. Order seen by a request: access log -> security headers -> CORS ->
    # rate limit -> body limit.
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        limits={"/api/search/image": settings.max_upload_bytes + MULTIPART_OVERHEAD,
                "/v1/embeddings": settings.max_embeddings_body_bytes},
    )
    if settings.rate_limit.enabled:
        app.add_middleware(RateLimitMiddleware, buckets=TokenBuckets(settings.rate_limit), metrics=metrics,
                           keys=keys, trusted=trusted)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["Warning", "X-Query-Truncated", "X-Request-ID"],
        )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, enabled=settings.access_log, trusted=trusted)
    return app


#: The encoder's nested fields get the short flags users type.
ENCODER_FLAGS = {"encoder.name": "encoder", "encoder.heads": "heads", "encoder.precision": "precision",
                 "encoder.device": "device"}


def parse_args(argv: Sequence[str] | None = None) -> ServiceSettings:
    """CLI flags (generated from :class:`ServiceSettings`) override environment variables (``SERVICE_*``), which
    override defaults. List and secret settings (API keys, CORS origins) come from the environment only."""
    p = argparse.ArgumentParser(prog="retrieval-serve", description="Serve an index over HTTP.")
    p.add_argument("index_dir_pos", nargs="?", type=Path, metavar="INDEX_DIR",
                   help="index folder (default: SERVICE_INDEX_DIR)")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    add_settings_flags(p, ServiceSettings, rename=ENCODER_FLAGS)
    args = p.parse_args(argv)
    extra: dict[str, Any] = {}
    if args.index_dir_pos is not None:
        extra["index_dir"] = args.index_dir_pos
    if args.plain_logs:
        extra["log_json"] = False
    return settings_from_flags(ServiceSettings, args, **extra)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    settings = parse_args(argv)
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    # uvicorn uses httptools and uvloop when installed (C parser and loop instead of pure-Python h11 + asyncio).
    # Trusted proxies: uvicorn rewrites the client address from X-Forwarded-For for the same peers the rate limiter
    # trusts (left to uvicorn's own default, FORWARDED_ALLOW_IPS or 127.0.0.1, when none are configured).
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=30,
                forwarded_allow_ips=settings.trusted_proxies or None)


if __name__ == "__main__":
    main()
