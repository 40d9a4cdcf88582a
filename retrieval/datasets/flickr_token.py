"""Flickr8k/30k ``*.token.txt``: one ``name.jpg#N<TAB>caption`` line per caption."""

from __future__ import annotations

from pathlib import Path

from retrieval.datasets.parsed import TOKEN_LINE, Parsed, norm_key
from retrieval.errors import DatasetError


def parse_token(path: Path, text: str) -> Parsed:
    """Flickr8k/30k ``*.token.txt``: ``name.jpg#0<TAB>caption``."""
    parsed = Parsed()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = TOKEN_LINE.match(line)
        if m is None:
            raise DatasetError(f"{path}:{lineno}: expected 'image.jpg#N<TAB>caption', got {line[:80]!r}")
        parsed.add(norm_key(m["image"]), m["caption"])
    return parsed
