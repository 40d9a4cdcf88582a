"""Request and response models. Field limits here are hard ceilings; settings may lower them (checked in the engine)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from retrieval.filter_spec import MetaFilter
from service.query import MAX_TERMS, MAX_WEIGHT, Compose, Mode, QuerySyntaxError, Sort, parse_query
from service.settings import (
    HARD_MAX_BATCH_QUERIES,
    HARD_MAX_EMBEDDING_INPUTS,
    HARD_MAX_FILTER_IDS,
    HARD_MAX_OFFSET,
    HARD_MAX_QUERY_CHARS,
    HARD_MAX_TOP_K,
)

TopK = Field(None, ge=1, le=HARD_MAX_TOP_K, strict=True,
             description="number of results (an integer, not a string); default: the service's default_top_k")
MinScore = Field(None, ge=-1.0, le=1.0, description="drop results whose cosine score is below this")
MinRelevance = Field(None, ge=0.0, le=1.0, description="drop results whose calibrated relevance is below this "
                     "(needs an encoder with a calibration; see /api/stats `calibrated`)")
Offset = Field(0, ge=0, le=HARD_MAX_OFFSET, strict=True,
               description="results to skip (pages: pass the previous response's next_offset)")
Weight = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)
SortField: Any = Field("score", description="score: best first; date_desc / date_asc: the hits that pass min_score / "
                  "min_relevance (at most max_sort_candidates of them) ordered by taken_at, undated last")
ModeField: Any = Field("vector", description="vector: embeddings only; hybrid: reciprocal-rank fusion of the vector "
                  "ranking with BM25 keyword search over captions and path words")

ComposeField: Any = Field("auto", description="image + text: sum (weighted sum of the embeddings), fusion (the "
                         "service's trained fusion head), auto (the head when there is one)")

#: The one-line hint for the query syntax (also on the page).
SYNTAX_HINT = ("words are one phrase; -word or - words subtract, +word adds, 2:word weighs 2x; "
               '"quotes" keep words literal')


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("the query is empty or only whitespace")
    return value


def _check_syntax(value: str | None) -> str | None:
    if value is None:
        return None
    _not_blank(value)
    try:
        terms = parse_query(value)
    except QuerySyntaxError as exc:
        raise ValueError(str(exc)) from None
    if not terms:
        raise ValueError("the query has no words")
    return value


def _parse_when(value: object) -> object:
    """``YYYY-MM-DD`` is a date (a whole day), anything else ISO 8601 a date-time; other types go to pydantic."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return date.fromisoformat(text)
            return datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date (2019-07-04) or date-time (2019-07-04T18:30)"
                             ) from None
    return value


#: A date (a whole day) or a date-time; a time zone is dropped (times are wall-clock).
When = Annotated[date | datetime, BeforeValidator(_parse_when)]


class SearchFilter(BaseModel):
    """Metadata conditions; every one given must hold. The top-k is taken within the rows that pass."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: str | None = Field(None, min_length=1, max_length=1024,
                                    description='relative path starts with this ("2019/" = the folder 2019 and below)')
    taken_after: When | None = Field(
        None, description="taken at or after (ISO 8601 date or date-time; a time zone is ignored: wall clock)")
    taken_before: When | None = Field(
        None, description="taken before this date-time; a date means before the end of that day")
    camera: str | None = Field(None, min_length=1, max_length=200,
                               description="case-insensitive part of the camera make and model")
    text: str | None = Field(None, min_length=1, max_length=HARD_MAX_QUERY_CHARS,
                             description="every word appears in the captions or the path (keyword filter)")
    ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        None, max_length=HARD_MAX_FILTER_IDS, description="only these ids")
    exclude_ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        None, max_length=HARD_MAX_FILTER_IDS, description="never these ids")

    @field_validator("text")
    @classmethod
    def _has_words(cls, value: str | None) -> str | None:
        if value is not None and not any(ch.isalnum() for ch in value):
            raise ValueError("the text filter has no words")
        return value

    @model_validator(mode="after")
    def _dates_in_order(self) -> SearchFilter:
        lo, hi = self.after_iso(), self.before_iso()
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError("taken_after must be earlier than taken_before")
        return self

    def after_iso(self) -> str | None:
        """``taken_after`` as ``YYYY-MM-DDTHH:MM:SS`` (inclusive)."""
        return _iso(self.taken_after, end_of_day=False)

    def before_iso(self) -> str | None:
        """``taken_before`` as ``YYYY-MM-DDTHH:MM:SS`` (exclusive; a bare date: the next midnight)."""
        return _iso(self.taken_before, end_of_day=True)

    def to_filter(self) -> MetaFilter:
        return MetaFilter(path_prefix=self.path_prefix, taken_after=self.after_iso(), taken_before=self.before_iso(),
                      camera=self.camera, text=self.text, ids=tuple(self.ids) if self.ids is not None else None,
                      exclude_ids=tuple(self.exclude_ids) if self.exclude_ids else None)


def _iso(value: datetime | date | None, *, end_of_day: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None, microsecond=0).isoformat(timespec="seconds")
    if end_of_day:
        value = value + timedelta(days=1)
    return datetime(value.year, value.month, value.day).isoformat(timespec="seconds")


class QueryTerm(BaseModel):
    """One weighted text: ``{"text": "people", "weight": -0.5}`` searches away from people."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1, max_length=HARD_MAX_QUERY_CHARS)
    weight: float = Weight

    _check_text = field_validator("text")(_not_blank)


