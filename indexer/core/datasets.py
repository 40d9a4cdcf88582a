"""Readers for image folders and caption files, and a torch ``Dataset`` that never crashes on a bad image.

- :func:`scan_images` walks a folder (recursively, hidden entries skipped, no symlink leaves the root) and returns
  one :class:`ImageRecord` per image, with ``id`` = the POSIX path relative to the root.
- :func:`read_captions` / :func:`read_splits` read every common captions format (jsonl, Kaggle/Flickr30k CSV,
  Flickr8k ``token.txt``, COCO ``captions_*.json``, Karpathy ``dataset_*.json``), auto-detected.
- :func:`load_dataset` joins the two: a folder of images, its captions (auto-discovered), an optional split.
- :class:`ImageLoadDataset` + :func:`collate_skipping` feed a ``DataLoader``: images that cannot be decoded come
  back in ``Batch.failed`` (index, reason) instead of raising, and :class:`SkipReport` records them.

Caption keys are file names or relative paths; a record matches a key equal to its ``id`` or, failing that, a key
with the same base name (when that base name is unambiguous).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from indexer.core.errors import BadImage, BadInput, DatasetError
from indexer.core.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "ImageLoadDataset",
    "ImageRecord",
    "LoadedItem",
    "SkipReport",
    "collate_skipping",
    "discover_captions",
    "load_dataset",
    "read_captions",
    "read_splits",
    "scan_images",
]

# ----------------------------------------------------------------------------------------------------------------
# Records and folder scanning
# ----------------------------------------------------------------------------------------------------------------


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_images(root: str | Path) -> list[ImageRecord]:
    """All images under ``root`` (recursive), sorted by id.

    Picks files whose extension (any case) is in :data:`~indexer.core.images.IMAGE_EXTENSIONS`; skips hidden files
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
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if _is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
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


# ----------------------------------------------------------------------------------------------------------------
# Caption files
# ----------------------------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("image", "file_name", "filename", "image_name", "img", "path", "file")
_CAPTION_KEYS = ("caption", "comment", "text", "sentence", "raw")
_CAPTIONS_KEYS = ("captions", "sentences", "texts")
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


@dataclass
class _Parsed:
    captions: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, image: str, caption: str) -> None:
        caption = caption.strip()
        lst = self.captions.setdefault(image, [])
        if caption:
            lst.append(caption)


