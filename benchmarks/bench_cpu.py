"""CPU inference, side by side in one run: torch fp32, torch bf16, ONNX Runtime fp32, ONNX Runtime int8 and the
default settings (``auto``), with the processor and its flags in the table header.

    python benchmarks/bench_cpu.py --data ../shared/data/flickr8k            # make bench-cpu
    python benchmarks/bench_cpu.py --data ../shared/data/flickr8k --quick    # builds of the 1,000 test photos

Per configuration: image tower images/s (batch 16, pre-decoded pixels: the encoder alone), text queries/s at batch
64 and at batch 1 with single-query p50/p99 (tokenisation included), the full build of every Flickr8k image with
the indexer (decode + encode + write; seconds and images/s), and text->image R@1/5/10 on the Flickr8k test split
(5,000 captions against the 1,000 test images, vectors taken from that build; with ``--full N`` only the test
images among the first N). The fp32 engines must agree within
0.3 R@1 points. Then, for the default settings: decode alone vs encode alone vs both with 0/1/2 DataLoader workers,
and JPEG draft decoding on 12 MP photos (time and embedding cosine). Results: benchmarks/results/bench_cpu.json.

The machine may be shared: the load average at start and end is printed; rerun on a quiet machine for final
numbers (ratios within one run are the fair comparison).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index, plan_records
from indexer.settings import IndexerSettings
from retrieval.datasets.loader import ImageLoadDataset, collate_skipping
from retrieval.encoders import build_encoder, parse_spec
from retrieval.encoders.cpu import cpu_info
from retrieval.images import load_image
from retrieval.index import IndexStore, configure_faiss
from retrieval.metrics import retrieval_metrics
from retrieval.settings import EncoderSettings

CONFIGS = {
    "torch-fp32": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),
    "onnx-fp32": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
    "auto": ("auto", "auto"),
}


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def rate(fn: Any, items_per_call: int, min_seconds: float, min_calls: int = 3) -> float:
    """Items per second of ``fn`` (one warm-up call; the median call time over at least ``min_seconds``)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items_per_call / statistics.median(times)


