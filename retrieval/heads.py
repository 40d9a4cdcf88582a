"""Projection heads applied on top of frozen backbone features, and their checkpoint format.

A head checkpoint is a ``torch.save`` dict ``{"format": 1, "config": {...}, "image": state_dict, "text":
state_dict, "extra": {...}}``; its SHA-256 goes into the index manifest, so an index built with one head is
never searched with another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from retrieval.checkpoints import load_checkpoint, save_checkpoint
from retrieval.checksums import file_sha256

HEAD_FORMAT = 1
HeadKind = Literal["linear", "mlp", "residual", "anchored"]


class HeadConfig(BaseModel):
    """Shape of a pair of heads: image features ``image_in`` -> ``out_dim``, text ``text_in`` -> ``out_dim``."""

    model_config = ConfigDict(extra="forbid")

    kind: HeadKind = "mlp"
    image_in: int
    text_in: int
    out_dim: int = 512
    hidden: int = 1024
    dropout: float = 0.1
    encoder: dict[str, Any] = {}  # identity of the backbones the heads were trained on
    classes: int = 0
    """``anchored`` only: size of the image side's class table (the label bridge; 0: no bridge)."""
    bridge_temperature: float = 1.0
    """``anchored`` only: softmax temperature on the class logits of the bridge."""
    anchor_weight: float = 0.0
    """``anchored`` only. 0: one space, ``scale * anchor + mlp``. In (0, 1): two concatenated unit parts,
    ``[sqrt(w) * anchor, sqrt(1 - w) * normalize(mlp)]``, so a score is ``w * cos(anchors) + (1 - w) *
    cos(learned parts)``; ``out_dim`` = anchor dimension (the text model's) + learned dimension."""
    gate_center: float | None = None
    """``anchored`` with ``anchor_weight > 0`` only (None: no gate): the text side weighs its two parts per query,
    ``[sqrt(g) * anchor, sqrt(1 - g) * learned]`` with ``g = sigmoid((m - gate_center) / gate_width)`` and ``m`` the
    query's highest cosine to the class prompts: an object name ("a photo of a piano", m ~ 0.75) leans on the label
    bridge, a descriptive caption (m ~ 0.4) on the learned part."""
    gate_width: float = 0.03


