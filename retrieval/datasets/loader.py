"""Feeding a ``DataLoader``: a ``Dataset`` that decodes images and never raises for a bad one, and its collate
function (failed images come back in ``Batch.failed`` as (index, reason))."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval.datasets.records import ImageRecord
from retrieval.errors import BadImage, BadInput
from retrieval.images import DEFAULT_MAX_PIXELS, load_image


@dataclass(frozen=True)
class LoadedItem:
    """One dataset item: ``pixels`` (float tensor (3, H, W)) on success, else ``None`` and ``error`` (reason)."""

    index: int
    pixels: torch.Tensor | None
    error: str | None


@dataclass
class Batch:
    """A collated batch. ``pixels`` is float (n, 3, H, W) for the ``n = len(indices)`` images that loaded
    (shape (0, 3, 0, 0) when none did); ``failed`` lists (dataset index, reason) of those that did not."""

    indices: list[int]
    pixels: torch.Tensor
    failed: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(self.indices, self.pixels.pin_memory(), self.failed)


class ImageLoadDataset(Dataset[LoadedItem]):
    """Decodes ``records[i].path`` with :func:`~retrieval.images.load_image` and applies ``transform``.

    ``draft`` ``(width, height)``: let the JPEG decoder scale large photos down on the way in, never below that
    size (see :func:`~retrieval.images.load_image`); None decodes at full size.

    Never raises for a bad file: item ``i`` is ``LoadedItem(i, None, reason)`` when the image is unreadable,
    truncated or larger than ``max_pixels``. Picklable (for ``num_workers > 0``) when ``transform`` is.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: tuple[int, int] | None = None,
    ) -> None:
        self.paths = [str(r.path) for r in records]
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft = draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> LoadedItem:
        try:
            image = load_image(self.paths[i], max_pixels=self.max_pixels, draft=self.draft)
        except BadImage as exc:
            return LoadedItem(i, None, str(exc))
        pixels = self.transform(image)
        return LoadedItem(i, pixels, None)


def collate_skipping(items: Sequence[LoadedItem]) -> Batch:
    """``collate_fn`` for :class:`ImageLoadDataset`: stacks the loaded images, lists the failed ones."""
    ok = [it for it in items if it.pixels is not None]
    failed = [(int(it.index), it.error or "unknown error") for it in items if it.pixels is None]
    if ok:
        shapes = {tuple(it.pixels.shape) for it in ok if it.pixels is not None}
        if len(shapes) != 1:
            raise BadInput(f"the transform produced tensors of different shapes {sorted(shapes)}; it must resize")
        pixels = torch.stack([it.pixels for it in ok if it.pixels is not None]).float()
    else:
        pixels = torch.zeros((0, 3, 0, 0), dtype=torch.float32)
    return Batch(indices=[int(it.index) for it in ok], pixels=pixels, failed=failed)
