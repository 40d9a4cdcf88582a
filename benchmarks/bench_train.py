"""Trained projection heads vs zero-shot on Flickr8k, with training and feature-cache times (CPU).

    python benchmarks/bench_train.py --data ../shared/data/flickr8k                  # cache (if cold) + train + eval
    python benchmarks/bench_train.py --data ../shared/data/flickr8k --heads runs/x/best.pt   # evaluate only

Steps (one process, 2 threads unless TRAINER_THREADS says otherwise):
1. features of the train/dev/test splits from the on-disk cache (computed first if missing: "cache build");
2. zero-shot test metrics of the encoder (for the default dual encoder: its ImageNet label bridge);
3. training of the heads from cached features with the trainer's settings (``TRAINER_*`` environment variables and
   the flags below), model selection on dev;
4. test metrics of the best checkpoint loaded through ``EncoderSpec(heads=...)``, the path the indexer and service
   use (and with ``--tta-flip`` also the mean of centre and flipped image features, which the service does not do).
Prints a markdown table and writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from retrieval.checksums import file_sha256
from retrieval.encoders import build_encoder
from trainer import plots
from trainer.config import TrainerSettings
from trainer.evaluate import evaluate_features, load_split
from trainer.features import FeatureCache, split_features
from trainer.train import Trainer

#: Best published comparable frozen-backbone figure on Flickr8k test (ViT-base + MiniLM, trained heads), T→I.
REFERENCE: dict[str, Any] = {"label": "reference: ViT-base + MiniLM, trained heads (published)",
                             "t2i_R@1": 44.7, "t2i_R@5": 71.1, "t2i_R@10": 80.8}


def _row(label: str, metrics: dict) -> dict:
    return {"label": label, **{f"{d}_{k}": round(metrics[d][k], 2) for d in ("t2i", "i2t")
                                for k in ("R@1", "R@5", "R@10", "median_rank")}}


def table(rows: list[dict]) -> str:
    head = ("| model (Flickr8k test, 1000 images / 5000 captions) | T→I R@1 | R@5 | R@10 | medR "
            "| I→T R@1 | R@5 | R@10 | medR |")
    lines = [head, "|---|" + "---:|" * 8]
    for r in rows:
        cells = [r.get(f"{d}_{k}") for d in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10", "median_rank")]
        lines.append(f"| {r['label']} | " + " | ".join("–" if c is None else f"{c:g}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--encoder", default="zero-shot")
    ap.add_argument("--out", default="runs/bench_train", help="training output folder")
    ap.add_argument("--heads", help="skip training: evaluate this checkpoint")
    ap.add_argument("--cache-dir")
    ap.add_argument("--tta-flip", action="store_true", help="also report centre+flip feature averaging")
    ap.add_argument("--json", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()

    cfg = TrainerSettings(data=args.data, encoder=args.encoder, out=args.out, cache_dir=args.cache_dir)
    torch.set_num_threads(cfg.threads)
    spec = cfg.spec()
    enc = build_encoder(spec)
    cache = FeatureCache(cfg.cache_dir)
    need_flip = cfg.flip_aug or args.tta_flip

    t0 = time.perf_counter()
    splits, computed = {}, 0
    for name, flip in (("train", cfg.flip_aug), ("dev", False), ("test", need_flip)):
        recs = load_split(args.data, None, name)
        splits[name] = split_features(enc, recs, cache, flip=flip, workers=cfg.workers, progress=sys.stderr.isatty())
        computed += cache.last.computed
    cache_s = time.perf_counter() - t0

    rows = [dict(REFERENCE)]
    zs = evaluate_features(enc, splits["test"])
    rows.append(_row(f"zero-shot ({spec.label()})", zs.metrics))

    train_s = None
    result = None
    heads_path = args.heads
    if heads_path is None:
        trainer = Trainer(cfg, splits["train"], splits["dev"], backend=spec.backend,
                          identity=cfg.heads_identity())
        result = trainer.fit()
        train_s = result.seconds
        heads_path = str(result.best_path)
    trained = build_encoder(spec.model_copy(update={"heads": heads_path}))
    tr = evaluate_features(trained, splits["test"])
    rows.append(_row(f"trained heads ({Path(heads_path).name})", tr.metrics))
    if args.tta_flip:
        rows.append(_row("trained heads + flip averaging (not in the service)",
                         evaluate_features(trained, splits["test"], tta_flip=True).metrics))

    print(table(rows))
    print()
    print(f"- feature cache: {cache_s:.1f} s for train/dev/test ({computed} rows computed, the rest cache hits)")
    if result is not None:
        print(f"- training from cached features: {train_s:.1f} s, {result.steps} steps, best dev epoch "
              f"{result.best_epoch} (score {result.best_score:.2f}), {cfg.threads} threads, "
              f"early stop: {result.stopped_early}")
    print(f"- heads: {heads_path} sha256 {file_sha256(heads_path)}")

    report = {
        "machine": {"cpu_count": os.cpu_count(), "threads": cfg.threads, "platform": platform.platform()},
        "encoder": spec.label(),
        "config": cfg.model_dump(),
        "rows": rows,
        "zero_shot": zs.metrics,
        "trained": tr.metrics,
        "feature_cache_seconds": round(cache_s, 2),
        "feature_rows_computed": computed,
        "train_seconds": round(train_s, 2) if train_s is not None else None,
        "train_steps": result.steps if result else None,
        "best_dev_epoch": result.best_epoch if result else None,
        "heads": heads_path,
        "heads_sha256": file_sha256(heads_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    png = plots.recall_curves({"zero-shot": zs.curve, "trained heads": tr.curve}, Path(args.json).with_suffix(".png"),
                              title=f"{spec.label()} — Flickr8k test")
    print(f"- wrote {args.json} and {png}")


if __name__ == "__main__":
    main()
