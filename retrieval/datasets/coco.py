"""COCO ``captions_*.json``: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.datasets.parsed import Parsed, norm_key
from retrieval.errors import DatasetError


def is_coco(data: Any) -> bool:
    """COCO has both ``images`` and ``annotations`` lists."""
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def parse_coco(path: Path, data: dict[str, Any]) -> Parsed:
    parsed = Parsed()
    names: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{path}: images[{i}] needs 'id' and 'file_name' (COCO format)")
        key = norm_key(img["file_name"])
        names[img["id"]] = key
        parsed.captions.setdefault(key, [])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise DatasetError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption' (COCO format)")
        if ann.get("image_id") not in names:
            raise DatasetError(f"{path}: annotations[{i}] refers to unknown image_id {ann.get('image_id')!r}")
        parsed.add(names[ann["image_id"]], ann["caption"])
    return parsed