class SearchOptions(BaseModel):
    """Fields every search form shares (POST, GET, batch, upload, similar)."""

    model_config = ConfigDict(extra="forbid")

    terms: list[QueryTerm] | None = Field(None, max_length=MAX_TERMS,
                                          description="weighted texts, added to the query's own terms")
    image_id: str | None = Field(None, min_length=1, max_length=1024,
                                 description="an indexed image whose vector joins the query (\"this photo, but ...\")")
    image_weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False,
                                description="weight of the image (image_id or the upload) against the texts")
    top_k: int | None = TopK
    offset: int = Offset
    min_score: float | None = MinScore
    min_relevance: float | None = MinRelevance
    filter: SearchFilter | None = None
    sort: Sort = SortField
    mode: Mode = ModeField
    compose: Compose = ComposeField


class SearchRequest(SearchOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"query": "a dog in the snow"},
        {"query": "dog on a beach -people", "top_k": 24, "filter": {"path_prefix": "2019/",
                                                                   "taken_after": "2019-06-01"}},
        {"image_id": "beach/IMG_0042.jpg", "query": "in snow", "image_weight": 1.0},
        {"query": "sunset", "sort": "date_desc", "min_score": 0.2, "offset": 24},
    ]})

    query: str | None = Field(None, min_length=1, max_length=HARD_MAX_QUERY_CHARS,
                              description="free text; " + SYNTAX_HINT)

    _check_query = field_validator("query")(_check_syntax)

    @model_validator(mode="after")
    def _something_to_search(self) -> SearchRequest:
        if self.query is None and not self.terms and self.image_id is None:
            raise ValueError("give a query, terms or an image_id")
        return self


class BatchSearchRequest(SearchOptions):
    """Several text queries with the same options; each query may use the arithmetic syntax."""

    queries: list[str] = Field(..., min_length=1, max_length=HARD_MAX_BATCH_QUERIES)

    @field_validator("queries")
    @classmethod
    def _check_queries(cls, value: list[str]) -> list[str]:
        for i, q in enumerate(value):
            if len(q) > HARD_MAX_QUERY_CHARS:
                raise ValueError(f"queries[{i}] is longer than {HARD_MAX_QUERY_CHARS} characters")
            try:
                _check_syntax(q)
            except ValueError as exc:
                raise ValueError(f"queries[{i}]: {exc}") from None
        return value


class ImageSearchOptions(SearchOptions):
    """The ``request`` form field of an image upload (JSON): the shared options plus an optional text query
    combined with the uploaded image (``image_weight`` weighs the image)."""

    query: str | None = Field(None, min_length=1, max_length=HARD_MAX_QUERY_CHARS, description=SYNTAX_HINT)

    _check_query = field_validator("query")(_check_syntax)


