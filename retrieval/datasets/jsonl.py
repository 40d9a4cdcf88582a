"""JSON Lines captions: ``{"image", "captions": [...]}`` (or one ``"caption"`` per line, merged), with optional
``split`` and extra fields; also a JSON array of such objects, or a single one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrieval.datasets.parsed import IMAGE_KEYS, Parsed, add_entry, pick
from retrieval.errors import DatasetError


def parse_jsonl(path: Path, text: str) -> Parsed:
    parsed = Parsed()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object per line")
        add_entry(parsed, obj, where)
    return parsed


def parse_object_list(path: Path, data: Any) -> Parsed | None:
    """A JSON array of jsonl-style objects, or one such object; None when ``data`` is neither."""
    parsed = Parsed()
    if isinstance(data, dict) and pick(data, IMAGE_KEYS) is not None:
        add_entry(parsed, data, str(path))
        return parsed
    if isinstance(data, list):
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}: [{i}] is not an object")
            add_entry(parsed, obj, f"{path}: [{i}]")
        return parsed
    return None
