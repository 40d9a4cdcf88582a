"""The indexing job's settings. Environment: ``INDEXER_BATCH_SIZE=64``, ``INDEXER_ENCODER__NAME=clip-vit-b-32`` ..."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.images import DEFAULT_MAX_PIXELS
from retrieval.settings import EncoderSettings


class IndexerSettings(BaseSettings):
    """The indexing job. Environment: ``INDEXER_BATCH_SIZE=64``, ``INDEXER_ENCODER__NAME=clip-vit-b-32`` ..."""

    model_config = SettingsConfigDict(env_prefix="INDEXER_", env_nested_delimiter="__", extra="ignore")

    encoder: EncoderSettings = EncoderSettings()
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="images per encoder call (default: 16 on CPU, 128 on CUDA)"
    )
    workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes decoding images")
    shard_size: int = Field(1024, ge=1, description="vectors per on-disk shard (the unit of resume)")
    index_key: str | None = Field(None, description="FAISS index factory key; None chooses from size and budget")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="RAM budget for the index when choosing its type (default: the machine's memory)"
    )
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are skipped as bombs")
    progress: bool = True

    def batch_for(self, device_type: str) -> int:
        """The batch size to use on a device: the configured one, else 16 on CPU and 128 on CUDA.

        On 2 CPU cores EfficientNet-Lite0 in bf16 peaks at batches of 8-16 (115-150 images/s) and falls at 32
        (~95/s) as activations leave the cache; GPUs want large batches.
        """
        return self.batch_size or (128 if device_type == "cuda" else 16)
