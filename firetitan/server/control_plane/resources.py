"""Fireworks-shaped control-plane resources and request bodies (camelCase on the wire)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from firetitan.errors import InvalidRequestError

RESOURCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Trainer job states (Fireworks names). PAUSED = stopped for inactivity; `:resume` restarts it.
JOB_CREATING = "JOB_STATE_CREATING"
JOB_RUNNING = "JOB_STATE_RUNNING"
JOB_FAILED = "JOB_STATE_FAILED"
JOB_PAUSED = "JOB_STATE_PAUSED"
JOB_DELETED = "JOB_STATE_DELETED"

DEP_CREATING = "CREATING"
DEP_READY = "READY"
DEP_UPDATING = "UPDATING"
DEP_FAILED = "FAILED"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_resource_id(value: str, field: str) -> str:
    if not RESOURCE_ID.match(value):
        raise InvalidRequestError(
            f"{field} {value!r} is not a valid resource id: use 1-63 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit", field=field)
    return value


def parse_duration(value: str | float | int | None, field: str) -> float | None:
    """Accept seconds as a number or a protobuf duration string like "600s"."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text[:-1]) if text.endswith("s") else float(text)
        except ValueError:
            raise InvalidRequestError(f"{field} {value!r} is not a duration like '600s'", field=field) from None
    if seconds <= 0:
        raise InvalidRequestError(f"{field} must be positive, got {value!r}", field=field)
    return seconds


class Wire(BaseModel):
    """camelCase JSON, snake_case Python; unknown request fields are ignored like the hosted API."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Status(Wire):
    code: str = "OK"
    message: str = ""


class TrainingConfig(Wire):
    base_model: str | None = None
    lora_rank: int = Field(default=0, ge=0, le=1024)
    learning_rate: float = Field(default=1e-5, gt=0)
    max_context_length: int | None = Field(default=None, gt=0)


class CreateTrainerJobRequest(Wire):
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    display_name: str | None = Field(default=None, max_length=63)
    forward_only: bool = False
    training_shape: str | None = None
    inactivity_timeout: str | float | None = None


class TrainerJob(Wire):
    name: str
    display_name: str | None = None
    state: str = JOB_CREATING
    status: Status = Field(default_factory=Status)
    training_config: TrainingConfig
    training_shape: str | None = None
    forward_only: bool = False
    threads: int = 1
    inactivity_timeout_s: float | None = None
    trainer_url: str | None = None
    pid: int | None = None
    create_time: str = Field(default_factory=now_rfc3339)
    update_time: str = Field(default_factory=now_rfc3339)

    @property
    def job_id(self) -> str:
        return self.name.rsplit("/", 1)[-1]


class Replica(Wire):
    index: int
    state: str = DEP_CREATING
    url: str | None = None
    pid: int | None = None
    message: str = ""


class HotLoadRecord(Wire):
    identity: str
    previous_snapshot_identity: str | None = None


class CreateDeploymentRequest(Wire):
    base_model: str
    display_name: str | None = Field(default=None, max_length=63)
    description: str | None = None
    deployment_shape: str | None = None
    min_replica_count: int = Field(default=1, ge=0, le=16)
    max_replica_count: int = Field(default=1, ge=0, le=16)
    hot_load_trainer_job: str | None = None


class UpdateDeploymentRequest(Wire):
    min_replica_count: int | None = Field(default=None, ge=0, le=16)
    max_replica_count: int | None = Field(default=None, ge=0, le=16)
    hot_load_trainer_job: str | None = None
    display_name: str | None = Field(default=None, max_length=63)


class Deployment(Wire):
    name: str
    display_name: str | None = None
    description: str | None = None
    base_model: str
    deployment_shape: str | None = None
    state: str = DEP_CREATING
    status: Status = Field(default_factory=Status)
    min_replica_count: int = 1
    max_replica_count: int = 1
    replicas: list[Replica] = Field(default_factory=list)
    hot_load_trainer_job: str | None = None
    # Snapshots since the last base, in load order: replayed into replicas started later.
    snapshot_chain: list[HotLoadRecord] = Field(default_factory=list)
    threads_per_replica: int = 1
    create_time: str = Field(default_factory=now_rfc3339)
    update_time: str = Field(default_factory=now_rfc3339)

    @property
    def deployment_id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def current_snapshot_identity(self) -> str | None:
        return self.snapshot_chain[-1].identity if self.snapshot_chain else None


class IncrementalSnapshotMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    previous_snapshot_identity: str


class HotLoadRequest(BaseModel):
    """The deployment worker's hot-load body (snake_case, as on the hosted gateway)."""

    model_config = ConfigDict(extra="allow")
    identity: str = Field(min_length=1, max_length=200)
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None
    reset_prompt_cache: bool = True
    mode: Literal["ASYNC", "SYNC"] = "ASYNC"

    @field_validator("identity")
    @classmethod
    def _identity_chars(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9._-]+$", value) or ".." in value:
            raise ValueError("identity must use only letters, digits, '.', '_' and '-' (no '..')")
        return value
