"""A collection on disk as records: the image root, its captions file(s) (found automatically), its splits."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from retrieval.datasets.captions import parse_file
from retrieval.datasets.parsed import Parsed, norm_key
from retrieval.datasets.records import ImageRecord, is_hidden, scan_images
from retrieval.errors import DatasetError
from retrieval.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

#: Names tried by :func:`discover_captions`, in order, in the image folder then its parent(s).
CAPTION_FILE_PATTERNS = (
    "captions.jsonl",
    "captions.json",
    "captions.csv",
    "captions.txt",
    "results.csv",
    "results_20130124.token",
    "Flickr8k.token.txt",
    "Flickr30k.token.txt",
    "dataset_*.json",
    "annotations/captions_*.json",
    "region_descriptions.json",
)

_SPLIT_SYNONYMS = {"val": "dev", "validation": "dev", "restval": "train"}
_IMAGE_SUBFOLDERS = ("images", "Images")


def _canonical_split(name: str) -> str:
    """``val``/``validation`` -> ``dev``; Karpathy's ``restval`` counts as ``train`` (the usual convention)."""
    n = name.strip().lower()
    return _SPLIT_SYNONYMS.get(n, n)


def _has_top_level_images(folder: Path) -> bool:
    try:
        return any(
            e.is_file() and not is_hidden(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            for e in os.scandir(folder)
        )
    except OSError:
        return False


def _image_root(src: Path) -> Path:
    if _has_top_level_images(src):
        return src
    for sub in _IMAGE_SUBFOLDERS:
        if (src / sub).is_dir():
            return src / sub
    return src


def _search_dirs(src: Path, image_root: Path) -> list[Path]:
    dirs: list[Path] = []
    for d in (image_root, src, src.parent):
        d = d.resolve()
        if d not in dirs:
            dirs.append(d)
    return dirs


def discover_captions(src: str | Path) -> list[Path]:
    """Captions file(s) for an image folder: the first :data:`CAPTION_FILE_PATTERNS` match, looked for in the
    image root, ``src`` and ``src``'s parent (in that order). A glob pattern returns all its matches (COCO's
    ``captions_train2014.json`` + ``captions_val2014.json``). ``[]`` when there is none."""
    src_path = Path(src)
    for d in _search_dirs(src_path, _image_root(src_path)):
        for pattern in CAPTION_FILE_PATTERNS:
            matches = sorted(p for p in d.glob(pattern) if p.is_file())
            if matches:
                return matches
    return []


def _split_lists(dirs: Sequence[Path]) -> dict[str, str]:
    """Flickr8k ``Flickr_8k.{train,dev,test}Images.txt`` lists (first folder that has any)."""
    for d in dirs:
        found = sorted(d.glob("Flickr_8k.*Images.txt"))
        if not found:
            continue
        splits: dict[str, str] = {}
        for f in found:
            name = f.name[len("Flickr_8k.") : -len("Images.txt")]
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    splits[norm_key(line)] = name
        return splits
    return {}


class _KeyIndex:
    """Looks a record id up in caption-file keys: exact relative path, else an unambiguous base name."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        by_base: dict[str, list[str]] = {}
        for k in self.keys:
            by_base.setdefault(PurePosixPath(k).name, []).append(k)
        self.by_base = {b: ks[0] for b, ks in by_base.items() if len(ks) == 1}

    def find(self, record_id: str) -> str | None:
        if record_id in self.keys:
            return record_id
        return self.by_base.get(PurePosixPath(record_id).name)


def load_dataset(
    src: str | Path,
    *,
    captions: str | Path | Sequence[str | Path] | None = None,
    split: str | None = None,
) -> list[ImageRecord]:
    """Records for the images in ``src`` with their captions and split, sorted by id.

    - Image root: ``src``, or ``src/images`` when ``src`` has no image at its top level.
    - ``captions``: a file (or several, merged); ``None`` auto-discovers one (:func:`discover_captions`). No
      captions file is fine: records then have no captions.
    - ``split``: ``train``/``dev``/``val``/``test`` (``dev`` = ``val``; ``restval`` counts as ``train``) keeps the
      records of that split, taken from the captions file's split fields, else from ``Flickr_8k.<split>Images.txt``
      lists. Raises :class:`DatasetError` when there is no split information or no such split.

    Caption entries whose image has no file are dropped and counted in a warning (as is a split list naming
    missing files). Raises :class:`DatasetError` if ``src`` is not a folder or a captions file is unreadable.
    """
    src_path = Path(src).expanduser()
    if not src_path.is_dir():
        raise DatasetError(f"image folder not found or not a folder: {src_path}")
    root = _image_root(src_path)
    records = scan_images(root)

    if captions is None:
        cap_files = discover_captions(src_path)
    elif isinstance(captions, (str, Path)):
        cap_files = [Path(captions)]
    else:
        cap_files = [Path(c) for c in captions]
    parsed = Parsed()
    for f in cap_files:
        one = parse_file(f)
        for k, caps in one.captions.items():
            parsed.captions.setdefault(k, []).extend(caps)
        parsed.splits.update(one.splits)
        for k, ex in one.extras.items():
            parsed.extras.setdefault(k, {}).update(ex)
    if cap_files:
        log.info("captions for %s from %s", root, ", ".join(str(f) for f in cap_files))

    splits = parsed.splits
    if not splits:
        dirs = [f.parent.resolve() for f in cap_files] + _search_dirs(src_path, root)
        splits = _split_lists(dirs)

    cap_index = _KeyIndex(parsed.captions)
    split_index = _KeyIndex(splits)
    used_keys: set[str] = set()
    used_split_keys: set[str] = set()
    out: list[ImageRecord] = []
    for rec in records:
        key = cap_index.find(rec.id)
        skey = split_index.find(rec.id)
        if key is not None:
            used_keys.add(key)
        if skey is not None:
            used_split_keys.add(skey)
        out.append(
            ImageRecord(
                id=rec.id,
                path=rec.path,
                captions=tuple(parsed.captions[key]) if key is not None else (),
                split=splits[skey] if skey is not None else None,
                extra=dict(parsed.extras.get(key, {})) if key is not None else {},
            )
        )

    missing = [k for k in parsed.captions if k not in used_keys]
    if missing:
        log.warning(
            "%d captioned image(s) listed in %s have no file under %s and were dropped (e.g. %s)",
            len(missing),
            ", ".join(str(f) for f in cap_files),
            root,
            ", ".join(missing[:3]),
        )

    if split is not None:
        if not splits:
            raise DatasetError(
                f"split {split!r} asked for, but no split information for {src_path} (no 'split' field in the "
                "captions file and no Flickr_8k.<split>Images.txt lists)"
            )
        want = _canonical_split(split)
        available = sorted({_canonical_split(s) for s in splits.values()})
        if want not in available:
            raise DatasetError(f"no split {split!r} in {src_path}; available: {', '.join(available)}")
        out = [r for r in out if r.split is not None and _canonical_split(r.split) == want]
        missing_in_split = sum(1 for k, s in splits.items() if _canonical_split(s) == want and k not in used_split_keys)
        if missing_in_split:
            log.warning("%d image(s) of split %r have no file under %s", missing_in_split, split, root)
    return out
