"""The encoder choice shared by every app's settings (torch-free: a spec string plus overrides).

Each app has one pydantic-settings class (``env_prefix``, nested ``__``), built when asked for, never at import
time; they nest :class:`EncoderSettings` as ``encoder``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from retrieval.encoders.spec import EncoderSpec, Precision, parse_spec


class EncoderSettings(BaseModel):
    """Which encoder to build: a registry name or spec string, plus overrides."""

    name: str = Field("default", description="registry name, open_clip:MODEL[:PRETRAINED] or dual:IMAGE[:TEXT]")
    heads: str | None = Field(None, description="projection-head checkpoint from the trainer")
    precision: Precision = "auto"
    device: str = "auto"

    def spec(self) -> EncoderSpec:
        return parse_spec(self.name, heads=self.heads, precision=self.precision, device=self.device)
