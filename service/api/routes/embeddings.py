"""``POST /v1/embeddings`` and ``GET /v1/models`` in OpenAI's format, for users who want the vectors (texts, and
images as base64 data URLs)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from retrieval.errors import BadInput
from service.api.deps import ReadyState, ServiceState, require_search_key
from service.schemas import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    ErrorResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=[Depends(require_search_key)],
                   responses={413: {"model": ErrorResponse, "description": "body too large"},
                              422: {"description": "invalid input, model or option (the message names it)"},
                              429: {"model": ErrorResponse, "description": "rate limited"},
                              503: {"model": ErrorResponse, "description": "not ready"}})


def model_names(state: ServiceState) -> list[str]:
    """The names ``model`` may take: the configured encoder name, the index's encoder label, and "default"."""
    assert state.searcher is not None
    names = [state.settings.encoder.name, state.searcher.store.manifest.encoder_label, "default"]
    return list(dict.fromkeys(n for n in names if n))


def _b64_float32(values: Any) -> str:
    """Little-endian float32 bytes, base64 (the OpenAI client decodes ``encoding_format="base64"`` this way)."""
    raw = struct.pack(f"<{len(values)}f", *values)
    return base64.b64encode(raw).decode("ascii")


@router.get("/models", response_model=ModelList, summary="The embedding model this service serves (OpenAI format)")
async def models(state: ReadyState) -> ModelList:
    return ModelList(data=[ModelCard(id=n) for n in model_names(state)])


@router.post("/embeddings", response_model=EmbeddingsResponse,
             summary="Embeddings of texts and images (OpenAI format; images as base64 data URLs)")
async def embeddings(body: EmbeddingsRequest, state: ReadyState) -> EmbeddingsResponse:
    assert state.searcher is not None
    names = model_names(state)
    if body.model not in names:
        raise BadInput(f"model: {body.model!r} is not served here; use one of {names}")
    dim = state.searcher.encoder.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise BadInput(f"dimensions: this model gives {dim}-d vectors, not {body.dimensions}")
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if len(inputs) > state.settings.max_embedding_inputs:
        raise BadInput(f"input: {len(inputs)} items; the limit is {state.settings.max_embedding_inputs}")
    vectors = await run_in_threadpool(state.searcher.embed, inputs, state.settings.max_upload_bytes)
    rows = vectors.tolist()
    tokens = sum(len(t.split()) for t in inputs if t[:5].lower() != "data:")
    data = [Embedding(index=i, embedding=_b64_float32(v) if body.encoding_format == "base64" else v)
            for i, v in enumerate(rows)]
    return EmbeddingsResponse(data=data, model=body.model, usage=EmbeddingsUsage(prompt_tokens=tokens,
                                                                              total_tokens=tokens))


