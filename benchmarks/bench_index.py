"""Indexing speed on CPU: the naive way vs the batched job, torch fp32 vs bf16, and the full Flickr8k build with the
default settings (engine and precision auto). The engines side by side (ONNX Runtime, int8): bench_cpu.py.

    python benchmarks/bench_index.py --data ../shared/data/flickr8k            # all 8,000 images (minutes)
    python benchmarks/bench_index.py --data ../shared/data/flickr8k --quick    # a small subset

Rows (same images, same encoder config, one run):
- naive torch fp32 / bf16: one image at a time, decoded in the main process (what a first script would do)
- batched torch fp32 / bf16: DataLoader with worker processes, batch 16 and 32 (the job's encode loop, no writing)
- job, default settings (all images): `build_index` end to end — decode, encode, shards, FAISS index, atomic write
Prints a markdown table with images/s and the ratio to the naive row, plus bf16-vs-fp32 agreement, and writes
benchmarks/results/bench_index.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.data import DataLoader

from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index, plan_records
from indexer.settings import IndexerSettings
from retrieval.datasets.loader import ImageLoadDataset, collate_skipping
from retrieval.encoders import build_encoder, parse_spec
from retrieval.encoders.cpu import cpu_info
from retrieval.images import load_image
from retrieval.index import configure_faiss
from retrieval.metrics import retrieval_metrics
from retrieval.settings import EncoderSettings


def naive(encoder, records) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vecs = [encoder.encode_images([load_image(r.path)]) for r in records]
    return time.perf_counter() - start, np.concatenate(vecs)


def batched(encoder, records, batch_size: int, workers: int) -> tuple[float, np.ndarray]:
    loader = DataLoader(ImageLoadDataset(records, encoder.image_transform), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_skipping)
    start = time.perf_counter()
    vecs = [encoder.encode_pixels(b.pixels) for b in loader]
    return time.perf_counter() - start, np.concatenate(vecs)


def main() -> None:
    configure_faiss()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--naive-n", type=int, default=200, help="images for the naive row")
    ap.add_argument("--compare-n", type=int, default=1000, help="images (test split) for the fp32/bf16 rows")
    ap.add_argument("--full", type=int, default=None, help="images for the job row (default: all)")
    ap.add_argument("--quick", action="store_true", help="naive 50, compare 200, job 500")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.naive_n, args.compare_n, args.full = 50, 200, 500
    torch.manual_seed(0)

    test = plan_records(args.data, split="test", limit=args.compare_n)
    enc32 = build_encoder(parse_spec(args.encoder, engine="torch", precision="fp32", device="cpu"))
    enc16 = build_encoder(parse_spec(args.encoder, engine="torch", precision="bf16", device="cpu"))
    rows = []
    few = test[: args.naive_n]
    t, _ = naive(enc32, few)
    naive_rate = len(few) / t
    rows.append(("naive fp32 (batch 1, no workers)", len(few), t, naive_rate))
    t, _ = naive(enc16, few)
    rows.append(("naive bf16 (batch 1, no workers)", len(few), t, len(few) / t))
    bs, w = args.batch_size, args.workers
    t32, v32 = batched(enc32, test, bs, w)
    rows.append((f"batched fp32 (batch {bs}, {w} workers)", len(test), t32, len(test) / t32))
    t16, v16 = batched(enc16, test, bs, w)
    rows.append((f"batched bf16 (batch {bs}, {w} workers)", len(test), t16, len(test) / t16))
    t, _ = batched(enc16, test, 2 * bs, w)
    rows.append((f"batched bf16 (batch {2 * bs}, {w} workers)", len(test), t, len(test) / t))

    # agreement: cosine per image, and zero-shot retrieval with each precision's image vectors
    cos = (v32 * v16).sum(1)
    caps = [c for r in test for c in r.captions]
    t2i = np.repeat(np.arange(len(test)), [len(r.captions) for r in test])
    txt = np.concatenate([enc32.encode_text(caps[i : i + 256]) for i in range(0, len(caps), 256)])
    m32 = retrieval_metrics(v32, txt, t2i)
    m16 = retrieval_metrics(v16, txt, t2i)

    all_records = plan_records(args.data, limit=args.full)
    out = Path(tempfile.mkdtemp(prefix="bench-index-")) / "idx"
    settings = IndexerSettings(encoder=EncoderSettings(name=args.encoder, device="cpu"),
                               batch_size=args.batch_size, workers=args.workers, progress=False)
    enc_auto = build_encoder(settings.encoder.spec())
    start = time.perf_counter()
    result = build_index(args.data, out, settings, limit=args.full, engine=LocalEngine(enc_auto, settings))
    tj = time.perf_counter() - start
    rows.append((f"job, default settings ({enc_auto.runtime_label()}): build_index end to end "
                 f"({len(all_records)} images)", result.manifest.count, tj, result.manifest.count / tj))
    shutil.rmtree(out.parent, ignore_errors=True)

    print(f"\n## Indexing speed — {args.encoder} ({enc16.spec.label()}), torch {torch.__version__}, "
          f"{cpu_info().describe()}\n")
    print("| mode | images | seconds | images/s | vs naive |")
    print("|---|---:|---:|---:|---:|")
    for name, n, secs, rate in rows:
        print(f"| {name} | {n} | {secs:.1f} | {rate:.1f} | {rate / naive_rate:.1f}x |")
    print(f"\nbf16 vs fp32 image embeddings over {len(test)} test images: cosine min {cos.min():.4f}, "
          f"mean {cos.mean():.5f}")
    print(f"T→I R@1/5/10 over those {len(test)} images and their captions, fp32 image vectors: "
          f"{m32['t2i']['R@1']:.1f}/{m32['t2i']['R@5']:.1f}/{m32['t2i']['R@10']:.1f}; "
          f"bf16: {m16['t2i']['R@1']:.1f}/{m16['t2i']['R@5']:.1f}/{m16['t2i']['R@10']:.1f}")
    results = {
        "encoder": enc16.spec.label(), "cpu": cpu_info().describe(),
        "rows": [{"mode": n, "images": c, "seconds": round(s, 2), "images_per_s": round(r, 2)} for n, c, s, r in rows],
        "bf16_cosine_min": float(cos.min()), "bf16_cosine_mean": float(cos.mean()),
        "retrieval_fp32": m32, "retrieval_bf16": m16,
    }
    dest = Path(__file__).parent / "results" / "bench_index.json"
    dest.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
