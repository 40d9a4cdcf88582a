"""Dev grid for ``python -m trainer compose``: caption heads + label bridge, per-query gate.

    python benchmarks/bench_compose.py --heads runs/q10/run-.../best.pt \
        --encoder dual:efficientnet-lite0:all-mpnet-base-v2 --precision fp32 --weights 0.4 0.5 --centers 0.5 0.6

Every (anchor weight, gate centre) pair is composed, scored on Flickr8k dev and Caltech-101 dev, and appended as
one row (``"recipe": "compose"``) to ``benchmarks/results/quality_sweep.jsonl``; the composed heads go to
``--out/w{weight}-c{centre}.pt``. Pick on the printed dev numbers (mean of the caption dev score and the Caltech
mAP), never on test. Cached features only (``python -m trainer features`` first), so each point takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_quality import append_row, metric_columns
from retrieval.encoders.cpu import cpu_info
from trainer.compose import compose
from trainer.config import TrainerSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", required=True, help="mlp caption heads (python -m trainer train / bench_quality)")
    ap.add_argument("--encoder", default="zero-shot")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--via-activations", type=int)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--class-data", default="../shared/data/caltech101-dev")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.4])
    ap.add_argument("--centers", type=float, nargs="+", default=[0.55])
    ap.add_argument("--width", type=float, default=0.03)
    ap.add_argument("--label", default="", help="free text stored with each row (what the heads are)")
    ap.add_argument("--out", default="runs/compose")
    ap.add_argument("--jsonl", default="benchmarks/results/quality_sweep.jsonl")
    args = ap.parse_args()
    cfg = TrainerSettings(data=args.data, class_data=args.class_data, encoder=args.encoder,
                          precision=args.precision, via_activations=args.via_activations)
    machine = {"cpu": cpu_info().describe(), "cores": os.cpu_count(), "threads": cfg.threads}
    for w in args.weights:
        for c in args.centers:
            out = Path(args.out) / f"w{w}-c{c}.pt"
            rep = compose(cfg, args.heads, out, w, c, args.width)
            row = {"encoder": args.encoder, "recipe": "compose", "source_heads": args.label or args.heads,
                   "precision": args.precision, "overrides": {"anchor_weight": w, "gate_center": c,
                                                               "gate_width": args.width},
                   "select": "dev grid", **metric_columns(rep["dev"], rep.get("class_dev")),
                   "seconds": rep["seconds"], "machine": machine}
            append_row(args.jsonl, row)
            print(json.dumps({k: row[k] for k in ("overrides", "dev_t2i_R@1", "dev_t2i_R@5", "dev_t2i_R@10",
                                                  "caltech_R@1", "caltech_P@10", "caltech_mAP")}), flush=True)


if __name__ == "__main__":
    main()
