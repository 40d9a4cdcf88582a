"""Everything a training run reads, made ready once (several runs of a sweep share it).

- Frozen pooled features of the train/dev splits (:mod:`trainer.features`), or, for EfficientNet backbones with
  ``via_activations``/``unfreeze_from``, cached activations after a block plus the pooled features derived from
  them (:mod:`trainer.activations`): one backbone pass per image serves frozen heads and partial unfreezing alike.
- The backbone's class prior (ImageNet classifier + class-prompt text features) when the heads or the loss use it.
- The class-labelled dev set (``class_data``) scored beside the caption dev split.
- The trainable tail (blocks ``unfreeze_from..``) for partial unfreezing.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.encoders import Encoder
from trainer.activations import activation_split, effnet_of
from trainer.config import TrainerSettings
from trainer.evaluate import load_split
from trainer.features import FeatureCache, SplitFeatures, split_features
from trainer.priors import ClassDevSet, ClassPrior, imagenet_prior
from trainer.train import TensorSplit


class EffnetTail(nn.Module):
    """Blocks ``cut..`` + head convolution of an EfficientNet-Lite (float32 copy; only those parameters train):
    ``(n, C, H, W)`` activations -> ``(n, 1280)`` pooled features."""

    def __init__(self, encoder: Encoder, cut: int):
        super().__init__()
        self.cut = cut
        net: Any = copy.deepcopy(effnet_of(encoder))
        net.float()
        net.requires_grad_(False)
        net.tail_modules(cut).requires_grad_(True)
        self.net = net

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.net.features_from(acts.contiguous(memory_format=torch.channels_last), self.cut)

    def state(self) -> dict[str, torch.Tensor]:
        """The tuned weights, as :meth:`~retrieval.encoders.effnet.EffnetImage.load_tail` takes them."""
        return {k: v.detach().clone() for k, v in self.net.tail_modules(self.cut).state_dict().items()}


@dataclass
class Prepared:
    """What :class:`~trainer.train.Trainer` takes, plus how long preparing it took (``seconds``)."""

    train: TensorSplit
    dev: TensorSplit
    prior: ClassPrior | None = None
    class_dev: ClassDevSet | None = None
    tail: nn.Module | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _needs_prior(cfg: TrainerSettings) -> bool:
    return cfg.head == "anchored" or cfg.distill > 0


def prepare(cfg: TrainerSettings, encoder: Encoder, cache: FeatureCache) -> Prepared:
    """Features (and activations), class prior, class dev set and tail for ``cfg``."""
    t0 = time.perf_counter()
    progress = sys.stderr.isatty()
    cut = cfg.unfreeze_from or cfg.via_activations
    train_rec = load_split(cfg.data, cfg.captions, cfg.train_split)
    dev_rec = load_split(cfg.data, cfg.captions, cfg.dev_split)
    class_rec = load_split(cfg.class_data, None, "all") if cfg.class_data else None
    class_dev = None
    if cut is None:
        train = TensorSplit.of(split_features(encoder, train_rec, cache, flip=cfg.flip_aug,
                                              batch_size=cfg.feature_batch, workers=cfg.workers, progress=progress))
        dev = TensorSplit.of(split_features(encoder, dev_rec, cache, flip=cfg.tta_flip, batch_size=cfg.feature_batch,
                                            workers=cfg.workers, progress=progress))
        if class_rec:
            class_dev = ClassDevSet.of(split_features(encoder, class_rec, cache, batch_size=cfg.feature_batch,
                                                      workers=cfg.workers, progress=progress))
    else:
        a_train = activation_split(encoder, train_rec, cache, cut, flip=cfg.flip_aug, workers=cfg.workers)
        a_dev = activation_split(encoder, dev_rec, cache, cut, flip=cfg.tta_flip, workers=cfg.workers)
        a_cls = activation_split(encoder, class_rec, cache, cut, workers=cfg.workers) if class_rec else None
        if cfg.unfreeze_from is None:  # frozen heads: pooled features only
            train, dev = TensorSplit.of(a_train.feats), TensorSplit.of(a_dev.feats)
            class_dev = ClassDevSet.of(a_cls.feats) if a_cls else None
        else:
            train = _acts_split(a_train.feats, a_train.acts, a_train.acts_flip, with_pooled=True)
            dev = _acts_split(a_dev.feats, a_dev.acts, a_dev.acts_flip, with_pooled=False)
            if a_cls:
                class_dev = ClassDevSet.of(a_cls.feats)
                class_dev.images = np.array(a_cls.acts)
    features_s = time.perf_counter() - t0
    prior = imagenet_prior(encoder, cache) if _needs_prior(cfg) else None
    tail = EffnetTail(encoder, cfg.unfreeze_from) if cfg.unfreeze_from is not None else None
    return Prepared(train, dev, prior, class_dev, tail,
                    {"features": round(features_s, 2), "total": round(time.perf_counter() - t0, 2)})


def _acts_split(feats: SplitFeatures, acts: np.ndarray, acts_flip: np.ndarray | None, with_pooled: bool
                ) -> TensorSplit:
    """Activations (read into memory, float16) as the split's images; the pooled features as the teacher's."""
    base = TensorSplit.of(feats)
    flip = torch.from_numpy(np.array(acts_flip)) if acts_flip is not None else None
    return TensorSplit(torch.from_numpy(np.array(acts)), flip, base.texts, base.text_image,
                       pooled=base.images if with_pooled else None,
                       pooled_flip=base.images_flip if with_pooled else None)
