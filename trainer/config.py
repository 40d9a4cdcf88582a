"""The trainer's settings: one pydantic-settings class, environment ``TRAINER_*`` (nested ``__``), CLI flags on top.

Built when asked for (``TrainerSettings()``), never at import time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.encoders import EncoderSpec, parse_spec

HeadChoice = Literal["auto", "linear", "mlp", "residual", "anchored"]


class TrainerSettings(BaseSettings):
    """Everything ``python -m trainer`` needs. ``TRAINER_LR=3e-4``, ``TRAINER_LOSS=triplet`` ...

    Defaults = the best of a dev sweep on Flickr8k with EfficientNet-Lite0 + MiniLM features (mlp 1024 hidden into
    256-d, dropout 0.5, weight decay 0.5, 12 epochs of one sampled caption per image, batch 256, flip augmentation);
    linear heads, batch 512, fixed temperature 0.05 and all-pairs batches scored within ~1 point of it, triplet
    ~3 points lower.
    """

    model_config = SettingsConfigDict(env_prefix="TRAINER_", env_nested_delimiter="__", extra="ignore")

    # data and encoder
    data: str = Field(default="../shared/data/flickr8k", description="image folder or pack")
    captions: str | None = Field(default=None, description="captions file (None: auto-discovered)")
    encoder: str = Field(default="zero-shot", description="backbones to train heads on: registry name or spec string")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    cache_dir: str | None = Field(default=None, description="feature cache; default $RETRIEVAL_CACHE/features")
    workers: int = Field(default=2, ge=0, le=64, description="image decoding workers")
    feature_batch: int = Field(default=64, ge=1, description="images per backbone call when caching features")
    train_split: str = "train"
    dev_split: str = "dev"

    # heads
    head: HeadChoice = Field(default="auto", description="auto: residual for open_clip, mlp for dual backbones")
    out_dim: int | None = Field(default=None, ge=8, description="shared space size (None: 256 / backbone dim)")
    hidden: int = Field(default=1024, ge=8)
    dropout: float = Field(default=0.5, ge=0, lt=1)
    standardize: bool = Field(default=True, description="train on standardised inputs (folded into saved heads)")
    bridge_temperature: float = Field(default=1.0, gt=0, description="anchored heads: class softmax temperature")
    anchor_weight: float = Field(
        default=0.0, ge=0, lt=1, description="anchored heads: 0 adds the learned part to the bridge in one space; "
        "in (0, 1) concatenates them, a score being w * bridge cosine + (1 - w) * learned cosine",
    )
    gate_center: float | None = Field(
        default=None, description="anchored heads with anchor_weight > 0: per-query weight on the bridge, "
        "sigmoid((highest cosine to a class prompt - center) / width); None: a fixed weight",
    )
    gate_width: float = Field(default=0.03, gt=0)
    lock_text: bool = Field(
        default=False, description="anchored heads: keep the text side the text model's own space (no text training)"
    )

    # keeping what the backbone knows (dual EfficientNet encoders)
    distill: float = Field(default=0.0, ge=0, description="weight of the class-prompt distillation loss")
    distill_temperature: float = Field(default=1.0, gt=0, description="teacher (ImageNet classifier) temperature")
    distill_scale: float = Field(default=50.0, gt=0, description="student logit scale over the class prompts")
    class_data: str | None = Field(
        default=None, description="class-labelled dev set scored every evaluation (e.g. ../shared/data/caltech101-dev)"
    )
    select: Literal["captions", "both"] = Field(
        default="captions", description="model selection: caption dev score, or its mean with the class dev mAP"
    )
    unfreeze_from: int | None = Field(
        default=None, ge=1, description="train the image backbone's blocks from this index on (cached activations)"
    )
    via_activations: int | None = Field(
        default=None, ge=1,
        description="EfficientNet: derive pooled features from activations cached after this block (shared with "
        "partial unfreezing: one backbone pass per image)",
    )
    tail_lr: float = Field(default=1e-4, gt=0, description="learning rate of the unfrozen backbone blocks")

    # loss
    loss: Literal["clip", "infonce", "triplet"] = "clip"
    temperature: float = Field(default=0.07, gt=0, description="initial (clip) or fixed (infonce) temperature")
    margin: float = Field(default=0.2, gt=0, description="triplet margin")

    # optimisation
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=256, ge=2, description="pairs per step (distinct images)")
    pairs: Literal["sample", "all"] = Field(
        default="sample", description="sample: one random caption per image per epoch; all: every caption every epoch"
    )
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.5, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    flip_aug: bool = Field(default=True, description="train on the flipped-image features half of the time")
    patience: int = Field(default=6, ge=1, description="epochs without dev improvement before stopping")
    eval_every: int = Field(default=1, ge=1)
    tta_flip: bool = Field(default=False, description="evaluate on the mean of centre and flipped image features")
    seed: int = 0
    threads: int = Field(default=2, ge=1)

    out: str = Field(default="runs/heads", description="output folder: best.pt, last.pt, metrics.json")
    resume: bool = Field(default=False, description="continue from <out>/last.pt")

    def spec(self) -> EncoderSpec:
        """The backbone spec (no heads: the trainer makes those; torch engine: the trainer reads raw backbone
        features, and an encoder loaded from its ONNX export would build its torch modules anyway, in float32
        whatever the precision, keying the feature cache differently)."""
        return parse_spec(self.encoder, precision=self.precision, device=self.device).model_copy(
            update={"heads": None, "engine": "torch"}
        )

    def heads_identity(self) -> dict[str, Any]:
        """The backbone identity trained heads record (:meth:`spec`'s identity without ``heads_sha256``)."""
        return {k: v for k, v in self.spec().identity().items() if k != "heads_sha256"}
