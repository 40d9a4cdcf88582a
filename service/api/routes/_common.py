"""Helpers shared by the route modules: turning engine pages into response models."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response

from service.query import SearchSpec
from service.schemas import HitMetadata, SearchHit, SearchResponse, TermOut


def image_url(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/images/{quote(item_id, safe='')}"


def thumb_url(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/thumbs/{quote(item_id, safe='')}"


def to_response(request: Request, page: Any, spec: SearchSpec, took_ms: float) -> SearchResponse:
    """An engine :class:`~service.searching.Page` for ``spec`` -> :class:`SearchResponse`."""
    return SearchResponse(
        query=spec.label,
        terms=[TermOut(text=t.text, weight=t.weight) for t in spec.terms],
        image_id=spec.image_id,
        top_k=spec.k,
        offset=spec.offset,
        next_offset=page.next_offset,
        sort=spec.sort,
        mode=spec.mode,
        compose=page.compose,
        took_ms=round(took_ms, 3),
        results=[
            SearchHit(
                rank=h.rank,
                id=h.id,
                score=round(h.score, 6),
                relevance=None if h.relevance is None else round(min(max(h.relevance, 0.0), 1.0), 6),
                fused_score=None if h.fused_score is None else round(h.fused_score, 8),
                image_url=image_url(request, h.id),
                thumb_url=thumb_url(request, h.id),
                metadata=HitMetadata(**h.metadata),
            )
            for h in page.hits
        ],
    )


def page_response(request: Request, response: Response, page: Any, spec: SearchSpec, t0: float) -> SearchResponse:
    """A single search's answer: :func:`warn_truncated` on ``response``, then :func:`to_response` timed from
    ``t0`` (``time.perf_counter()`` when the request began)."""
    warn_truncated(response, [page])
    return to_response(request, page, spec, (time.perf_counter() - t0) * 1000)


#: Response header naming the queries that were longer than the text model reads (``0`` for a single query).
TRUNCATED_HEADER = "X-Query-Truncated"


def warn_truncated(response: Response, results: Sequence[Any]) -> None:
    """Set a ``Warning`` (299) and :data:`TRUNCATED_HEADER` when any query's answer says it was cut to the text
    model's token limit (``truncated_to`` of :class:`service.searching.Page`)."""
    limits = [getattr(hits, "truncated_to", None) for hits in results]
    cut = [i for i, limit in enumerate(limits) if limit]
    if not cut:
        return
    which = "the query is" if len(results) == 1 else f"queries {', '.join(map(str, cut))} are"
    response.headers["Warning"] = (f'299 - "{which} longer than the text model reads ({limits[cut[0]]} tokens): '
                                   f'only the first {limits[cut[0]]} tokens were used"')
    response.headers[TRUNCATED_HEADER] = ",".join(map(str, cut))
