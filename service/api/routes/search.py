"""Search: by text (POST, GET, batch), by an uploaded image (optionally with text), and by an indexed id. Every form
takes the same options (filters, sort, mode, pages, thresholds, weighted terms); encoding goes through the
micro-batchers on ``app.state``."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from retrieval.errors import BadImage, BadInput
from retrieval.filter_spec import MetaFilter
from service.api.deps import ItemId, ReadyState, ServiceState, require_search_key
from service.api.routes._common import page_response, to_response, warn_truncated
from service.errors import PayloadTooLarge
from service.query import Compose, Mode, SearchSpec, Sort, Term, parse_query
from service.schemas import (
    SYNTAX_HINT,
    BatchSearchRequest,
    BatchSearchResponse,
    ComposeField,
    ErrorResponse,
    ImageSearchOptions,
    MinRelevance,
    MinScore,
    ModeField,
    Offset,
    SearchFilter,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    SortField,
    When,
)
from service.settings import HARD_MAX_FILTER_IDS, HARD_MAX_QUERY_CHARS, HARD_MAX_TOP_K

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown id (the path's, or image_id)"},
    413: {"model": ErrorResponse, "description": "body or upload too large"},
    422: {"description": "invalid query, filter, term, parameter or image (the message names the field)"},
    429: {"model": ErrorResponse, "description": "queue full or rate limited; retry later"},
    503: {"model": ErrorResponse, "description": "not ready"},
}

router = APIRouter(prefix="/api/search", tags=["search"], dependencies=[Depends(require_search_key)], responses=ERRORS)


class SearchParams(BaseModel):
    """The GET form of :class:`SearchRequest`: the same fields as query parameters (the filter's fields flat;
    ``terms`` repeated, each in the query syntax, e.g. ``terms=-0.5:people``)."""

    model_config = ConfigDict(extra="forbid")

    q: str | None = Field(None, min_length=1, max_length=HARD_MAX_QUERY_CHARS, description="free text; " + SYNTAX_HINT)
    terms: list[Annotated[str, Field(min_length=1, max_length=HARD_MAX_QUERY_CHARS)]] | None = Field(
        None, max_length=16, description="more weighted texts, each in the query syntax (2:sunset, -people)")
    image_id: str | None = Field(None, min_length=1, max_length=1024)
    image_weight: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, le=HARD_MAX_TOP_K, description="default: the service's default_top_k")
    offset: int = Offset
    min_score: float | None = MinScore
    min_relevance: float | None = MinRelevance
    sort: Sort = SortField
    mode: Mode = ModeField
    compose: Compose = ComposeField
    path_prefix: str | None = Field(None, min_length=1, max_length=1024)
    taken_after: When | None = Field(None, description="taken at or after (ISO 8601 date or date-time)")
    taken_before: When | None = Field(None, description="taken before (a date: before the end of that day)")
    camera: str | None = Field(None, min_length=1, max_length=200)
    text: str | None = Field(None, min_length=1, max_length=HARD_MAX_QUERY_CHARS)
    ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(None, max_length=HARD_MAX_FILTER_IDS)
    exclude_ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        None, max_length=HARD_MAX_FILTER_IDS)

    FILTER_FIELDS: ClassVar[tuple[str, ...]] = ("path_prefix", "taken_after", "taken_before", "camera", "text", "ids",
                                                "exclude_ids")

    def to_request(self, *, need_something: bool = True) -> SearchRequest | SearchOptions:
        """The body this GET stands for, validated by the same models (errors name the query parameter)."""
        flt = {f: getattr(self, f) for f in self.FILTER_FIELDS if getattr(self, f) is not None}
        terms = []
        for i, t in enumerate(self.terms or []):
            try:
                terms += [{"text": x.text, "weight": x.weight} for x in parse_query(t)]
            except ValueError as exc:
                raise RequestValidationError([{"loc": ("query", "terms", i), "msg": str(exc),
                                               "type": "value_error"}]) from None
        body: dict[str, Any] = {
            "terms": terms or None, "image_id": self.image_id, "image_weight": self.image_weight, "top_k": self.top_k,
            "offset": self.offset, "min_score": self.min_score, "min_relevance": self.min_relevance,
            "sort": self.sort, "mode": self.mode, "compose": self.compose, "filter": flt or None,
        }
        try:
            if need_something:
                return SearchRequest.model_validate({**body, "query": self.q})
            return ImageSearchOptions.model_validate({**body, "query": self.q})
        except ValidationError as exc:
            raise RequestValidationError([_as_query_error(e) for e in exc.errors()]) from None


def _as_query_error(e: Any) -> dict[str, Any]:
    """A body-model error as a query-parameter error: ``("filter", "taken_after")`` -> ``("query", "taken_after")``."""
    loc = [p for p in e.get("loc", ()) if p != "filter"]
    if loc[:1] == ["query"]:
        loc = ["q", *loc[1:]]
    return {"loc": ("query", *loc), "msg": str(e.get("msg")), "type": str(e.get("type"))}


def _k(state: ServiceState, top_k: int | None) -> int:
    """The requested number of results, or the service's ``default_top_k``."""
    return top_k if top_k is not None else state.settings.default_top_k


