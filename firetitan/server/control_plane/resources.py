"""Fireworks-shaped control-plane resources and request bodies (camelCase on the wire)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from firetitan.devices import DeviceSetting, DTypeSetting
from firetitan.errors import InvalidRequestError
from firetitan.server.deployment.schemas import LoadingState

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
# Some replicas serve, others crashed and are being restarted (routing uses the ready ones).
DEP_DEGRADED = "DEGRADED"

# Record kinds in the state store.
TRAINER = "trainer"
DEPLOYMENT = "deployment"


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
    # Data-parallel ranks of the trainer (docs/data-parallel-trainer.md); > 1 needs lora_rank 0.
    world_size: int = Field(default=1, ge=1, le=8)
    # None: the training shape's setting, else auto / float32. Resolved on the worker's host.
    device: DeviceSetting | None = None
    dtype: DTypeSetting | None = None


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
    health_url: str | None = None  # the trainer's health listener (firetitan.server.health)
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
    health_url: str | None = None  # the replica's health listener (firetitan.server.health)
    pid: int | None = None
    message: str = ""


class HotLoadRecord(Wire):
    identity: str
    previous_snapshot_identity: str | None = None


DeploymentEngine = Literal["embedded", "vllm"]


class CreateDeploymentRequest(Wire):
    base_model: str
    display_name: str | None = Field(default=None, max_length=63)
    description: str | None = None
    deployment_shape: str | None = None
    min_replica_count: int = Field(default=1, ge=0, le=16)
    max_replica_count: int = Field(default=1, ge=0, le=16)
    hot_load_trainer_job: str | None = None
    engine: DeploymentEngine | None = None  # None: the deployment shape's engine, else "embedded"
    device: DeviceSetting | None = None  # None: the deployment shape's setting, else auto
    dtype: DTypeSetting | None = None  # None: the deployment shape's setting, else float32


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
    engine: DeploymentEngine = "embedded"  # which worker serves it: the embedded engine or vLLM
    device: str = "auto"  # passed to every replica as --device (resolved on the replica's host)
    dtype: str = "float32"  # the served weights' dtype (--dtype)
    state: str = DEP_CREATING
    status: Status = Field(default_factory=Status)
    min_replica_count: int = 1
    max_replica_count: int = 1
    replicas: list[Replica] = Field(default_factory=list)
    hot_load_trainer_job: str | None = None
    # Snapshots since the last base, in load order: replayed into replicas started later.
    snapshot_chain: list[HotLoadRecord] = Field(default_factory=list)
    # The latest deployment-wide hot-load: done, rolled_back (no replica kept it) or loading.
    last_hot_load: LoadingState | None = None
    # The replica count before a scale to zero, restored when a trainer re-attaches (PATCH).
    last_replica_count: int = 0
    # Set when a re-attach (PATCH hotLoadTrainerJob) woke the deployment from zero: the job that woke it.
    # Deleting that job scales the deployment back to zero, as the hosted autoscaler would for a
    # deployment whose minimum is zero (the official SDK only scales down deployments it created).
    woken_by_trainer_job: str | None = None
    threads_per_replica: int = 1
    create_time: str = Field(default_factory=now_rfc3339)
    update_time: str = Field(default_factory=now_rfc3339)

    @property
    def deployment_id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def current_snapshot_identity(self) -> str | None:
        return self.snapshot_chain[-1].identity if self.snapshot_chain else None
