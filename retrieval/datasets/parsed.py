"""What every caption reader produces (:class:`Parsed`), and the helpers the readers share."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from retrieval.errors import DatasetError

IMAGE_KEYS = ("image", "file_name", "filename", "image_name", "img", "path", "file")
CAPTION_KEYS = ("caption", "comment", "text", "sentence", "raw")
CAPTIONS_KEYS = ("captions", "sentences", "texts")
TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


@dataclass
class Parsed:
    """Captions, splits and extra fields per image key (a file name or a relative POSIX path)."""

    captions: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, image: str, caption: str) -> None:
        caption = caption.strip()
        lst = self.captions.setdefault(image, [])
        if caption:
            lst.append(caption)


def norm_key(key: str) -> str:
    """Caption-file image keys in POSIX form without a leading ``./``."""
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def pick(obj: dict[str, Any], keys: Iterable[str]) -> Any:
    """The first of ``keys`` present (and not None) in ``obj``."""
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def caption_text(value: Any, where: str) -> list[str]:
    """Captions from a str, a list of str, or a list of {"raw"|"caption": str} dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict) and isinstance(pick(v, CAPTION_KEYS), str):
                out.append(pick(v, CAPTION_KEYS))
            else:
                raise DatasetError(f"{where}: caption entries must be strings, got {type(v).__name__}")
        return out
    raise DatasetError(f"{where}: captions must be a string or a list, got {type(value).__name__}")



def add_entry(parsed: Parsed, obj: dict[str, Any], where: str) -> None:
    """One {"image": ..., "captions": [...] | "caption": str, "split"?: str, ...} object."""
    image = pick(obj, IMAGE_KEYS)
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}: no image file name (expected one of {', '.join(IMAGE_KEYS)})")
    key = norm_key(image)
    caps = pick(obj, CAPTIONS_KEYS)
    if caps is None:
        caps = pick(obj, CAPTION_KEYS)
    texts = caption_text(caps, where) if caps is not None else []
    parsed.captions.setdefault(key, [])
    for t in texts:
        parsed.add(key, t)
    split = obj.get("split")
    if isinstance(split, str) and split:
        parsed.splits[key] = split
    used = {*IMAGE_KEYS, *CAPTIONS_KEYS, *CAPTION_KEYS, "split"}
    extra = {k: v for k, v in obj.items() if k not in used}
    if extra:
        parsed.extras.setdefault(key, {}).update(extra)
