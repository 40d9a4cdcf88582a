"""The encoder choice shared by every app's settings (torch-free: a spec string plus overrides).

Each app has one pydantic-settings class (``env_prefix``, nested ``__``), built when asked for, never at import
time; they nest :class:`EncoderSettings` as ``encoder``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from retrieval.encoders.spec import EncoderSpec, Engine, Precision, parse_spec


class EncoderSettings(BaseModel):
    """Which encoder to build: a registry name or spec string, plus overrides."""

    name: str = Field("default", description="registry name, open_clip:MODEL[:PRETRAINED] or dual:IMAGE[:TEXT]")
    heads: str | None = Field(None, description="projection-head checkpoint from the trainer")
    precision: Precision = Field("auto", description="auto: native bf16 only where it measures faster, else fp32 "
                                 "(fp16 on CUDA); int8: ONNX Runtime quantisation (opt-in)")
    engine: Engine = Field("auto", description="torch, onnx (ONNX Runtime) or auto")
    device: str = "auto"
    threads: int | None = Field(None, ge=1, le=256, description="encoder intra-op threads (default: the cores)")

    def spec(self) -> EncoderSpec:
        return parse_spec(self.name, heads=self.heads, precision=self.precision, device=self.device,
                          engine=self.engine, threads=self.threads)
