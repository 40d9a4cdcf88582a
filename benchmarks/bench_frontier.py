"""Speed/quality frontier of the candidate encoders: images/s on this CPU vs Flickr8k R@1 vs Caltech-101 mAP.

    python benchmarks/bench_frontier.py                      # measure images/s of every candidate, print + plot
    python benchmarks/bench_frontier.py --engines torch-fp32 torch-bf16 --batch 16 --seconds 20

Speed: preprocessed pixels (real Flickr8k test photos, decoding excluded) through ``backbone + heads`` with
``Encoder.encode_pixels`` at ``--batch`` on ``--threads`` threads, after a warm-up; the median of ``--repeats``
timed windows. Engines: ``ENGINE-PRECISION`` (torch fp32 / bf16, ONNX Runtime fp32 / int8). Quality: the dev-set
rows of ``benchmarks/results/quality_sweep.jsonl`` named in :data:`CANDIDATES` (choices are made on dev; test
numbers live in bench_train.json / the model card). Prints a markdown table with the CPU model and flags, writes
``benchmarks/results/bench_frontier.json`` and ``bench_frontier.png``. Timings on a shared machine are provisional.
Quality rows: ``benchmarks/results/quality_frontier.json`` (dev numbers copied from quality_sweep.jsonl; Lite2: the
earlier dev sweep of mlp heads, Caltech not measured)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from retrieval.encoders import build_encoder, parse_spec
from retrieval.images import load_image

#: candidate -> its encoder (registry name or spec string) and the key of its dev quality in ``--quality``
CANDIDATES: dict[str, dict[str, Any]] = {
    "zero-shot (Lite0 label bridge)": {"encoder": "zero-shot", "quality": "zero-shot"},
    "caption-heads (Lite0, previous default)": {"encoder": "caption-heads", "quality": "caption-heads"},
    "default (Lite0 caption heads + bridge, gated)": {"encoder": "default", "quality": "default"},
    "Lite2 label bridge (speed of a Lite2 candidate)": {"encoder": "dual:efficientnet-lite2", "quality": "lite2"},
}


def cpu_summary() -> dict[str, Any]:
    """The processor as the encoders see it (:func:`retrieval.encoders.cpu.cpu_info`) plus torch's capability."""
    from retrieval.encoders.cpu import cpu_info

    info = cpu_info()
    return {"model": info.describe(), "flags": sorted(info.flags), "cores": info.cores,
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()}


def images_per_s(spec_str: str, heads: str | None, engine: str, precision: str, pixels: torch.Tensor, batch: int,
                 seconds: float, repeats: int) -> float:
    enc = build_encoder(parse_spec(spec_str, engine=engine, precision=precision, device="cpu", heads=heads))
    x = pixels[:batch]
    enc.encode_pixels(x)
    enc.encode_pixels(x)  # warm-up (oneDNN primitive creation)
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / repeats:
            enc.encode_pixels(x)
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--engines", nargs="+", default=["torch-fp32", "torch-bf16", "onnx-fp32"],
                    help="ENGINE-PRECISION: torch-fp32, torch-bf16, onnx-fp32, onnx-int8")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=12.0, help="timed seconds per candidate and engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", default="benchmarks/results/quality_frontier.json",
                    help="dev quality per candidate (written by the sweep; see the model card)")
    ap.add_argument("--json", default="benchmarks/results/bench_frontier.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    quality = json.loads(Path(args.quality).read_text()) if Path(args.quality).is_file() else {}
    images = sorted((Path(args.data) / "images").glob("*.jpg"))[: args.batch]
    rows = []
    for name, cand in CANDIDATES.items():
        heads = None
        enc = build_encoder(parse_spec(cand["encoder"], precision="fp32", device="cpu"))
        pixels = torch.stack([enc.image_transform(load_image(p)) for p in images])
        row: dict[str, Any] = {"candidate": name, "encoder": cand["encoder"], "dim": enc.dim,
                               **quality.get(cand["quality"], {})}
        for engine in args.engines:
            kind, _, precision = engine.partition("-")
            row[engine] = round(images_per_s(cand["encoder"], heads, kind, precision, pixels, args.batch,
                                             args.seconds, args.repeats), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    cpu = cpu_summary()
    print(f"\nCPU: {cpu['model']} (torch capability {cpu['torch_capability']}); {args.threads} threads, "
          f"batch {args.batch}, decoding excluded\n")
    cols = [e for e in args.engines if any(e in r for r in rows)]
    print("| candidate | " + " | ".join(f"images/s {c}" for c in cols)
          + " | Flickr8k dev T→I R@1 | Caltech-101 dev mAP | P@10 |")
    print("|---|" + "---:|" * (len(cols) + 3))
    for r in rows:
        cells = [f"{r.get(c, '–')}" for c in cols] + [str(r.get(k, "–")) for k in ("dev_t2i_R@1", "caltech_mAP",
                                                                                     "caltech_P@10")]
        print(f"| {r['candidate']} | " + " | ".join(cells) + " |")
    out = {"cpu": cpu, "threads": args.threads, "batch": args.batch, "rows": rows,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.json).write_text(json.dumps(out, indent=2))
    plot(rows, cols, Path(args.json).with_suffix(".png"), cpu["model"])
    print(f"\nwrote {args.json} and {Path(args.json).with_suffix('.png')}")


def plot(rows: list[dict[str, Any]], engines: list[str], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    engine = "onnx-fp32" if "onnx-fp32" in engines else engines[0]
    for ax, key, name in zip(axes, ("dev_t2i_R@1", "caltech_mAP"), ("Flickr8k dev T→I R@1", "Caltech-101 dev mAP"),
                             strict=True):
        for r in rows:
            if engine in r and key in r:
                ax.scatter(r[engine], r[key], s=40)
                ax.annotate(r["candidate"], (r[engine], r[key]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.axvline(100, color="0.6", ls="--", lw=1)
        ax.set_xlabel(f"images/s ({engine}, 2 threads)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(f"speed/quality frontier — {cpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
