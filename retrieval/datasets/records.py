"""Image records and folder scanning: one :class:`ImageRecord` per image file, ``id`` = its POSIX path relative to
the collection root."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import DatasetError
from retrieval.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageRecord:
    """One image of a collection. Equality and hash ignore ``extra`` (a plain dict, not hashable)."""

    id: str
    """Stable id: the path relative to the collection root, POSIX form (``sub/a.jpg``)."""
    path: Path
    """Absolute path of the file."""
    captions: tuple[str, ...] = ()
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def is_hidden(name: str) -> bool:
    """Names starting with ``.`` are hidden (skipped by the scan)."""
    return name.startswith(".")


def scan_images(root: str | Path) -> list[ImageRecord]:
    """All images under ``root`` (recursive), sorted by id.

    Picks files whose extension (any case) is in :data:`~retrieval.images.IMAGE_EXTENSIONS`; skips hidden files
    and folders (name starting with ``.``); never descends into symlinked folders and ignores symlinked files whose
    target lies outside ``root``. Raises :class:`DatasetError` if ``root`` is missing or not a folder.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(f"image folder not found: {root_path}")
    if not root_path.is_dir():
        raise DatasetError(f"not a folder: {root_path}")
    real_root = root_path.resolve()
    records: list[ImageRecord] = []
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for name in filenames:
            if is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = Path(dirpath) / name
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(real_root) or not target.is_file():
                    continue
            elif not full.is_file():
                continue
            rel = full.relative_to(real_root).as_posix()
            records.append(ImageRecord(id=rel, path=full))
    records.sort(key=lambda r: r.id)
    return records
