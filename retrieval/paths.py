"""Where the project keeps derived files (label-bridge embeddings, feature caches, exported models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$RETRIEVAL_CACHE`` or ``~/.cache/retrieval`` (read at call time, never written to the environment)."""
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))
