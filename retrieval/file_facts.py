"""What the index records about an image file beside its vector: size, modification time, pixel size, when the
photo was taken (EXIF ``DateTimeOriginal``, else the file's mtime), the camera, and a content hash.

Reading these opens the file's header only (Pillow is lazy: no pixels are decoded), so it costs well under a
millisecond per JPEG. A file that cannot be opened as an image still gets its size, mtime and hash.

Times: ``mtime`` is Unix seconds (float, UTC). ``taken_at`` is an ISO 8601 string *without* a time zone, the wall
clock where the photo was taken (EXIF stores it that way; ``OffsetTimeOriginal``, when present, is dropped so every
value lies on one wall-clock timeline), and the file's mtime rendered in UTC when there is no EXIF date.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

#: EXIF tags (https://exiftool.org/TagNames/EXIF.html)
EXIF_IFD = 0x8769
TAG_DATETIME_ORIGINAL = 0x9003
TAG_DATETIME_DIGITIZED = 0x9004
TAG_DATETIME = 0x0132
TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_ORIENTATION = 0x0112
#: EXIF orientations that rotate the picture by 90 or 270 degrees (displayed width and height swap)
ROTATED = {5, 6, 7, 8}
#: Hash of the file bytes (hex); what ``sync`` compares when size or mtime differ.
HASH_NAME = "sha256"
HASH_BLOCK = 1 << 20


def content_hash(path: str | Path) -> str:
    """``sha256:<hex>`` of the file's bytes."""
    digest = hashlib.new(HASH_NAME)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)
    return f"{HASH_NAME}:{digest.hexdigest()}"


def parse_exif_datetime(value: Any) -> str | None:
    """``"2019:07:04 18:22:10"`` (EXIF) -> ``"2019-07-04T18:22:10"``; None for blank, zeroed or malformed values."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip().rstrip("\x00").strip()
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y:%m:%d %H:%M", "%Y-%m-%d %H:%M"):
        try:
            return datetime.strptime(text[:19], fmt).isoformat(timespec="seconds")
        except ValueError:
            continue
    return None


def mtime_iso(mtime: float) -> str:
    """Unix seconds -> naive ISO 8601 in UTC (``taken_at`` of a file without an EXIF date)."""
    return datetime.fromtimestamp(mtime, UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip().rstrip("\x00").strip()
    return value or None


def image_header_facts(path: str | Path) -> dict[str, Any]:
    """``width``, ``height`` (as displayed, after the EXIF orientation), ``exif_taken_at`` (ISO or None),
    ``camera_make``, ``camera_model`` from the file's header; ``{}`` when it is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                exif = img.getexif()
                sub = exif.get_ifd(EXIF_IFD) if exif else {}
    except Exception as exc:  # any decoder error: the file is still indexed (or skipped) by the encoder
        log.debug("no image header for %s: %s", path, exc)
        return {}
    if exif.get(TAG_ORIENTATION) in ROTATED:
        width, height = height, width
    taken = (parse_exif_datetime(sub.get(TAG_DATETIME_ORIGINAL)) or parse_exif_datetime(sub.get(TAG_DATETIME_DIGITIZED))
             or parse_exif_datetime(exif.get(TAG_DATETIME)))
    return {"width": int(width), "height": int(height), "exif_taken_at": taken,
            "camera_make": _text(exif.get(TAG_MAKE)), "camera_model": _text(exif.get(TAG_MODEL))}


def file_facts(path: str | Path, *, with_hash: bool = True) -> dict[str, Any]:
    """The metadata fields of one image file (see the module docstring): ``bytes``, ``mtime``, ``width``,
    ``height``, ``taken_at``, ``taken_at_source`` ("exif" or "mtime"), ``camera_make``, ``camera_model`` and
    (``with_hash``) ``content_hash``. Missing values are None. Raises OSError when the file cannot be stat'ed."""
    st = os.stat(path)
    head = image_header_facts(path)
    exif_taken = head.get("exif_taken_at")
    facts: dict[str, Any] = {
        "bytes": int(st.st_size),
        "mtime": st.st_mtime,
        "width": head.get("width"),
        "height": head.get("height"),
        "taken_at": exif_taken or mtime_iso(st.st_mtime),
        "taken_at_source": "exif" if exif_taken else "mtime",
        "camera_make": head.get("camera_make"),
        "camera_model": head.get("camera_model"),
    }
    if with_hash:
        facts["content_hash"] = content_hash(path)
    return facts
