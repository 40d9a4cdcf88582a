"""Full images and thumbnails of indexed ids. Only ids present in the index are served; the engine resolves the file
under the image root and checks containment, so ids like ``../../etc/passwd`` are simply unknown (404)."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ItemId, ReadyState
from service.schemas import ErrorResponse

router = APIRouter(tags=["images"], responses={404: {"model": ErrorResponse, "description": "unknown id"}})
CACHE = {"Cache-Control": "public, max-age=3600"}


@router.get(
    "/images/{item_id:path}",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}, "description": "the original image file"}},
    summary="The original image of an indexed id",
)
async def get_image(item_id: ItemId, state: ReadyState) -> FileResponse:
    assert state.searcher is not None
    path = await run_in_threadpool(state.searcher.image_path, item_id)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, headers=CACHE)


@router.get(
    "/thumbs/{item_id:path}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"}},
    summary="A thumbnail of an indexed id (cached)",
)
async def get_thumb(item_id: ItemId, state: ReadyState) -> Response:
    assert state.searcher is not None
    data = await run_in_threadpool(state.searcher.thumbnail, item_id)
    return Response(data, media_type="image/jpeg", headers=CACHE)
