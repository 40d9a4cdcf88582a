"""CSV captions with a header naming an image column and a caption column (``image,caption``; Flickr30k's
``image_name| comment_number| comment``)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from retrieval.datasets.parsed import Parsed, norm_key
from retrieval.errors import DatasetError

_CSV_IMAGE_COLS = ("image", "image_name", "filename", "file_name", "image_file", "img", "path")
_CSV_CAPTION_COLS = ("caption", "comment", "captions", "text", "sentence", "description")
_RECOVERABLE_NUMBER = re.compile(r"^\s*\d+\s+(?P<caption>\S.*)$")


def parse_csv(path: Path, text: str) -> Parsed:
    """CSV with a header naming an image column and a caption column; one row per caption.

    Delimiter ``,``, ``|`` (Flickr30k ``results.csv``), ``;`` or TAB, taken from the header line. With ``|``, quotes
    are literal characters. A row with more fields than the header keeps the surplus in its caption (unquoted
    commas), and the known broken Flickr30k row ``name.jpg| 4   A dog ...`` (missing delimiter) is recovered.
    """
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        raise DatasetError(f"{path}: empty captions file")
    header_line = lines[first]
    delim = max(",|;\t", key=header_line.count)
    if header_line.count(delim) == 0:
        raise DatasetError(f"{path}:{first + 1}: unknown captions format (no CSV header, not Flickr 'token' lines)")
    if delim == "|":
        reader = csv.reader(io.StringIO(text), delimiter=delim, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text), delimiter=delim)
    parsed = Parsed()
    header: list[str] | None = None
    img_col = cap_col = -1
    split_col: int | None = None
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            img_col = next((header.index(c) for c in _CSV_IMAGE_COLS if c in header), -1)
            cap_col = next((header.index(c) for c in _CSV_CAPTION_COLS if c in header), -1)
            if img_col < 0 or cap_col < 0:
                raise DatasetError(
                    f"{path}:{lineno}: CSV header {row!r} needs an image column ({', '.join(_CSV_IMAGE_COLS)}) "
                    f"and a caption column ({', '.join(_CSV_CAPTION_COLS)})"
                )
            split_col = header.index("split") if "split" in header else None
            continue
        image = row[img_col].strip() if img_col < len(row) else ""
        if not image:
            raise DatasetError(f"{path}:{lineno}: missing image name")
        if cap_col < len(row):
            caption = row[cap_col]
            if cap_col == len(header) - 1 and len(row) > len(header):
                caption = delim.join([caption, *row[cap_col + 1 :]])
        else:
            # Flickr30k results.csv line 19999: "2199200615.jpg| 4   A dog runs ..." (delimiter missing)
            recoverable = len(row) == len(header) - 1 and cap_col == len(header) - 1
            m = _RECOVERABLE_NUMBER.match(row[-1]) if recoverable else None
            if m is None:
                raise DatasetError(f"{path}:{lineno}: missing caption (row {row!r})")
            caption = m["caption"]
        key = norm_key(image)
        parsed.add(key, caption)
        if split_col is not None and split_col < len(row) and row[split_col].strip():
            parsed.splits[key] = row[split_col].strip()
    if header is None:
        raise DatasetError(f"{path}: empty captions file")
    return parsed
