"""Encoders: a torch-free description (:mod:`retrieval.encoders.spec`) and the torch side, built by one factory.

Importing this package stays torch-free: the spec names are imported eagerly, :func:`build_encoder` and
:class:`Encoder` load torch on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retrieval.encoders.spec import (
    DEFAULT_HEADS,
    DEFAULT_TEXT_MODEL,
    FLICKR8K_HEADS,
    MPNET_TEXT_MODEL,
    QUALITY_HEADS,
    EncoderSpec,
    Precision,
    encoder_configs,
    parse_spec,
    register_encoder_config,
    registered_encoder_config,
    unregister_encoder_config,
)

if TYPE_CHECKING:
    from retrieval.encoders.encoder import Encoder
    from retrieval.encoders.factory import build_encoder

__all__ = [
    "DEFAULT_HEADS",
    "DEFAULT_TEXT_MODEL",
    "FLICKR8K_HEADS",
    "MPNET_TEXT_MODEL",
    "QUALITY_HEADS",
    "Encoder",
    "EncoderSpec",
    "Precision",
    "build_encoder",
    "encoder_configs",
    "parse_spec",
    "register_encoder_config",
    "registered_encoder_config",
    "unregister_encoder_config",
]

_LAZY = {"Encoder": "retrieval.encoders.encoder", "build_encoder": "retrieval.encoders.factory"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
