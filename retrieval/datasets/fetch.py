"""Fetch a public dataset into the layout this project's readers expect (for users with a network).

    python -m retrieval.datasets.fetch flickr8k --dest data/flickr8k
    python -m retrieval.datasets.fetch --list

Each recipe downloads its archives into ``DEST/downloads/`` (resumable: a complete file is kept), checks every
download (the byte count against the server's Content-Length, the SHA-256 against a pinned value where one is
published here, and every zip member's CRC), records the SHA-256 in ``DEST/downloads/SHA256SUMS`` (a later fetch
refuses a file that changed), unpacks into the layout below, and checks the result (image counts, splits) through
the same readers the indexer and trainer use. Archives behind a licence form (Flickr30k images, FashionIQ images)
are not downloaded: the command says where to get them and where to put them, then finishes the job.

Layouts (all read by :func:`retrieval.datasets.load_dataset` or the named reader):

- ``flickr8k``: ``images/*.jpg``, ``Flickr8k.token.txt``, ``Flickr_8k.{train,dev,test}Images.txt``
- ``flickr30k`` / ``coco``: ``images/...``, Karpathy ``dataset_flickr30k.json`` / ``dataset_coco.json`` (splits)
- ``caltech101``: ``images/<class>__<file>.jpg``, ``captions.jsonl`` ("a photo of a {class}.", ``label``)
- ``visual-genome``: ``images/VG_100K*/``, ``region_descriptions.json``, ``image_data.json``
- ``fashioniq``: ``captions/cap.<category>.<split>.json``, ``image_splits/``, ``images/`` (by hand)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from retrieval.atomic import atomic_path, atomic_write_text
from retrieval.errors import DatasetError
from retrieval.images import IMAGE_EXTENSIONS

CHUNK = 1 << 20
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


@dataclass(frozen=True)
class Download:
    url: str
    filename: str
    sha256: str | None = None
    """Pinned where a checksum is published; otherwise the first fetch records it in SHA256SUMS."""


@dataclass(frozen=True)
class Recipe:
    name: str
    licence: str
    downloads: tuple[Download, ...]
    prepare: Callable[[Path, Path], None]
    """(downloads folder, destination) -> writes the layout."""
    check: Callable[[Path], str]
    """destination -> a one-line summary, or :class:`DatasetError`."""
    manual: tuple[tuple[str, str], ...] = ()
    """(file name expected in downloads/, where to get it) for archives behind a form."""


# ----------------------------------------------------------------------------------------------------------------
# Downloading and checking
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded(downloads: Path) -> dict[str, str]:
    f = downloads / "SHA256SUMS"
    if not f.is_file():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip()] = digest
    return out


def _record(downloads: Path, name: str, digest: str) -> None:
    sums = _recorded(downloads)
    sums[name] = digest
    atomic_write_text(downloads / "SHA256SUMS", "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def download(item: Download, downloads: Path, *, quiet: bool = False) -> Path:
    """Fetch ``item`` into ``downloads`` (kept if already complete) and check it; returns the file."""
    target = downloads / item.filename
    pinned = item.sha256 or _recorded(downloads).get(item.filename)
    if not target.is_file():
        if not quiet:
            print(f"downloading {item.url}", file=sys.stderr)
        try:
            with urllib.request.urlopen(item.url, timeout=60) as resp, atomic_path(target) as tmp:
                expected = resp.headers.get("Content-Length")
                got = 0
                with open(tmp, "wb") as fh:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        fh.write(block)
                        got += len(block)
                if expected is not None and int(expected) != got:
                    raise DatasetError(f"{item.url}: received {got} bytes, the server announced {expected}")
        except OSError as exc:
            raise DatasetError(f"cannot download {item.url}: {exc}") from exc
    digest = _sha256(target)
    if pinned and digest != pinned:
        raise DatasetError(f"{target}: SHA-256 {digest} differs from the expected {pinned}; delete it and rerun")
    if target.suffix == ".zip":
        with zipfile.ZipFile(target) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise DatasetError(f"{target}: member {bad} fails its CRC check; delete the file and rerun")
    _record(downloads, item.filename, digest)
    return target


def _members(archive: Path) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """(name, opener) of every regular file in a zip or tar archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(zf.open, info)
        return
    with tarfile.open(archive) as tf:

        def open_member(member: tarfile.TarInfo) -> IO[bytes]:
            fh = tf.extractfile(member)
            if fh is None:
                raise DatasetError(f"{archive}: cannot read member {member.name}")
            return fh

        for member in tf:
            if member.isfile():
                yield member.name, functools.partial(open_member, member)


