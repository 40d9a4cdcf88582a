"""``manifest.json``: what an index folder holds and which encoder made it; and the encoder check."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from retrieval.errors import IndexCorrupt, IndexEncoderMismatch, IndexNotFound

SCHEMA_VERSION = 1

INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
#: What folders written before meta.sqlite hold instead (read on open, see retrieval.index.folder.open_meta)
LEGACY_META_FILE = "meta.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
SKIPPED_FILE = "skipped.jsonl"


class Manifest(BaseModel):
    """``manifest.json``: what the index holds and which encoder made it."""

    schema_version: int
    encoder: dict[str, Any]
    encoder_label: str
    dim: int
    metric: Literal["ip"] = "ip"
    index_key: str
    count: int
    build: dict[str, Any] = {}
    created_at: str


def _fmt(identity: dict[str, Any], keys: Iterable[str]) -> str:
    return " ".join(f"{k}={identity.get(k)}" for k in keys)


def check_encoder(manifest: Manifest, encoder_identity: dict[str, Any]) -> None:
    """Raise :class:`IndexEncoderMismatch` unless ``encoder_identity`` equals the identity the index was built with.

    Every key of both dicts is compared (a key missing on one side counts as None); a ``"dim"`` key is also
    compared with ``manifest.dim``. The message names the differing fields on both sides.
    """
    recorded = {**manifest.encoder, "dim": manifest.encoder.get("dim", manifest.dim)}
    keys = list(dict.fromkeys([*manifest.encoder, *encoder_identity]))
    differing = [
        k for k in keys
        if recorded.get(k) != encoder_identity.get(k) and not (k == "dim" and k not in encoder_identity)
    ]
    if differing:
        raise IndexEncoderMismatch(
            f"index built with {_fmt(recorded, differing)} ({manifest.encoder_label}), "
            f"this encoder is {_fmt(encoder_identity, differing)}: rebuild the index with this encoder "
            f"or search it with the encoder it was built with"
        )


def now_iso() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` (``created_at``)."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def manifest_json(manifest: Manifest) -> str:
    """The text of ``manifest.json``."""
    return json.dumps(manifest.model_dump(), indent=2) + "\n"


def read_manifest(path: Path) -> Manifest:
    """The manifest of the index folder ``path``: :class:`IndexNotFound` when there is none,
    :class:`IndexCorrupt` when it is not valid or of another schema version."""
    if not path.is_dir():
        raise IndexNotFound(f"no index folder at {path}")
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise IndexNotFound(f"no {MANIFEST_FILE} in {path}")
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorrupt(f"{mf} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise IndexCorrupt(f"{mf} is not a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise IndexCorrupt(f"{mf} has schema_version {raw.get('schema_version')!r}; this code reads "
                           f"{SCHEMA_VERSION}: rebuild the index")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexCorrupt(f"{mf} is invalid: {exc}") from exc
