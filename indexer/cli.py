"""``python -m indexer``: build, add, remove, sync, dupes, migrate, search, info.

Flags are generated from :class:`indexer.settings.IndexerSettings` (which also reads ``INDEXER_*`` environment
variables): ``--batch-size`` sets ``batch_size``, ``--encoder`` sets ``encoder.name``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.settings import IndexerSettings
from retrieval.cli_flags import add_settings_flags, given_flags, settings_from_flags
from retrieval.errors import RetrievalError

if TYPE_CHECKING:
    from retrieval.encoders import Encoder
    from retrieval.index import IndexStore


#: The encoder's nested fields get the short flags users type.
ENCODER_FLAGS = {"encoder.name": "encoder", "encoder.heads": "heads", "encoder.precision": "precision",
                 "encoder.device": "device"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m indexer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="index a folder of images (resumes an interrupted build)")
    b.add_argument("src", help="folder of images (an images/ sub-folder and a captions file are found)")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--captions", help="captions file (jsonl, csv, token.txt, COCO or Karpathy json)")
    b.add_argument("--split", help="only this split (train, dev/val, test)")
    b.add_argument("--limit", type=int, help="only the first N images (quick runs)")
    b.add_argument("--engine", choices=["local", "ray"], default="local")
    b.add_argument("--ray-address", help="Ray cluster address (default: start a local instance)")
    add_settings_flags(b, IndexerSettings, rename=ENCODER_FLAGS)

    a = sub.add_parser("add", help="encode more images into an existing index")
    a.add_argument("index")
    a.add_argument("paths", nargs="+", help="image files or folders under the index's source root")
    a.add_argument("--root", help="folder the ids are relative to (default: the index's source root)")
    add_settings_flags(a, IndexerSettings, rename=ENCODER_FLAGS)

    r = sub.add_parser("remove", help="remove images by id")
    r.add_argument("index")
    r.add_argument("ids", nargs="+")

    y = sub.add_parser("sync", help="bring an index in step with its folder: add new images, re-encode changed "
                       "ones (size/mtime, then content hash), remove deleted ones; resumable")
    y.add_argument("src", help="the image folder the index was built from")
    y.add_argument("index", help="index folder (built from SRC if it does not exist yet)")
    y.add_argument("--captions", help="captions file (default: found beside the images, as in build)")
    y.add_argument("--watch", type=float, metavar="SECONDS", help="sync again every SECONDS until interrupted")
    add_settings_flags(y, IndexerSettings, rename=ENCODER_FLAGS)

    d = sub.add_parser("dupes", help="clusters of near-duplicate images (cosine >= threshold)")
    d.add_argument("index")
    d.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    d.add_argument("--format", choices=["json", "csv"], default="json")
    d.add_argument("--out", help="write here instead of standard output")

    m = sub.add_parser("migrate", help="rewrite an index's metadata as meta.sqlite, adding file dates, sizes and "
                       "EXIF (for folders written by older versions)")
    m.add_argument("index")

    s = sub.add_parser("search", help="query an index from the terminal")
    s.add_argument("index")
    s.add_argument("query", nargs="?", help="text query")
    s.add_argument("--image", help="query by an image file instead")
    s.add_argument("-k", "--top-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print JSON")
    add_settings_flags(s, IndexerSettings, skip=[f for f in IndexerSettings.model_fields if f != "encoder"],
                       rename=ENCODER_FLAGS)

    i = sub.add_parser("info", help="print an index's manifest")
    i.add_argument("index")

    sub.add_parser("encoders", help="list the named encoder configs")
    return parser


def settings_from_args(args: argparse.Namespace) -> IndexerSettings:
    """Environment/defaults first, then every flag that was given."""
    return settings_from_flags(IndexerSettings, args)


def _cmd_build(args: argparse.Namespace) -> int:
    from indexer.pipeline import build_index

    settings = settings_from_args(args)
    job = {"captions": args.captions, "split": args.split, "limit": args.limit}
    if args.engine == "ray":
        from indexer.ray_engine import RayEngine

        with RayEngine(settings, address=args.ray_address) as engine:
            result = build_index(args.src, args.out, settings, engine=engine, **job)
    else:
        result = build_index(args.src, args.out, settings, **job)
    m = result.manifest
    print(
        f"indexed {m.count} images into {result.out} ({m.index_key}, dim {m.dim}, {m.encoder_label}); "
        f"encoded {result.stats.encoded} now at {result.stats.images_per_s:.1f} images/s, "
        f"{result.resumed} resumed, {len(result.skipped)} skipped"
    )
    for rid, reason in result.skipped[:20]:
        print(f"  skipped {rid}: {reason}", file=sys.stderr)
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from indexer.local_engine import LocalEngine
    from indexer.pipeline import add_images

    settings = settings_from_args(args)
    encoder, store = encoder_for_index(args.index, args)  # the index's own encoder unless --encoder names one
    root = args.root or store.manifest.build.get("source_root")
    if not root:
        raise SystemExit("the index records no source root; pass --root")
    manifest, skipped = add_images(args.index, args.paths, settings, root=root,
                                   engine=LocalEngine(encoder, settings))
    print(f"index now holds {manifest.count} images; {len(skipped)} skipped")
    for rid, reason in skipped:
        print(f"  skipped {rid}: {reason}", file=sys.stderr)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from retrieval.index import remove_from_index

    manifest = remove_from_index(args.index, args.ids)
    print(f"removed {len(set(args.ids))}; index now holds {manifest.count} images")
    return 0


def encoder_for_index(index: str | Path, args: argparse.Namespace | None = None) -> tuple[Encoder, IndexStore]:
    """Build the encoder an index was made with (from its manifest), unless flags name another; and open the index
    checked against it."""
    from retrieval.encoders import EncoderSpec, build_encoder
    from retrieval.index import IndexStore

    manifest = IndexStore.open(index).manifest
    flags = given_flags(args).get("encoder", {}) if args is not None else {}
    if args is not None and "name" in flags:
        spec = settings_from_flags(IndexerSettings, args).encoder.spec()
    else:
        stored = dict(manifest.build.get("encoder_spec") or {})
        if not stored:
            raise SystemExit("the index records no encoder spec; pass --encoder")
        stored.update({k: v for k, v in flags.items() if k in ("precision", "device")})
        spec = EncoderSpec(**stored)
    encoder = build_encoder(spec)
    return encoder, IndexStore.open(index, expected_encoder=encoder.identity())


def _cmd_search(args: argparse.Namespace) -> int:
    from retrieval.images import load_image

    if bool(args.query) == bool(args.image):
        raise SystemExit("give a text query or --image PATH (one of them)")
    encoder, store = encoder_for_index(args.index, args)
    if args.image:
        q = encoder.encode_images([load_image(args.image)])
    else:
        if not args.query.strip():
            raise SystemExit("the query is empty")
        q = encoder.encode_text([args.query])
    scores, rows = store.search(q, args.top_k)
    hits = []
    for rank, (score, row) in enumerate(zip(scores[0], rows[0], strict=True), 1):
        meta = store.get(int(row))
        hits.append(
            {"rank": rank, "id": meta["id"], "score": round(float(score), 4), "captions": meta.get("captions", [])}
        )
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
    else:
        print(f"query: {args.query or args.image}")
        for h in hits:
            cap = f"  — {h['captions'][0]}" if h["captions"] else ""
            print(f"{h['rank']:>3}. {h['score']:.4f}  {h['id']}{cap}")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from indexer.local_engine import LocalEngine
    from indexer.sync import sync_index, watch

    settings = settings_from_args(args)
    if not (Path(args.index) / "manifest.json").is_file():
        from indexer.pipeline import build_index

        result = build_index(args.src, args.index, settings, captions=args.captions)
        print(f"built {args.index}: added {result.manifest.count}, skipped {len(result.skipped)}")
        if not args.watch:
            return 0
    encoder, _ = encoder_for_index(args.index, args)
    engine = LocalEngine(encoder, settings)

    def once():
        return sync_index(args.src, args.index, settings, engine=engine, captions=args.captions)

    if args.watch:
        if args.watch <= 0:
            raise SystemExit("--watch needs a positive number of seconds")
        print(f"watching {args.src} every {args.watch:g} s (Ctrl-C stops)")
        watch(args.src, args.index, args.watch, once)
        return 0
    result = once()
    print(result.summary())
    for rid, reason in result.skipped[:20]:
        print(f"  skipped {rid}: {reason}", file=sys.stderr)
    return 0


def _cmd_dupes(args: argparse.Namespace) -> int:
    import csv
    import io

    from retrieval.index import IndexStore
    from retrieval.index.dupes import near_duplicates

    store = IndexStore.open(args.index)
    clusters = near_duplicates(store, args.threshold)
    if args.format == "json":
        text = json.dumps({"threshold": args.threshold, "count": store.count, "clusters": [
            {"representative": c.representative, "size": len(c.ids),
             "items": [{"id": i, "score": round(s, 6)} for i, s in zip(c.ids, c.scores, strict=True)]}
            for c in clusters]}, indent=2, ensure_ascii=False) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["cluster", "id", "representative", "score"])
        for n, c in enumerate(clusters, 1):
            for i, sc in zip(c.ids, c.scores, strict=True):
                w.writerow([n, i, c.representative, f"{sc:.6f}"])
        text = buf.getvalue()
    if args.out:
        from retrieval.atomic import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"{len(clusters)} clusters ({sum(len(c.ids) for c in clusters)} images) at cosine >= "
              f"{args.threshold:g} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from retrieval.index.migrate import migrate_folder

    manifest = migrate_folder(args.index)
    print(f"migrated {args.index}: {manifest.count} rows in meta.sqlite")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from retrieval.index import IndexStore

    print(IndexStore.open(args.index).manifest.model_dump_json(indent=2))
    return 0


def _cmd_encoders(args: argparse.Namespace) -> int:
    from retrieval.encoders import encoder_configs

    for name, spec in sorted(encoder_configs().items()):
        print(f"{name:22s} {spec.label()}")
    return 0


COMMANDS = {
    "build": _cmd_build, "add": _cmd_add, "remove": _cmd_remove, "sync": _cmd_sync, "dupes": _cmd_dupes,
    "migrate": _cmd_migrate, "search": _cmd_search, "info": _cmd_info, "encoders": _cmd_encoders,
}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("retrieval.encoders").setLevel(logging.INFO)  # the engine/precision choice, once, with why
    if args.command in ("build", "add", "remove", "sync", "dupes", "migrate", "search"):
        from retrieval.index import configure_faiss

        configure_faiss()
    try:
        return COMMANDS[args.command](args)
    except RetrievalError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a file-size limit, permissions, an I/O error
        print(f"error: {exc}\nThe published index is unchanged (every write is atomic) and finished work is kept: "
              f"fix the cause and rerun the same command to resume.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
