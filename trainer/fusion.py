"""Training the composed-query fusion head (:mod:`retrieval.fusion`) on (reference image, change text, target
image) triplets, e.g. FashionIQ: ``python -m trainer fusion --data data/fashioniq``.

The encoder is frozen: every image and text is embedded once with the same encoder (and heads) as the index, then
the head learns, with an InfoNCE loss over in-batch targets, to map (reference, text) to the target's embedding.
Evaluation (the FashionIQ protocol): rank the split's gallery (every candidate and target image, the reference
itself left out) by the composed query; Recall@K for K in 1, 10, 50, beside three baselines that need no training:
the image alone, the text alone, and their normalised sum.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.atomic import atomic_write_text
from retrieval.cli_flags import add_settings_flags, settings_from_flags

if TYPE_CHECKING:  # torch is imported when training starts, not when the CLI parses its flags
    from retrieval.fusion import AdditiveAttentionFusion

log = logging.getLogger(__name__)

RECALL_KS = (1, 10, 50)


class FusionSettings(BaseSettings):
    """Fusion-head training. Environment: ``FUSION_EPOCHS=30`` ..."""

    model_config = SettingsConfigDict(env_prefix="FUSION_", extra="ignore")

    data: Path = Field(Path("data/fashioniq"), description="FashionIQ folder (captions/, image_splits/, images/)")
    categories: str | None = Field(None, description="comma-separated (dress,shirt,toptee); default: all found")
    encoder: str = Field("default", description="the index's encoder: registry name or spec string")
    heads: str | None = Field(None, description="its head checkpoint, if any")
    precision: str = "auto"
    train_split: str = "train"
    dev_split: str = "val"
    out: Path = Field(Path("runs/fusion"), description="writes best.pt and metrics.json here")
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(128, ge=2, le=8192)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden: int = Field(256, ge=1, le=8192, description="attention hidden size")
    temperature: float = Field(0.05, gt=0, le=1)
    seed: int = 0
    threads: int = Field(2, ge=1, le=256)
    image_batch: int = Field(32, ge=1, description="images per encoder call while embedding")


@dataclass
class TripletFeatures:
    """Embedded triplets: ``ref`` / ``text`` ``(n, d)`` float32 unit rows, ``target`` ``(n,)`` int64 and ``ref_idx``
    ``(n,)`` int64 rows of ``gallery`` ``(m, d)`` (every distinct image of the split, ``gallery_ids``)."""

    ref: np.ndarray
    text: np.ndarray
    target: np.ndarray
    ref_idx: np.ndarray
    gallery: np.ndarray
    gallery_ids: list[str]


def embed_triplets(encoder: Any, triplets: Sequence[Any], paths: dict[str, Path], image_batch: int = 32
                   ) -> TripletFeatures:
    """Embed the triplets' images (each once) and texts with ``encoder`` (``encode_images`` / ``encode_text``)."""
    from retrieval.images import load_image

    ids = sorted({n for t in triplets for n in (t.candidate, t.target)})
    row = {n: i for i, n in enumerate(ids)}
    chunks = []
    for start in range(0, len(ids), image_batch):
        chunks.append(encoder.encode_images([load_image(paths[n]) for n in ids[start:start + image_batch]]))
    gallery = np.concatenate(chunks).astype(np.float32)
    texts = [t.text for t in triplets]
    text = np.concatenate([encoder.encode_text(texts[s:s + 256]) for s in range(0, len(texts), 256)])
    ref_idx = np.array([row[t.candidate] for t in triplets], np.int64)
    return TripletFeatures(ref=gallery[ref_idx], text=text.astype(np.float32),
                           target=np.array([row[t.target] for t in triplets], np.int64), ref_idx=ref_idx,
                           gallery=gallery, gallery_ids=ids)


