"""Datasets: folder scanning, one reader per caption format, splits, and the DataLoader pieces.

- :func:`scan_images` walks a folder (recursively, hidden entries skipped, no symlink leaves the root) and returns
  one :class:`ImageRecord` per image, with ``id`` = the POSIX path relative to the root.
- :func:`read_captions` / :func:`read_splits` read every common captions format (jsonl, Kaggle/Flickr30k CSV,
  Flickr8k ``token.txt``, COCO ``captions_*.json``, Karpathy ``dataset_*.json``), auto-detected.
- :func:`load_dataset` joins the two: a folder of images, its captions (auto-discovered), an optional split.
- :class:`ImageLoadDataset` + :func:`collate_skipping` (in :mod:`retrieval.datasets.loader`, which imports torch)
  feed a ``DataLoader``: images that cannot be decoded come back in ``Batch.failed`` instead of raising.

Caption keys are file names or relative paths; a record matches a key equal to its ``id`` or, failing that, a key
with the same base name (when that base name is unambiguous).
"""

from retrieval.datasets.captions import parse_file, read_captions, read_splits
from retrieval.datasets.load import CAPTION_FILE_PATTERNS, discover_captions, load_dataset
from retrieval.datasets.records import ImageRecord, scan_images

__all__ = [
    "CAPTION_FILE_PATTERNS",
    "ImageRecord",
    "discover_captions",
    "load_dataset",
    "parse_file",
    "read_captions",
    "read_splits",
    "scan_images",
]
