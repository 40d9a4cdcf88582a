"""What the image backbone already knows, kept while training on captions.

- :class:`ClassPrior`: the backbone's ImageNet classifier (``fc``) and the text model's features of the class
  prompts. It seeds ``anchored`` heads with the label bridge and drives :func:`class_distillation_loss`: on every
  training image, the heads' similarities to the 1,000 class prompts are pulled toward the classifier's own
  class distribution, so "a photo of a piano" keeps finding pianos after training on people-and-dogs captions.
- :class:`ClassDevSet`: a class-labelled dev set (``../shared/data/caltech101-dev``: one prompt per class, every
  image of the class relevant), scored with :func:`class_metrics` for model selection beside the caption dev split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.encoders import Encoder
from retrieval.encoders.factory import class_prompt_table
from retrieval.errors import BadInput
from retrieval.metrics import query_metrics
from trainer.features import FeatureCache, SplitFeatures


@dataclass
class ClassPrior:
    """``fc_weight`` ``(K, d_img)``, ``fc_bias`` ``(K,)`` float32: the classifier on raw pooled image features;
    ``prompts`` ``(K, d_txt)`` float32: mean raw text feature of the label bridge's templates per class."""

    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    prompts: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.fc_weight.shape[0])

    def logits(self, image_feats: torch.Tensor) -> torch.Tensor:
        """``(n, d_img)`` raw pooled features -> ``(n, K)`` class logits."""
        return image_feats @ self.fc_weight.T + self.fc_bias

    def class_embeddings(self) -> torch.Tensor:
        """``(K, d_txt)`` unit-length prompt embeddings in the raw text space (what the label bridge uses)."""
        return F.normalize(self.prompts, dim=-1)


def imagenet_prior(encoder: Encoder, cache: FeatureCache) -> ClassPrior:
    """The ImageNet classifier of a dual encoder's EfficientNet backbone + the text features of its class prompts
    (cached like caption features)."""
    names, templates = class_prompt_table()
    fc = getattr(encoder.image_backbone, "fc", None)
    if not isinstance(fc, torch.nn.Linear):
        raise BadInput("the class prior needs an image backbone with an ImageNet classifier (dual EfficientNet)")
    prompts = [t.format(n) for n in names for t in templates]
    feats = cache.text_features(encoder, prompts)
    per_class = F.normalize(torch.from_numpy(feats), dim=-1).view(len(names), len(templates), -1)
    return ClassPrior(fc.weight.detach().float().clone(), fc.bias.detach().float().clone(), per_class.mean(1))


def class_distillation_loss(
    image_emb: torch.Tensor,
    prompt_emb: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_temperature: float = 1.0,
    student_scale: float = 50.0,
) -> torch.Tensor:
    """KL(teacher || student), mean over the batch.

    ``image_emb`` ``(B, d)`` and ``prompt_emb`` ``(K, d)``: normalised embeddings; ``teacher_logits`` ``(B, K)``
    the classifier's logits. The student distribution is ``softmax(student_scale * image_emb @ prompt_emb.T)``.
    """
    teacher = F.softmax(teacher_logits / teacher_temperature, dim=-1)
    student = F.log_softmax(student_scale * image_emb @ prompt_emb.T, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean")


@dataclass
class ClassDevSet:
    """Raw features of a class-labelled set: ``images`` ``(n, d_img)`` (or cached activations), ``queries``
    ``(q, d_txt)`` one per distinct prompt, ``relevant[i]`` the image rows of query ``i``."""

    images: np.ndarray
    queries: np.ndarray
    relevant: list[np.ndarray]
    prompts: list[str]

    @classmethod
    def of(cls, feats: SplitFeatures) -> ClassDevSet:
        """Group a split's captions by text: each distinct caption is a query, its images are relevant."""
        by_text: dict[str, list[int]] = {}
        first: dict[str, int] = {}
        for row, (text, img) in enumerate(zip(feats.captions, feats.text_image, strict=True)):
            by_text.setdefault(text, []).append(int(img))
            first.setdefault(text, row)
        prompts = list(by_text)
        return cls(feats.images, feats.texts[[first[p] for p in prompts]],
                   [np.unique(by_text[p]) for p in prompts], prompts)


def class_metrics(image_emb: np.ndarray, query_emb: np.ndarray, relevant: Sequence[np.ndarray]) -> dict[str, Any]:
    """Text→image metrics of a class set (percent): R@1/5/10, P@K, mAP."""
    return query_metrics(query_emb, image_emb, relevant, ks=(1, 5, 10))
