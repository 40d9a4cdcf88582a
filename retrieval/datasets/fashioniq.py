"""FashionIQ composed-retrieval triplets: a candidate image, a target image, and two captions saying how the
target differs ("is darker", "has longer sleeves").

Layout (``python -m retrieval.datasets.fetch fashioniq``)::

    captions/cap.<category>.<split>.json    [{"candidate": "B004QD2X2C", "target": "B005AD7YXM",
                                              "captions": ["is darker", "has longer sleeves"]}, ...]
    image_splits/split.<category>.<split>.json   ["B004QD2X2C", ...]   (the gallery of that split)
    images/<asin>.(png|jpg|jpeg|webp)

Categories: ``dress``, ``shirt``, ``toptee``; splits ``train``, ``val``, ``test``. Many image URLs of the original
release are gone: triplets whose candidate or target image is missing are dropped and counted in a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import DatasetError
from retrieval.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

CATEGORIES = ("dress", "shirt", "toptee")
_SPLITS = {"dev": "val", "validation": "val"}


@dataclass(frozen=True)
class Triplet:
    """One composed query: ``candidate`` image + ``captions`` -> ``target`` image (ids are the image names)."""

    candidate: str
    target: str
    captions: tuple[str, ...]
    category: str
    split: str

    @property
    def text(self) -> str:
        """The captions as one modification text (FashionIQ baselines join the two with "and")."""
        return " and ".join(c.strip().rstrip(".") for c in self.captions if c.strip())


def _split(name: str) -> str:
    return _SPLITS.get(name.lower(), name.lower())


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"FashionIQ file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def read_triplets(root: str | Path, split: str = "train", categories: tuple[str, ...] | None = None
                  ) -> list[Triplet]:
    """Every triplet of ``split`` in ``categories`` (default: those with a captions file), in file order.
    :class:`DatasetError` for a missing or malformed file (naming it and the entry)."""
    root = Path(root)
    split = _split(split)
    cats = categories or tuple(sorted({p.name.split(".")[1] for p in (root / "captions").glob(f"cap.*.{split}.json")}))
    if not cats:
        raise DatasetError(f"no FashionIQ captions for split {split!r} under {root / 'captions'}")
    out: list[Triplet] = []
    for cat in cats:
        f = root / "captions" / f"cap.{cat}.{split}.json"
        data = _load_json(f)
        if not isinstance(data, list):
            raise DatasetError(f"{f}: expected a list of triplets")
        for i, entry in enumerate(data):
            where = f"{f}: entry {i}"
            if not isinstance(entry, dict):
                raise DatasetError(f"{where} is not an object")
            cand, target, caps = entry.get("candidate"), entry.get("target"), entry.get("captions")
            if not isinstance(cand, str) or not cand:
                raise DatasetError(f"{where} needs a string 'candidate'")
            if target is None:  # the released test split hides its targets
                continue
            if not isinstance(target, str) or not target:
                raise DatasetError(f"{where}: 'target' must be a string")
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps) or not any(
                    c.strip() for c in caps):
                raise DatasetError(f"{where} needs a list of caption strings")
            out.append(Triplet(cand, target, tuple(caps), cat, split))
    return out


def image_split(root: str | Path, category: str, split: str) -> list[str]:
    """The image names of one category's split gallery (``image_splits/split.<category>.<split>.json``)."""
    f = Path(root) / "image_splits" / f"split.{category}.{_split(split)}.json"
    data = _load_json(f)
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DatasetError(f"{f}: expected a list of image names")
    return data


def image_paths(root: str | Path) -> dict[str, Path]:
    """Image name (file name without extension) -> path, for every image under ``root/images``."""
    folder = Path(root) / "images"
    if not folder.is_dir():
        raise DatasetError(f"no images folder at {folder}")
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}


def load_triplets(root: str | Path, split: str = "train", categories: tuple[str, ...] | None = None
                  ) -> tuple[list[Triplet], dict[str, Path]]:
    """The triplets of ``split`` whose two images are on disk, and the image paths they use. Dropped triplets are
    counted in a warning."""
    paths = image_paths(root)
    triplets = read_triplets(root, split, categories)
    kept = [t for t in triplets if t.candidate in paths and t.target in paths]
    if len(kept) < len(triplets):
        log.warning("FashionIQ %s: %d of %d triplets dropped (candidate or target image missing under %s)",
                    split, len(triplets) - len(kept), len(triplets), Path(root) / "images")
    if not kept:
        raise DatasetError(f"no FashionIQ {split} triplet has both images under {Path(root) / 'images'}")
    used = {n for t in kept for n in (t.candidate, t.target)}
    return kept, {n: paths[n] for n in sorted(used)}
