"""Versioned torch checkpoints (projection heads, fusion heads): one atomic write, one guarded read.

A checkpoint is a dict saved with ``torch.save`` whose ``"format"`` names its layout; reading uses
``weights_only=True`` and turns a missing, foreign or damaged file into :class:`EncoderUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from retrieval.atomic import atomic_path
from retrieval.checksums import file_sha256
from retrieval.errors import EncoderUnavailable

T = TypeVar("T")


def save_checkpoint(blob: dict[str, Any], path: str | Path) -> str:
    """Write ``blob`` (with its ``"format"``) atomically; returns the file's SHA-256."""
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return file_sha256(path)


def load_checkpoint(path: str | Path, fmt: int, kind: str, build: Callable[[dict[str, Any]], T], *,
                    missing: str | None = None) -> T:
    """``build(blob)`` of the checkpoint at ``path`` whose format is ``fmt``. :class:`EncoderUnavailable` when the
    file is missing (``missing``, default "``kind`` not found"), has another format, or cannot be read or built
    (``"not a valid {kind}"``: torch and ``load_state_dict`` raise many kinds on a damaged file)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderUnavailable(f"{missing or kind + ' not found'}: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != fmt:
            raise EncoderUnavailable(f"{path}: unknown {kind} format {blob.get('format')!r}")
        return build(blob)
    except EncoderUnavailable:
        raise
    except Exception as exc:
        raise EncoderUnavailable(f"{path}: not a valid {kind} ({exc})") from exc
