"""Request bodies of the deployment worker's HTTP API (Fireworks / OpenAI completions, hot-load)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict

# Wire-typed scalars: JSON `true` is not a number and `"2"` is not an int (a 400 naming the field).
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict(), AllowInfNan(False)]
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]
# Seeds feed torch generators (64-bit); stop token ids and every other id are checked against the vocabulary.
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS = 1 << 20  # a hard ceiling; the context (and --max-cached-tokens) clamps it further
MAX_N = 128


class CompletionBody(BaseModel):
    """`POST /inference/v1/completions` and `/v1/completions`; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: SStr | None = None
    prompt: Any = Field(description="token ids, a string, or a list of either (one choice set per prompt)")
    max_tokens: SInt | None = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    temperature: SFloat | None = Field(default=1.0, ge=0.0, le=100.0)
    top_p: SFloat | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: SInt | None = Field(default=0, ge=-1, le=1 << 31)
    stop: SStr | list[SStr] | None = Field(default=None, max_length=16)
    stop_token_ids: list[SInt] | None = Field(default=None, max_length=1024)
    seed: SInt | None = Field(default=None, ge=0, le=MAX_SEED)
    n: SInt = Field(default=1, ge=1, le=MAX_N)
    stream: SBool = False
    logprobs: SBool | SInt | None = None
    top_logprobs: SInt | None = Field(default=None, ge=0, le=20)
    raw_output: SBool = False
    perf_metrics_in_response: SBool = False
    ignore_eos: SBool = False
    echo: SBool = False
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
