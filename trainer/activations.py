"""Cached intermediate activations of an EfficientNet-Lite backbone, for training its last blocks.

Partial unfreezing without running the whole backbone in the training loop: every image view is sent once through
the frozen stem and the first ``cut`` MBConv blocks, and that activation ``(C, H, W)`` (float16, ~44 KB for
EfficientNet-Lite0 cut at block 11) is stored; training then runs only blocks ``cut..`` + the head convolution on
the cached activations.

Files: ``<cache_dir>/acts-<key>.npy`` (float16 ``(n, C, H, W)``, memory-mapped when read) and
``acts-<key>.json`` (the file keys of the rows, the identity, and which rows failed to load). ``key`` hashes the
backbone identity, the cut, the view and the ordered file keys: another image list or a changed file gives another
cache file (no row-level merging; these caches are made once per dataset split).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.atomic import atomic_path
from retrieval.datasets import ImageRecord
from retrieval.datasets.loader import ImageLoadDataset, collate_skipping
from retrieval.encoders import Encoder
from retrieval.encoders.backbones import StagedImageBackbone
from retrieval.errors import BadInput
from trainer.features import (
    FeatureCache,
    FlipTransform,
    RecordLike,
    SplitFeatures,
    View,
    backbone_identity,
    cache_key,
    default_cache_dir,
    file_key,
)

log = logging.getLogger(__name__)


def effnet_of(encoder: Encoder) -> StagedImageBackbone:
    """The EfficientNet-Lite image backbone of a ``dual`` encoder (:class:`BadInput` for anything else)."""
    backbone = encoder.image_backbone
    if not isinstance(backbone, StagedImageBackbone):
        raise BadInput("partial unfreezing needs a dual encoder with an EfficientNet-Lite image backbone")
    return backbone


def cached_activations(
    encoder: Encoder,
    paths: Sequence[str | Path],
    cut: int,
    view: View = "center",
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Activations after block ``cut`` for every path: ``(acts (n, C, H, W) float16 memmap, ok (n,) bool)``.

    Computed (and stored) on the first call, read memory-mapped afterwards. Unreadable images get zero rows and
    ``ok = False``.
    """
    net = effnet_of(encoder)
    keys = [file_key(p) for p in paths]
    folder = Path(cache_dir) if cache_dir else default_cache_dir()

    def files(c: int) -> tuple[Path, Path, dict[str, Any]]:
        ident = {**backbone_identity(encoder, "image", view), "cut": c}
        key = cache_key({"identity": ident, "files": keys})
        return folder / f"acts-{key}.npy", folder / f"acts-{key}.json", ident

    npy, meta, identity = files(cut)
    if npy.is_file() and meta.is_file():
        return np.load(npy, mmap_mode="r"), np.asarray(json.loads(meta.read_text())["ok"], bool)
    t0 = time.perf_counter()
    for earlier in range(cut - 1, 0, -1):  # activations at an earlier cut: run only the blocks in between
        src, src_meta, _ = files(earlier)
        if src.is_file() and src_meta.is_file():
            src_ok = np.asarray(json.loads(src_meta.read_text())["ok"], bool)
            advanced = _advance(net, np.load(src, mmap_mode="r"), earlier, cut, encoder)
            return _store(npy, meta, advanced, src_ok, {"identity": identity, "keys": keys, "from_cut": earlier}, t0)
    transform = encoder.image_transform if view == "center" else FlipTransform(encoder.image_transform)
    loader = torch.utils.data.DataLoader(
        ImageLoadDataset([ImageRecord(str(p), Path(p)) for p in paths], transform),
        batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping,
    )
    out: np.ndarray | None = None
    ok = np.zeros(len(paths), bool)
    with torch.inference_mode():
        for batch in loader:
            for j, reason in batch.failed:
                log.warning("skipping %s: %s", paths[j], reason)
            if not len(batch):
                continue
            pixels = batch.pixels.to(encoder.device, encoder.dtype).contiguous(memory_format=torch.channels_last)
            acts = net.features_until(pixels, cut).float().cpu().numpy().astype(np.float16)
            if out is None:
                out = np.zeros((len(paths), *acts.shape[1:]), np.float16)
            out[batch.indices] = acts
            ok[batch.indices] = True
    if out is None:
        raise BadInput("no image could be read")
    return _store(npy, meta, out, ok, {"identity": identity, "keys": keys}, t0)