def recall_at(queries: np.ndarray, feats: TripletFeatures, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K (percent) of ``queries`` ``(n, d)`` against the gallery, each query's reference image left out."""
    scores = queries @ feats.gallery.T
    scores[np.arange(len(queries)), feats.ref_idx] = -np.inf
    target_score = scores[np.arange(len(queries)), feats.target]
    rank = (scores > target_score[:, None]).sum(axis=1)  # 0 = first
    return {f"R@{k}": round(float(np.mean(rank < k)) * 100, 2) for k in ks}


def baselines(feats: TripletFeatures) -> dict[str, dict[str, float]]:
    """Recall of the compositions that need no training."""
    both = feats.ref + feats.text
    both /= np.linalg.norm(both, axis=1, keepdims=True)
    return {"image only": recall_at(feats.ref, feats), "text only": recall_at(feats.text, feats),
            "sum": recall_at(both.astype(np.float32), feats)}


def train_fusion(train: TripletFeatures, cfg: FusionSettings, dev: TripletFeatures | None = None,
                 encoder_identity: dict[str, Any] | None = None
                 ) -> tuple[AdditiveAttentionFusion, list[dict[str, Any]]]:
    """Fit a head on ``train``; keep the state with the best dev R@10 (the last one without ``dev``). Returns the
    head (eval mode) and one history row per epoch."""
    import torch
    import torch.nn.functional as F

    from retrieval.fusion import AdditiveAttentionFusion, FusionConfig

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = AdditiveAttentionFusion(FusionConfig(dim=train.ref.shape[1], hidden=cfg.hidden,
                                                encoder=encoder_identity or {}))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref, text = torch.from_numpy(train.ref), torch.from_numpy(train.text)
    target_vecs = torch.from_numpy(train.gallery[train.target])
    n = len(ref)
    best: tuple[float, dict[str, Any]] | None = None
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = torch.from_numpy(order[start:start + cfg.batch_size])
            if len(idx) < 2:
                continue
            q = head(ref[idx], text[idx])
            logits = q @ target_vecs[idx].T / cfg.temperature
            same = torch.from_numpy(train.target[idx.numpy()][:, None] == train.target[idx.numpy()][None, :])
            logits = logits.masked_fill(same & ~torch.eye(len(idx), dtype=torch.bool), -1e4)  # duplicate targets
            loss = F.cross_entropy(logits, torch.arange(len(idx)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        row: dict[str, Any] = {"epoch": epoch, "loss": round(total / max(n, 1), 5)}
        if dev is not None:
            row.update(recall_at(head.compose(dev.ref, dev.text), dev))
        history.append(row)
        score = row.get("R@10", -epoch)
        if best is None or score > best[0]:
            best = (score, {k: v.detach().clone() for k, v in head.state_dict().items()})
    assert best is not None
    head.load_state_dict(best[1])
    return head.eval(), history


def run_fusion(cfg: FusionSettings) -> dict[str, Any]:
    """Embed FashionIQ's train and dev triplets with the index's encoder, train, evaluate, write ``best.pt`` and
    ``metrics.json`` under ``cfg.out``; returns the report."""
    import torch

    from retrieval.datasets.fashioniq import load_triplets
    from retrieval.encoders import build_encoder, parse_spec
    from retrieval.fusion import save_fusion

    torch.set_num_threads(cfg.threads)
    cats = tuple(c.strip() for c in cfg.categories.split(",")) if cfg.categories else None
    encoder = build_encoder(parse_spec(cfg.encoder, heads=cfg.heads, precision=cfg.precision))
    t0 = time.perf_counter()
    train_t, train_paths = load_triplets(cfg.data, cfg.train_split, cats)
    dev_t, dev_paths = load_triplets(cfg.data, cfg.dev_split, cats)
    train = embed_triplets(encoder, train_t, train_paths, cfg.image_batch)
    dev = embed_triplets(encoder, dev_t, dev_paths, cfg.image_batch)
    embed_s = time.perf_counter() - t0
    head, history = train_fusion(train, cfg, dev, encoder.identity())
    dev_recall = recall_at(head.compose(dev.ref, dev.text), dev)
    report = {"encoder": encoder.spec.label(), "train_triplets": len(train_t), "dev_triplets": len(dev_t),
              "dev_gallery": len(dev.gallery_ids), "dev": dev_recall, "dev_baselines": baselines(dev),
              "history": history, "embed_seconds": round(embed_s, 2), "config": json.loads(cfg.model_dump_json())}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report["sha256"] = save_fusion(head, out / "best.pt", extra={"dev": dev_recall})
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    return report


def add_fusion_parser(sub: Any) -> None:
    """The ``fusion`` sub-command (flags generated from :class:`FusionSettings`)."""
    p = sub.add_parser("fusion", help="train the composed-query fusion head on FashionIQ-style triplets")
    add_settings_flags(p, FusionSettings)


def cmd_fusion(ns: argparse.Namespace) -> dict[str, Any]:
    return run_fusion(settings_from_flags(FusionSettings, ns))
