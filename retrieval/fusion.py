"""A trainable fusion head for composed queries ("this photo, but with long sleeves"): additive attention over the
reference image's embedding and the change text's embedding, in the index's embedding space.

For a reference image embedding ``v`` and a text embedding ``t`` (both ``(n, d)`` float32, unit rows from the same
encoder as the index)::

    h_v = W_v v,  h_t = W_t t                                 (two d x d projections)
    e_i = u^T tanh(W_a h_i + b)   for i in {v, t}             (additive (Bahdanau) attention scores)
    (a_v, a_t) = softmax(e_v, e_t)                            (one pair of weights per query)
    q = normalize(v + a_v h_v + a_t h_t)                      (a residual on the image; W_v, W_t start at zero)

so an untrained head returns the reference image itself, and training moves it toward the target images. The
checkpoint (``torch.save`` dict: format, config, state, extra) records the encoder identity it was trained for;
:func:`load_fusion` refuses another encoder's space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from retrieval.checkpoints import load_checkpoint, save_checkpoint
from retrieval.errors import IndexEncoderMismatch

FUSION_FORMAT = 1


class FusionConfig(BaseModel):
    """Shape of a fusion head: embedding ``dim`` in and out, attention ``hidden`` size, and the identity of the
    encoder whose embeddings it composes (keys of :meth:`retrieval.encoders.Encoder.identity`)."""

    model_config = ConfigDict(extra="forbid")

    dim: int
    hidden: int = 256
    encoder: dict[str, Any] = {}


class AdditiveAttentionFusion(nn.Module):
    """See the module docstring. ``forward(v, t)``: ``(n, d)`` and ``(n, d)`` -> ``(n, d)`` unit rows."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        d, h = config.dim, config.hidden
        self.image_proj = nn.Linear(d, d)
        self.text_proj = nn.Linear(d, d)
        for lin in (self.image_proj, self.text_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.attn = nn.Linear(d, h)
        self.score = nn.Linear(h, 1, bias=False)

    def attention(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projected inputs ``h_v``, ``h_t`` and the weights ``(n, 2)`` (image, text)."""
        hv, ht = self.image_proj(v), self.text_proj(t)
        stacked = torch.stack([hv, ht], dim=1)  # (n, 2, d)
        e = self.score(torch.tanh(self.attn(stacked))).squeeze(-1)  # (n, 2)
        return hv, ht, torch.softmax(e, dim=1)

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        hv, ht, a = self.attention(v, t)
        return F.normalize(v + a[:, :1] * hv + a[:, 1:] * ht, dim=-1)

    @torch.inference_mode()
    def compose(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """numpy in and out: ``(n, d)`` or ``(d,)`` float32 image and text embeddings -> ``(n, d)`` float32."""
        v = torch.as_tensor(np.atleast_2d(image), dtype=torch.float32)
        t = torch.as_tensor(np.atleast_2d(text), dtype=torch.float32)
        return self(v, t).numpy().astype(np.float32, copy=False)


def save_fusion(head: AdditiveAttentionFusion, path: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write a fusion checkpoint atomically; returns its SHA-256."""
    return save_checkpoint({"format": FUSION_FORMAT, "config": head.config.model_dump(), "state": head.state_dict(),
                            "extra": extra or {}}, path)


def load_fusion(path: str | Path, expected_encoder: dict[str, Any] | None = None
                ) -> tuple[AdditiveAttentionFusion, dict[str, Any]]:
    """Load a fusion checkpoint (eval mode) and its ``extra``. :class:`EncoderUnavailable` for a missing or damaged
    file; :class:`IndexEncoderMismatch` when ``expected_encoder`` differs from the encoder it was trained for."""

    def build(blob: dict[str, Any]) -> tuple[AdditiveAttentionFusion, dict[str, Any]]:
        head = AdditiveAttentionFusion(FusionConfig(**blob["config"]))
        head.load_state_dict(blob["state"])
        return head, dict(blob.get("extra") or {})

    head, extra = load_checkpoint(path, FUSION_FORMAT, "fusion checkpoint", build, missing="fusion head not found")
    trained_for = head.config.encoder
    if expected_encoder is not None and trained_for:
        differing = sorted(k for k in {*trained_for, *expected_encoder}
                           if trained_for.get(k) != expected_encoder.get(k))
        if differing:
            raise IndexEncoderMismatch(f"{path} composes embeddings of another encoder (differs in {differing}); "
                                       "train a fusion head for this encoder")
    return head.eval(), extra
