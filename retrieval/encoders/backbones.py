"""The two interfaces every backbone family implements: raw (pre-head) image and text features.

Two optional hooks let a built encoder be loaded again from its ONNX export without importing the model library
(:mod:`retrieval.encoders.bundle`): ``source_files()`` names the files the weights came from (None: unknown, e.g.
random weights or a hub download, and then the encoder is always built in full), and ``fast_tokenizer()`` gives a
Hugging Face ``tokenizers`` description of ``tokenize`` (None: none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


class ImageBackbone(torch.nn.Module):
    """Pixels ``(n, 3, H, W)`` -> raw features ``(n, out_dim)``; ``transform`` maps a PIL image to pixels."""

    out_dim: int
    transform: Callable[[Image.Image], torch.Tensor]

    def source_files(self) -> list[Path] | None:
        """Files (or folders) the weights were loaded from; None when they cannot be named."""
        return None


class TextBackbone(torch.nn.Module):
    """A batch of strings -> raw features ``(n, out_dim)``."""

    out_dim: int

    def tokenize(self, texts: Sequence[str]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def source_files(self) -> list[Path] | None:
        """Files (or folders) the weights and the tokenizer were loaded from; None when they cannot be named."""
        return None

    def fast_tokenizer(self) -> dict[str, Any] | None:
        """``{"tokenizer_json", "max_length", "pad_id", "pad_token", "outputs", "constants"}`` when ``tokenize`` is
        a Hugging Face fast tokenizer padding to the longest text (see :class:`~retrieval.encoders.bundle.
        FastTokenizer`); None otherwise."""
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
