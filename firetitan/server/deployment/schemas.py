"""Wire models of the deployment worker's HTTP API: completion bodies, the hot-load request and the one
hot-load status that replicas, the control plane and the client all speak (with the one wait on it)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, field_validator

from firetitan.errors import APITimeoutError, SnapshotError

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


# ---- hot-load ------------------------------------------------------------------------------------

HOT_LOAD_PATH = "/hot_load/v1/models/hot_load"
_IDENTITY = re.compile(r"^[A-Za-z0-9._-]+$")


class IncrementalSnapshotMetadata(BaseModel):
    """Marks a delta load. `previous_snapshot_identity` is the snapshot the sender last loaded (the
    official SDK's chain) or the delta's base; the formats are accepted for wire compatibility."""

    model_config = ConfigDict(extra="allow")

    previous_snapshot_identity: str | None = Field(default=None, max_length=512)
    compression_format: str | None = None
    checksum_format: str | None = None


class HotLoadRequest(BaseModel):
    """`POST /hot_load/v1/models/hot_load`, on a replica and on the control plane alike."""

    model_config = ConfigDict(extra="allow")

    identity: str = Field(min_length=1, max_length=512)
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None
    reset_prompt_cache: bool = True
    mode: Literal["ASYNC", "SYNC"] = "ASYNC"

    @field_validator("identity")
    @classmethod
    def _identity_chars(cls, value: str) -> str:
        if not _IDENTITY.match(value) or ".." in value:
            raise ValueError("identity must use only letters, digits, '.', '_' and '-' (no '..')")
        return value

    @property
    def previous(self) -> str | None:
        meta = self.incremental_snapshot_metadata
        return meta.previous_snapshot_identity if meta else None



LoadStage = Literal["idle", "loading", "swapping", "done", "error", "pending", "rolled_back"]


class LoadingState(BaseModel):
    """The latest load: `target_snapshot_identity` is what it loads (the official SDK fails fast on an
    `error` stage whose target is the snapshot it waits for); `identity` is the same, kept for old readers."""

    model_config = ConfigDict(extra="ignore")

    stage: LoadStage = "idle"
    identity: str | None = None
    target_snapshot_identity: str | None = None
    mode: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


class ReplicaHotLoadStatus(BaseModel):
    """What one replica serves and what it is loading."""

    model_config = ConfigDict(extra="ignore")

    replica_index: int = 0
    readiness: bool = False
    current_snapshot_identity: str | None = None
    base_snapshot_identity: str | None = None
    policy_version: str | None = None
    loading_state: LoadingState = Field(default_factory=LoadingState)
    loaded_adapters: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None  # set by the control plane when it could not reach the replica


class HotLoadStatus(BaseModel):
    """`GET /hot_load/v1/models/hot_load`: a replica answers as a deployment of one replica, the control
    plane with one entry per replica, so every reader handles one shape."""

    model_config = ConfigDict(extra="ignore")

    deployment_id: str | None = None
    deployment: str | None = None
    base_model: str | None = None
    identity: str | None = None  # on a POST answer: the snapshot that was asked for
    mode: str | None = None
    readiness: bool = False
    current_snapshot_identity: str | None = None
    policy_version: str | None = None
    loading_state: LoadingState = Field(default_factory=LoadingState)
    replica_count: int = 1
    replicas: list[ReplicaHotLoadStatus] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)

    def failure(self, identity: str) -> str | None:
        """Why loading `identity` failed, if the deployment or one replica says it did."""
        for state, where in [(self.loading_state, "deployment"),
                             *((r.loading_state, f"replica {r.replica_index}") for r in self.replicas)]:
            target = state.target_snapshot_identity or state.identity
            if state.stage in ("error", "rolled_back") and target == identity:
                return f"{where}: {state.error}"
        return None

    def all_serving(self, identity: str) -> bool:
        """Every replica the deployment should run is ready and serves `identity`."""
        return len(self.replicas) >= self.replica_count and all(
            r.readiness and r.current_snapshot_identity == identity for r in self.replicas)


async def wait_until_serving(fetch: Callable[[], Awaitable[HotLoadStatus]], identity: str, timeout: float, *,
                             where: str, first: HotLoadStatus | None = None, poll_s: float = 0.1,
                             field: str = "identity") -> HotLoadStatus:
    """Poll `fetch` until every replica serves `identity`: the one wait, used by the control plane
    (per replica and per deployment) and by the client. A reported failure raises `SnapshotError` at
    once; no answer in `timeout` seconds raises `APITimeoutError` (never a silent success)."""
    deadline = time.monotonic() + timeout
    status = first if first is not None else await fetch()
    while True:
        if (reason := status.failure(identity)) is not None:
            raise SnapshotError(f"{where} failed to load {identity!r}: {reason}", field=field)
        if status.all_serving(identity):
            return status
        if time.monotonic() > deadline:
            stages = sorted({r.loading_state.stage for r in status.replicas}) or ["no replicas"]
            raise APITimeoutError(f"{where} did not serve {identity!r} within {timeout:.0f}s (still "
                                  f"{', '.join(stages)})", field=field)
        await asyncio.sleep(poll_s)
        status = await fetch()
