"""The two interfaces every backbone family implements: raw (pre-head) image and text features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


class ImageBackbone(torch.nn.Module):
    """Pixels ``(n, 3, H, W)`` -> raw features ``(n, out_dim)``; ``transform`` maps a PIL image to pixels."""

    out_dim: int
    transform: Callable[[Image.Image], torch.Tensor]


class TextBackbone(torch.nn.Module):
    """A batch of strings -> raw features ``(n, out_dim)``."""

    out_dim: int

    def tokenize(self, texts: Sequence[str]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def token_limit(self) -> int | None:
        """Tokens the model reads of a text (special tokens included); the rest is cut off. None: unknown."""
        return None

    def token_count(self, text: str) -> int | None:
        """Tokens ``text`` makes (special tokens included), to compare with :meth:`token_limit`. None: unknown."""
        return None

    def forward(self, tokens: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@runtime_checkable
class StagedImageBackbone(Protocol):
    """An image backbone that can stop after a block and resume from there (EfficientNet-Lite): what partial
    unfreezing on cached activations needs. ``cut`` = number of blocks run before the activation."""

    def features_until(self, pixels: torch.Tensor, cut: int) -> torch.Tensor: ...

    def blocks_between(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...

    def features_from(self, acts: torch.Tensor, cut: int) -> torch.Tensor: ...

    def tail_modules(self, cut: int) -> torch.nn.ModuleDict: ...
