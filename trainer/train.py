"""Training projection heads on cached frozen-backbone features.

- Model: a :class:`~retrieval.heads.HeadPair` (``residual`` = identity at init for open_clip backbones, ``mlp`` /
  ``linear`` into a shared space for dual backbones) plus the loss (which owns the learnable temperature).
- Inputs are standardised with train-split statistics while training (``standardize``); the affine map is folded
  into the heads' first layers when saving, so a checkpoint maps *raw* backbone features exactly as the encoder
  applies it (``EncoderSpec(heads=path)``).
- Batches: ``pairs="sample"`` draws one random caption of every training image per epoch (no two rows of a batch
  come from the same image: no false negatives); ``pairs="all"`` uses every caption and masks same-image pairs out
  of the negatives. ``flip_aug`` uses the horizontally flipped image's features half of the time.
- AdamW, linear warm-up then cosine decay (per step), early stopping on the dev score = mean of R@1/5/10 in both
  directions, ``best.pt`` (shippable heads) and ``last.pt`` (heads + full training state).
- Reproducible: every epoch seeds its own generator (``seed``, epoch), so resuming from ``last.pt`` gives exactly
  the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.heads import AnchoredHead, HeadConfig, HeadPair, save_heads
from retrieval.metrics import retrieval_metrics
from trainer.analysis import RELEVANCE_TOP_K, fit_relevance, relevance_pairs
from trainer.batches import TensorSplit, epoch_batches, lr_lambda, steps_per_epoch
from trainer.config import TrainerSettings
from trainer.features import SplitFeatures
from trainer.losses import ContrastiveLoss
from trainer.priors import ClassDevSet, ClassPrior, class_distillation_loss, class_metrics

log = logging.getLogger(__name__)

#: Dev score used for early stopping and model selection.
SCORE_KEYS = ("R@1", "R@5", "R@10")


def dev_score(metrics: dict[str, Any]) -> float:
    """Mean of R@1/5/10 over text→image and image→text (percent)."""
    return float(np.mean([metrics[d][k] for d in ("t2i", "i2t") for k in SCORE_KEYS]))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def head_config(
    cfg: TrainerSettings, image_in: int, text_in: int, backend: str, identity: dict[str, Any], classes: int = 0
) -> HeadConfig:
    """Resolve ``auto`` choices: residual (identity at init) on open_clip, mlp into 256-d on dual backbones;
    ``anchored`` heads live in the text model's space (``out_dim = text_in``) and carry ``classes`` prompts."""
    kind = cfg.head
    if kind == "auto":
        kind = "residual" if backend == "open_clip" and image_in == text_in else "mlp"
    if kind == "anchored":
        if not classes:
            raise ValueError("anchored heads need the backbone's class prior (a dual EfficientNet encoder)")
        learned = (cfg.out_dim or 256) if cfg.anchor_weight > 0 else 0
        return HeadConfig(kind=kind, image_in=image_in, text_in=text_in, out_dim=text_in + learned,
                          hidden=cfg.hidden, dropout=cfg.dropout, encoder=identity, classes=classes,
                          bridge_temperature=cfg.bridge_temperature, anchor_weight=cfg.anchor_weight,
                          gate_center=cfg.gate_center, gate_width=cfg.gate_width)
    out_dim = cfg.out_dim or (image_in if kind == "residual" else 256)
    return HeadConfig(kind=kind, image_in=image_in, text_in=text_in, out_dim=out_dim, hidden=cfg.hidden,
                      dropout=cfg.dropout, encoder=identity)