def to_spec(state: ServiceState, opts: SearchOptions, query: str | None, *, image_id: str | None = None
            ) -> SearchSpec:
    """A validated request -> the searcher's :class:`SearchSpec`."""
    terms = [Term(t.text, t.weight) for t in parse_query(query)] if query else []
    terms += [Term(t.text, t.weight) for t in opts.terms or []]
    return SearchSpec(
        terms=tuple(terms), image_id=image_id or opts.image_id, image_weight=opts.image_weight,
        k=_k(state, opts.top_k), offset=opts.offset, min_score=opts.min_score, min_relevance=opts.min_relevance,
        filter=opts.filter.to_filter() if opts.filter is not None else MetaFilter(), sort=opts.sort, mode=opts.mode,
        compose=opts.compose, label=query,
    )


async def run_spec(state: ServiceState, spec: SearchSpec) -> Any:
    """A spec with texts goes through the text micro-batcher (the encoder); one with only an indexed image needs
    no encoder and runs in the thread pool."""
    assert state.searcher is not None and state.text_runner is not None
    if spec.terms:
        return await state.text_runner.submit(spec)
    result = (await run_in_threadpool(state.searcher.search_specs, [spec]))[0]
    if isinstance(result, BaseException):
        raise result
    return result


async def search_one(request: Request, response: Response, state: ServiceState, body: SearchOptions,
                     query: str | None, t0: float) -> SearchResponse:
    """The POST and GET search: ``body`` with ``query`` -> one page, the truncation warning set on ``response``."""
    spec = to_spec(state, body, query)
    return page_response(request, response, await run_spec(state, spec), spec, t0)


@router.post("", response_model=SearchResponse, summary="Search images by text, weighted terms and/or an indexed image")
async def search(body: SearchRequest, request: Request, response: Response, state: ReadyState) -> SearchResponse:
    return await search_one(request, response, state, body, body.query, time.perf_counter())


@router.get("", response_model=SearchResponse, summary="Search images (query string; the same fields as the POST)")
async def search_get(request: Request, response: Response, state: ReadyState,
                     params: Annotated[SearchParams, Query()]) -> SearchResponse:
    t0 = time.perf_counter()
    return await search_one(request, response, state, params.to_request(), params.q, t0)


@router.post("/batch", response_model=BatchSearchResponse, summary="Several text queries with the same options")
async def search_batch(body: BatchSearchRequest, request: Request, response: Response, state: ReadyState
                       ) -> BatchSearchResponse:
    if len(body.queries) > state.settings.max_batch_queries:
        raise BadInput(f"queries: {len(body.queries)}; the limit is {state.settings.max_batch_queries}")
    t0 = time.perf_counter()
    specs = [to_spec(state, body, q) for q in body.queries]
    # Submitted together, the queries land in the same encoder batch when the batcher is on.
    pages = await asyncio.gather(*(run_spec(state, s) for s in specs))
    took = (time.perf_counter() - t0) * 1000
    warn_truncated(response, pages)
    return BatchSearchResponse(
        results=[to_response(request, p, s, took) for s, p in zip(specs, pages, strict=True)],
        took_ms=round(took, 3),
    )


@router.post("/image", response_model=SearchResponse,
             summary="Search by an uploaded image, optionally combined with text (\"this photo, but in snow\")")
async def search_image(
    request: Request,
    response: Response,
    state: ReadyState,
    file: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF, BMP or TIFF image")],
    options: Annotated[str | None, Form(alias="request", max_length=64 * 1024, description=(
        "JSON with the search options (query, terms, image_weight, compose, top_k, offset, min_score, "
        'min_relevance, filter, sort, mode), e.g. {"query": "in snow", "image_weight": 1}'))] = None,
    top_k: Annotated[int | None, Query(ge=1, le=HARD_MAX_TOP_K, description="overrides the request's top_k")] = None,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="overrides the request's min_score")] = None,
) -> SearchResponse:
    try:
        opts = ImageSearchOptions.model_validate_json(options) if options else ImageSearchOptions()
    except ValidationError as exc:
        raise RequestValidationError([{"loc": ("body", "request", *e.get("loc", ())), "msg": str(e.get("msg")),
                                       "type": str(e.get("type"))} for e in exc.errors()]) from None
    if opts.image_id is not None:
        raise BadInput("image_id: the upload is the image; leave image_id out")
    updates = {k: v for k, v in (("top_k", top_k), ("min_score", min_score)) if v is not None}
    opts = opts.model_copy(update=updates)
    limit = state.settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
    if not data:
        raise BadImage("the upload is empty")
    t0 = time.perf_counter()
    assert state.image_runner is not None
    spec = to_spec(state, opts, opts.query)
    return page_response(request, response, await state.image_runner.submit((data, spec)), spec, t0)


@router.get("/similar/{item_id:path}", response_model=SearchResponse,
            summary="Images similar to an indexed image (\"more like this\"; q adds text to it)")
async def search_similar(request: Request, response: Response, state: ReadyState, item_id: ItemId,
                         params: Annotated[SearchParams, Query()]) -> SearchResponse:
    t0 = time.perf_counter()
    if params.image_id is not None:
        raise BadInput("image_id: the path names the image; leave image_id out")
    opts = params.to_request(need_something=False)
    spec = to_spec(state, opts, params.q, image_id=item_id)
    return page_response(request, response, await run_spec(state, spec), spec, t0)


__all__ = ["SearchFilter", "router"]
