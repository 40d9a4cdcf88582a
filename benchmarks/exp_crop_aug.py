"""Experiment (issue 10): random crops as the cached second view, instead of horizontal flips.

The trainer's augmentation swaps in a second cached view of each training image half of the time (``flip_aug``:
the mirrored image). This runs the same trainer twice: centre + flip (the shipped recipe: the control) and
centre + one random crop per image (50-100 % of the area, aspect 3/4-4/3, seeded; then the backbone's own resize
and crop), the crop features computed here in ONNX Runtime fp32 like the trainer's cache. Selection on Flickr8k dev.

    python benchmarks/exp_crop_aug.py
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.exp_common import train_arm  # noqa: E402
from retrieval.encoders.factory import build_torch_encoder  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from trainer.batches import TensorSplit  # noqa: E402
from trainer.config import TrainerSettings  # noqa: E402
from trainer.evaluate import load_split  # noqa: E402
from trainer.features import FeatureCache, _onnx_backbone, split_features  # noqa: E402


def random_crop(img: Image.Image, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0)) -> Image.Image:
    """A box of ``scale`` of the area with aspect ratio in [3/4, 4/3] at a random place (whole image if none fits)."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch))
    return img


def crop_features(encoder: Any, paths: list[str], seed: int = 0, batch: int = 32) -> np.ndarray:
    """``(n, 1280)`` float32 features of one seeded random crop per image."""
    run = _onnx_backbone(encoder, "image")
    transform = encoder.image_transform
    out = []
    for i in range(0, len(paths), batch):
        pixels = []
        for j, p in enumerate(paths[i:i + batch]):
            img = load_image(p, draft=encoder.decode_draft())
            pixels.append(transform(random_crop(img, random.Random(seed * 1_000_003 + i + j))))
        out.append(run(torch.stack(pixels)))
    return np.concatenate(out).astype(np.float32)


def main() -> int:
    torch.set_num_threads(2)
    cfg = TrainerSettings(encoder="zero-shot", precision="fp32", head="mlp", out="runs/exp-crop-aug")
    enc = build_torch_encoder(cfg.spec())
    cache = FeatureCache(cfg.cache_dir, engine="onnx")
    train_rec = load_split(cfg.data, cfg.captions, cfg.train_split)
    train_f = split_features(enc, train_rec, cache, flip=True)
    dev_f = split_features(enc, load_split(cfg.data, cfg.captions, cfg.dev_split), cache)
    if len(train_f.paths) != len(train_rec):
        raise SystemExit("some training images could not be read: crop rows would not line up")
    t0 = time.perf_counter()
    crops = crop_features(enc, train_f.paths)
    print(f"crop features {time.perf_counter() - t0:.0f} s for {len(crops)} images", flush=True)
    for i, name in enumerate(("centre + flip (control)", "centre + random crop")):
        tr, dv = TensorSplit.of(train_f), TensorSplit.of(dev_f)
        if name == "centre + random crop":
            tr.images_flip = torch.from_numpy(crops)
        print(name, json.dumps(train_arm(cfg, f"{cfg.out}/{i}", tr, dv)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
