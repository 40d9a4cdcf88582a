"""Frozen-backbone features, computed once and cached on disk.

The trainer never runs a backbone inside its training loop: image and caption features are computed once per
(encoder, file) and stored in ``<cache_dir>/<key>.npz``, where ``key`` hashes the backbone's identity (spec without
heads, dtype, view). Inside one cache file every row is keyed by the image's resolved path, mtime and size (images)
or by the caption text (captions), so a changed file is recomputed and nothing else is; rows are merged in and the
file is rewritten atomically every ``save_every`` images, so an interrupted run resumes where it stopped.

Arrays: image features ``(n_images, d_img_raw)`` float32, caption features ``(n_captions, d_txt_raw)`` float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from retrieval.atomic import atomic_path
from retrieval.datasets import ImageRecord
from retrieval.datasets.loader import ImageLoadDataset, collate_skipping
from retrieval.encoders import Encoder
from retrieval.errors import BadInput, DatasetError
from retrieval.paths import cache_root

log = logging.getLogger(__name__)

View = Literal["center", "flip"]

FEATURE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$RETRIEVAL_CACHE/features`` or ``~/.cache/retrieval/features``."""
    return cache_root() / "features"


class RecordLike(Protocol):
    """What the feature builder needs of a dataset record (``retrieval.datasets.ImageRecord`` fits)."""

    id: str
    path: Any
    captions: tuple[str, ...]
    split: str | None


# ----------------------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------------------


def backbone_identity(encoder: Encoder, part: Literal["image", "text"], view: View = "center") -> dict[str, Any]:
    """What the raw features of ``part`` depend on: the backbone identity (heads excluded), dtype and view."""
    ident = dict(encoder.spec.identity())
    if not (part == "image" and encoder.image_tuned):  # tuned backbone blocks ship inside the heads file
        ident.pop("heads_sha256", None)
    if part == "image":
        ident.pop("text_model", None)
    elif ident.get("backend") == "dual":  # the dual text backbone does not depend on the image model
        ident.pop("model", None)
        ident.pop("pretrained", None)
    return {"format": FEATURE_FORMAT, "part": part, "view": view if part == "image" else None,
            "dtype": str(encoder.dtype), **ident}


def cache_key(identity: dict[str, Any]) -> str:
    """Short stable hash of an identity dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_key(path: str | Path) -> str:
    """``resolved-path|mtime_ns|size``: a file that changes (or moves) gets a new key."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise DatasetError(f"cannot stat {p}: {exc}") from exc
    return f"{p.resolve()}|{st.st_mtime_ns}|{st.st_size}"


# ----------------------------------------------------------------------------------------------------------------
# Image loading (DataLoader that skips unreadable images)
# ----------------------------------------------------------------------------------------------------------------


