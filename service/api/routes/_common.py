"""Helpers shared by the route modules: turning engine pages into response models."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import Request

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
