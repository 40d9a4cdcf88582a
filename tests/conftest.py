"""Shared fixtures. Nothing here touches the network: tiny open_clip models have random weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"))

#: A tiny open_clip model (ViT with 2 layers, 64-d): builds in well under a second with random weights.
TINY_CLIP_NAME = "tiny-test-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory: pytest.TempPathFactory):
    """An EncoderSpec for the tiny open_clip config (random weights, fp32, CPU)."""
    from indexer.core.encoders import EncoderSpec, register_open_clip_config

    register_open_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG, tmp_path_factory.mktemp("clipcfg"))
    return EncoderSpec(backend="open_clip", model=TINY_CLIP_NAME, pretrained=None, precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_spec):
    import torch

    from indexer.core.encoders import build_encoder

    torch.manual_seed(0)
    return build_encoder(tiny_clip_spec)


def make_images(folder: Path, n: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Path]:
    """Write ``n`` random-but-distinct RGB JPEGs into ``folder``; returns their paths (sorted)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return sorted(paths)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of 12 generated images with a captions.jsonl beside them."""
    folder = tmp_path / "imgs"
    paths = make_images(folder, 12)
    with open(folder / "captions.jsonl", "w") as fh:
        for i, p in enumerate(paths):
            fh.write(json.dumps({"image": p.name, "captions": [f"picture number {i}", f"image {i}"]}) + "\n")
    return folder


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k pack from ../shared/data (read in place, never copied)."""
    if not (FLICKR8K / "captions.jsonl").is_file():
        pytest.fail(f"Flickr8k not found at {FLICKR8K}; set FLICKR8K_DIR")
    return FLICKR8K