def measure_config(name: str, args: argparse.Namespace, pixels: torch.Tensor, captions: list[str],
                   test_ids: list[str], test_caps: list[str], test_t2i: np.ndarray) -> dict[str, Any]:
    engine, precision = CONFIGS[name]
    t0 = time.perf_counter()
    enc = build_encoder(parse_spec(args.encoder, engine=engine, precision=precision, device="cpu"))
    row: dict[str, Any] = {"config": name, "runtime": enc.runtime_label(), "build_encoder_s": time.perf_counter() - t0,
                           "reasons": enc.runtime_info()}
    print(f"\n[{name}] {enc.runtime_label()} (built in {row['build_encoder_s']:.1f} s)", flush=True)
    batches = [pixels[i:i + 16] for i in range(0, len(pixels), 16)]
    row["image_per_s"] = rate(lambda: [enc.encode_pixels(b) for b in batches], len(pixels), args.seconds)
    print(f"  image tower: {row['image_per_s']:.1f} images/s", flush=True)
    chunks = [captions[i:i + 64] for i in range(0, 64 * 4, 64)]
    row["text64_per_s"] = rate(lambda: [enc.encode_text(c) for c in chunks], 64 * len(chunks), args.seconds)
    lat = single_query_seconds(enc, captions[256:256 + args.single_queries])
    row["text1_p50_ms"] = 1000 * float(np.percentile(lat, 50))
    row["text1_p99_ms"] = 1000 * float(np.percentile(lat, 99))
    row["text1_per_s"] = len(lat) / sum(lat)
    print(f"  text: batch 64 {row['text64_per_s']:.0f}/s, batch 1 {row['text1_per_s']:.0f}/s, "
          f"p50 {row['text1_p50_ms']:.1f} ms p99 {row['text1_p99_ms']:.1f} ms", flush=True)

    out = Path(tempfile.mkdtemp(prefix=f"bench-cpu-{name}-")) / "idx"
    settings = IndexerSettings(encoder=EncoderSettings(name=args.encoder, engine=engine, precision=precision,
                                                       device="cpu"), progress=False)
    t0 = time.perf_counter()
    result = build_index(args.data, out, settings, split=args.build_split, limit=args.full,
                         engine=LocalEngine(enc, settings))
    row["build_s"] = time.perf_counter() - t0
    row["build_images"] = result.manifest.count
    row["build_per_s"] = result.manifest.count / row["build_s"]
    print(f"  build: {row['build_images']} images in {row['build_s']:.1f} s ({row['build_per_s']:.1f}/s)", flush=True)
    store = IndexStore.open(out)
    indexed = set(store.ids)
    keep = [j for j, i in enumerate(test_ids) if i in indexed]  # all of them unless --full cut the build short
    img = np.stack([store.vector(test_ids[j]) for j in keep]).astype(np.float32)
    pos = {j: n for n, j in enumerate(keep)}
    caps = [(c, pos[j]) for c, j in zip(test_caps, test_t2i, strict=True) if j in pos]
    texts = [c for c, _ in caps]
    txt = np.concatenate([enc.encode_text(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    m = retrieval_metrics(img, txt, np.asarray([j for _, j in caps]))["t2i"]
    row.update({"R@1": m["R@1"], "R@5": m["R@5"], "R@10": m["R@10"], "test_images": len(keep)})
    row["_test_vectors"] = img
    print(f"  T->I R@1/5/10: {m['R@1']:.2f}/{m['R@5']:.2f}/{m['R@10']:.2f}", flush=True)
    shutil.rmtree(out.parent, ignore_errors=True)
    return row


def decode_vs_encode(args: argparse.Namespace, records: list[Any]) -> list[dict[str, Any]]:
    """The default settings' encoder: decode alone, encode alone, both, with 0/1/2 DataLoader workers."""
    enc = build_encoder(parse_spec(args.encoder, device="cpu"))
    ds = ImageLoadDataset(records, enc.image_transform, draft=enc.decode_draft())
    rows = []
    pre: list[torch.Tensor] = []
    for workers in (0, 1, 2):
        loader = DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=collate_skipping)
        t0 = time.perf_counter()
        batches = [b.pixels for b in loader]
        decode = len(records) / (time.perf_counter() - t0)
        pre = batches
        t0 = time.perf_counter()
        for b in DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=collate_skipping):
            enc.encode_pixels(b.pixels)
        both = len(records) / (time.perf_counter() - t0)
        rows.append({"workers": workers, "decode_per_s": decode, "both_per_s": both})
    t0 = time.perf_counter()
    for b in pre:
        enc.encode_pixels(b)
    encode_alone = len(records) / (time.perf_counter() - t0)
    for r in rows:
        r["encode_alone_per_s"] = encode_alone
    return rows


def draft_check(args: argparse.Namespace, records: list[Any], n: int = 16) -> dict[str, Any]:
    """12 MP JPEGs (Flickr8k test photos upscaled to 4032x3024): decode + transform time and embeddings with and
    without draft decoding."""
    enc = build_encoder(parse_spec(args.encoder, device="cpu"))
    blobs = []
    for r in records[:n]:
        buf = io.BytesIO()
        load_image(r.path).resize((4032, 3024), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    out: dict[str, Any] = {"images": len(blobs), "size": "4032x3024"}
    vecs = {}
    for label, draft in (("full", None), ("draft", enc.decode_draft())):
        t0 = time.perf_counter()
        pix = torch.stack([enc.image_transform(load_image(b, draft=draft)) for b in blobs])
        out[f"{label}_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(blobs)
        vecs[label] = enc.encode_pixels(pix)
    cos = (vecs["full"] * vecs["draft"]).sum(1)
    out["cosine_min"], out["cosine_mean"] = float(cos.min()), float(cos.mean())
    return out


def single_query_seconds(enc: Any, texts: list[str], warmup: int = 5) -> list[float]:
    """Seconds of ``enc.encode_text([q])`` for each of ``texts`` (one query per call, after ``warmup`` calls)."""
    for q in texts[:warmup]:
        enc.encode_text([q])
    lat = []
    for q in texts:
        t = time.perf_counter()
        enc.encode_text([q])
        lat.append(time.perf_counter() - t)
    return lat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    p.add_argument("--encoder", default="default")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--full", type=int, default=None, help="images in the build rows (default: all)")
    p.add_argument("--seconds", type=float, default=4.0, help="minimum timing per tower measurement")
    p.add_argument("--single-queries", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="builds of the 1,000 test photos, shorter timings")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_cpu.json")
    args = p.parse_args()
    args.build_split = None
    if args.quick:  # the 1,000 test photos only
        args.build_split, args.seconds, args.single_queries = "test", 1.5, 100
    configure_faiss()
    torch.manual_seed(0)
    cpu = cpu_info()
    load_start = load_avg()
    print(f"CPU: {cpu.describe()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"load average at start {load_start}", flush=True)

    test = plan_records(args.data, split="test")
    test_ids = [r.id for r in test]
    test_caps = [c for r in test for c in r.captions]
    test_t2i = np.repeat(np.arange(len(test)), [len(r.captions) for r in test])
    train_caps = list(dict.fromkeys(c for r in plan_records(args.data, split="train") for c in r.captions))
    probe = build_encoder(parse_spec(args.encoder, engine="torch", precision="fp32", device="cpu"))
    pixels = torch.stack([probe.image_transform(load_image(r.path)) for r in test[:64]])
    del probe

    rows = [measure_config(name, args, pixels, train_caps, test_ids, test_caps, test_t2i)
            for name in args.configs.split(",")]
    by = {r["config"]: r for r in rows}
    base = by.get("torch-fp32")
    print("\ndecode vs encode (default settings) ...", flush=True)
    dve = decode_vs_encode(args, test[: min(len(test), 480)])
    print("JPEG draft on 12 MP photos ...", flush=True)
    draft = draft_check(args, test)
    load_end = load_avg()

    lines = [f"### CPU inference — {args.encoder} encoder, {cpu.describe()}",
             "",
             f"torch {torch.__version__}; onnxruntime {_ort_version()}; load average {load_start} at start, "
             f"{load_end} at end ({os.cpu_count()} CPUs)",
             "",
             "| config | runs as | image tower img/s (batch 16) | vs torch fp32 | text q/s batch 64 | text q/s batch 1 "
             "| single query p50 / p99 ms | build: images, s, img/s | T→I R@1 / R@5 / R@10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['image_per_s'] / base['image_per_s']:.2f}x" if base else "–"
        lines.append(f"| {r['config']} | {r['runtime']} | {r['image_per_s']:.1f} | {ratio} | {r['text64_per_s']:.0f} "
                     f"| {r['text1_per_s']:.0f} | {r['text1_p50_ms']:.1f} / {r['text1_p99_ms']:.1f} "
                     f"| {r['build_images']}, {r['build_s']:.1f}, {r['build_per_s']:.1f} "
                     f"| {r['R@1']:.2f} / {r['R@5']:.2f} / {r['R@10']:.2f} |")
    agree = ""
    if "torch-fp32" in by and "onnx-fp32" in by:
        a, b = by["torch-fp32"], by["onnx-fp32"]
        cos = (a["_test_vectors"] * b["_test_vectors"]).sum(1)
        delta = abs(a["R@1"] - b["R@1"])
        agree = (f"fp32 engines: R@1 differs by {delta:.2f} points ({'within' if delta <= 0.3 else 'OUTSIDE'} 0.3); "
                 f"test-image embedding cosine min {cos.min():.6f}")
        lines += ["", agree]
    if "auto" in by:
        lines += ["", f"auto chose: image — {by['auto']['reasons']['image']['reason']}; "
                      f"text — {by['auto']['reasons']['text']['reason']}"]
    lines += ["", "| DataLoader workers | decode alone img/s | encode alone img/s | decode + encode img/s |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {d['workers']} | {d['decode_per_s']:.0f} | {d['encode_alone_per_s']:.0f} | {d['both_per_s']:.0f} |"
              for d in dve]
    lines += ["", f"JPEG draft ({draft['images']} photos at {draft['size']}): decode + transform "
                  f"{draft['full_ms_per_image']:.0f} ms/image full, {draft['draft_ms_per_image']:.0f} ms/image with "
                  f"draft; embedding cosine min {draft['cosine_min']:.5f}, mean {draft['cosine_mean']:.5f}"]
    md = "\n".join(lines)
    print("\n" + md)
    for r in rows:
        r.pop("_test_vectors", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu.describe(), "rows": rows, "decode_vs_encode": dve, "draft": draft,
                                    "load_start": load_start, "load_end": load_end, "markdown": md}, indent=2,
                                   default=str))
    print(f"\nresults: {args.out}")
    return 0


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