class HitMetadata(BaseModel):
    """What the index holds about a hit: always ``path``, ``folder``, ``captions``; the file facts where known; and
    any extra fields of the captions file."""

    model_config = ConfigDict(extra="allow")

    path: str
    folder: str = Field(..., description='the path\'s folder ("" at the top level)')
    captions: list[str] = Field(default_factory=list)
    taken_at: str | None = Field(None, description="ISO 8601 wall-clock time (EXIF, else the file's mtime in UTC)")
    taken_at_source: str | None = Field(None, description='"exif" or "mtime"')
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    camera: str | None = Field(None, description="camera make and model")


class SearchHit(BaseModel):
    rank: int = Field(..., ge=1, description="position in the whole answer (offset + 1 for a page's first hit)")
    id: str
    score: float = Field(..., description="cosine similarity to the query vector, higher is closer")
    relevance: float | None = Field(None, ge=0.0, le=1.0, description="calibrated probability that the hit is "
                                    "relevant (None: the encoder has no calibration)")
    fused_score: float | None = Field(None, description="hybrid mode: the reciprocal-rank-fusion score it is ranked by")
    image_url: str
    thumb_url: str
    metadata: HitMetadata


class TermOut(BaseModel):
    text: str
    weight: float


class SearchResponse(BaseModel):
    query: str | None = Field(None, description="the text query as given (None for image and similar searches)")
    terms: list[TermOut] = Field(default_factory=list, description="the weighted texts the query was read as")
    image_id: str | None = None
    top_k: int
    offset: int = 0
    next_offset: int | None = Field(None, description="offset of the next page; null at the end")
    sort: Sort = "score"
    mode: Mode = "vector"
    compose: Literal["sum", "fusion"] = Field("sum", description="how the image and the texts were combined")
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
    calibrated: bool = Field(False, description="hits carry a calibrated relevance (min_relevance works)")
    fusion: bool = Field(False, description="a trained fusion head composes image + text queries")
    default_min_relevance: float | None = Field(
        None, description="the page hides hits below this relevance by default (None: not calibrated)")
    syntax_hint: str = Field(SYNTAX_HINT, description="the query syntax in one line")


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


# --------------------------------------------------------------------------------------------------------------
# Library: folders, dates, near-duplicates
# --------------------------------------------------------------------------------------------------------------


class FolderCount(BaseModel):
    folder: str = Field(..., description='relative folder ("" = the top level)')
    count: int = Field(..., description="images directly in it")


class LibraryResponse(BaseModel):
    count: int
    folders: list[FolderCount]
    earliest: str | None = Field(None, description="earliest taken_at")
    latest: str | None = Field(None, description="latest taken_at")


class DuplicateItem(BaseModel):
    id: str
    score: float = Field(..., description="cosine to the cluster's representative (1 for itself)")
    image_url: str
    thumb_url: str


class DuplicateCluster(BaseModel):
    representative: str = Field(..., description="the member linked to the most others")
    size: int
    items: list[DuplicateItem]


class DuplicatesResponse(BaseModel):
    threshold: float
    total: int = Field(..., description="clusters in all")
    offset: int
    next_offset: int | None
    clusters: list[DuplicateCluster]
    generation: int = Field(..., description="the index snapshot they were computed on")
    took_ms: float


# --------------------------------------------------------------------------------------------------------------
# OpenAI-compatible embeddings
# --------------------------------------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` as OpenAI's API takes it. Each input is a text, or an image as a base64 data URL
    (``data:image/jpeg;base64,...``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"input": ["a dog in the snow", "data:image/png;base64,iVBORw0KGgo..."], "model": "default"}]})

    input: str | list[Annotated[str, Field(min_length=1)]] = Field(..., description="one input or a list of them")
    model: str = Field(..., min_length=1, max_length=200, description="see GET /v1/models")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, base64-encoded (what the OpenAI client asks for)")
    dimensions: int | None = Field(None, ge=1, description="must equal the model's dimension when given")
    user: str | None = Field(None, max_length=256, description="ignored")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("give at least one input")
        if len(items) > HARD_MAX_EMBEDDING_INPUTS:
            raise ValueError(f"{len(items)} inputs; the limit is {HARD_MAX_EMBEDDING_INPUTS}")
        for i, item in enumerate(items):
            if not item.strip():
                raise ValueError(f"input[{i}] is empty")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(..., description="words in the text inputs (approximate)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "retrieval"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
