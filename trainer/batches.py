"""Training data as tensors and the batches of one epoch (a pure function of seed and epoch), and the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import TrainerSettings
from trainer.features import SplitFeatures


@dataclass
class TensorSplit:
    """A split's features as tensors (see :class:`~trainer.features.SplitFeatures`): ``images`` float32 pooled
    features ``(n, d_img)``, or, for partial unfreezing, float16 cached activations ``(n, C, H, W)``; ``pooled``
    (and ``pooled_flip``) the frozen backbone's pooled features when ``images`` are activations (the class
    distillation teacher reads them)."""

    images: torch.Tensor
    images_flip: torch.Tensor | None
    texts: torch.Tensor
    text_image: torch.Tensor
    pooled: torch.Tensor | None = None
    pooled_flip: torch.Tensor | None = None

    @classmethod
    def of(cls, f: SplitFeatures) -> TensorSplit:
        flip = torch.from_numpy(np.asarray(f.images_flip, np.float32)) if f.images_flip is not None else None
        return cls(torch.from_numpy(np.asarray(f.images, np.float32)), flip,
                   torch.from_numpy(np.asarray(f.texts, np.float32)), torch.from_numpy(f.text_image).long())

    def teacher(self, rows: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Frozen pooled features of ``rows`` (flipped view where ``flips``): ``(B, d_img)`` float32."""
        pooled = self.pooled if self.pooled is not None else self.images
        x = pooled[rows]
        flipped = self.pooled_flip if self.pooled is not None else self.images_flip
        if flipped is not None and bool(flips.any()):
            x = torch.where(flips[:, None], flipped[rows], x)
        return x.float()


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def epoch_batches(split: TensorSplit, cfg: TrainerSettings, epoch: int) -> list[Batch]:
    """``(image_rows, caption_rows, use_flip)`` index tensors per step for one epoch; a pure function of
    ``(seed, epoch)``. Incomplete last batches are dropped (the contrastive loss wants full batches)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n_img = split.images.shape[0]
    if cfg.pairs == "sample":
        order = torch.argsort(split.text_image, stable=True)
        counts = torch.bincount(split.text_image, minlength=n_img)
        starts = torch.cumsum(counts, 0) - counts
        valid = torch.nonzero(counts > 0).squeeze(1)
        imgs = valid[torch.randperm(valid.numel(), generator=g)]
        pick = (torch.rand(imgs.numel(), generator=g) * counts[imgs]).long()
        caps = order[starts[imgs] + pick]
    else:
        caps = torch.randperm(split.texts.shape[0], generator=g)
        imgs = split.text_image[caps]
    flips = torch.rand(imgs.numel(), generator=g) < 0.5
    if not cfg.flip_aug or split.images_flip is None:
        flips = torch.zeros_like(flips)
    bs = min(cfg.batch_size, imgs.numel())
    n_steps = imgs.numel() // bs
    return [(imgs[i * bs:(i + 1) * bs], caps[i * bs:(i + 1) * bs], flips[i * bs:(i + 1) * bs]) for i in range(n_steps)]


def steps_per_epoch(split: TensorSplit, cfg: TrainerSettings) -> int:
    n = int((torch.bincount(split.text_image) > 0).sum()) if cfg.pairs == "sample" else split.texts.shape[0]
    return max(1, n // min(cfg.batch_size, n))


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
