"""Karpathy ``dataset_{coco,flickr8k,flickr30k}.json``: ``{"images": [{"filename", "filepath"?, "sentences",
"split"}]}``; ``restval`` counts as train (see :mod:`retrieval.datasets.load`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.datasets.parsed import Parsed, caption_text, norm_key
from retrieval.errors import DatasetError


def is_karpathy(data: Any) -> bool:
    """An ``images`` list (check :func:`~retrieval.datasets.coco.is_coco` first)."""
    return isinstance(data, dict) and isinstance(data.get("images"), list)


def parse_karpathy(path: Path, data: dict[str, Any]) -> Parsed:
    parsed = Parsed()
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            raise DatasetError(f"{where} needs 'filename' (Karpathy format)")
        key = norm_key(img["filename"])
        if isinstance(img.get("filepath"), str) and img["filepath"]:
            key = norm_key(f"{img['filepath']}/{img['filename']}")
        parsed.captions.setdefault(key, [])
        for t in caption_text(img.get("sentences", []), where):
            parsed.add(key, t)
        if isinstance(img.get("split"), str):
            parsed.splits[key] = img["split"]
    return parsed