class FlipTransform:
    """Horizontal flip, then ``inner`` (picklable for DataLoader workers)."""

    def __init__(self, inner: Callable[[Image.Image], torch.Tensor]):
        self.inner = inner

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.inner(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What a cache call did (tests check ``computed`` is 0 on a hit)."""

    hits: int = 0
    computed: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


class FeatureCache:
    """Row-keyed feature store: one ``.npz`` (keys + float32 features) per backbone identity."""

    def __init__(self, cache_dir: str | Path | None = None, save_every: int = 1024,
                 engine: Literal["torch", "onnx"] = "torch"):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.save_every = save_every
        self.engine = engine
        self.last = CacheStats()

    # -- storage -------------------------------------------------------------------------------------------------
    def _path(self, identity: dict[str, Any]) -> Path:
        return self.dir / f"{cache_key(identity)}.npz"

    def _load(self, identity: dict[str, Any]) -> dict[str, np.ndarray]:
        path = self._path(identity)
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, feats = z["keys"], z["feats"]
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
            return {}
        return {str(k): feats[i] for i, k in enumerate(keys)}

    def _save(self, identity: dict[str, Any], rows: dict[str, np.ndarray]) -> None:
        if not rows:
            return
        keys = np.array(list(rows), dtype=str)
        feats = np.stack(list(rows.values())).astype(np.float32)
        with atomic_path(self._path(identity)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=keys, feats=feats, identity=json.dumps(identity, sort_keys=True, default=str))

    # -- images --------------------------------------------------------------------------------------------------
    def image_features(
        self,
        encoder: Encoder,
        paths: Sequence[str | Path],
        view: View = "center",
        batch_size: int = 64,
        workers: int = 2,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw image features for ``paths``: ``(feats (n, d) float32, ok (n,) bool)``; unreadable rows are zeros."""
        t0 = time.perf_counter()
        identity = backbone_identity(encoder, "image", view)
        rows = self._load(identity)
        keys = [file_key(p) for p in paths]
        missing = [i for i, k in enumerate(keys) if k not in rows]
        stats = CacheStats(hits=len(keys) - len(missing))
        if missing:
            transform = encoder.image_transform if view == "center" else FlipTransform(encoder.image_transform)
            loader = torch.utils.data.DataLoader(
                ImageLoadDataset([ImageRecord(str(paths[i]), Path(paths[i])) for i in missing], transform),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=collate_skipping,
                persistent_workers=False,
            )
            run = _image_runner(encoder, self.engine)
            unsaved = 0
            bar = _progress(loader, len(missing), batch_size, progress, f"image features ({view})")
            for batch in bar:
                for j, reason in batch.failed:
                    log.warning("skipping %s: %s", paths[missing[j]], reason)
                if not len(batch):
                    continue
                feats = run(batch.pixels)
                idx = batch.indices
                for j, f in zip(idx, feats, strict=True):
                    rows[keys[missing[j]]] = f
                stats.computed += len(idx)
                unsaved += len(idx)
                if unsaved >= self.save_every:
                    self._save(identity, rows)
                    unsaved = 0
            stats.failed = [str(paths[i]) for i in missing if keys[i] not in rows]
            self._save(identity, rows)
        dim = _dim(rows, encoder.image_backbone.out_dim)
        out = np.zeros((len(keys), dim), np.float32)
        ok = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            if k in rows:
                out[i] = rows[k]
                ok[i] = True
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return out, ok

    # -- captions ------------------------------------------------------------------------------------------------
    def text_features(
        self, encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Raw caption features ``(n, d_txt_raw)`` float32 (duplicates computed once)."""
        t0 = time.perf_counter()
        identity = backbone_identity(encoder, "text")
        rows = self._load(identity)
        missing_set = {t for t in texts if t not in rows}
        missing = sorted(missing_set)
        stats = CacheStats(hits=sum(1 for t in texts if t not in missing_set))  # one set, not one per text
        if missing:
            run = _text_runner(encoder, self.engine)
            chunks = range(0, len(missing), batch_size)
            unsaved = 0
            for s in _progress(chunks, len(missing), batch_size, progress, "caption features"):
                batch = missing[s : s + batch_size]
                feats = run(batch)
                rows.update(zip(batch, feats, strict=True))
                stats.computed += len(batch)
                unsaved += len(batch)
                if unsaved >= self.save_every * 4:
                    self._save(identity, rows)
                    unsaved = 0
            self._save(identity, rows)
        out = np.stack([rows[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, 0), np.float32)
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return out


def _dim(rows: dict[str, np.ndarray], default: int) -> int:
    return int(next(iter(rows.values())).shape[0]) if rows else default


def _onnx_backbone(encoder: Encoder, kind: Literal["image", "text"]) -> Callable[[Any], np.ndarray]:
    """The float32 backbone of ``kind`` (no head) in ONNX Runtime, exported once by
    :func:`~retrieval.encoders.onnx_export.load_tower` (checked against torch at export)."""
    if encoder.dtype != torch.float32:
        raise BadInput(f"ONNX feature caching needs a float32 encoder (precision=fp32), not {encoder.dtype}")
    from retrieval.encoders.onnx_export import load_tower
    from retrieval.encoders.runtime import image_examples, text_examples

    identity = {**encoder.spec.identity(), "heads_sha256": None}
    backbone, examples = ((encoder.image_backbone, image_examples(encoder)) if kind == "image"
                          else (encoder.text_backbone, text_examples(encoder)))
    return load_tower(kind, backbone, None, examples, identity, threads=encoder.spec.threads)  # (n, d) float32


def _text_runner(encoder: Encoder, engine: Literal["torch", "onnx"]) -> Callable[[Sequence[str]], np.ndarray]:
    """Strings -> raw features ``(n, d)`` float32, in torch or in ONNX Runtime (see :func:`_image_runner`)."""
    if engine == "onnx":
        run = _onnx_backbone(encoder, "text")
        return lambda texts: run(encoder.text_backbone.tokenize(texts))
    return lambda texts: encoder.text_features(texts).numpy()


def _image_runner(encoder: Encoder, engine: Literal["torch", "onnx"]) -> Callable[[torch.Tensor], np.ndarray]:
    """Pixels ``(n, 3, H, W)`` -> raw features ``(n, d)`` float32, in torch or in ONNX Runtime.

    ONNX runs the float32 backbone, so it needs a float32 encoder: the cache key records the encoder's dtype, and
    ONNX features must land under the float32 key (they agree with torch float32 to cosine >= 0.9999). On 2 CPU
    cores it is several times faster than torch (EfficientNet-Lite0: ~15 images/s in bf16 torch, ~190/s ONNX).
    """
    if engine == "onnx":
        return _onnx_backbone(encoder, "image")
    if encoder.spec.backend == "dual":  # convolutions run ~1.5x faster channels-last on CPU (bf16 Lite0 10 -> 15/s)
        encoder.image_backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return lambda pixels: encoder.image_features(pixels.contiguous(memory_format=torch.channels_last)).numpy()


def _progress(it: Iterable[Any], total: int, batch: int, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=(total + batch - 1) // batch, desc=desc, unit="batch")


# ----------------------------------------------------------------------------------------------------------------
# A split's features, ready for training and evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SplitFeatures:
    """Raw features of one split.

    ``images`` ``(n_img, d_img)``, ``images_flip`` same shape or None, ``texts`` ``(n_txt, d_txt)``,
    ``text_image`` ``(n_txt,)`` int64: the row in ``images`` each caption describes.
    """

    ids: list[str]
    paths: list[str]
    images: np.ndarray
    texts: np.ndarray
    text_image: np.ndarray
    captions: list[str]
    images_flip: np.ndarray | None = None

    def image_view(self, average_flip: bool) -> np.ndarray:
        """Centre features, or the mean of centre and flipped features (test-time augmentation)."""
        if average_flip and self.images_flip is not None:
            return (self.images + self.images_flip) / 2
        return self.images


def split_features(
    encoder: Encoder,
    records: Sequence[RecordLike],
    cache: FeatureCache,
    flip: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
) -> SplitFeatures:
    """Features of ``records`` (images that cannot be read are dropped with their captions)."""
    paths = [str(r.path) for r in records]
    img, ok = cache.image_features(encoder, paths, "center", batch_size, workers, progress)
    img_flip = None
    if flip:
        img_flip, ok_flip = cache.image_features(encoder, paths, "flip", batch_size, workers, progress)
        ok &= ok_flip
    keep = [i for i in range(len(records)) if ok[i]]
    if len(keep) < len(records):
        log.warning("%d of %d images unreadable; dropped", len(records) - len(keep), len(records))
    captions: list[str] = []
    owner: list[int] = []
    for row, i in enumerate(keep):
        for c in records[i].captions:
            captions.append(c)
            owner.append(row)
    texts = cache.text_features(encoder, captions, progress=progress)
    return SplitFeatures(
        ids=[records[i].id for i in keep],
        paths=[paths[i] for i in keep],
        images=img[keep],
        images_flip=img_flip[keep] if img_flip is not None else None,
        texts=texts,
        text_image=np.asarray(owner, np.int64),
        captions=captions,
    )
