"""The zero-shot *label bridge* between an ImageNet classifier and a sentence model.

An image becomes the probability-weighted mean of the text embeddings of "a photo of a {class}" over its likely
ImageNet classes: a real, training-free bridge from the image space into the text space.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from retrieval.atomic import atomic_path
from retrieval.encoders.backbones import TextBackbone
from retrieval.paths import cache_root

LABEL_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a photo of the {}.")


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet-1k class names (open_clip's cleaned list), in classifier order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


class LabelBridgeHead(torch.nn.Module):
    """Zero-shot image head: ``softmax(fc(x) / T) @ C`` where ``C`` holds the text embeddings of the classes.

    ``(n, d_img)`` backbone features -> ``(n, d_txt)`` points in the text space. ``top_k`` keeps only the most
    likely classes (less noise from the long tail).
    """

    def __init__(self, fc: torch.nn.Linear, class_embeddings: torch.Tensor, temperature: float = 1.0, top_k: int = 10):
        super().__init__()
        self.fc = fc
        self.classes: torch.Tensor
        self.register_buffer("classes", class_embeddings)
        self.temperature = temperature
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x).float() / self.temperature
        top = logits.topk(self.top_k, dim=-1)
        probs = torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(dim=-1))
        return probs @ self.classes.float()


def class_embeddings(text: TextBackbone, cache_key: str) -> torch.Tensor:
    """Mean text embedding of :data:`LABEL_TEMPLATES` for each ImageNet class: ``(1000, d_txt)`` float32.

    Cached on disk under :func:`~retrieval.paths.cache_root` by ``cache_key`` (the text model's identity); a
    damaged cache file is recomputed.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    digest = hashlib.sha256((cache_key + repr(LABEL_TEMPLATES)).encode()).hexdigest()[:16]
    cache = cache_root() / f"label-bridge-{digest}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.shape[0] == len(IMAGENET_CLASSNAMES):
                return cached
        except Exception:
            pass
    rows = []
    with torch.inference_mode():
        for name in IMAGENET_CLASSNAMES:
            prompts = [t.format(name) for t in LABEL_TEMPLATES]
            emb = F.normalize(text(text.tokenize(prompts)).float(), dim=-1).mean(0)
            rows.append(F.normalize(emb, dim=0))
    classes = torch.stack(rows)
    with atomic_path(cache) as tmp:
        torch.save(classes, tmp)
    return classes
