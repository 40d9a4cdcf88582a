"""Dev-set sweep for the default encoder: captions (Flickr8k dev) and everyday objects (Caltech-101 dev) at once.

    python benchmarks/bench_quality.py --encoder zero-shot --via-activations 11 \
        --run '{"head": "anchored"}' --run '{"head": "anchored", "distill": 1.0}'

Every run trains heads with the trainer's settings plus the run's overrides (a JSON object of
:class:`~trainer.config.TrainerSettings` fields) on Flickr8k train, selects its epoch on the dev score
(``select``), and appends one JSON line to ``benchmarks/results/quality_sweep.jsonl``: the overrides, Flickr8k dev
R@1/5/10 both ways, Caltech-101 dev R@1/P@10/mAP, the epoch, and the seconds it took. Test splits are never read
here: the shipped model is evaluated once on test by ``benchmarks/bench_train.py``.
Features (and cached activations) are prepared once per distinct (encoder, cut, unfreeze, flip) and shared by
the runs. Runs are niced by the caller (``nice -n 10``) on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from retrieval.encoders import build_encoder
from trainer.config import TrainerSettings
from trainer.features import FeatureCache
from trainer.prepare import Prepared, prepare
from trainer.train import Trainer, TrainResult


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(base: dict[str, Any], overrides: dict[str, Any], data: Prepared, out_root: Path) -> dict[str, Any]:
    """Train one config on prepared data; returns the result row."""
    cfg = TrainerSettings(**{**base, **overrides, "out": str(out_root / f"run-{int(time.time() * 1000)}")})
    enc_spec = cfg.spec()
    identity = cfg.heads_identity()
    tail = copy.deepcopy(data.tail) if data.tail is not None and cfg.unfreeze_from else None
    trainer = Trainer(cfg, data.train, data.dev, backend=enc_spec.backend, identity=identity, prior=data.prior,
                      class_dev=data.class_dev, tail=tail)
    res = trainer.fit()
    row: dict[str, Any] = {"encoder": cfg.encoder, "overrides": overrides, "select": cfg.select,
                           **result_columns(res)}
    row["best"] = str(res.best_path) if res.best_path else None
    return row


def result_columns(res: TrainResult) -> dict[str, Any]:
    """A training run's sweep-row columns: best epoch, selection score, training seconds and the best epoch's
    :func:`metric_columns`."""
    m = res.best_metrics or {}
    return {"best_epoch": res.best_epoch, "score": round(res.best_score, 2), "train_s": round(res.seconds, 1),
            **metric_columns(m, m.get("classes"))}


def metric_columns(dev: dict[str, Any], classes: dict[str, Any] | None) -> dict[str, float | None]:
    """A sweep row's metric columns: ``dev_{t2i,i2t}_R@{1,5,10}`` from ``dev`` (Flickr8k dev, per direction) and
    ``caltech_{R@1,P@10,mAP}`` from ``classes`` (Caltech-101 dev); None where a part was not measured."""
    row: dict[str, float | None] = {}
    for d in ("t2i", "i2t"):
        for k in ("R@1", "R@5", "R@10"):
            row[f"dev_{d}_{k}"] = round(dev[d][k], 2) if d in dev else None
    for k in ("R@1", "P@10", "mAP"):
        row[f"caltech_{k}"] = round(classes[k], 2) if classes is not None else None
    return row


def append_row(jsonl: str | Path, row: dict[str, Any]) -> None:
    """Stamp ``row`` with its UTC creation time and append it as one line to the sweep log ``jsonl``."""
    row["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(jsonl, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--class-data", default="../shared/data/caltech101-dev")
    ap.add_argument("--encoder", default="zero-shot")
    ap.add_argument("--via-activations", type=int, default=11)
    ap.add_argument("--unfreeze-from", type=int)
    ap.add_argument("--run", action="append", default=[], help="JSON object of TrainerSettings overrides")
    ap.add_argument("--base", default="{}", help="JSON overrides shared by every run")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--jsonl", default="benchmarks/results/quality_sweep.jsonl")
    args = ap.parse_args()

    base = {"data": args.data, "class_data": args.class_data, "encoder": args.encoder,
            "via_activations": args.via_activations, "unfreeze_from": args.unfreeze_from, "head": "anchored",
            **json.loads(args.base)}
    prep_cfg = TrainerSettings(**base)
    torch.set_num_threads(prep_cfg.threads)
    enc = build_encoder(prep_cfg.spec())
    t0 = time.perf_counter()
    data = prepare(prep_cfg, enc, FeatureCache(prep_cfg.cache_dir))
    print(f"prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    runs = [json.loads(r) for r in args.run] or [{}]
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": prep_cfg.threads}
    for overrides in runs:
        row = run_one(base, overrides, data, Path(args.out))
        row.update({"base": json.loads(args.base), "unfreeze_from": args.unfreeze_from,
                    "via_activations": base["via_activations"], "machine": machine})
        append_row(args.jsonl, row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "best")}), flush=True)


if __name__ == "__main__":
    main()
