"""The service's one settings class. Environment: ``SERVICE_INDEX_DIR=/idx``, ``SERVICE_ENCODER__NAME=default``,
``SERVICE_RATE_LIMIT__PER_SECOND=20``, ``SERVICE_API_KEYS='["k1","k2"]'`` ... Built when asked for, never at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.settings import EncoderSettings

#: Hard ceilings that appear in the OpenAPI schema; settings may only lower them.
HARD_MAX_QUERY_CHARS = 2000
HARD_MAX_TOP_K = 1000
HARD_MAX_BATCH_QUERIES = 64
#: Deepest result a page may start at (offset), and most ids a filter may list.
HARD_MAX_OFFSET = 10_000
HARD_MAX_FILTER_IDS = 1_000
#: Most inputs one POST /v1/embeddings may carry.
HARD_MAX_EMBEDDING_INPUTS = 2048


class RateLimitSettings(BaseModel):
    """Token bucket per client: a configured API key's own bucket, else the client address (the forwarded one only
    behind ``trusted_proxies``). Off by default."""

    enabled: bool = False
    per_second: float = Field(default=20.0, gt=0, description="tokens added per second")
    burst: int = Field(default=40, ge=1, description="bucket size")
    max_clients: int = Field(default=10_000, ge=1, description="buckets kept (least recently seen are dropped)")


class ServiceSettings(BaseSettings):
    """Everything the search service needs. CLI flags of ``retrieval-serve`` map onto these fields."""

    model_config = SettingsConfigDict(env_prefix="SERVICE_", env_nested_delimiter="__", extra="ignore")

    index_dir: Path = Field(default=Path("index"), description="index folder written by the indexer")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)  # type: ignore[arg-type]  # core Field style
    image_root: Path | None = Field(
        default=None, description="image folder; default: the manifest's build.source_root"
    )
    fusion_head: Path | None = Field(
        default=None, description="fusion head checkpoint (python -m trainer fusion) for image + text queries"
    )

    # micro-batching of text (and image) encoding
    batching: bool = Field(
        default=True, description="False: every request runs the encoder on its own (for comparison)"
    )
    max_batch: int = Field(default=32, ge=1, le=1024, description="queries per encoder call")
    max_wait_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="how long the batcher waits to fill a batch; 0: it takes what queued up while the encoder was busy "
        "(no wait when idle, full batches under load)",
    )
    queue_size: int = Field(default=256, ge=1, description="queued requests before 429")

    encode_workers: int | None = Field(
        default=None, ge=1, le=64,
        description="encoder batches run at once (None: the cores / the encoder's intra-op threads); more than one "
        "keeps every core encoding under load while a single query still gets the encoder's threads",
    )
    decode_threads: int = Field(default=2, ge=1, le=64, description="threads decoding uploaded images")
    decode_queue: int = Field(default=32, ge=1, description="uploads being decoded or waiting to be, before 429")
    search_threads: int = Field(default=1, ge=1, le=64, description="threads running index searches")
    search_omp_threads: int = Field(
        default=1, ge=1, le=256,
        description="faiss OpenMP threads per search thread; more only helps large batches over large indexes, and "
        "idle OpenMP workers spin-wait after every search",
    )

    cache_size: int = Field(default=4096, ge=0, description="LRU query-embedding cache entries (0: off)")
    thumb_cache_size: int = Field(default=1024, ge=0, description="thumbnails kept in memory")
    thumb_size: int = Field(default=256, ge=16, le=1024, description="longest side of a thumbnail, pixels")

    # input limits
    max_query_chars: int = Field(default=512, ge=1, le=HARD_MAX_QUERY_CHARS)
    max_top_k: int = Field(default=100, ge=1, le=HARD_MAX_TOP_K)
    default_top_k: int = Field(default=12, ge=1, le=HARD_MAX_TOP_K)
    max_batch_queries: int = Field(default=32, ge=1, le=HARD_MAX_BATCH_QUERIES)
    max_offset: int = Field(default=1000, ge=0, le=HARD_MAX_OFFSET, description="deepest page start (offset)")
    max_sort_candidates: int = Field(
        default=1000, ge=1, le=HARD_MAX_OFFSET + HARD_MAX_TOP_K,
        description="a date sort orders at most this many best hits (those passing min_score / min_relevance)",
    )
    hybrid_pool: int = Field(default=200, ge=1, le=10_000,
                             description="hybrid mode: candidates taken from each ranking before the fusion")
    default_min_relevance: float = Field(
        default=0.005, ge=0.0, le=1.0,
        description="the page hides hits below this calibrated relevance (a 'show all' toggle reveals them). The "
                    "shipped calibration is P(this is the photo a caption was written for), with one such photo per "
                    "caption, so even good hits score low: on Flickr8k dev the best hit's median is 0.10, the 10th's "
                    "0.02; at 0.005, 90% of the 5,000 dev captions' own photos pass",
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="image upload limit")
    max_embedding_inputs: int = Field(default=256, ge=1, le=HARD_MAX_EMBEDDING_INPUTS,
                                      description="inputs per POST /v1/embeddings")
    max_embeddings_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024,
        description="body limit of POST /v1/embeddings (images come as base64 data URLs)")
    min_duplicates_threshold: float = Field(
        default=0.8, ge=-1.0, le=1.0,
        description="lowest threshold GET /api/duplicates accepts (lower ones link most of a collection)")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="limit for every other request body")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="decoded pixels above this are refused (bombs)"
    )

    # access
    api_keys: list[SecretStr] = Field(default_factory=list, description="X-API-Key values; empty: no keys")
    protect_search: bool = Field(
        default=False, description="with api_keys: require a key on every /api route, not only admin"
    )
    cors_origins: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or networks (10.0.0.0/8) of reverse proxies whose X-Forwarded-For is believed",
    )
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {entry!r} is not an address or network ({exc})") from exc
        return value

    # process
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    keep_alive_s: int = Field(
        default=75, ge=1, le=3600,
        description="idle keep-alive timeout; longer than clients' and proxies' idle timeouts (nginx: 60 s), so the "
        "server never closes a connection a client is about to reuse",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True
    access_log: bool = True
    warmup: bool = True
    watch_index_s: float | None = Field(
        default=None, gt=0, le=3600,
        description="check the index folder every N seconds and hot-reload a new version (e.g. after "
        "`indexer sync`); None: only POST /api/admin/reload",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=256,
        description="torch intra-op threads (None: torch's default). On a small shared CPU, 1 leaves a core to the "
        "event loop and avoids OpenMP spin-wait thrashing",
    )
    example_queries: list[str] = Field(
        default_factory=lambda: [
            "a dog running through the snow",
            "children playing in a fountain",
            "a man riding a bike on a dirt track",
            "a surfer on a big wave",
        ]
    )
