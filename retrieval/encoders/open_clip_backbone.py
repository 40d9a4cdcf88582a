"""open_clip models as a backbone pair: any model name with a pretrained tag (downloaded where a hub is
reachable), a local checkpoint file, a local model folder, or ``None`` (random weights, for tests)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from retrieval import _torch_compat  # noqa: F401  (must run before anything imports torchvision)
from retrieval.atomic import atomic_write_text
from retrieval.encoders.backbones import ImageBackbone, TextBackbone
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import EncoderUnavailable


class OpenClipImage(ImageBackbone):
    def __init__(self, model: Any, transform: Callable[[Image.Image], torch.Tensor], out_dim: int):
        super().__init__()
        self.model = model
        self.transform = transform
        self.out_dim = out_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class OpenClipText(TextBackbone):
    def __init__(self, model: Any, tokenizer: Any, out_dim: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.out_dim = out_dim

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_limit(self) -> int | None:
        limit = getattr(self.tokenizer, "context_length", None)
        return int(limit) if limit else None

    def token_count(self, text: str) -> int | None:
        tok = self.tokenizer
        if getattr(tok, "reduction_fn", None) is None and hasattr(tok, "sot_token_id") and hasattr(tok, "encode"):
            return len(tok.encode(text)) + 2  # CLIP's BPE tokenizer: start + text + end
        hf = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer (SigLIP, ...)
        if hf is not None:
            clean = getattr(tok, "clean_fn", None) or (lambda t: t)
            return len(hf(clean(text))["input_ids"])
        return None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(next(self.model.parameters()).device))


def build_open_clip(spec: EncoderSpec) -> tuple[OpenClipImage, OpenClipText]:
    """Both towers of the open_clip model ``spec`` names; :class:`EncoderUnavailable` when it cannot load."""
    import open_clip

    name, pretrained = spec.model, spec.pretrained
    if pretrained and Path(pretrained).is_dir():  # a saved open_clip model folder (open_clip_config.json + weights)
        name, pretrained = f"local-dir:{pretrained}", None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises RuntimeError/HF errors/OSError for missing weights or no network
        raise EncoderUnavailable(
            f"cannot load open_clip model {spec.model!r} with pretrained={spec.pretrained!r}: {exc}. "
            "Without network access pass a local checkpoint file or folder as the pretrained value."
        ) from exc
    dim = int(model.text_projection.shape[1] if getattr(model, "text_projection", None) is not None
              else model.visual.output_dim)
    return OpenClipImage(model, preprocess, dim), OpenClipText(model, tokenizer, dim)


def register_open_clip_config(name: str, config: dict[str, Any], directory: str | Path) -> None:
    """Register a model config (open_clip's JSON schema) under ``name``; ``directory`` receives the JSON file."""
    import open_clip

    path = Path(directory) / f"{name}.json"
    atomic_write_text(path, json.dumps(config))
    open_clip.add_model_config(path)
