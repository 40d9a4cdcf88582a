"""Loading an encoder straight from its ONNX export, without importing the model libraries.

Building the default encoder spends most of its ~8 s of CPU importing sentence-transformers (and through it
transformers, scipy, pandas...), only to hand the weights to ONNX Runtime. Once an encoder has been built in full
with both towers on ONNX Runtime on the CPU, :func:`save_bundle` writes a small record beside the exported graphs:
the graphs, the image transform (pickled), the tokenizer (Hugging Face ``tokenizers`` JSON), the dimension, the
calibration, each tower's plan and reason, and the size and modification time of every file the weights came from.
:func:`load_bundle` rebuilds the encoder from it in ~1 s when nothing it depends on changed: the spec, the
processor, the versions of torch, ONNX Runtime and the model packages, the source files, the graph files' SHA-256.
Anything else (open_clip with random or downloaded weights, a backbone that cannot name its files, a tokenizer that
is not a plain fast tokenizer) is simply built in full every time.

The torch modules (the trainer's ``image_features``/``text_features``, a torch tower) are built on first use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.atomic import atomic_write_bytes, atomic_write_text
from retrieval.calibration import Calibration
from retrieval.encoders.cpu import cpu_info
from retrieval.encoders.device import TowerPlan
from retrieval.encoders.encoder import Encoder
from retrieval.encoders.onnx_engine import (
    InputSignature,
    OnnxTower,
    cache_dir,
    cached_ok,
    make_session,
    session_factory,
)
from retrieval.encoders.onnx_export import EXPORTER_VERSION
from retrieval.encoders.spec import EncoderSpec

log = logging.getLogger(__name__)

BUNDLE_VERSION = 1
#: Packages whose code shapes what the backbones compute or how text is tokenised.
MODEL_PACKAGES = ("sentence-transformers", "transformers", "tokenizers", "efficientnet-lite-pytorch",
                  "open_clip_torch", "onnxruntime")


class FastTokenizer:
    """``tokenize`` of a Hugging Face fast tokenizer, padding to the longest text and truncating to ``max_length``,
    without importing transformers. Returns int64 ``(n, seq)`` arrays named like the original, plus its constant
    entries."""

    def __init__(self, spec: dict[str, Any]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(spec["tokenizer_json"])
        self.max_length = int(spec["max_length"])
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(pad_id=int(spec["pad_id"]), pad_token=str(spec["pad_token"]))
        self.outputs: list[str] = list(spec["outputs"])
        self.constants: dict[str, Any] = dict(spec["constants"])

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        encodings = self.tokenizer.encode_batch(list(texts))
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        out: dict[str, Any] = {name: np.asarray([getattr(e, fields[name]) for e in encodings], dtype=np.int64)
                               for name in self.outputs}
        return {**out, **self.constants}

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """For each text: True when it has more than ``max_length`` tokens (special tokens included) and is cut."""
        return [bool(e.overflowing) for e in self.tokenizer.encode_batch(list(texts))]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in MODEL_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def bundle_path(spec: EncoderSpec) -> Path:
    """Where the record of ``spec`` on this processor with these library versions lives."""
    material = {"v": BUNDLE_VERSION, "exporter": EXPORTER_VERSION, "spec": spec.model_dump(),
                "identity": spec.identity(), "cpu": cpu_info().key(), "versions": _versions()}
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / f"bundle-{key}.json"


def _signature(paths: Sequence[Path]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file under ``paths`` (folders walked), sorted."""
    rows: list[list[Any]] = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            rows.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return sorted(rows)


def _signature_ok(rows: list[list[Any]]) -> bool:
    try:
        return all([str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] == [p, size, mtime]
                   for p, size, mtime in rows)
    except OSError:
        return False


def save_bundle(encoder: Encoder) -> Path | None:
    """Record ``encoder`` (built in full, both towers on ONNX Runtime on the CPU) for :func:`load_bundle`.
    Returns the record's path, or None when this encoder cannot be loaded that way (nothing is written)."""
    image, text = encoder.image_runner, encoder.text_runner
    if image is None or text is None or encoder.device.type != "cpu":
        return None
    sources_img, sources_txt = encoder.image_backbone.source_files(), encoder.text_backbone.source_files()
    tok_spec = encoder.text_backbone.fast_tokenizer()
    if sources_img is None or sources_txt is None or tok_spec is None:
        return None
    # the fast tokenizer must reproduce the original exactly, or the bundle would encode other token ids
    samples = ["a dog", "Two CHILDREN play in a fountain, laughing!", "x " * 400, "café naïve — 東京"]
    fast, slow = FastTokenizer(tok_spec)(samples), encoder.text_backbone.tokenize(samples)
    for name in tok_spec["outputs"]:
        if not np.array_equal(fast[name], np.asarray(slow[name])):
            log.info("no fast load for %s: the tokenizer output %r differs", encoder.spec.label(), name)
            return None
    path = bundle_path(encoder.spec)
    transform_file = path.with_suffix(".transform.pkl")
    atomic_write_bytes(transform_file, pickle.dumps(encoder.image_transform))
    record = {
        "dim": encoder.dim,
        "calibration": encoder.calibration.to_dict() if encoder.calibration is not None else None,
        "transform": transform_file.name,
        "tokenizer": tok_spec,
        "towers": {kind: {"file": r.path.name, "precision": r.precision, "names": list(r.signature.names),
                          "keyed": r.signature.keyed, "constants": dict(r.signature.constants),
                          "reason": encoder.reasons[kind]}
                   for kind, r in (("image", image), ("text", text))},
        "sources": _signature([*sources_img, *sources_txt]),
    }
    atomic_write_text(path, json.dumps(record, indent=1, default=str))
    return path


def load_bundle(spec: EncoderSpec, build_torch: Callable[[EncoderSpec], Encoder]) -> Encoder | None:
    """The encoder ``spec`` describes, loaded from its record (see :func:`save_bundle`), or None when there is
    no valid record. ``build_torch(spec)`` builds the torch modules when something first needs them."""
    if spec.device not in ("auto", "cpu") or (spec.device == "auto" and torch.cuda.is_available()):
        return None
    path = bundle_path(spec)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not _signature_ok(record["sources"]):
            return None
        runners: dict[str, OnnxTower] = {}
        for kind, t in record["towers"].items():
            graph = cache_dir() / t["file"]
            if not cached_ok(graph):
                return None
            signature = InputSignature(tuple(t["names"]), bool(t["keyed"]), tuple(t["constants"].items()))
            runners[kind] = OnnxTower(make_session(graph, "cpu", spec.threads), signature, t["precision"], graph,
                                      session_factory(graph, "cpu", spec.threads))
        with open(path.with_name(record["transform"]), "rb") as fh:
            transform = pickle.load(fh)  # written by save_bundle into the user's own cache folder
        tokenizer = FastTokenizer(record["tokenizer"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged record is rebuilt by the full path
        log.warning("ignoring the encoder record %s: %s: %s", path, type(exc).__name__, exc)
        return None
    cal = record.get("calibration")
    enc = Encoder.from_runtime(
        spec, record["dim"], torch.device("cpu"), Calibration.from_dict(cal) if cal else None, transform,
        tokenizer, runners["image"], runners["text"],
        {k: TowerPlan("onnx", t["precision"]) for k, t in record["towers"].items()},
        {k: t["reason"].replace("measured now", "measured earlier on this machine")
         for k, t in record["towers"].items()}, lambda: build_torch(spec))
    return enc
