"""Keeping an index in step with a changing folder: ``indexer sync`` after 10% of the files changed re-encodes
exactly those (plus the new ones), against rebuilding the whole index.

    python benchmarks/bench_sync.py --data ../shared/data/flickr8k            # 1,000 photos (a few minutes)
    python benchmarks/bench_sync.py --data ../shared/data/flickr8k --n 200    # quicker

The photos (the Flickr8k test split) are copied to a temporary folder (never into the repository) and indexed with
the default encoder. Then: 10% of them get new bytes (re-saved with a brightness change), 5% only a new mtime (same
bytes: a metadata rewrite, no encoding), 2% are deleted and 2% new photos (from the dev split) are added. The sync
must encode exactly the changed + added files — counted by wrapping the engine — and the result must equal a fresh
build of the folder (same ids, vectors within 1e-5). Prints a markdown table with the CPU; writes
``benchmarks/results/bench_sync.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from bench_filter import cpu_line
from PIL import Image, ImageEnhance

from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index
from indexer.settings import IndexerSettings
from indexer.sync import sync_index
from retrieval.datasets import load_dataset
from retrieval.index import IndexStore, configure_faiss, read_vectors

REPO = Path(__file__).resolve().parents[1]


class CountingEngine(LocalEngine):
    """The local engine, recording every id it is asked to encode."""

    def __init__(self, encoder, settings):
        super().__init__(encoder, settings)
        self.encoded: list[str] = []

    def encode(self, records):
        self.encoded += [r.id for r in records]
        yield from super().encode(records)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--n", type=int, default=1000, help="photos in the folder")
    p.add_argument("--encoder", default="default")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_sync.json")
    args = p.parse_args(argv)
    configure_faiss()
    cpu = cpu_line()
    print(cpu, flush=True)
    from retrieval.encoders import build_encoder, parse_spec

    settings = IndexerSettings(progress=False, encoder={"name": args.encoder})
    encoder = build_encoder(parse_spec(args.encoder))
    test = load_dataset(args.data, split="test")[: args.n]
    extra = load_dataset(args.data, split="dev")[: max(1, args.n // 50)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        src, idx, fresh = Path(tmp) / "photos", Path(tmp) / "idx", Path(tmp) / "fresh"
        src.mkdir()
        for r in test:
            shutil.copy2(r.path, src / r.path.name)
        t0 = time.perf_counter()
        build_index(src, idx, settings, engine=LocalEngine(encoder, settings))
        first_build_s = time.perf_counter() - t0

        names = sorted(p.name for p in src.iterdir())
        order = rng.permutation(len(names))
        n10, n5, n2 = len(names) // 10, len(names) // 20, len(names) // 50
        changed = [names[i] for i in order[:n10]]
        touched = [names[i] for i in order[n10:n10 + n5]]
        removed = [names[i] for i in order[n10 + n5:n10 + n5 + n2]]
        for name in changed:
            img = Image.open(src / name).convert("RGB")
            ImageEnhance.Brightness(img).enhance(1.15).save(src / name, quality=92)
        for name in touched:
            st = (src / name).stat()
            os.utime(src / name, (st.st_atime, st.st_mtime + 3600))
        for name in removed:
            (src / name).unlink()
        added = []
        for r in extra:
            shutil.copy2(r.path, src / r.path.name)
            added.append(r.path.name)

        engine = CountingEngine(encoder, settings)
        t0 = time.perf_counter()
        result = sync_index(src, idx, settings, engine=engine)
        sync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_index(src, fresh, settings, engine=LocalEngine(encoder, settings))
        rebuild_s = time.perf_counter() - t0

        exact = sorted(engine.encoded) == sorted(changed + added)
        a, b = IndexStore.open(idx), IndexStore.open(fresh)
        same_ids = sorted(a.ids) == sorted(b.ids)
        va, vb = read_vectors(idx), read_vectors(fresh)
        diff = float(np.abs(va[[a.row_of(i) for i in b.ids]] - vb).max()) if same_ids else float("nan")
    row = {"photos": len(names), "changed": len(changed), "metadata_only": len(touched), "removed": len(removed),
           "added": len(added), "encoded": len(engine.encoded), "hashed": result.plan.hashed,
           "encoded_exactly_the_changed_and_added": exact, "same_ids_as_rebuild": same_ids,
           "max_vector_diff_vs_rebuild": diff, "sync_s": round(sync_s, 2), "rebuild_s": round(rebuild_s, 2),
           "first_build_s": round(first_build_s, 2), "speedup": round(rebuild_s / sync_s, 2),
           "summary": result.summary()}
    md = "\n".join([
        f"### indexer sync after 10% of a folder changed — {cpu}", "",
        "| photos | changed | metadata only | removed | added | encoded | exactly those | sync s | rebuild s | "
        "rebuild / sync | max vector diff vs rebuild |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        f"| {row['photos']:,} | {row['changed']} | {row['metadata_only']} | {row['removed']} | {row['added']} | "
        f"{row['encoded']} | {'yes' if exact else 'NO'} | {row['sync_s']:.1f} | {row['rebuild_s']:.1f} | "
        f"{row['speedup']:.1f}x | {diff:.1e} |",
    ])
    print(result.summary())
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "row": row, "markdown": md,
                                    "command": "python benchmarks/bench_sync.py " + " ".join(argv or sys.argv[1:])},
                                   indent=2) + "\n")
    if not exact or not same_ids or not diff < 1e-4:
        raise SystemExit("sync did not match the rebuild")


if __name__ == "__main__":
    main()
