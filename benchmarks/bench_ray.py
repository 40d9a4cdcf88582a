"""Ray engine vs local engine: the same index of the Flickr8k test images, built both ways.

    python benchmarks/bench_ray.py --data ../shared/data/flickr8k               # the 1,000 test images
    python benchmarks/bench_ray.py --data ../shared/data/flickr8k --limit 200   # quicker
    python benchmarks/bench_ray.py --address auto                               # on a running Ray cluster

Rows (same images, same encoder, same settings, one run each):
- local: ``build_index`` — DataLoader workers decode, the main process encodes (``python -m indexer build``)
- ray: ``RayEngine`` — Ray Data decode tasks + encoder actor pool (``--engine ray``), on a local Ray instance
  of ``--ray-cpus`` CPUs unless ``--address`` names a cluster. Its time includes starting Ray and its workers.
Then checks that both indexes hold the same ids in the same order and the same vectors (max abs difference),
prints a markdown table and writes benchmarks/results/bench_ray.json.

On one small machine Ray brings no speed of its own (it adds start-up and object-store copies on the same cores);
it exists for collections that need more than one machine or many GPUs. The ratio shows what it costs or gains here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from indexer.pipeline import build_index
from indexer.ray_engine import RayEngine
from indexer.settings import IndexerSettings
from retrieval.index import IndexStore, configure_faiss, read_vectors
from retrieval.settings import EncoderSettings


def main() -> None:
    configure_faiss()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the local engine")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--atol", type=float, default=1e-4, help="largest allowed vector difference")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_ray.json"))
    args = ap.parse_args()

    settings = IndexerSettings(
        encoder=EncoderSettings(name=args.encoder),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=False,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        start = time.perf_counter()
        local = build_index(args.data, work / "local", settings, split=args.split, limit=args.limit)
        t_local = time.perf_counter() - start

        start = time.perf_counter()
        with RayEngine(settings, address=args.address, num_cpus=None if args.address else args.ray_cpus) as engine:
            ray_res = build_index(args.data, work / "ray", settings, split=args.split, limit=args.limit,
                                  engine=engine)
        t_ray = time.perf_counter() - start

        a, b = IndexStore.open(work / "local"), IndexStore.open(work / "ray")
        same_ids = a.ids == b.ids
        va, vb = read_vectors(work / "local"), read_vectors(work / "ray")
        max_diff = float(np.abs(va - vb).max()) if va.shape == vb.shape else float("inf")
        min_cos = float((va * vb).sum(1).min()) if va.shape == vb.shape else float("nan")
        equal = same_ids and max_diff <= args.atol
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = local.manifest.count
    rows = [
        ("local (DataLoader + 1 process)", t_local, local.stats.images_per_s, 1.0),
        (f"ray ({ray_res.manifest.build.get('ray_actors')} actor(s), "
         f"{'GPU' if ray_res.manifest.build.get('ray_gpu') else 'CPU'})", t_ray, ray_res.stats.images_per_s,
         t_ray / t_local),
    ]
    print(f"\n{n} images ({args.split} split), encoder {local.manifest.encoder_label}, "
          f"index {local.manifest.index_key}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| engine | wall time (s) | encode images/s | time vs local |")
    print("|---|---:|---:|---:|")
    for name, t, ips, ratio in rows:
        print(f"| {name} | {t:.1f} | {ips:.1f} | {ratio:.2f}x |")
    print(f"\nequal: {equal} (same ids in the same order: {same_ids}; max |Δ| = {max_diff:.2e}, "
          f"min cosine = {min_cos:.6f}, tolerance {args.atol})")

    result = {
        "images": n, "split": args.split, "encoder": local.manifest.encoder_label,
        "index_key": local.manifest.index_key,
        "local_s": round(t_local, 2), "ray_s": round(t_ray, 2), "ratio_ray_over_local": round(t_ray / t_local, 3),
        "local_images_per_s": round(local.stats.images_per_s, 2),
        "ray_images_per_s": round(ray_res.stats.images_per_s, 2),
        "ray_actors": ray_res.manifest.build.get("ray_actors"), "ray_gpu": ray_res.manifest.build.get("ray_gpu"),
        "same_ids": same_ids, "max_abs_diff": max_diff, "min_cosine": min_cos, "equal": equal,
        "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not equal:
        raise SystemExit("the Ray build differs from the local build")


if __name__ == "__main__":
    main()
