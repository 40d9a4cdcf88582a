"""Command line: ``python -m trainer features|train|compose|fusion|eval`` (also installed as ``retrieval-train``).

``train`` flags map one to one onto :class:`~trainer.config.TrainerSettings` fields (``--batch-size`` ->
``batch_size``); unset flags fall back to ``TRAINER_*`` environment variables, then the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write_text
from retrieval.cli_flags import add_settings_flags, settings_from_flags
from retrieval.errors import RetrievalError
from trainer.config import TrainerSettings
from trainer.fusion import add_fusion_parser, cmd_fusion

log = logging.getLogger("trainer")


def settings_from_args(ns: argparse.Namespace) -> TrainerSettings:
    """CLI values (those given) override environment and defaults."""
    return settings_from_flags(TrainerSettings, ns)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("features", help="compute and cache frozen-backbone features")
    f.add_argument("--data", required=True)
    f.add_argument("--captions")
    f.add_argument("--split", help="only this split (default: every captioned image)")
    f.add_argument("--encoder", default="zero-shot")
    f.add_argument("--cache-dir")
    f.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also cache horizontally flipped views (training augmentation / test-time averaging)")
    f.add_argument("--workers", type=int, default=2)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="backbone precision (part of the cache key: train with the same --precision)")
    f.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                   help="onnx: run the backbones in ONNX Runtime (with --precision fp32; several times faster on CPU)")

    t = sub.add_parser("train", help="train projection heads on cached features")
    add_settings_flags(t, TrainerSettings)

    add_fusion_parser(sub)

    c = sub.add_parser("compose", help="join trained caption heads with the label bridge (per-query gate)")
    c.add_argument("--heads", required=True, help="mlp caption heads (python -m trainer train)")
    c.add_argument("--out", required=True)
    c.add_argument("--data", default="../shared/data/flickr8k")
    c.add_argument("--class-data", default="../shared/data/caltech101-dev")
    c.add_argument("--encoder", default="zero-shot")
    c.add_argument("--anchor-weight", type=float, default=0.5)
    c.add_argument("--gate-center", type=float, default=0.6)
    c.add_argument("--gate-width", type=float, default=0.03)
    c.add_argument("--via-activations", type=int, default=None)
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="backbone precision the heads were trained on (the feature cache key)")
    c.add_argument("--threads", type=int, default=2)

    e = sub.add_parser("eval", help="retrieval metrics + plots on a split or captions file")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", help="train/dev/test, or 'all'")
    e.add_argument("--captions")
    e.add_argument("--encoder", default="zero-shot")
    e.add_argument("--heads", help="head checkpoint (default: the encoder's zero-shot head)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--cache-dir")
    e.add_argument("--tta-flip", action="store_true", help="average centre and flipped image features")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--grid", type=int, default=6, help="queries in the result grid (0: none)")
    e.add_argument("--class-data", help="also score class-prompt retrieval on this class-labelled set "
                   "(e.g. ../shared/data/caltech101-dev)")
    e.add_argument("--map", default="auto", choices=["auto", "umap", "tsne", "pca"],
                   help="2-D map of the embeddings (auto: UMAP if installed, else t-SNE, else PCA)")
    return p


def cmd_features(ns: argparse.Namespace) -> dict[str, Any]:
    from retrieval.encoders import build_encoder, parse_spec
    from trainer.evaluate import load_split
    from trainer.features import FeatureCache, split_features

    enc = build_encoder(parse_spec(ns.encoder, precision=ns.precision, engine="torch"))
    records = load_split(ns.data, ns.captions, ns.split)
    cache = FeatureCache(ns.cache_dir, engine=ns.engine)
    t0 = time.perf_counter()
    feats = split_features(enc, records, cache, flip=ns.flip, batch_size=ns.batch_size, workers=ns.workers,
                           progress=sys.stderr.isatty())
    return {"encoder": enc.spec.label(), "images": len(feats.ids), "captions": len(feats.captions),
            "flip": ns.flip, "engine": ns.engine, "dtype": str(enc.dtype), "cache_dir": str(cache.dir),
            "seconds": round(time.perf_counter() - t0, 2)}


def run_train(cfg: TrainerSettings) -> dict[str, Any]:
    """Feature caching + training; writes ``<out>/metrics.json`` and returns it."""
    import torch

    from retrieval.checksums import file_sha256
    from retrieval.encoders import build_encoder
    from trainer.features import FeatureCache
    from trainer.prepare import prepare
    from trainer.train import Trainer

    torch.set_num_threads(cfg.threads)
    spec = cfg.spec()
    enc = build_encoder(spec)
    data = prepare(cfg, enc, FeatureCache(cfg.cache_dir))
    feature_s = data.seconds["total"]
    identity = cfg.heads_identity()
    trainer = Trainer(cfg, data.train, data.dev, backend=spec.backend, identity=identity, prior=data.prior,
                      class_dev=data.class_dev, tail=data.tail)
    last = Path(cfg.out) / "last.pt"
    if cfg.resume and last.is_file():
        trainer.load_state(last)
        log.info("resumed from %s at epoch %d (step %d)", last, trainer.epoch, trainer.step)
    result = trainer.fit(on_epoch=lambda row: log.info(
        "epoch %d loss %.4f dev %.2f", row["epoch"], row["loss"], row.get("dev_score", float("nan"))))
    report = {
        "encoder": spec.label(),
        "head": trainer.head_cfg.model_dump(exclude={"encoder"}),
        "config": cfg.model_dump(),
        "best_epoch": result.best_epoch,
        "best_dev_score": result.best_score,
        "best_dev_metrics": result.best_metrics,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "feature_seconds": round(feature_s, 2),
        "threads": cfg.threads,
        "best": str(result.best_path) if result.best_path else None,
        "best_sha256": file_sha256(result.best_path) if result.best_path else None,
        "history": result.history,
    }
    atomic_write_text(Path(cfg.out, "metrics.json"), json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "features":
            print(json.dumps(cmd_features(ns), indent=2))
        elif ns.command == "compose":
            from trainer.compose import compose

            cfg = TrainerSettings(data=ns.data, class_data=ns.class_data, encoder=ns.encoder,
                                  via_activations=ns.via_activations, threads=ns.threads, precision=ns.precision)
            rep = compose(cfg, ns.heads, ns.out, ns.anchor_weight, ns.gate_center, ns.gate_width)
            brief = {k: v for k, v in rep.items() if k not in ("dev", "class_dev")}
            brief["dev"] = {d: {k: round(rep["dev"][d][k], 2) for k in ("R@1", "R@5", "R@10")} for d in ("t2i", "i2t")}
            if "class_dev" in rep:
                brief["class_dev"] = {k: round(rep["class_dev"][k], 2) for k in ("R@1", "P@10", "mAP")}
            print(json.dumps(brief, indent=2))
        elif ns.command == "train":
            rep = run_train(settings_from_args(ns))
            brief = {k: rep[k] for k in ("encoder", "best_epoch", "best_dev_score", "train_seconds", "best",
                                         "best_sha256")}
            if rep["best_dev_metrics"]:
                brief["dev"] = {d: {k: round(rep["best_dev_metrics"][d][k], 2) for k in ("R@1", "R@5", "R@10")}
                                for d in ("t2i", "i2t")}
            print(json.dumps(brief, indent=2))
        elif ns.command == "fusion":
            rep = cmd_fusion(ns)
            print(json.dumps({k: rep[k] for k in ("encoder", "train_triplets", "dev_triplets", "dev",
                                                  "dev_baselines", "sha256")}, indent=2))
        else:
            from trainer.evaluate import run_eval, summary_table

            rep = run_eval(ns.data, ns.encoder, heads=ns.heads, split=ns.split, captions=ns.captions, out=ns.out,
                           cache_dir=ns.cache_dir, tta_flip=ns.tta_flip, workers=ns.workers, grid=ns.grid,
                           class_data=ns.class_data, map_method=ns.map)
            print(summary_table([rep]))
            print(f"\nwrote {Path(ns.out) / 'metrics.json'}, recall_at_k.png, results_grid.png")
    except RetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