def _advance(net: StagedImageBackbone, acts: np.ndarray, start: int, stop: int, encoder: Encoder,
             chunk: int = 128) -> np.ndarray:
    """Blocks ``[start, stop)`` over cached activations (in the encoder's dtype), float16 out."""
    out = []
    with torch.inference_mode():
        for i in range(0, acts.shape[0], chunk):
            x = torch.from_numpy(np.asarray(acts[i:i + chunk])).to(encoder.device, encoder.dtype)
            x = net.blocks_between(x.contiguous(memory_format=torch.channels_last), start, stop)
            out.append(x.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def _store(npy: Path, meta: Path, out: np.ndarray, ok: np.ndarray, info: dict[str, Any],
           t0: float) -> tuple[np.ndarray, np.ndarray]:
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, out)
    info = {**info, "ok": ok.tolist(), "seconds": round(time.perf_counter() - t0, 2)}
    with atomic_path(meta) as tmp:
        Path(tmp).write_text(json.dumps(info))
    log.info("cached %d activations (%s) in %.1f s", int(ok.sum()), npy.name, info["seconds"])
    return np.load(npy, mmap_mode="r"), ok


def pooled_from_activations(encoder: Encoder, acts: np.ndarray, cut: int, chunk: int = 256) -> np.ndarray:
    """The frozen backbone's pooled features ``(n, out_dim)`` float32 from cached activations (runs blocks
    ``cut..`` in float32)."""
    net: Any = copy.deepcopy(effnet_of(encoder))
    net.float().eval()
    out = []
    with torch.inference_mode():
        for i in range(0, acts.shape[0], chunk):
            x = torch.from_numpy(np.asarray(acts[i:i + chunk], np.float32))
            out.append(net.features_from(x.contiguous(memory_format=torch.channels_last), cut).numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class ActivationSplit:
    """A split for partial unfreezing: ``feats`` holds the frozen pooled features (``images``/``images_flip``) and
    the captions; ``acts``/``acts_flip`` the cached activations ``(n_img, C, H, W)`` float16 of the same rows."""

    feats: SplitFeatures
    acts: np.ndarray
    acts_flip: np.ndarray | None


def activation_split(
    encoder: Encoder,
    records: Sequence[RecordLike],
    cache: FeatureCache,
    cut: int,
    flip: bool = False,
    workers: int = 2,
) -> ActivationSplit:
    """Activations after block ``cut`` (cached), the pooled features derived from them, and caption features."""
    paths = [str(r.path) for r in records]
    views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ok = np.ones(len(paths), bool)
    for view in ("center", "flip") if flip else ("center",):
        acts, ok_v = cached_activations(encoder, paths, cut, view, cache.dir, workers=workers)  # type: ignore[arg-type]
        pooled_path = cache.dir / f"pooled-{cache_key({'acts': str(getattr(acts, 'filename', '')), 'cut': cut})}.npy"
        if pooled_path.is_file():
            pooled = np.load(pooled_path)
        else:
            pooled = pooled_from_activations(encoder, acts, cut)
            with atomic_path(pooled_path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, pooled)
        views[view] = (acts, pooled)
        ok &= ok_v
    keep = np.flatnonzero(ok)
    captions: list[str] = []
    owner: list[int] = []
    for row, i in enumerate(keep.tolist()):
        captions.extend(records[i].captions)
        owner.extend([row] * len(records[i].captions))
    texts = cache.text_features(encoder, captions)
    flip_view = views.get("flip")
    feats = SplitFeatures(
        ids=[records[i].id for i in keep.tolist()], paths=[paths[i] for i in keep.tolist()],
        images=views["center"][1][keep], images_flip=flip_view[1][keep] if flip_view else None,
        texts=texts, text_image=np.asarray(owner, np.int64), captions=captions,
    )
    all_rows = len(keep) == len(paths)
    acts_c = views["center"][0] if all_rows else views["center"][0][keep]
    acts_f = (flip_view[0] if all_rows else flip_view[0][keep]) if flip_view else None
    return ActivationSplit(feats, acts_c, acts_f)
