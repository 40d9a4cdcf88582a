"""Shared fixtures. Nothing here touches the network: tiny open_clip models have random weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", SHARED_DATA / "flickr8k"))
CALTECH101_DEV = Path(os.environ.get("CALTECH101_DEV_DIR", SHARED_DATA / "caltech101-dev"))

#: A tiny open_clip model (ViT with 2 layers, 64-d): builds in well under a second with random weights.
TINY_CLIP_NAME = "tiny-test-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session", autouse=True)
def _faiss_configured():
    """The apps call configure_faiss() once at start; the suite does the same."""
    from retrieval.index import configure_faiss

    configure_faiss()


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory: pytest.TempPathFactory):
    """An EncoderSpec for the tiny open_clip config (random weights, fp32, CPU); its open_clip model config is
    registered for the session and removed again at the end."""
    from retrieval.encoders import EncoderSpec
    from retrieval.encoders.open_clip_backbone import register_open_clip_config  # before open_clip: torch compat

    register_open_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG, tmp_path_factory.mktemp("clipcfg"))
    yield EncoderSpec(backend="open_clip", model=TINY_CLIP_NAME, pretrained=None, precision="fp32", device="cpu")
    from open_clip import factory as open_clip_factory

    open_clip_factory._MODEL_CONFIGS.pop(TINY_CLIP_NAME, None)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_spec):
    import torch

    from retrieval.encoders import build_encoder

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


def _data_pack(path: Path, env: str) -> Path:
    if not (path / "captions.jsonl").is_file():
        pytest.skip(f"real data not found at {path} (set {env}, or see data/README.md to fetch it): "
                    "this test needs it")
    return path


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k pack from ../shared/data (read in place, never copied); skips when absent."""
    return _data_pack(FLICKR8K, "FLICKR8K_DIR")


@pytest.fixture(scope="session")
def caltech101_dev() -> Path:
    """The Caltech-101 dev pack from ../shared/data (read in place); skips when absent."""
    return _data_pack(CALTECH101_DEV, "CALTECH101_DEV_DIR")
