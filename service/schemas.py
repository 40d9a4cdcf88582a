"""Request and response models. Field limits here are hard ceilings; settings may lower them (checked in the engine)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.settings import HARD_MAX_BATCH_QUERIES, HARD_MAX_QUERY_CHARS, HARD_MAX_TOP_K

TopK = Field(None, ge=1, le=HARD_MAX_TOP_K, strict=True,
             description="number of results (an integer, not a string); default: the service's default_top_k")
MinScore = Field(None, ge=-1.0, le=1.0, description="drop results whose cosine score is below this")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("the query is empty or only whitespace")
    return value


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "a dog in the snow"}]})

    query: str = Field(..., min_length=1, max_length=HARD_MAX_QUERY_CHARS, description="free text")
    top_k: int | None = TopK
    min_score: float | None = MinScore

    _check_query = field_validator("query")(_not_blank)


class BatchSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(..., min_length=1, max_length=HARD_MAX_BATCH_QUERIES)
    top_k: int | None = TopK
    min_score: float | None = MinScore

    @field_validator("queries")
    @classmethod
    def _check_queries(cls, value: list[str]) -> list[str]:
        for q in value:
            if len(q) > HARD_MAX_QUERY_CHARS:
                raise ValueError(f"a query is longer than {HARD_MAX_QUERY_CHARS} characters")
            _not_blank(q)
        return value


class SearchHit(BaseModel):
    rank: int = Field(..., ge=1)
    id: str
    score: float = Field(..., description="cosine similarity, higher is closer")
    image_url: str
    thumb_url: str
    metadata: dict[str, Any] = Field(default_factory=dict, description="captions and other indexed fields")


class SearchResponse(BaseModel):
    query: str | None = Field(None, description="the text query (None for image and similar searches)")
    top_k: int
    results: list[SearchHit]
    took_ms: float


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse]
    took_ms: float


class CacheStats(BaseModel):
    size: int
    hits: int
    misses: int


class QueueStats(BaseModel):
    batching: bool
    depth: int
    submitted: int
    rejected: int
    batches: int
    mean_batch: float
    max_batch_seen: int


class StatsResponse(BaseModel):
    count: int = Field(..., description="indexed images")
    dim: int
    encoder: str
    index_key: str
    created_at: str
    index_dir: str
    generation: int = Field(..., description="increments on every reload")
    loaded_at: float
    query_cache: CacheStats
    thumb_cache: CacheStats
    text_queue: QueueStats
    image_queue: QueueStats
    examples: list[str] = Field(default_factory=list, description="example queries for the web page")
    limits: dict[str, int]


class HealthResponse(BaseModel):
    status: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index_dir: str | None = Field(
        None, min_length=1, max_length=4096, description="index folder to load; default: reload the current one"
    )


class ReloadResponse(BaseModel):
    index_dir: str
    count: int
    generation: int
    previous_generation: int
    took_ms: float


class ErrorResponse(BaseModel):
    error: str = Field(..., description="error class, e.g. BadQuery, UnknownId, Overloaded")
    detail: str
