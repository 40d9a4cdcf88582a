"""Visual Genome region descriptions as captions: ``region_descriptions.json`` (``[{"id": image_id, "regions":
[{"region_id", "image_id", "phrase", "x", "y", "width", "height"}, ...]}, ...]``) joined with ``image_data.json``
(``[{"image_id", "url", "width", "height", ...}]``) when it lies beside it.

Each image's region phrases become its captions (stripped, duplicates dropped case-insensitively, in file order).
Keys are the image's path under the images folder taken from its URL (``VG_100K_2/1.jpg``), or ``<image_id>.jpg``
without ``image_data.json`` (matched by base name, which is unique across ``VG_100K`` and ``VG_100K_2``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrieval.datasets.parsed import Parsed, norm_key
from retrieval.errors import DatasetError

IMAGE_DATA_FILE = "image_data.json"


def is_region_descriptions(data: Any) -> bool:
    """A list whose first entry has a ``regions`` list."""
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and isinstance(data[0].get("regions"), list))


def _image_keys(path: Path) -> dict[Any, str]:
    """image_id -> ``VG_100K*/<file>`` from ``image_data.json`` beside ``path`` (``{}`` when there is none)."""
    f = path.with_name(IMAGE_DATA_FILE)
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{f}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{f}: expected a list of images")
    keys: dict[Any, str] = {}
    for i, img in enumerate(data):
        if not isinstance(img, dict):
            raise DatasetError(f"{f}: entry {i} is not an object")
        image_id = img.get("image_id", img.get("id"))
        url = img.get("url")
        if image_id is None or not isinstance(url, str):
            continue
        parts = url.rstrip("/").split("/")
        keys[image_id] = norm_key("/".join(parts[-2:]) if len(parts) >= 2 else parts[-1])
    return keys


def parse_visual_genome(path: Path, data: list[Any]) -> Parsed:
    """Captions per image from a ``region_descriptions.json`` already loaded as ``data``."""
    keys = _image_keys(path)
    parsed = Parsed()
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            raise DatasetError(f"{where} needs a 'regions' list (Visual Genome region descriptions)")
        regions = entry["regions"]
        image_id = entry.get("id", entry.get("image_id"))
        if image_id is None and regions and isinstance(regions[0], dict):
            image_id = regions[0].get("image_id")
        if image_id is None:
            raise DatasetError(f"{where} has no image id")
        key = keys.get(image_id, f"{image_id}.jpg")
        seen: set[str] = set()
        parsed.captions.setdefault(key, [])
        for j, region in enumerate(regions):
            if not isinstance(region, dict) or not isinstance(region.get("phrase"), str):
                raise DatasetError(f"{where}: regions[{j}] needs a string 'phrase'")
            phrase = " ".join(region["phrase"].split())
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                parsed.add(key, phrase)
    return parsed
