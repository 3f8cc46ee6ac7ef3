"""The validated provisioning config behind `FiretitanServiceClient.from_firetitan_config(...)`."""

from __future__ import annotations

import re
import warnings
from datetime import timedelta
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from firetitan.devices import DeviceSetting, DTypeSetting
from firetitan.errors import ConfigError

CLEANUP_DEPLOYMENT_ON_CLOSE_SCALE_TO_ZERO = "scale_to_zero"
CLEANUP_DEPLOYMENT_ON_CLOSE_DELETE = "delete"
DeploymentCleanupOnClose = Literal["scale_to_zero", "delete"]

_RESOURCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SHAPE = re.compile(r"^accounts/[^/]+/trainingShapes/[^/]+(/versions/[^/]+)?$")
# Hosted-SDK spellings accepted for compatibility.
_ALIASES = {"model_name": "base_model", "training_shape": "training_shape_id",
            "training_shape_ref": "training_shape_id", "trainer_id": "trainer_job_id",
            "deployment_replica_count": "replica_count"}
# Hardware is the shape's business; the hosted SDK accepts these with a warning and drops them.
_DEPRECATED = ("accelerator_type", "accelerator_count", "node_count", "custom_image_tag", "region",
               "use_reservation", "reservation_target", "preemptible", "skip_validations")
# Hosted-service knobs with no local meaning, and the hosted default of each: accepted so a hosted
# script's config builds unchanged; a value other than the default is warned about and dropped.
_HOSTED_ONLY: dict[str, Any] = {
    "projection_head_dim": None, "max_lora_rank": None, "gradient_accumulation_steps": 1, "extra_args": None,
    "extra_values": None, "deployment_extra_args": None, "deployment_extra_values": None,
    "trainer_replica_count": None, "trainer_pending_timeout_s": 172800, "disable_inactivity_cleanup": False,
    "reattach_settle_timeout_s": 600.0, "reattach_poll_interval_s": 5.0, "purpose": None, "managed_by": None,
    "disable_speculative_decoding": False, "weight_sync_transport": None,
}


class FiretitanProvisioningConfig(BaseModel):
    """What the service provisions: one trainer job, optionally one deployment and a reference."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field(min_length=1)
    tokenizer_model: str | None = None
    lora_rank: int = Field(default=0, ge=0, le=1024)
    # Data-parallel ranks of the trainer job (docs/data-parallel-trainer.md); > 1 needs lora_rank 0.
    world_size: int = Field(default=1, ge=1, le=8)
    lora_alpha: float | None = Field(default=None, gt=0)
    training_shape_id: str | None = None
    reference_training_shape_id: str | None = None
    reference_trainer_job_id: str | None = None
    cleanup_reference_trainer_on_close: bool = True
    reference_required: bool = False
    deployment_shape: str | None = None
    deployment_engine: Literal["embedded", "vllm"] | None = Field(
        default=None, description="which engine serves a deployment this client creates; None: the training "
        "shape's (embedded unless the shape names vLLM). vLLM needs `make vllm-env` (docs/scaling-out.md)")
    trainer_job_id: str | None = None
    deployment_id: str | None = None
    create_deployment: bool = True
    forward_only: bool = False
    max_context_length: int | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=1e-5, gt=0)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    replica_count: int = Field(default=1, ge=0, le=16)
    device: DeviceSetting | None = Field(default=None, description="trainer and deployment device: auto|cpu|"
                                         "cuda[:i]|mps (None: the shape's or the server's default)")
    dtype: DTypeSetting | None = Field(default=None, description="float32|bfloat16: the trainer's compute and "
                                       "snapshot dtype and the deployment's served dtype (None: the default)")
    trainer_timeout_s: float = Field(default=3600.0, gt=0)
    deployment_timeout_s: float = Field(default=5400.0, gt=0)
    hotload_timeout_s: float = Field(default=600.0, gt=0)
    inactivity_timeout: float | None = Field(default=None, gt=0, le=3 * 3600)
    cleanup_trainer_on_close: bool = False
    cleanup_deployment_on_close: DeploymentCleanupOnClose | None = None
    display_name: str | None = Field(default=None, max_length=63)
    hot_load_transition_type: Literal["ASYNC", "SYNC"] | None = None
    wait_for_trainer_before_deployment: bool = False
    direct_replica_routing: bool = Field(
        default=True, description="samplers send requests straight to the deployment's replicas when they are "
        "reachable (same host as the control plane), instead of through its gateway")
    account: str = "local"
    home: str | None = Field(default=None, description="state directory of the embedded control plane")

    @model_validator(mode="before")
    @classmethod
    def _drop_hosted_only(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for key in [k for k in out if k in _HOSTED_ONLY or k in _DEPRECATED]:
            value = out.pop(key)
            if key in _DEPRECATED or value != _HOSTED_ONLY[key]:
                warnings.warn(f"{key}={value!r} is a hosted-service setting with no meaning locally; ignored",
                              UserWarning, stacklevel=4)
        return out

    @field_validator("trainer_job_id", "deployment_id", "reference_trainer_job_id")
    @classmethod
    def _resource_id(cls, value: str | None) -> str | None:
        if value is not None and not _RESOURCE_ID.match(value):
            raise ValueError(f"{value!r} is not a valid resource id: 1-63 lowercase letters, digits and "
                             "hyphens, starting and ending with a letter or digit")
        return value

    @field_validator("training_shape_id", "reference_training_shape_id")
    @classmethod
    def _shape_name(cls, value: str | None) -> str | None:
        if value is not None and not _SHAPE.match(value):
            raise ValueError(f"{value!r} is not a training shape name; use the full resource name "
                             "accounts/<account>/trainingShapes/<shape>[/versions/<version>]")
        return value

    @field_validator("inactivity_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, timedelta):
            return value.total_seconds()
        if isinstance(value, str) and value.endswith("s"):
            return value[:-1]
        return value

    @field_validator("replica_count")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        return max(1, value)  # as hosted: 0 means "the default", one replica

    @model_validator(mode="after")
    def _consistent(self) -> FiretitanProvisioningConfig:
        if self.lora_alpha is not None and self.lora_rank == 0:
            raise ValueError("lora_alpha needs lora_rank > 0")
        return self

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_model or self.base_model

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FiretitanProvisioningConfig:
        """Build from keyword arguments, accepting hosted aliases; errors become `ConfigError(field=...)`."""
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _DEPRECATED:
                warnings.warn(f"{key} is ignored: the training shape decides the hardware", DeprecationWarning,
                              stacklevel=3)
                continue
            target = _ALIASES.get(key, key)
            if target in values and key != target:
                raise ConfigError(f"both {key!r} and {target!r} were given; pass one", field=target)
            values[target] = value
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ())) or None
            if err.get("type") == "extra_forbidden":
                known = ", ".join(sorted(cls.model_fields))
                raise ConfigError(f"unknown argument {field!r}; accepted: {known}", field=field) from None
            raise ConfigError(f"{field}: {err.get('msg')} (got {err.get('input')!r})", field=field) from None
