"""Experiment (issue 10): does tuning the top layers of the text model (LiT: locked image, tuned text) beat heads over
a frozen text model?

Same data, heads, loss, schedule and selection as ``trainer train --head mlp`` over the default backbones (Lite0 +
all-MiniLM-L6-v2, fp32 features, flip augmentation); the only change is that the top ``--tune-layers`` transformer
layers of MiniLM train too (at ``--text-lr``), run on the fly for each batch's captions (the frozen layers below run
without gradients). ``--tune-layers 0`` is the control: it reads the cached frozen caption features, which is
exactly the trainer's run. Selection on Flickr8k dev (T→I and I→T R@1/5/10), one row per run appended to
``benchmarks/results/quality_sweep.jsonl``.

    python benchmarks/exp_text_tune.py --tune-layers 2 --text-lr 2e-5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_quality import append_row, metric_columns  # noqa: E402
from retrieval.encoders.cpu import cpu_info  # noqa: E402
from retrieval.encoders.factory import build_torch_encoder  # noqa: E402
from retrieval.heads import HeadPair  # noqa: E402
from retrieval.metrics import retrieval_metrics  # noqa: E402
from trainer.batches import TensorSplit, epoch_batches, lr_lambda  # noqa: E402
from trainer.config import TrainerSettings  # noqa: E402
from trainer.evaluate import load_split  # noqa: E402
from trainer.features import FeatureCache, split_features  # noqa: E402
from trainer.losses import ContrastiveLoss  # noqa: E402
from trainer.train import SCORE_KEYS, TrainModel, dev_score, head_config  # noqa: E402


class TunedText(torch.nn.Module):
    """The sentence-transformers model with only its top ``n`` transformer layers trainable:
    captions -> ``(n, 384)`` normalised sentence embeddings (mean pooling, as the model defines)."""

    def __init__(self, st: Any, n: int):
        super().__init__()
        self.st = copy.deepcopy(st).float()
        self.st.requires_grad_(False)
        layers = self.st[0].auto_model.encoder.layer
        for layer in layers[len(layers) - n:]:
            layer.requires_grad_(True)

    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = dict(self.st.preprocess(captions) if hasattr(self.st, "preprocess") else self.st.tokenize(captions))
        return self.st(tokens)["sentence_embedding"]


def embed_captions(text: TunedText, captions: list[str], chunk: int = 256) -> torch.Tensor:
    was = text.training
    text.eval()
    with torch.no_grad():
        out = torch.cat([text(captions[i:i + chunk]) for i in range(0, len(captions), chunk)])
    text.train(was)
    return out


def evaluate(model: TrainModel, text: TunedText | None, dev: TensorSplit, dev_captions: list[str]) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        img = model.embed_image(dev.images).numpy()
        raw = embed_captions(text, dev_captions) if text is not None else dev.texts
        txt = model.embed_text(raw).numpy()
    model.train()
    return retrieval_metrics(img, txt, dev.text_image.numpy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune-layers", type=int, default=2)
    p.add_argument("--text-lr", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", type=Path, default=REPO / "benchmarks" / "results" / "quality_sweep.jsonl")
    p.add_argument("--save", type=Path, default=None,
                   help="write the best heads (folded) + the tuned text model here (torch.save)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainerSettings(encoder="zero-shot", precision="fp32", head="mlp", epochs=args.epochs,
                          threads=args.threads)
    spec = cfg.spec()
    enc = build_torch_encoder(spec)
    cache = FeatureCache(cfg.cache_dir, engine="onnx")  # fp32 ONNX Runtime fills missing rows (same features)
    t0 = time.perf_counter()
    train_f = split_features(enc, load_split(cfg.data, cfg.captions, cfg.train_split), cache, flip=cfg.flip_aug)
    dev_f = split_features(enc, load_split(cfg.data, cfg.captions, cfg.dev_split), cache)
    train, dev = TensorSplit.of(train_f), TensorSplit.of(dev_f)
    print(f"features {time.perf_counter() - t0:.1f} s: train {tuple(train.images.shape)} images, "
          f"{len(train_f.captions)} captions; dev {tuple(dev.images.shape)}", flush=True)

    identity = cfg.heads_identity()
    torch.manual_seed(cfg.seed)
    hc = head_config(cfg, train.images.shape[1], train.texts.shape[1], spec.backend, identity)
    model = TrainModel(HeadPair(hc), ContrastiveLoss(cfg.loss, cfg.temperature, cfg.margin),
                       train.images.shape[1], train.texts.shape[1])
    model.set_standardization(train.images, train.texts)  # frozen statistics in both arms
    text = TunedText(enc.text_backbone.st, args.tune_layers) if args.tune_layers > 0 else None

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim < 2 or name.startswith("loss.") else decay).append(prm)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    if text is not None:
        groups.append({"params": [q for q in text.parameters() if q.requires_grad], "weight_decay": 0.01,
                       "lr": args.text_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    steps = len(epoch_batches(train, cfg, 0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, steps * cfg.epochs))

    best: dict[str, Any] = {"score": -1.0}
    history = []
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        te = time.perf_counter()
        torch.manual_seed(cfg.seed * 7919 + epoch)
        model.train()
        if text is not None:
            text.train()
        losses = []
        for imgs, caps, flips in epoch_batches(train, cfg, epoch):
            x_img = torch.where(flips[:, None], train.images_flip[imgs], train.images[imgs]) \
                if train.images_flip is not None else train.images[imgs]
            x_txt = text([train_f.captions[int(c)] for c in caps]) if text is not None else train.texts[caps]
            loss = model.loss(model.embed_image(x_img), model.embed_text(x_txt), None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        m = evaluate(model, text, dev, dev_f.captions)
        score = dev_score(m)
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4), "dev_score": round(score, 2),
               **{f"dev_{d}_{k}": round(m[d][k], 2) for d in ("t2i", "i2t") for k in SCORE_KEYS},
               "seconds": round(time.perf_counter() - te, 1)}
        history.append(row)
        print(json.dumps(row), flush=True)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "metrics": m}
            if args.save:
                torch.save({"heads": model.folded_heads().state_dict(), "head_config": hc.model_dump(),
                            "text_model": text.state_dict() if text else None,
                            "tune_layers": args.tune_layers}, args.save)
    train_s = time.perf_counter() - t_train
    bm = best["metrics"]
    rec = {"encoder": "zero-shot", "recipe": "text-tune", "overrides": {"head": "mlp", "tune_layers": args.tune_layers,
                                                                     "text_lr": args.text_lr, "epochs": args.epochs},
           "best_epoch": best["epoch"], "select": "captions", "score": round(best["score"], 2),
           "train_s": round(train_s, 1),
           **metric_columns(bm, None),
           "base": {"precision": "fp32", "flip_aug": cfg.flip_aug}, "history": history,
           "machine": {"cpu": cpu_info().describe(), "cores": 2, "threads": args.threads}}
    append_row(args.log, rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
