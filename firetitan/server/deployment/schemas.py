"""Request bodies of the deployment worker's HTTP API (Fireworks / OpenAI completions, hot-load)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CompletionBody(BaseModel):
    """`POST /inference/v1/completions` and `/v1/completions`; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: Any = Field(description="token ids, a string, or a list of either (one choice set per prompt)")
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=0, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    raw_output: bool = False
    perf_metrics_in_response: bool = False
    ignore_eos: bool = False
    echo: bool = False
    stream_options: dict[str, Any] | None = None


class IncrementalSnapshotMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    previous_snapshot_identity: str | None = None
    compression_format: str | None = None
    checksum_format: str | None = None


class HotLoadBody(BaseModel):
    """`POST /hot_load/v1/models/hot_load` (docs/contracts.md)."""

    model_config = ConfigDict(extra="allow")

    identity: str = Field(min_length=1, max_length=512)
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None
    reset_prompt_cache: bool = True
    mode: Literal["ASYNC", "SYNC"] = "ASYNC"
