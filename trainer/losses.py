"""Contrastive losses over a batch of paired image and text embeddings.

Every loss takes L2-normalised ``image`` and ``text`` float tensors of shape ``(B, d)`` where row ``i`` of each is
a matching pair, plus optional ``groups`` ``(B,)`` int64 (the image each row comes from): off-diagonal pairs of
the same group are positives too (another caption of the same image), so they are masked out of the negatives
instead of being pushed apart.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["clip", "infonce", "triplet"]


def _false_negative_mask(groups: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """``(B, B)`` bool, True where ``i != j`` but both rows come from the same image (None when no such pair)."""
    if groups is None:
        return None
    same = groups[:, None] == groups[None, :]
    same &= ~torch.eye(n, dtype=torch.bool, device=device)
    return same if bool(same.any()) else None


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric cross-entropy over ``logit_scale * image @ text.T`` (CLIP / InfoNCE / NT-Xent), a scalar."""
    logits = image @ text.T * logit_scale
    mask = _false_negative_mask(groups, logits.shape[0], logits.device)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def triplet_loss(
    image: torch.Tensor, text: torch.Tensor, margin: float = 0.2, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """VSE++ hinge loss with the hardest negative in the batch, both directions (mean over the batch)."""
    sims = image @ text.T
    pos = sims.diag()
    exclude = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    mask = _false_negative_mask(groups, sims.shape[0], sims.device)
    if mask is not None:
        exclude |= mask
    neg = sims.masked_fill(exclude, float("-inf"))
    hardest_text = neg.max(dim=1).values  # for each image, the closest wrong caption
    hardest_image = neg.max(dim=0).values  # for each caption, the closest wrong image
    cost = F.relu(margin - pos + hardest_text) + F.relu(margin - pos + hardest_image)
    return cost.mean()


class ContrastiveLoss(nn.Module):
    """The configured loss; owns the learnable temperature of ``clip`` (stored as log of the logit scale).

    - ``clip``: symmetric cross-entropy with a learnable temperature (init ``temperature``, scale capped at 100).
    - ``infonce``: the same loss with the temperature fixed (NT-Xent).
    - ``triplet``: hinge with the hardest in-batch negative, ``margin``.
    """

    log_scale: torch.Tensor

    def __init__(self, name: LossName = "clip", temperature: float = 0.07, margin: float = 0.2):
        super().__init__()
        self.name = name
        self.margin = margin
        scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if name == "clip":
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))

    def forward(self, image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "triplet":
            return triplet_loss(image, text, self.margin, groups)
        scale = self.log_scale.clamp(max=math.log(100.0)).exp()
        return contrastive_loss(image, text, scale, groups)