class TrainModel(nn.Module):
    """Heads + loss + input standardisation (buffers). ``embed_*``: raw features -> normalised embeddings."""

    img_mean: torch.Tensor
    img_std: torch.Tensor
    txt_mean: torch.Tensor
    txt_std: torch.Tensor

    def __init__(self, heads: HeadPair, loss: ContrastiveLoss, image_in: int, text_in: int,
                 tail: nn.Module | None = None):
        super().__init__()
        self.heads = heads
        self.loss = loss
        #: partial unfreezing: cached activations -> pooled features (None: the inputs are pooled features)
        self.tail = tail
        self.register_buffer("img_mean", torch.zeros(image_in))
        self.register_buffer("img_std", torch.ones(image_in))
        self.register_buffer("txt_mean", torch.zeros(text_in))
        self.register_buffer("txt_std", torch.ones(text_in))

    def set_standardization(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        self.img_mean.copy_(images.mean(0))
        self.img_std.copy_(images.std(0).clamp_min(1e-6))
        self.txt_mean.copy_(texts.mean(0))
        self.txt_std.copy_(texts.std(0).clamp_min(1e-6))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features: ``x`` itself, or the trainable tail applied to cached activations."""
        return self.tail(x.float()) if self.tail is not None else x

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.heads.image((self.pooled(x) - self.img_mean) / self.img_std), dim=-1)

    def embed_text(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.heads.text((x - self.txt_mean) / self.txt_std), dim=-1)

    def folded_heads(self) -> HeadPair:
        """A copy of the heads that takes raw features: ``W' = W / std``, ``b' = b - W' @ mean`` on input layers."""
        heads = copy.deepcopy(self.heads).eval()
        _fold(heads.image, self.img_mean, self.img_std)
        _fold(heads.text, self.txt_mean, self.txt_std)
        return heads


def _input_layers(head: Any) -> list[nn.Linear]:
    if head.kind == "mlp":
        return [head.proj, head.mlp[0]]  # type: ignore[list-item]
    if head.kind == "linear":
        return [head.proj]  # type: ignore[list-item]
    return []


@torch.no_grad()
def _fold(head: Any, mean: torch.Tensor, std: torch.Tensor) -> None:
    if head.kind in ("residual", "anchored"):
        if not (torch.all(mean == 0) and torch.all(std == 1)):
            raise ValueError(f"a {head.kind} head cannot absorb input standardisation; train it without")
        return
    for layer in _input_layers(head):
        layer.weight.div_(std[None, :])
        layer.bias.sub_(layer.weight @ mean)


@torch.no_grad()
def init_anchored(heads: HeadPair, prior: ClassPrior, images: torch.Tensor | None, texts: torch.Tensor | None) -> None:
    """Seed ``anchored`` heads: the image side's bridge takes the classifier and the class-prompt embeddings; the
    MLPs' input standardisation takes the training statistics (when given)."""
    img, txt = heads.image, heads.text
    assert isinstance(img, AnchoredHead) and isinstance(txt, AnchoredHead)
    img.fc.weight.copy_(prior.fc_weight)
    img.fc.bias.copy_(prior.fc_bias)
    img.class_embeddings.copy_(prior.class_embeddings())
    if txt.gated:
        txt.class_embeddings.copy_(prior.class_embeddings())
    for head, x in ((img, images), (txt, texts)):
        if x is not None:
            head.mean.copy_(x.mean(0))
            head.std.copy_(x.std(0).clamp_min(1e-6))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on features
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(model: TrainModel, images: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """Normalised ``(n, d)`` float32 image embeddings (in chunks: activations are large)."""
    was = model.training
    model.eval()
    out = [model.embed_image(images[i:i + chunk]).numpy() for i in range(0, images.shape[0], chunk)]
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_texts(model: TrainModel, texts: torch.Tensor) -> np.ndarray:
    was = model.training
    model.eval()
    out = model.embed_text(texts).numpy()
    model.train(was)
    return out


def embed_split(model: TrainModel, split: TensorSplit, tta_flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``(n_img, d)`` and ``(n_txt, d)`` float32 embeddings of a split under ``model``."""
    images = split.images
    if tta_flip and split.images_flip is not None:
        images = (images.float() + split.images_flip.float()) / 2
    return embed_images(model, images), embed_texts(model, split.texts)


def evaluate_model(model: TrainModel, split: TensorSplit, tta_flip: bool = False) -> dict[str, Any]:
    img, txt = embed_split(model, split, tta_flip)
    return retrieval_metrics(img, txt, split.text_image.numpy())


def evaluate_classes(model: TrainModel, dev: ClassDevSet) -> dict[str, Any]:
    """Class retrieval metrics (each distinct prompt a query, its class's images relevant)."""
    images = torch.from_numpy(np.asarray(dev.images))
    return class_metrics(embed_images(model, images), embed_texts(model, torch.from_numpy(dev.queries)),
                         dev.relevant)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    best_path: Path | None
    last_path: Path
    best_epoch: int
    best_score: float
    best_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    stopped_early: bool


class Trainer:
    """Trains heads for ``cfg`` on ``train`` features, selecting on ``dev`` (may be None: no early stopping)."""

    def __init__(
        self,
        cfg: TrainerSettings,
        train: SplitFeatures | TensorSplit,
        dev: SplitFeatures | TensorSplit | None,
        backend: str = "dual",
        identity: dict[str, Any] | None = None,
        prior: ClassPrior | None = None,
        class_dev: ClassDevSet | None = None,
        tail: nn.Module | None = None,
    ):
        """``prior``: the backbone's classifier and class prompts (``anchored`` heads and ``distill`` need it);
        ``class_dev``: a class-labelled dev set scored every evaluation (and in the selection score when
        ``cfg.select == "both"``); ``tail``: trainable backbone blocks for partial unfreezing (then ``train``'s and
        ``dev``'s ``images`` are cached activations and ``train.pooled`` the frozen pooled features)."""
        self.cfg = cfg
        self.train = train if isinstance(train, TensorSplit) else TensorSplit.of(train)
        self.dev = dev if dev is None or isinstance(dev, TensorSplit) else TensorSplit.of(dev)
        self.prior = prior
        self.class_dev = class_dev
        self.out = Path(cfg.out)
        pooled = self.train.pooled if self.train.pooled is not None else self.train.images
        d_img, d_txt = pooled.shape[1], self.train.texts.shape[1]
        self.head_cfg = head_config(cfg, d_img, d_txt, backend, identity or {}, prior.classes if prior else 0)
        torch.manual_seed(cfg.seed)
        heads = HeadPair(self.head_cfg)
        loss = ContrastiveLoss(cfg.loss, cfg.temperature, cfg.margin)
        self.model = TrainModel(heads, loss, d_img, d_txt, tail)
        if self.head_cfg.kind == "anchored":
            assert prior is not None
            init_anchored(heads, prior, pooled.float() if cfg.standardize else None,
                           self.train.texts if cfg.standardize else None)
        elif cfg.standardize and self.head_cfg.kind != "residual":
            self.model.set_standardization(pooled.float(), self.train.texts)
        if cfg.lock_text:
            if self.head_cfg.kind != "anchored":
                raise ValueError("lock_text needs anchored heads (their text side starts as the identity)")
            heads.text.requires_grad_(False)  # concatenated parts (anchor_weight > 0): the text anchor is raw anyway
        if cfg.distill > 0 and prior is None:
            raise ValueError("distill > 0 needs the backbone's class prior")
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        tail_params: list[nn.Parameter] = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("tail."):
                tail_params.append(p)
            else:
                (no_decay if p.ndim < 2 or name.startswith("loss.") else decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": cfg.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}]
        if tail_params:
            groups.append({"params": tail_params, "weight_decay": 0.0, "lr": cfg.tail_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.steps_per_epoch = steps_per_epoch(self.train, cfg)
        total = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup_steps, total))
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _extra(self, metrics: dict[str, Any] | None, with_state: bool,
               calibration: dict[str, Any] | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {**(calibration or {}),
            "config": self.cfg.model_dump(),
            "metrics": metrics,
            "epoch": self.epoch,
            "step": self.step,
            "temperature": self.model.loss.temperature,
        }
        tail: Any = self.model.tail
        if tail is not None:  # partial unfreezing: the tuned backbone blocks travel with the heads
            extra["image_tail"] = {"cut": int(tail.cut), "state": tail.state()}
        if with_state:
            extra["train_state"] = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "best_metrics": self.best_metrics,
                "bad_epochs": self.bad_epochs,
                "history": self.history,
            }
        return extra

    def save(self, path: Path, metrics: dict[str, Any] | None, with_state: bool,
             calibration: dict[str, Any] | None = None) -> str:
        """Heads folded to take raw features (usable as ``EncoderSpec(heads=path)``); returns the SHA-256."""
        return save_heads(self.model.folded_heads(), path, extra=self._extra(metrics, with_state, calibration))

    def dev_calibration(self) -> dict[str, Any]:
        """Score -> relevance map fitted on the dev split's caption queries and their top-k images:
        ``{"calibration": Calibration.to_dict(), "calibration_fit": {...}}`` (what ``best.pt`` carries)."""
        assert self.dev is not None
        img, txt = embed_split(self.model, self.dev, self.cfg.tta_flip)
        scores, labels = relevance_pairs(img, txt, self.dev.text_image.numpy())
        cal, brier = fit_relevance(scores, labels)
        return {"calibration": cal.to_dict(),
                "calibration_fit": {"split": self.cfg.dev_split, "top_k": RELEVANCE_TOP_K, "pairs": len(scores),
                                    "base_rate": float(labels.mean()), "brier": brier}}

    def load_state(self, path: Path) -> None:
        """Restore everything from a ``last.pt`` written by :meth:`save` with ``with_state=True``."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = blob["extra"]["train_state"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = state["best_metrics"]
        self.bad_epochs = int(state["bad_epochs"])
        self.history = list(state["history"])
        self.epoch = int(blob["extra"]["epoch"])
        self.step = int(blob["extra"]["step"])

    # -- one epoch -----------------------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """Runs epoch ``self.epoch`` (0-based); returns the mean training loss."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 7919 + self.epoch)  # dropout
        self.model.train()
        flip_imgs = self.train.images_flip
        losses = []
        if self.model.tail is not None:
            self.model.tail.eval()  # batch norm keeps its ImageNet statistics
        for imgs, caps, flips in epoch_batches(self.train, cfg, self.epoch):
            x_img = self.train.images[imgs]
            if flip_imgs is not None and bool(flips.any()):
                shape = (-1,) + (1,) * (x_img.ndim - 1)
                x_img = torch.where(flips.view(shape), flip_imgs[imgs], x_img)
            x_txt = self.train.texts[caps]
            groups = imgs if cfg.pairs == "all" else None
            img_emb = self.model.embed_image(x_img)
            loss = self.model.loss(img_emb, self.model.embed_text(x_txt), groups)
            if cfg.distill > 0 and self.prior is not None:
                prompts = self.model.embed_text(self.prior.prompts)
                teacher = self.prior.logits(self.train.teacher(imgs, flips))
                loss = loss + cfg.distill * class_distillation_loss(
                    img_emb, prompts, teacher, cfg.distill_temperature, cfg.distill_scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            losses.append(float(loss.detach()))
        self.epoch += 1
        return float(np.mean(losses)) if losses else float("nan")

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(
        self, stop_after_epochs: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None
    ) -> TrainResult:
        """Train until ``cfg.epochs``, early stopping, or ``stop_after_epochs`` more epochs (tests, resumption)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        done_now = 0
        stopped = False
        while self.epoch < cfg.epochs:
            if stop_after_epochs is not None and done_now >= stop_after_epochs:
                break
            te = time.perf_counter()
            train_loss = self.train_epoch()
            done_now += 1
            row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "loss": train_loss,
                                   "lr": self.scheduler.get_last_lr()[0], "temperature": self.model.loss.temperature}
            metrics = None
            if self.dev is not None and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                metrics = evaluate_model(self.model, self.dev, cfg.tta_flip)
                score = dev_score(metrics)
                row.update({"caption_dev_score": score, **{f"dev_{d}_{k}": metrics[d][k] for d in ("t2i", "i2t")
                                                           for k in SCORE_KEYS}})
                if self.class_dev is not None:
                    metrics["classes"] = evaluate_classes(self.model, self.class_dev)
                    row.update({f"class_{k}": metrics["classes"][k] for k in ("R@1", "P@10", "mAP")})
                    if cfg.select == "both":
                        score = (score + metrics["classes"]["mAP"]) / 2
                row["dev_score"] = score
                if score > self.best_score:
                    self.best_score, self.best_epoch, self.best_metrics = score, self.epoch, metrics
                    self.bad_epochs = 0
                    self.save(self.out / "best.pt", metrics, with_state=False, calibration=self.dev_calibration())
                else:
                    self.bad_epochs += 1
            row["seconds"] = time.perf_counter() - te
            self.history.append(row)
            if on_epoch:
                on_epoch(row)
            log.info("%s", json.dumps(row))
            if self.dev is not None and self.bad_epochs >= cfg.patience:
                stopped = True
                self.save(self.out / "last.pt", metrics, with_state=True)
                break
            self.save(self.out / "last.pt", metrics, with_state=True)
        if self.dev is None:
            self.save(self.out / "best.pt", None, with_state=False)
            self.best_epoch = self.epoch
        best = self.out / "best.pt"
        return TrainResult(best if best.is_file() else None, self.out / "last.pt", self.best_epoch, self.best_score,
                           self.best_metrics, self.history, time.perf_counter() - t0, self.step, stopped)
