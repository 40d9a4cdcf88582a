"""Reading a captions file of any supported format (detected from the extension and content)."""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.datasets.coco import is_coco, parse_coco
from retrieval.datasets.csv_captions import parse_csv
from retrieval.datasets.flickr_token import parse_token
from retrieval.datasets.jsonl import parse_jsonl, parse_object_list
from retrieval.datasets.karpathy import is_karpathy, parse_karpathy
from retrieval.datasets.parsed import TOKEN_LINE, Parsed
from retrieval.datasets.visual_genome import is_region_descriptions, parse_visual_genome
from retrieval.errors import DatasetError


def parse_json(path: Path, text: str) -> Parsed:
    """A ``.json`` captions file: COCO, Karpathy, Visual Genome region descriptions, or a list of (or one)
    ``{"image", "captions"}`` objects."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if is_coco(data):
        return parse_coco(path, data)
    if is_karpathy(data):
        return parse_karpathy(path, data)
    if is_region_descriptions(data):
        return parse_visual_genome(path, data)
    parsed = parse_object_list(path, data)
    if parsed is not None:
        return parsed
    raise DatasetError(
        f"{path}: unknown JSON captions format (expected COCO 'images'+'annotations', Karpathy 'images' with "
        "'sentences', Visual Genome 'regions', or a list of {'image', 'captions'} objects)"
    )


def parse_file(path: str | Path) -> Parsed:
    """Parse a captions file of any supported format; :class:`DatasetError` names the file (and line) on failure."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"captions file not found: {p}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read captions file {p}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{p}: not UTF-8 text (byte {exc.start})") from exc
    suffix = p.suffix.lower()
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError(f"{p}: empty captions file")
    if suffix == ".jsonl" or (suffix != ".json" and stripped.startswith("{") and "\n{" in stripped.rstrip()):
        return parse_jsonl(p, text)
    if suffix == ".json" or stripped[0] in "{[":
        return parse_json(p, text)
    first_line = stripped.splitlines()[0]
    if TOKEN_LINE.match(first_line):
        return parse_token(p, text)
    return parse_csv(p, text)


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """Map image file name or relative path (POSIX) -> its captions, in file order.

    Format is detected from the extension and content: jsonl (``{"image", "captions": [...]}`` or one
    ``"caption"`` per line, merged), CSV with a header (``image,caption``; ``image_name|comment`` as in Flickr30k),
    Flickr8k ``token.txt``, COCO ``captions_*.json``, Karpathy ``dataset_*.json``. Images listed without a caption
    map to ``[]``. Raises :class:`DatasetError` (naming the file, and the line where known) otherwise.
    """
    return parse_file(path).captions


def read_splits(path: str | Path) -> dict[str, str]:
    """Map image -> split name as written in the file (jsonl/CSV ``split``, Karpathy ``split``); ``{}`` if none."""
    return parse_file(path).splits
