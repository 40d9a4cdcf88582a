"""What the service offers besides search, over one snapshot: near-duplicate clusters, the folders and date range
(for the page's filters), and raw embeddings of texts and images (for ``POST /v1/embeddings``)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import BadImage, BadInput
from retrieval.images import load_image
from retrieval.index import IndexStore
from retrieval.index.dupes import Cluster, near_duplicates

#: ``data:image/png;base64,....`` (RFC 2397, base64 only)
DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.I)


@dataclass(frozen=True)
class Library:
    """Folders (with their number of images, directly inside) and the earliest / latest ``taken_at``."""

    folders: list[tuple[str, int]]
    earliest: str | None
    latest: str | None


def library(store: IndexStore) -> Library:
    lo, hi = store.meta.date_range()
    return Library(store.meta.folders(), lo, hi)


def duplicates(store: IndexStore, threshold: float) -> list[Cluster]:
    """Near-duplicate clusters at cosine ``>= threshold`` (see :mod:`retrieval.index.dupes`)."""
    return near_duplicates(store, threshold)


def is_image_input(text: str) -> bool:
    """Whether an embeddings input is an image (a base64 ``data:`` URL) rather than text."""
    return text[:5].lower() == "data:"


def decode_data_url(text: str, index: int, max_bytes: int) -> bytes:
    """The bytes of a base64 image data URL; :class:`BadInput` naming ``input[index]`` otherwise."""
    m = DATA_URL.match(text[:512])
    if m is None:
        raise BadInput(f"input[{index}]: a data URL must look like data:image/png;base64,... (base64 images only)")
    payload = text[m.end():]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise BadInput(f"input[{index}]: the image is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"input[{index}]: the data URL is not valid base64") from None


def embed_inputs(encoder: Any, inputs: Sequence[str], *, max_image_bytes: int, max_pixels: int,
                 check_text: Any) -> np.ndarray:
    """Texts and data-URL images -> ``(len(inputs), dim)`` float32, L2-normalised, in input order. Texts go through
    ``check_text`` (normalisation and the length limit); errors name the offending ``input[i]``."""
    texts: list[tuple[int, str]] = []
    images: list[tuple[int, Any]] = []
    for i, item in enumerate(inputs):
        if is_image_input(item):
            data = decode_data_url(item, i, max_image_bytes)
            try:
                images.append((i, load_image(data, max_pixels=max_pixels)))
            except BadImage as exc:
                raise BadImage(f"input[{i}]: {exc}") from None
        else:
            try:
                texts.append((i, check_text(item)))
            except BadInput as exc:
                raise type(exc)(f"input[{i}]: {exc}") from None
    out = np.zeros((len(inputs), encoder.dim), np.float32)
    if texts:
        out[[i for i, _ in texts]] = encoder.encode_text([t for _, t in texts])
    if images:
        out[[i for i, _ in images]] = encoder.encode_images([im for _, im in images])
    return out
