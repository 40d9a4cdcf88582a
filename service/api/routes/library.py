"""The collection itself: its folders and date range (the page's filters), and near-duplicate clusters."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from retrieval.errors import BadInput
from service.api.deps import ReadyState, require_search_key
from service.api.routes._common import image_url, thumb_url
from service.schemas import (
    DuplicateCluster,
    DuplicateItem,
    DuplicatesResponse,
    ErrorResponse,
    FolderCount,
    LibraryResponse,
)

router = APIRouter(prefix="/api", tags=["library"], dependencies=[Depends(require_search_key)],
                   responses={422: {"description": "invalid parameter"},
                              503: {"model": ErrorResponse, "description": "not ready"}})


@router.get("/folders", response_model=LibraryResponse, summary="Folders (with image counts) and the date range")
async def folders(state: ReadyState) -> LibraryResponse:
    assert state.searcher is not None
    info = await run_in_threadpool(state.searcher.library_info)
    return LibraryResponse(count=sum(n for _, n in info.folders),
                           folders=[FolderCount(folder=f, count=n) for f, n in info.folders],
                           earliest=info.earliest, latest=info.latest)


@router.get("/duplicates", response_model=DuplicatesResponse,
            summary="Clusters of near-duplicate images (cosine >= threshold), largest first")
async def duplicates(
    request: Request,
    state: ReadyState,
    threshold: Annotated[float, Query(ge=-1.0, le=1.0, description="cosine similarity")] = 0.95,
    limit: Annotated[int, Query(ge=1, le=500, description="clusters per page")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> DuplicatesResponse:
    assert state.searcher is not None
    if threshold < state.settings.min_duplicates_threshold:
        raise BadInput(f"threshold: {threshold} is below the service's minimum "
                       f"{state.settings.min_duplicates_threshold} (lower ones link most of a collection)")
    t0 = time.perf_counter()
    generation, clusters = await run_in_threadpool(state.searcher.duplicates, threshold)
    page = clusters[offset: offset + limit]
    return DuplicatesResponse(
        threshold=threshold, total=len(clusters), offset=offset,
        next_offset=offset + limit if offset + limit < len(clusters) else None,
        clusters=[DuplicateCluster(representative=c.representative, size=len(c.ids), items=[
            DuplicateItem(id=i, score=round(s, 6), image_url=image_url(request, i), thumb_url=thumb_url(request, i))
            for i, s in zip(c.ids, c.scores, strict=True)]) for c in page],
        generation=generation, took_ms=round((time.perf_counter() - t0) * 1000, 3),
    )
