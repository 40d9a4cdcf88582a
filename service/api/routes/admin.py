"""Admin: hot reload of the index. API-key protected when the service has keys."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReadyState, require_admin_key
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key)],
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key"},
        404: {"model": ErrorResponse, "description": "no index folder there"},
        409: {"model": ErrorResponse, "description": "the index was built with another encoder"},
        422: {"description": "corrupt index or invalid body"},
    },
)


@router.post("/reload", response_model=ReloadResponse, summary="Load a new index folder without dropping requests")
async def reload_index(state: ReadyState, body: ReloadRequest | None = None) -> ReloadResponse:
    searcher = state.searcher
    assert searcher is not None
    t0 = time.perf_counter()
    previous = searcher.snapshot.generation
    snap = await run_in_threadpool(searcher.reload, body.index_dir if body else None)
    state.metrics.index_vectors.set(len(snap.store.ids))
    state.metrics.index_generation.set(snap.generation)
    return ReloadResponse(
        index_dir=str(snap.index_dir),
        count=len(snap.store.ids),
        generation=snap.generation,
        previous_generation=previous,
        took_ms=round((time.perf_counter() - t0) * 1000, 3),
    )
