"""Where an encoder runs and in which weights dtype."""

from __future__ import annotations

import torch

from retrieval.encoders.spec import Precision
from retrieval.errors import EncoderUnavailable


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderUnavailable("device 'cuda' was asked for but no GPU is visible; use --device cpu or auto")
    return dev


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CPU, fp16 on CUDA."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
