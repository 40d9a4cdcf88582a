"""Compose shippable ``anchored`` heads from trained caption heads and the backbone's label bridge.

The image side becomes ``[sqrt(w) * bridge(x), sqrt(1 - w) * normalize(mlp(x))]``; the text side
``[sqrt(g) * normalize(t), sqrt(1 - g) * normalize(mlp(t))]`` with a per-query gate ``g`` (how much the query reads
like a class prompt: its highest cosine to the 1,000 ImageNet class prompts, through a sigmoid). An object name
("a photo of a lobster") is then scored mostly by the training-free bridge, which knows ImageNet's objects; a
descriptive caption mostly by the heads trained on Flickr8k captions. ``w``, the gate's centre and width are
chosen on the dev sets (Flickr8k dev + Caltech-101 dev); the calibration is fitted on Flickr8k dev.

    python -m trainer compose --heads runs/heads/best.pt --out retrieval/models/NAME.pt
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.checksums import file_sha256
from retrieval.encoders import build_encoder
from retrieval.heads import HeadConfig, HeadPair, load_heads, save_heads
from retrieval.metrics import retrieval_metrics
from trainer.analysis import RELEVANCE_TOP_K, fit_relevance, relevance_pairs
from trainer.config import TrainerSettings
from trainer.features import FeatureCache
from trainer.prepare import prepare
from trainer.priors import ClassPrior, class_metrics
from trainer.train import init_anchored


def gated_heads(source: HeadPair, prior: ClassPrior, anchor_weight: float, gate_center: float | None,
                gate_width: float) -> HeadPair:
    """``anchored`` heads whose learned parts are ``source``'s ``mlp`` heads (taking raw features)."""
    src = source.config
    if src.kind != "mlp":
        raise ValueError(f"compose needs mlp caption heads, got {src.kind!r}")
    cfg = HeadConfig(kind="anchored", image_in=src.image_in, text_in=src.text_in, out_dim=src.text_in + src.out_dim,
                     hidden=src.hidden, dropout=src.dropout, encoder=src.encoder, classes=prior.classes,
                     anchor_weight=anchor_weight, gate_center=gate_center, gate_width=gate_width)
    pair = HeadPair(cfg)
    pair.image.mlp.load_state_dict(source.image.state_dict())  # type: ignore[union-attr,operator]
    pair.text.mlp.load_state_dict(source.text.state_dict())  # type: ignore[union-attr,operator]
    init_anchored(pair, prior, None, None)
    return pair.eval()


@torch.no_grad()
def _embed(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return F.normalize(head(torch.from_numpy(np.asarray(x, np.float32))), dim=-1).numpy()


def compose(cfg: TrainerSettings, heads_path: str, out: str | Path, anchor_weight: float = 0.5,
            gate_center: float | None = 0.6, gate_width: float = 0.03) -> dict[str, Any]:
    """Build, score on the dev sets, calibrate on the caption dev split and save; returns the report."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    cfg = cfg.model_copy(update={"head": "anchored", "flip_aug": False})
    enc = build_encoder(cfg.spec())
    data = prepare(cfg, enc, FeatureCache(cfg.cache_dir))
    assert data.prior is not None
    source, source_sha = load_heads(heads_path)
    pair = gated_heads(source, data.prior, anchor_weight, gate_center, gate_width)
    img = _embed(pair.image, data.dev.images.numpy())
    txt = _embed(pair.text, data.dev.texts.numpy())
    dev = retrieval_metrics(img, txt, data.dev.text_image.numpy())
    report: dict[str, Any] = {"source_heads": str(heads_path), "source_sha256": source_sha,
                              "anchor_weight": anchor_weight, "gate_center": gate_center, "gate_width": gate_width,
                              "dev": dev}
    if data.class_dev is not None:
        report["class_dev"] = class_metrics(_embed(pair.image, data.class_dev.images),
                                            _embed(pair.text, data.class_dev.queries), data.class_dev.relevant)
    scores, labels = relevance_pairs(img, txt, data.dev.text_image.numpy())
    cal, brier = fit_relevance(scores, labels)
    extra = {"calibration": cal.to_dict(),
             "calibration_fit": {"split": cfg.dev_split, "top_k": RELEVANCE_TOP_K, "pairs": len(scores),
                                 "base_rate": float(labels.mean()), "brier": brier},
             "composed_from": {k: v for k, v in report.items() if k not in ("dev", "class_dev")},
             "metrics": dev, "class_metrics": report.get("class_dev")}
    save_heads(pair, out, extra=extra)
    report.update({"out": str(out), "sha256": file_sha256(out), "calibration": cal.kind, "brier": brier,
                   "seconds": round(time.perf_counter() - t0, 1)})
    return report
