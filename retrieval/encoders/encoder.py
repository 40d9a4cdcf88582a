"""The encoder: backbones + optional heads. Every public ``encode_*`` returns L2-normalised float32 ``(n, dim)``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.calibration import Calibration
from retrieval.encoders.backbones import ImageBackbone, TextBackbone
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import BadInput


class Encoder:
    """Backbones + optional heads. All public ``encode_*`` return L2-normalised float32 ``(n, dim)`` arrays.

    The trainer uses the two halves separately: ``image_features``/``text_features`` give raw backbone features
    (float32 tensors), ``project_image``/``project_text`` apply the heads and normalise.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        image: ImageBackbone,
        text: TextBackbone,
        image_head: torch.nn.Module | None,
        text_head: torch.nn.Module | None,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        calibration: Calibration | None = None,
    ):
        self.spec = spec
        #: score -> probability of relevance, shipped with the heads (None: the encoder has no calibration)
        self.calibration = calibration
        #: True when the head checkpoint replaced backbone weights (partial unfreezing): raw image features then
        #: depend on the heads file, and feature caches must key on it
        self.image_tuned = False
        self.image_backbone = image.to(device=device, dtype=dtype).eval()
        self.text_backbone = text.to(device=device, dtype=dtype).eval()
        # Heads are small: keep them in float32 for exactness.
        self.image_head = image_head.to(device).float().eval() if image_head is not None else None
        self.text_head = text_head.to(device).float().eval() if text_head is not None else None
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once

    # -- identity ------------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the manifest stores and the searcher compares (see :meth:`EncoderSpec.identity`), plus ``dim``."""
        return {**self.spec.identity(), "dim": self.dim}

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> pixel tensor; picklable, for DataLoader workers."""
        return self.image_backbone.transform

    # -- raw features --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` pixels -> ``(n, d_img_raw)`` float32 backbone features (no head, not normalised)."""
        with self._lock:
            return self.image_backbone(pixels.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``n`` strings -> ``(n, d_txt_raw)`` float32 backbone features."""
        check_texts(texts)
        with self._lock:
            return self.text_backbone(self.text_backbone.tokenize(texts)).float()

    # -- heads ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def project_image(self, feats: torch.Tensor) -> np.ndarray:
        """Raw image features -> normalised ``(n, dim)`` float32 array."""
        out = self.image_head(feats.to(self.device).float()) if self.image_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def project_text(self, feats: torch.Tensor) -> np.ndarray:
        """Raw text features -> normalised ``(n, dim)`` float32 array."""
        out = self.text_head(feats.to(self.device).float()) if self.text_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    # -- end to end ----------------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """``(n, 3, H, W)`` preprocessed pixels -> ``(n, dim)`` float32, L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.project_image(self.image_features(pixels))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> ``(n, dim)`` float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.image_transform(im) for im in images]))

    def text_truncation(self, texts: Sequence[str]) -> list[int | None]:
        """For each text: the model's token limit when the text is longer than that (only that many tokens are
        encoded, the rest is cut off), else None."""
        check_texts(texts)
        limit = self.text_backbone.token_limit()
        if limit is None:
            return [None] * len(texts)
        with self._lock:  # tokenizers are not all safe to call from several threads at once
            counts = [self.text_backbone.token_count(t) for t in texts]
        return [limit if n is not None and n > limit else None for n in counts]

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> ``(n, dim)`` float32, L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.project_text(self.text_features(texts))


def check_texts(texts: Sequence[str]) -> None:
    """:class:`BadInput` unless ``texts`` is a list of strings (a bare string is refused)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise BadInput("texts must be a list of strings")
