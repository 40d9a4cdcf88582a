"""Text, batch, image-upload and by-id search. Encoding goes through the micro-batchers on ``app.state``."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from retrieval.errors import BadImage, BadInput
from service.api.deps import ItemId, ReadyState, ServiceState, require_search_key
from service.api.routes._common import to_response, warn_truncated
from service.errors import PayloadTooLarge
from service.schemas import (
    BatchSearchRequest,
    BatchSearchResponse,
    ErrorResponse,
    SearchRequest,
    SearchResponse,
)
from service.settings import HARD_MAX_QUERY_CHARS, HARD_MAX_TOP_K

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown id"},
    413: {"model": ErrorResponse, "description": "body or upload too large"},
    422: {"description": "invalid query, parameter or image"},
    429: {"model": ErrorResponse, "description": "queue full or rate limited; retry later"},
    503: {"model": ErrorResponse, "description": "not ready"},
}

router = APIRouter(prefix="/api/search", tags=["search"], dependencies=[Depends(require_search_key)], responses=ERRORS)


OptionalTopK = Annotated[int | None, Query(ge=1, le=HARD_MAX_TOP_K, description="default: the service's default_top_k")]
MinScoreQuery = Annotated[float | None, Query(ge=-1.0, le=1.0)]


def _k(state: ServiceState, top_k: int | None) -> int:
    """The requested number of results, or the service's ``default_top_k``."""
    return top_k if top_k is not None else state.settings.default_top_k


async def _search_text(state: ServiceState, text: str, k: int, min_score: float | None):
    assert state.text_runner is not None
    return await state.text_runner.submit((text, k, min_score))  # an engine.TextQuery


@router.post("", response_model=SearchResponse, summary="Search images by text")
async def search(body: SearchRequest, request: Request, response: Response, state: ReadyState) -> SearchResponse:
    t0 = time.perf_counter()
    k = _k(state, body.top_k)
    hits = await _search_text(state, body.query, k, body.min_score)
    warn_truncated(response, [hits])
    return to_response(request, hits, k, (time.perf_counter() - t0) * 1000, body.query)


@router.get("", response_model=SearchResponse, summary="Search images by text (query string; for the web page)")
async def search_get(
    request: Request,
    response: Response,
    state: ReadyState,
    q: Annotated[str, Query(min_length=1, max_length=HARD_MAX_QUERY_CHARS, description="free text")],
    top_k: OptionalTopK = None,
    min_score: MinScoreQuery = None,
) -> SearchResponse:
    t0 = time.perf_counter()
    k = _k(state, top_k)
    hits = await _search_text(state, q, k, min_score)
    warn_truncated(response, [hits])
    return to_response(request, hits, k, (time.perf_counter() - t0) * 1000, q)


@router.post("/batch", response_model=BatchSearchResponse, summary="Search images for several texts at once")
async def search_batch(body: BatchSearchRequest, request: Request, response: Response, state: ReadyState
                       ) -> BatchSearchResponse:
    if len(body.queries) > state.settings.max_batch_queries:
        raise BadInput(f"{len(body.queries)} queries; the limit is {state.settings.max_batch_queries}")
    t0 = time.perf_counter()
    k = _k(state, body.top_k)
    # Submitted together, the queries land in the same encoder batch when the batcher is on.
    all_hits = await asyncio.gather(*(_search_text(state, q, k, body.min_score) for q in body.queries))
    took = (time.perf_counter() - t0) * 1000
    warn_truncated(response, all_hits)
    return BatchSearchResponse(
        results=[to_response(request, hits, k, took, q) for q, hits in zip(body.queries, all_hits, strict=True)],
        took_ms=round(took, 3),
    )


@router.post("/image", response_model=SearchResponse, summary="Search images similar to an uploaded image")
async def search_image(
    request: Request,
    state: ReadyState,
    file: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF, BMP or TIFF image")],
    top_k: OptionalTopK = None,
    min_score: MinScoreQuery = None,
) -> SearchResponse:
    limit = state.settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
    if not data:
        raise BadImage("the upload is empty")
    t0 = time.perf_counter()
    assert state.image_runner is not None
    k = _k(state, top_k)
    hits = await state.image_runner.submit((data, k, min_score))
    return to_response(request, hits, k, (time.perf_counter() - t0) * 1000)


@router.get("/similar/{item_id:path}", response_model=SearchResponse, summary="Images similar to an indexed image")
async def search_similar(
    request: Request,
    state: ReadyState,
    item_id: ItemId,
    top_k: OptionalTopK = None,
    min_score: MinScoreQuery = None,
) -> SearchResponse:
    assert state.searcher is not None
    t0 = time.perf_counter()
    k = _k(state, top_k)
    hits = await run_in_threadpool(state.searcher.similar, item_id, k, min_score)
    return to_response(request, hits, k, (time.perf_counter() - t0) * 1000)