def _norm_key(key: str) -> str:
    """Caption-file image keys in POSIX form without a leading ``./``."""
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _pick(obj: dict[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def _caption_text(value: Any, where: str) -> list[str]:
    """Captions from a str, a list of str, or a list of {"raw"|"caption": str} dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict) and isinstance(_pick(v, _CAPTION_KEYS), str):
                out.append(_pick(v, _CAPTION_KEYS))
            else:
                raise DatasetError(f"{where}: caption entries must be strings, got {type(v).__name__}")
        return out
    raise DatasetError(f"{where}: captions must be a string or a list, got {type(value).__name__}")


def _parse_jsonl(path: Path, text: str) -> _Parsed:
    parsed = _Parsed()
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
        _add_entry(parsed, obj, where)
    return parsed


def _add_entry(parsed: _Parsed, obj: dict[str, Any], where: str) -> None:
    """One {"image": ..., "captions": [...] | "caption": str, "split"?: str, ...} object."""
    image = _pick(obj, _IMAGE_KEYS)
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}: no image file name (expected one of {', '.join(_IMAGE_KEYS)})")
    key = _norm_key(image)
    caps = _pick(obj, _CAPTIONS_KEYS)
    if caps is None:
        caps = _pick(obj, _CAPTION_KEYS)
    texts = _caption_text(caps, where) if caps is not None else []
    parsed.captions.setdefault(key, [])
    for t in texts:
        parsed.add(key, t)
    split = obj.get("split")
    if isinstance(split, str) and split:
        parsed.splits[key] = split
    used = {*_IMAGE_KEYS, *_CAPTIONS_KEYS, *_CAPTION_KEYS, "split"}
    extra = {k: v for k, v in obj.items() if k not in used}
    if extra:
        parsed.extras.setdefault(key, {}).update(extra)


def _parse_json(path: Path, text: str) -> _Parsed:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    parsed = _Parsed()
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        # COCO captions_*.json
        names: dict[Any, str] = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                raise DatasetError(f"{path}: images[{i}] needs 'id' and 'file_name' (COCO format)")
            key = _norm_key(img["file_name"])
            names[img["id"]] = key
            parsed.captions.setdefault(key, [])
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                raise DatasetError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption' (COCO format)")
            if ann.get("image_id") not in names:
                raise DatasetError(f"{path}: annotations[{i}] refers to unknown image_id {ann.get('image_id')!r}")
            parsed.add(names[ann["image_id"]], ann["caption"])
        return parsed
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        # Karpathy dataset_{coco,flickr8k,flickr30k}.json
        for i, img in enumerate(data["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
                raise DatasetError(f"{where} needs 'filename' (Karpathy format)")
            key = _norm_key(img["filename"])
            if isinstance(img.get("filepath"), str) and img["filepath"]:
                key = _norm_key(f"{img['filepath']}/{img['filename']}")
            parsed.captions.setdefault(key, [])
            for t in _caption_text(img.get("sentences", []), where):
                parsed.add(key, t)
            if isinstance(img.get("split"), str):
                parsed.splits[key] = img["split"]
        return parsed
    if isinstance(data, dict) and _pick(data, _IMAGE_KEYS) is not None:
        # a single jsonl-style object (a one-line jsonl file without the .jsonl extension)
        _add_entry(parsed, data, str(path))
        return parsed
    if isinstance(data, list):
        # a JSON array of jsonl-style objects
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}: [{i}] is not an object")
            _add_entry(parsed, obj, f"{path}: [{i}]")
        return parsed
    raise DatasetError(
        f"{path}: unknown JSON captions format (expected COCO 'images'+'annotations', Karpathy 'images' with "
        "'sentences', or a list of {'image', 'captions'} objects)"
    )


def _parse_token(path: Path, text: str) -> _Parsed:
    """Flickr8k/30k ``*.token.txt``: ``name.jpg#0<TAB>caption``."""
    parsed = _Parsed()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _TOKEN_LINE.match(line)
        if m is None:
            raise DatasetError(f"{path}:{lineno}: expected 'image.jpg#N<TAB>caption', got {line[:80]!r}")
        parsed.add(_norm_key(m["image"]), m["caption"])
    return parsed


_CSV_IMAGE_COLS = ("image", "image_name", "filename", "file_name", "image_file", "img", "path")
_CSV_CAPTION_COLS = ("caption", "comment", "captions", "text", "sentence", "description")
_RECOVERABLE_NUMBER = re.compile(r"^\s*\d+\s+(?P<caption>\S.*)$")


def _parse_csv(path: Path, text: str) -> _Parsed:
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
    parsed = _Parsed()
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
        key = _norm_key(image)
        parsed.add(key, caption)
        if split_col is not None and split_col < len(row) and row[split_col].strip():
            parsed.splits[key] = row[split_col].strip()
    if header is None:
        raise DatasetError(f"{path}: empty captions file")
    return parsed


def _parse_file(path: str | Path) -> _Parsed:
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
        return _parse_jsonl(p, text)
    if suffix == ".json" or stripped[0] in "{[":
        return _parse_json(p, text)
    first_line = stripped.splitlines()[0]
    if _TOKEN_LINE.match(first_line):
        return _parse_token(p, text)
    return _parse_csv(p, text)


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """Map image file name or relative path (POSIX) -> its captions, in file order.

    Format is detected from the extension and content: jsonl (``{"image", "captions": [...]}`` or one
    ``"caption"`` per line, merged), CSV with a header (``image,caption``; ``image_name|comment`` as in Flickr30k),
    Flickr8k ``token.txt``, COCO ``captions_*.json``, Karpathy ``dataset_*.json``. Images listed without a caption
    map to ``[]``. Raises :class:`DatasetError` (naming the file, and the line where known) otherwise.
    """
    return _parse_file(path).captions


def read_splits(path: str | Path) -> dict[str, str]:
    """Map image -> split name as written in the file (jsonl/CSV ``split``, Karpathy ``split``); ``{}`` if none."""
    return _parse_file(path).splits


# ----------------------------------------------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------------------------------------------

#: Names tried by :func:`discover_captions`, in order, in the image folder then its parent(s).
CAPTION_FILE_PATTERNS = (
    "captions.jsonl",
    "captions.json",
    "captions.csv",
    "captions.txt",
    "results.csv",
    "results_20130124.token",
    "Flickr8k.token.txt",
    "Flickr30k.token.txt",
    "dataset_*.json",
    "annotations/captions_*.json",
)

_SPLIT_SYNONYMS = {"val": "dev", "validation": "dev", "restval": "train"}
_IMAGE_SUBFOLDERS = ("images", "Images")


def _canonical_split(name: str) -> str:
    """``val``/``validation`` -> ``dev``; Karpathy's ``restval`` counts as ``train`` (the usual convention)."""
    n = name.strip().lower()
    return _SPLIT_SYNONYMS.get(n, n)


def _has_top_level_images(folder: Path) -> bool:
    try:
        return any(
            e.is_file() and not _is_hidden(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            for e in os.scandir(folder)
        )
    except OSError:
        return False


def _image_root(src: Path) -> Path:
    if _has_top_level_images(src):
        return src
    for sub in _IMAGE_SUBFOLDERS:
        if (src / sub).is_dir():
            return src / sub
    return src


def _search_dirs(src: Path, image_root: Path) -> list[Path]:
    dirs: list[Path] = []
    for d in (image_root, src, src.parent):
        d = d.resolve()
        if d not in dirs:
            dirs.append(d)
    return dirs


def discover_captions(src: str | Path) -> list[Path]:
    """Captions file(s) for an image folder: the first :data:`CAPTION_FILE_PATTERNS` match, looked for in the
    image root, ``src`` and ``src``'s parent (in that order). A glob pattern returns all its matches (COCO's
    ``captions_train2014.json`` + ``captions_val2014.json``). ``[]`` when there is none."""
    src_path = Path(src)
    for d in _search_dirs(src_path, _image_root(src_path)):
        for pattern in CAPTION_FILE_PATTERNS:
            matches = sorted(p for p in d.glob(pattern) if p.is_file())
            if matches:
                return matches
    return []


def _split_lists(dirs: Sequence[Path]) -> dict[str, str]:
    """Flickr8k ``Flickr_8k.{train,dev,test}Images.txt`` lists (first folder that has any)."""
    for d in dirs:
        found = sorted(d.glob("Flickr_8k.*Images.txt"))
        if not found:
            continue
        splits: dict[str, str] = {}
        for f in found:
            name = f.name[len("Flickr_8k.") : -len("Images.txt")]
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    splits[_norm_key(line)] = name
        return splits
    return {}


class _KeyIndex:
    """Looks a record id up in caption-file keys: exact relative path, else an unambiguous base name."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        by_base: dict[str, list[str]] = {}
        for k in self.keys:
            by_base.setdefault(PurePosixPath(k).name, []).append(k)
        self.by_base = {b: ks[0] for b, ks in by_base.items() if len(ks) == 1}

    def find(self, record_id: str) -> str | None:
        if record_id in self.keys:
            return record_id
        return self.by_base.get(PurePosixPath(record_id).name)


def load_dataset(
    src: str | Path,
    *,
    captions: str | Path | Sequence[str | Path] | None = None,
    split: str | None = None,
) -> list[ImageRecord]:
    """Records for the images in ``src`` with their captions and split, sorted by id.

    - Image root: ``src``, or ``src/images`` when ``src`` has no image at its top level.
    - ``captions``: a file (or several, merged); ``None`` auto-discovers one (:func:`discover_captions`). No
      captions file is fine: records then have no captions.
    - ``split``: ``train``/``dev``/``val``/``test`` (``dev`` = ``val``; ``restval`` counts as ``train``) keeps the
      records of that split, taken from the captions file's split fields, else from ``Flickr_8k.<split>Images.txt``
      lists. Raises :class:`DatasetError` when there is no split information or no such split.

    Caption entries whose image has no file are dropped and counted in a warning (as is a split list naming
    missing files). Raises :class:`DatasetError` if ``src`` is not a folder or a captions file is unreadable.
    """
    src_path = Path(src).expanduser()
    if not src_path.is_dir():
        raise DatasetError(f"image folder not found or not a folder: {src_path}")
    root = _image_root(src_path)
    records = scan_images(root)

    if captions is None:
        cap_files = discover_captions(src_path)
    elif isinstance(captions, (str, Path)):
        cap_files = [Path(captions)]
    else:
        cap_files = [Path(c) for c in captions]
    parsed = _Parsed()
    for f in cap_files:
        one = _parse_file(f)
        for k, caps in one.captions.items():
            parsed.captions.setdefault(k, []).extend(caps)
        parsed.splits.update(one.splits)
        for k, ex in one.extras.items():
            parsed.extras.setdefault(k, {}).update(ex)
    if cap_files:
        log.info("captions for %s from %s", root, ", ".join(str(f) for f in cap_files))

    splits = parsed.splits
    if not splits:
        dirs = [f.parent.resolve() for f in cap_files] + _search_dirs(src_path, root)
        splits = _split_lists(dirs)

    cap_index = _KeyIndex(parsed.captions)
    split_index = _KeyIndex(splits)
    used_keys: set[str] = set()
    used_split_keys: set[str] = set()
    out: list[ImageRecord] = []
    for rec in records:
        key = cap_index.find(rec.id)
        skey = split_index.find(rec.id)
        if key is not None:
            used_keys.add(key)
        if skey is not None:
            used_split_keys.add(skey)
        out.append(
            ImageRecord(
                id=rec.id,
                path=rec.path,
                captions=tuple(parsed.captions[key]) if key is not None else (),
                split=splits[skey] if skey is not None else None,
                extra=dict(parsed.extras.get(key, {})) if key is not None else {},
            )
        )

    missing = [k for k in parsed.captions if k not in used_keys]
    if missing:
        log.warning(
            "%d captioned image(s) listed in %s have no file under %s and were dropped (e.g. %s)",
            len(missing),
            ", ".join(str(f) for f in cap_files),
            root,
            ", ".join(missing[:3]),
        )

    if split is not None:
        if not splits:
            raise DatasetError(
                f"split {split!r} asked for, but no split information for {src_path} (no 'split' field in the "
                "captions file and no Flickr_8k.<split>Images.txt lists)"
            )
        want = _canonical_split(split)
        available = sorted({_canonical_split(s) for s in splits.values()})
        if want not in available:
            raise DatasetError(f"no split {split!r} in {src_path}; available: {', '.join(available)}")
        out = [r for r in out if r.split is not None and _canonical_split(r.split) == want]
        missing_in_split = sum(1 for k, s in splits.items() if _canonical_split(s) == want and k not in used_split_keys)
        if missing_in_split:
            log.warning("%d image(s) of split %r have no file under %s", missing_in_split, split, root)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading pixels for a DataLoader
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedItem:
    """One dataset item: ``pixels`` (float tensor (3, H, W)) on success, else ``None`` and ``error`` (reason)."""

    index: int
    pixels: torch.Tensor | None
    error: str | None


@dataclass
class Batch:
    """A collated batch. ``pixels`` is float (n, 3, H, W) for the ``n = len(indices)`` images that loaded
    (shape (0, 3, 0, 0) when none did); ``failed`` lists (dataset index, reason) of those that did not."""

    indices: list[int]
    pixels: torch.Tensor
    failed: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(self.indices, self.pixels.pin_memory(), self.failed)


class ImageLoadDataset(Dataset[LoadedItem]):
    """Decodes ``records[i].path`` with :func:`~indexer.core.images.load_image` and applies ``transform``.

    Never raises for a bad file: item ``i`` is ``LoadedItem(i, None, reason)`` when the image is unreadable,
    truncated or larger than ``max_pixels``. Picklable (for ``num_workers > 0``) when ``transform`` is.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = [str(r.path) for r in records]
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> LoadedItem:
        try:
            image = load_image(self.paths[i], max_pixels=self.max_pixels)
        except BadImage as exc:
            return LoadedItem(i, None, str(exc))
        pixels = self.transform(image)
        return LoadedItem(i, pixels, None)


def collate_skipping(items: Sequence[LoadedItem]) -> Batch:
    """``collate_fn`` for :class:`ImageLoadDataset`: stacks the loaded images, lists the failed ones."""
    ok = [it for it in items if it.pixels is not None]
    failed = [(int(it.index), it.error or "unknown error") for it in items if it.pixels is None]
    if ok:
        shapes = {tuple(it.pixels.shape) for it in ok if it.pixels is not None}
        if len(shapes) != 1:
            raise BadInput(f"the transform produced tensors of different shapes {sorted(shapes)}; it must resize")
        pixels = torch.stack([it.pixels for it in ok if it.pixels is not None]).float()
    else:
        pixels = torch.zeros((0, 3, 0, 0), dtype=torch.float32)
    return Batch(indices=[int(it.index) for it in ok], pixels=pixels, failed=failed)


@dataclass
class SkipReport:
    """Images left out of a job, as (id, reason) pairs."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.skipped)

    def add(self, image_id: str, reason: str) -> None:
        self.skipped.append((image_id, reason))

    def add_batch(self, batch: Batch, records: Sequence[ImageRecord]) -> None:
        """Record ``batch.failed`` (dataset indices) under the ids of ``records`` (the dataset's records)."""
        for index, reason in batch.failed:
            self.add(records[index].id, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self.skipped), "skipped": [{"id": i, "reason": r} for i, r in self.skipped]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> SkipReport:
        data = json.loads(text)
        return cls([(d["id"], d["reason"]) for d in data.get("skipped", [])])

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json() + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target
