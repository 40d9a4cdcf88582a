"""Liveness, readiness, Prometheus metrics and index statistics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ReadyState, ServiceState, get_state, require_search_key
from service.schemas import CacheStats, HealthResponse, QueueStats, StatsResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "loading or shutting down"}},
    summary="Readiness: encoder and index loaded, batchers running",
)
async def readyz(request: Request) -> HealthResponse | JSONResponse:
    state = get_state(request)
    if state.ready and state.searcher is not None:
        return HealthResponse(status="ready")
    return JSONResponse({"status": "not ready"}, status_code=503)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    state = get_state(request)
    m = state.metrics
    for name, runner in (("text", state.text_runner), ("image", state.image_runner)):
        if runner is not None:
            m.queue_depth.labels(name).set(runner.depth())
    if state.searcher is not None:
        cache = state.searcher.query_cache
        m.cache.labels("hit").set(cache.hits)
        m.cache.labels("miss").set(cache.misses)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


def _queue(state: ServiceState, name: str) -> QueueStats:
    runner = state.text_runner if name == "text" else state.image_runner
    assert runner is not None
    s = runner.stats
    return QueueStats(
        batching=state.settings.batching, depth=runner.depth(), submitted=s.submitted, rejected=s.rejected,
        batches=s.batches, mean_batch=round(s.mean_batch, 3), max_batch_seen=s.max_seen_batch,
    )


@router.get("/api/stats", response_model=StatsResponse, tags=["search"], summary="Index and service statistics",
            dependencies=[Depends(require_search_key)])
async def stats(state: ReadyState) -> StatsResponse:
    assert state.searcher is not None
    s = state.searcher.stats()
    cfg = state.settings
    return StatsResponse(
        **{k: v for k, v in s.items() if k not in ("query_cache", "thumb_cache", "calibrated", "fusion")},
        query_cache=CacheStats(**s["query_cache"]),
        thumb_cache=CacheStats(**s["thumb_cache"]),
        text_queue=_queue(state, "text"),
        image_queue=_queue(state, "image"),
        examples=cfg.example_queries,
        limits={
            "max_query_chars": cfg.max_query_chars,
            "max_top_k": cfg.max_top_k,
            "default_top_k": cfg.default_top_k,
            "max_batch_queries": cfg.max_batch_queries,
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_offset": cfg.max_offset,
        },
        calibrated=bool(s.get("calibrated")),
        fusion=bool(s.get("fusion")),
        default_min_relevance=cfg.default_min_relevance if s.get("calibrated") else None,
    )