class ProjectionHead(nn.Module):
    """Maps ``(n, in_dim)`` features to ``(n, out_dim)`` (not normalised).

    ``linear``: one matrix. ``mlp``: linear + GELU + dropout + linear, plus a linear skip path.
    ``residual``: ``x + W x`` with ``W`` initialised to zero, so it starts as the identity (needs in == out);
    used on open_clip backbones so training can only move away from zero-shot when that helps.
    (``anchored`` is :class:`AnchoredHead`, built by :func:`make_head`.)
    """

    def __init__(self, kind: HeadKind, in_dim: int, out_dim: int, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.proj = nn.Linear(in_dim, out_dim)
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
            )
        elif kind == "residual":
            if in_dim != out_dim:
                raise ValueError(f"a residual head needs in_dim == out_dim, got {in_dim} and {out_dim}")
            self.proj = nn.Linear(in_dim, out_dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:  # pragma: no cover - pydantic guards the literal
            raise ValueError(f"unknown head kind {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "residual":
            return x + self.proj(x)
        if self.kind == "mlp":
            return self.proj(x) + self.mlp(x)
        return self.proj(x)


class AnchoredHead(nn.Module):
    """``y = scale * anchor(x) + mlp((x - mean) / std)``: a learned correction on top of a training-free map.

    The anchor is a point in the text model's space: on the image side (``classes > 0``) the label bridge
    ``normalize(softmax(fc(x) / T) @ C)`` (ImageNet logits -> probability-weighted class-prompt embeddings), on the
    text side ``normalize(x)`` (so ``out_dim`` equals the text model's dimension). The MLP starts at zero, so an
    untrained pair *is* the zero-shot label bridge, and training adds what captions teach while the anchor keeps
    what the classifier knew. ``(n, in_dim)`` raw features -> ``(n, out_dim)`` (not normalised); input
    standardisation lives in the ``mean``/``std`` buffers (no folding). Fixed shapes, no data-dependent branches:
    traceable by ``torch.onnx.export``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    class_embeddings: torch.Tensor

    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float, classes: int = 0,
                 bridge_temperature: float = 1.0, anchor_dim: int | None = None, anchor_weight: float = 0.0,
                 gate_center: float | None = None, gate_width: float = 0.03, gate_classes: int = 0):
        super().__init__()
        self.kind: HeadKind = "anchored"
        self.anchor_weight = anchor_weight
        anchor_dim = anchor_dim or out_dim
        learned_dim = out_dim - anchor_dim if anchor_weight > 0 else out_dim
        if learned_dim < 1 or not 0 <= anchor_weight < 1:
            raise ValueError(f"anchored head: out_dim {out_dim}, anchor_dim {anchor_dim}, weight {anchor_weight}")
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.mlp = ProjectionHead("mlp", in_dim, learned_dim, hidden, dropout)
        if anchor_weight == 0:  # one space: start exactly at the anchor
            for layer in (self.mlp.proj, self.mlp.mlp[-1]):
                nn.init.zeros_(layer.weight)  # type: ignore[arg-type]
                nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.classes = classes
        self.bridge_temperature = bridge_temperature
        self.gated = gate_center is not None and anchor_weight > 0 and not classes and gate_classes > 0
        self.gate_center = float(gate_center or 0.0)
        self.gate_width = gate_width
        if classes:
            self.fc = nn.Linear(in_dim, classes)
            self.fc.requires_grad_(False)
        if classes or self.gated:  # image side: the bridge's targets; gated text side: what a class prompt is
            self.register_buffer("class_embeddings", torch.zeros(classes or gate_classes, anchor_dim))
        elif in_dim != anchor_dim:
            raise ValueError(f"a text-side anchored head needs in_dim == anchor dim, got {in_dim} and {anchor_dim}")

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` text features -> ``(n,)`` weight on the anchor: how much the query reads like a class
        prompt (its highest cosine to the class prompts, through a sigmoid)."""
        m = (F.normalize(x, dim=-1) @ self.class_embeddings.T).max(dim=-1).values
        return torch.sigmoid((m - self.gate_center) / self.gate_width)

    def anchor(self, x: torch.Tensor) -> torch.Tensor:
        """The training-free part: ``(n, in_dim)`` -> ``(n, out_dim)``, unit length."""
        if self.classes:
            probs = (self.fc(x) / self.bridge_temperature).softmax(dim=-1)
            return F.normalize(probs @ self.class_embeddings, dim=-1)
        return F.normalize(x, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned = self.mlp((x - self.mean) / self.std)
        if self.anchor_weight == 0:
            return self.scale * self.anchor(x) + learned
        if self.gated:
            w = self.gate(x)[:, None]  # (n, 1): this query's weight on the anchor
            return torch.cat([w.sqrt() * self.anchor(x), (1 - w).sqrt() * F.normalize(learned, dim=-1)], dim=-1)
        w0 = self.anchor_weight
        return torch.cat([w0**0.5 * self.anchor(x), (1 - w0) ** 0.5 * F.normalize(learned, dim=-1)], dim=-1)


def make_head(config: HeadConfig, side: Literal["image", "text"]) -> nn.Module:
    """The image or text head a config describes."""
    in_dim = config.image_in if side == "image" else config.text_in
    if config.kind == "anchored":
        classes = config.classes if side == "image" else 0
        return AnchoredHead(in_dim, config.out_dim, config.hidden, config.dropout, classes, config.bridge_temperature,
                            config.text_in, config.anchor_weight, config.gate_center, config.gate_width,
                            config.classes if side == "text" else 0)
    return ProjectionHead(config.kind, in_dim, config.out_dim, config.hidden, config.dropout)


class HeadPair(nn.Module):
    """The image and text heads of one checkpoint; ``extra`` holds what the checkpoint carries beside the weights
    (training report, ``"calibration"``: a :meth:`retrieval.calibration.Calibration.to_dict`)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.extra: dict[str, Any] = {}
        self.image = make_head(config, "image")
        self.text = make_head(config, "text")


def save_heads(heads: HeadPair, path: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write a head checkpoint atomically; returns its SHA-256."""
    return save_checkpoint({
        "format": HEAD_FORMAT,
        "config": heads.config.model_dump(),
        "image": heads.image.state_dict(),
        "text": heads.text.state_dict(),
        "extra": extra or {},
    }, path)


def load_heads(path: str | Path) -> tuple[HeadPair, str]:
    """Load a head checkpoint written by :func:`save_heads`; returns the heads (eval mode) and the file's SHA-256."""

    def build(blob: dict[str, Any]) -> HeadPair:
        heads = HeadPair(HeadConfig(**blob["config"]))
        heads.image.load_state_dict(blob["image"])
        heads.text.load_state_dict(blob["text"])
        heads.extra = dict(blob.get("extra") or {})
        return heads

    heads = load_checkpoint(path, HEAD_FORMAT, "head checkpoint", build)
    return heads.eval(), file_sha256(path)


def checkpoint_calibration(path: str | Path | None) -> dict[str, Any] | None:
    """The ``extra["calibration"]`` a head checkpoint carries (a :meth:`Calibration.to_dict`), or None."""
    if not path:
        return None
    heads, _ = load_heads(path)
    cal = heads.extra.get("calibration")
    return dict(cal) if cal else None
