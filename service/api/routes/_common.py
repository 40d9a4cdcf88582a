"""Helpers shared by the route modules: turning engine hits into response models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from fastapi import Request

from service.schemas import SearchHit, SearchResponse


def image_url(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/images/{quote(item_id, safe='')}"


def thumb_url(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/thumbs/{quote(item_id, safe='')}"


def to_response(request: Request, hits: Sequence[Any], top_k: int, took_ms: float, query: str | None = None
                ) -> SearchResponse:
    """Engine :class:`~service.engine.Hit` objects -> :class:`SearchResponse`."""
    return SearchResponse(
        query=query,
        top_k=top_k,
        took_ms=round(took_ms, 3),
        results=[
            SearchHit(
                rank=h.rank,
                id=h.id,
                score=round(h.score, 6),
                image_url=image_url(request, h.id),
                thumb_url=thumb_url(request, h.id),
                metadata=h.metadata,
            )
            for h in hits
        ],
    )