def extract(archive: Path, dest: Path, rename: Callable[[str], str | None]) -> int:
    """Extract the members of a zip or tar archive whose ``rename(member)`` gives a relative path (None: skip);
    a member that would land outside ``dest`` is refused. Returns the number extracted."""
    n = 0
    for name, open_member in _members(archive):
        rel = rename(name)
        if rel is None:
            continue
        out = dest / rel
        if not out.resolve().is_relative_to(dest.resolve()):
            raise DatasetError(f"{archive}: member {name} would leave {dest}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(out, "wb") as fh:
            shutil.copyfileobj(src, fh, CHUNK)
        n += 1
    return n


def _images_only(prefix: str, into: str = "images/") -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        if not name.startswith(prefix) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        return into + name[len(prefix):]

    return rename


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _need(dest: Path, n_images: int, splits: dict[str, int] | None = None) -> str:
    from retrieval.datasets import load_dataset

    found = _count_images(dest / "images")
    if found < n_images:
        raise DatasetError(f"{dest}: {found} images, expected at least {n_images}; the download is incomplete")
    sizes = {s: len(load_dataset(dest, split=s)) for s in (splits or {})}
    short = {s: (sizes[s], n) for s, n in (splits or {}).items() if sizes[s] < n}
    if short:
        raise DatasetError(f"{dest}: splits smaller than expected (found, expected): {short}")
    return f"{found} images" + (f", splits {sizes}" if sizes else "")


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------


def _prep_flickr8k(dl: Path, dest: Path) -> None:
    extract(dl / "Flickr8k_Dataset.zip", dest, _images_only("Flicker8k_Dataset/"))  # sic: "Flicker"
    keep = {"Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"}
    extract(dl / "Flickr8k_text.zip", dest, lambda n: Path(n).name if Path(n).name in keep else None)


def _only_file(filename: str) -> Callable[[str], str | None]:
    """Extract only the member named ``filename`` (in any folder), to the top of the destination."""
    return lambda n: filename if Path(n).name == filename else None


def _karpathy(name: str) -> Callable[[str], str | None]:
    return _only_file(f"dataset_{name}.json")


def _prep_flickr30k(dl: Path, dest: Path) -> None:
    archive = next(dl / n for n in ("flickr30k-images.tar.gz", "flickr30k-images.zip") if (dl / n).is_file())
    rename = _images_only("flickr30k-images/")
    extract(archive, dest, rename)
    extract(dl / "caption_datasets.zip", dest, _karpathy("flickr30k"))


def _prep_coco(dl: Path, dest: Path) -> None:
    for part in ("train2014", "val2014"):
        extract(dl / f"{part}.zip", dest, _images_only(f"{part}/", f"images/{part}/"))
    extract(dl / "caption_datasets.zip", dest, _karpathy("coco"))


#: Readable names where the folder name is not one (the CLIP paper's Caltech-101 prompts).
CALTECH_NAMES = {
    "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard", "Motorbikes": "motorbike",
    "airplanes": "airplane", "car_side": "side of a car", "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat", "crocodile_head": "head of a crocodile",
    "flamingo_head": "head of a flamingo", "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
}


def _prep_caltech101(dl: Path, dest: Path) -> None:
    inner = dl / "101_ObjectCategories.tar.gz"
    if not inner.is_file():
        extract(dl / "caltech-101.zip", dl, lambda n: inner.name if n.endswith(inner.name) else None)

    def rename(name: str) -> str | None:
        parts = Path(name).parts
        if len(parts) < 3 or parts[-2] == "BACKGROUND_Google" or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        return f"images/{parts[-2]}__{parts[-1]}"

    extract(inner, dest, rename)
    rows = []
    for img in sorted((dest / "images").iterdir()):
        label = img.name.split("__", 1)[0]
        name = CALTECH_NAMES.get(label, label.replace("_", " ").lower())
        rows.append(json.dumps({"image": img.name, "captions": [f"a photo of a {name}."], "label": label,
                                "class_name": name}))
    atomic_write_text(dest / "captions.jsonl", "\n".join(rows) + "\n")


def _prep_visual_genome(dl: Path, dest: Path) -> None:
    for archive, folder in (("images.zip", "VG_100K/"), ("images2.zip", "VG_100K_2/")):
        extract(dl / archive, dest, _images_only(folder, f"images/{folder}"))
    for name in ("region_descriptions.json", "image_data.json"):
        extract(dl / f"{name}.zip", dest, _only_file(name))


def _prep_fashioniq(dl: Path, dest: Path) -> None:
    def rename(name: str) -> str | None:
        parts = Path(name).parts
        if len(parts) >= 3 and parts[1] in ("captions", "image_splits") and name.endswith(".json"):
            return f"{parts[1]}/{parts[-1]}"
        return None

    extract(dl / "fashion-iq-master.zip", dest, rename)
    (dest / "images").mkdir(exist_ok=True)


def _check_caltech(dest: Path) -> str:
    classes = {p.name.split("__", 1)[0] for p in (dest / "images").iterdir()}
    if len(classes) != 101:
        raise DatasetError(f"{dest}: {len(classes)} classes, expected 101")
    return _need(dest, 8000) + ", 101 classes"


def _check_fashioniq(dest: Path) -> str:
    caps = sorted((dest / "captions").glob("cap.*.json"))
    if not caps:
        raise DatasetError(f"{dest}/captions has no cap.*.json files")
    return f"{len(caps)} caption files, {_count_images(dest / 'images')} images under images/ (fetched by hand)"


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "flickr8k", "research use; cite Hodosh, Young, Hockenmaier (2013), JAIR 47",
        (Download("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                  "Flickr8k_Dataset.zip"),
         Download("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                  "Flickr8k_text.zip")),
        _prep_flickr8k, lambda d: _need(d, 8091, {"train": 6000, "dev": 1000, "test": 1000})),
    Recipe(
        "flickr30k", "non-commercial research; request the images at https://shannon.cs.illinois.edu/DenotationGraph/",
        (Download(KARPATHY, "caption_datasets.zip"),),
        _prep_flickr30k, lambda d: _need(d, 31783, {"train": 29000, "dev": 1014, "test": 1000}),
        manual=(("flickr30k-images.tar.gz", "the Flickr30k request form (https://shannon.cs.illinois.edu/"
                 "DenotationGraph/), or flickr30k-images.zip from a mirror you trust"),)),
    Recipe(
        "coco", "annotations CC BY 4.0; images under their Flickr licences (https://cocodataset.org/#termsofuse)",
        (Download("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip"),
         Download("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip"),
         Download(KARPATHY, "caption_datasets.zip")),
        _prep_coco, lambda d: _need(d, 123287, {"test": 5000, "dev": 5000})),
    Recipe(
        "caltech101", "CC BY 4.0 (CaltechDATA doi:10.22002/D1.20086)",
        (Download("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", "caltech-101.zip"),),
        _prep_caltech101, _check_caltech),
    Recipe(
        "visual-genome", "CC BY 4.0 (https://homes.cs.washington.edu/~ranjay/visualgenome/)",
        (Download("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "images.zip"),
         Download("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "images2.zip"),
         Download("https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/region_descriptions.json.zip",
                  "region_descriptions.json.zip"),
         Download("https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/image_data.json.zip",
                  "image_data.json.zip")),
        _prep_visual_genome, lambda d: _need(d, 108077)),
    Recipe(
        "fashioniq", "research use (https://github.com/XiaoxiaoGuo/fashion-iq); images belong to their sellers",
        (Download("https://github.com/XiaoxiaoGuo/fashion-iq/archive/refs/heads/master.zip", "fashion-iq-master.zip"),),
        _prep_fashioniq, _check_fashioniq),
)}


def fetch(name: str, dest: str | Path, *, quiet: bool = False) -> str:
    """Download, check, unpack and verify dataset ``name`` into ``dest``; returns the check's summary."""
    if name not in RECIPES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    dest = Path(dest)
    downloads = dest / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [(f, where) for f, where in recipe.manual if not (downloads / f).is_file()]
    if missing:
        raise DatasetError("put these files into " + str(downloads) + " first: "
                           + "; ".join(f"{f} (from {where})" for f, where in missing))
    for item in recipe.downloads:
        download(item, downloads, quiet=quiet)
    recipe.prepare(downloads, dest)
    return recipe.check(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retrieval.datasets.fetch", description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="dataset: " + ", ".join(sorted(RECIPES)))
    p.add_argument("--dest", help="folder to write (default: data/NAME)")
    p.add_argument("--list", action="store_true", help="list the datasets and their licences")
    args = p.parse_args(argv)
    if args.list or not args.name:
        for r in RECIPES.values():
            print(f"{r.name:14s} {r.licence}")
        return 0
    try:
        summary = fetch(args.name, args.dest or Path("data") / args.name)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
