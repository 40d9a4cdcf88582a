"""What an encoder is, without building one (torch-free, so settings and HTTP routes can import it).

- :class:`EncoderSpec`: a typed, frozen description of an encoder; :meth:`EncoderSpec.identity` is what an index
  manifest records and what a searcher must match.
- The registry of named configs (``--encoder NAME``): read with :func:`encoder_configs`, changed only through
  :func:`register_encoder_config` / :func:`unregister_encoder_config` (or the :func:`registered_encoder_config`
  context manager, which restores the previous entry: tests use it).
- :func:`parse_spec`: a CLI string -> a spec.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from retrieval.checksums import cached_file_sha256
from retrieval.errors import BadInput

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
#: How the towers run: ``torch``, ``onnx`` (ONNX Runtime, exported once and cached) or ``auto`` (see
#: :func:`retrieval.encoders.device.plan_towers`).
Engine = Literal["auto", "torch", "onnx"]

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
#: The stronger (768-d, ~5x slower) text model of the ``quality`` encoder, assembled from its PyPI parts.
MPNET_TEXT_MODEL = "all-mpnet-base-v2"

#: Bumped whenever a code change alters the embeddings an unchanged spec produces (preprocessing, pooling, the
#: label bridge...). It is part of the identity, so indexes and feature caches made by older code are refused or
#: recomputed instead of silently mixed with new vectors.
ENCODER_IMPL_VERSION = 2

#: Projection heads shipped with the package (model card: retrieval/models/README.md). ``FLICKR8K_HEADS``: caption
#: heads trained by ``python -m trainer train`` on the Flickr8k train split; ``DEFAULT_HEADS``: those heads joined
#: with the label bridge by ``python -m trainer compose`` (a per-query gate), the ``default`` encoder.
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "models"
FLICKR8K_HEADS = str(SHIPPED_MODELS / "effnet-lite0-minilm-flickr8k.pt")
DEFAULT_HEADS = str(SHIPPED_MODELS / "effnet-lite0-minilm-flickr8k-gated.pt")
#: The same recipe over all-mpnet-base-v2 text features (the ``quality`` encoder): stronger, but its text tower is
#: ~5x slower than MiniLM's (over the 5 ms single-query budget of the default).
QUALITY_HEADS = str(SHIPPED_MODELS / "effnet-lite0-mpnet-flickr8k-gated.pt")


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
    """Numeric precision. ``auto``: fp16 on CUDA; on CPU bf16 only where the processor has it natively (AMX or
    AVX512_BF16) and it measures faster, else fp32. ``int8`` (opt-in): ONNX Runtime dynamic quantisation. Does not
    change identity (fp32/bf16 embeddings agree to ~1e-3 in cosine; int8's quality delta is in the README)."""
    engine: Engine = "auto"
    """``torch``, ``onnx`` or ``auto`` (ONNX Runtime where installed unless native bf16 torch measures faster).
    Does not change identity: the engines agree to cosine >= 0.9999 (tested)."""
    device: str = "auto"
    threads: int | None = None
    """Intra-op threads of ONNX Runtime sessions (None: the cores this process may use)."""

    def identity(self) -> dict[str, Any]:
        """The parts that change the embedding space: backend, model, weights, heads (files by SHA-256)."""
        return {
            "impl": ENCODER_IMPL_VERSION,
            "backend": self.backend,
            "model": self.model,
            "pretrained": weights_id(self.pretrained),
            "text_model": weights_id(self.text_model) if self.backend == "dual" else None,
            "heads_sha256": cached_file_sha256(self.heads) if self.heads else None,
        }

    def label(self) -> str:
        """Short human-readable form, e.g. ``dual:efficientnet-lite0+all-MiniLM-L6-v2``."""
        if self.backend == "open_clip":
            core = f"open_clip:{self.model}:{self.pretrained}"
        else:
            core = f"dual:{self.model}+{self.text_model or DEFAULT_TEXT_MODEL}"
        return core + (f" heads={Path(self.heads).name}" if self.heads else "")


def weights_id(value: str | None) -> str | None:
    """A tag stays a tag; an existing local file becomes ``sha256:<hex>`` so renamed copies still match."""
    if value and Path(value).is_file():
        return "sha256:" + cached_file_sha256(value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# The registry of named configs
# ----------------------------------------------------------------------------------------------------------------

#: ``default``: the offline backbones joined by the shipped gated heads (caption heads + label bridge);
#: ``caption-heads``: the caption heads alone (the previous default); ``zero-shot``: the training-free label bridge;
#: ``quality``: the default's recipe over all-mpnet-base-v2 (better on both benchmarks, slower text queries).
_BUILTIN: dict[str, EncoderSpec] = {
    "default": EncoderSpec(backend="dual", model="efficientnet-lite0", heads=DEFAULT_HEADS),
    "caption-heads": EncoderSpec(backend="dual", model="efficientnet-lite0", heads=FLICKR8K_HEADS),
    "quality": EncoderSpec(backend="dual", model="efficientnet-lite0", text_model=MPNET_TEXT_MODEL,
                           heads=QUALITY_HEADS),
    "zero-shot": EncoderSpec(backend="dual", model="efficientnet-lite0"),
    "effnet-lite0-minilm": EncoderSpec(backend="dual", model="efficientnet-lite0"),
    "effnet-lite1-minilm": EncoderSpec(backend="dual", model="efficientnet-lite1"),
    "effnet-lite2-minilm": EncoderSpec(backend="dual", model="efficientnet-lite2"),
    "clip-vit-b-32": EncoderSpec(backend="open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k"),
    "clip-vit-b-16": EncoderSpec(backend="open_clip", model="ViT-B-16", pretrained="laion2b_s34b_b88k"),
}
_registry: dict[str, EncoderSpec] = dict(_BUILTIN)
_registry_lock = threading.Lock()


def encoder_configs() -> Mapping[str, EncoderSpec]:
    """The named configs (a read-only view)."""
    return MappingProxyType(_registry)


def register_encoder_config(name: str, spec: EncoderSpec) -> EncoderSpec | None:
    """Add or replace a named config; returns the entry it replaced (None if new)."""
    with _registry_lock:
        previous = _registry.get(name)
        _registry[name] = spec
    return previous


def unregister_encoder_config(name: str) -> None:
    """Remove a named config (no error if absent)."""
    with _registry_lock:
        _registry.pop(name, None)


@contextmanager
def registered_encoder_config(name: str, spec: EncoderSpec) -> Iterator[EncoderSpec]:
    """Register ``spec`` as ``name`` for the duration of the block, then restore what was there."""
    previous = register_encoder_config(name, spec)
    try:
        yield spec
    finally:
        if previous is None:
            unregister_encoder_config(name)
        else:
            register_encoder_config(name, previous)


def parse_spec(text: str, **overrides: Any) -> EncoderSpec:
    """Turn a CLI string into a spec.

    Accepted forms: a registry name (``default``), ``open_clip:MODEL[:PRETRAINED]`` (PRETRAINED may be a tag, a
    file or a folder), ``dual:IMAGE_BACKBONE[:TEXT_MODEL]``. ``overrides`` (e.g. ``heads=...``,
    ``precision=...``) replace fields; ``None`` values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    named = _registry.get(text)
    if named is not None:
        return named.model_copy(update=overrides)
    backend, _, rest = text.partition(":")
    if backend not in ("open_clip", "dual") or not rest:
        known = ", ".join(sorted(_registry))
        raise BadInput(
            f"unknown encoder {text!r}: use one of {known}, open_clip:MODEL[:PRETRAINED] or dual:IMAGE[:TEXT]"
        )
    model, _, extra = rest.partition(":")
    fields: dict[str, Any] = {"backend": backend, "model": model}
    if extra:
        fields["pretrained" if backend == "open_clip" else "text_model"] = extra
    return EncoderSpec(**fields, **overrides)
