"""The local engine: DataLoader worker processes decode and resize images, this process encodes the batches.

Where the time goes on 2 cores (``make bench-cpu`` measures decode alone, encode alone and both): decoding and
resizing a Flickr8k photo costs ~2 ms of one core in a worker, the default encoder's ONNX Runtime image tower
~10 ms of both cores per image, so the encoder is the bottleneck and the workers only need to stay ahead of it.
JPEGs are decoded with ``draft`` (twice the encoder's input size): phone photos decode ~13x faster, smaller
images are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from indexer.pipeline import EncodedBatch
from indexer.settings import IndexerSettings
from retrieval.datasets import ImageRecord
from retrieval.datasets.loader import ImageLoadDataset, collate_skipping
from retrieval.encoders import Encoder, build_encoder
from retrieval.encoders.spec import EncoderSpec


class LocalEngine:
    """Encodes records in batches of ``settings.batch_for(device)`` with ``settings.workers`` decode processes."""

    def __init__(self, encoder: Encoder, settings: IndexerSettings):
        self.encoder = encoder
        self.settings = settings
        self.spec: EncoderSpec = encoder.spec
        #: the manifest's record of how the vectors were made: this engine, and each tower's engine and precision
        self.build_info: dict[str, Any] = {"engine": "local", "runtime": encoder.runtime_info()}

    @classmethod
    def from_settings(cls, settings: IndexerSettings) -> LocalEngine:
        """Build the encoder ``settings.encoder`` names."""
        return cls(build_encoder(settings.encoder.spec()), settings)

    def identity(self) -> dict[str, Any]:
        return self.encoder.identity()

    def encode(self, records: Sequence[ImageRecord]) -> Iterator[EncodedBatch]:
        if not records:
            return
        device = self.encoder.device.type
        loader = DataLoader(
            ImageLoadDataset(records, self.encoder.image_transform, max_pixels=self.settings.max_image_pixels,
                             draft=self.encoder.decode_draft()),
            batch_size=self.settings.batch_for(device),
            num_workers=self.settings.workers,
            collate_fn=collate_skipping,
            pin_memory=device == "cuda",
            persistent_workers=False,
        )
        for batch in loader:
            yield EncodedBatch(batch.indices, self.encoder.encode_pixels(batch.pixels), batch.failed)
