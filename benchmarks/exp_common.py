"""What the issue-10 experiment scripts (``exp_*.py``) share: the frozen activations of the train and dev splits,
and one trainer run ("arm") turned into sweep-row columns."""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmarks.bench_quality import result_columns
from retrieval.encoders import Encoder
from retrieval.encoders.factory import build_torch_encoder
from trainer.activations import ActivationSplit, activation_split
from trainer.batches import TensorSplit
from trainer.config import TrainerSettings
from trainer.evaluate import load_split
from trainer.features import FeatureCache
from trainer.train import Trainer


def activation_splits(cfg: TrainerSettings, cut: int) -> tuple[Encoder, ActivationSplit, ActivationSplit]:
    """The float32 torch encoder of ``cfg`` and its cached activations after block ``cut`` (centre view) for the
    train and dev splits."""
    enc = build_torch_encoder(cfg.spec())
    cache = FeatureCache(cfg.cache_dir)
    train = activation_split(enc, load_split(cfg.data, cfg.captions, cfg.train_split), cache, cut)
    dev = activation_split(enc, load_split(cfg.data, cfg.captions, cfg.dev_split), cache, cut)
    return enc, train, dev


def train_arm(cfg: TrainerSettings, out: str, train: TensorSplit, dev: TensorSplit,
              tail: nn.Module | None = None) -> dict[str, Any]:
    """Train ``cfg``'s heads (and ``tail``) into ``out``, selecting on ``dev``; the run's sweep-row columns."""
    trainer = Trainer(cfg.model_copy(update={"out": out}), train, dev, identity=cfg.heads_identity(), tail=tail)
    return result_columns(trainer.fit())
