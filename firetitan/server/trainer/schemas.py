"""Request bodies of the trainer worker's Tinker-style REST API (pydantic, strict, 400 naming the field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from firetitan.types import AdamParams, Datum, LoraConfig

# Strict scalars on the wire: `true` is not a number, "2" is not an int, 10^30 is not a seq id.
SeqId = Annotated[int, Field(ge=0, lt=2**63, strict=True)]
Name = Annotated[str, Field(min_length=1, max_length=256, strict=True)]
# A base model name or path; longer ones are refused before any file system call (ENAMETOOLONG was a 500).
ModelName = Annotated[str, Field(min_length=1, max_length=1024, strict=True)]


class _Body(BaseModel):
    # Tinker SDKs send extra bookkeeping fields (type, ttl_seconds, user_metadata...): ignore them.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Sequenced(_Body):
    """A submission executed in per-session `seq_id` order on its model."""

    model_id: Name
    # Absent = run in arrival order; an explicit null is refused (it used to slip through as "absent").
    seq_id: SeqId | None = None
    # Our SDK sends its per-client id so several clients (and reconnects) each get their own sequence.
    session_id: StrictStr | None = Field(default=None, max_length=128)

    @field_validator("seq_id", mode="before")
    @classmethod
    def _no_null_seq_id(cls, value: Any) -> Any:
        # Runs only when the field is present: an explicit null is refused, absence means arrival order.
        if value is None:
            raise ValueError("must be an integer >= 0 when given (omit it for arrival order), got null")
        return value


class CreateModelRequest(_Body):
    base_model: ModelName
    lora_config: LoraConfig | None = None
    model_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,128}$", strict=True)
    seed: int | None = Field(default=None, ge=0, lt=2**63, strict=True)
    # A reference model: forward passes only (the worker's --forward-only makes every model one).
    # The official fireworks SDK calls it `base_only`.
    forward_only: StrictBool = Field(default=False, validation_alias=AliasChoices("forward_only", "base_only"))
    # Tinker addressing: the model id is "<session_id>:train:<model_seq_id>" when both are given.
    session_id: StrictStr | None = Field(default=None, max_length=100)
    model_seq_id: SeqId | None = None

    @property
    def resolved_model_id(self) -> str | None:
        if self.model_id is None and self.session_id is not None and self.model_seq_id is not None:
            return f"{self.session_id}:train:{self.model_seq_id}"
        return self.model_id

    @model_validator(mode="before")
    @classmethod
    def _zero_rank_is_full(cls, value: Any) -> Any:
        # `lora_config.rank == 0` means full-parameter training (Fireworks' lora_rank=0).
        if isinstance(value, dict) and isinstance(value.get("lora_config"), dict):
            rank = value["lora_config"].get("rank")
            if rank == 0 and not isinstance(rank, bool):
                value = {**value, "lora_config": None}
        return value


class ModelRef(_Body):
    model_id: Name


class ForwardBackwardInput(_Body):
    data: list[Datum]
    loss_fn: Annotated[str, Field(max_length=64, strict=True)] = "cross_entropy"
    loss_fn_config: dict[str, Annotated[float, Field(allow_inf_nan=False, strict=True)] | StrictStr] | None = None


class ForwardRequest(_Sequenced):
    forward_input: ForwardBackwardInput = Field(
        validation_alias=AliasChoices("forward_input", "forward_backward_input")
    )
    # Run the LoRA model with its adapters switched off (a reference policy without a second model).
    disable_adapter: StrictBool = False


class ForwardBackwardRequest(_Sequenced):
    forward_backward_input: ForwardBackwardInput = Field(
        validation_alias=AliasChoices("forward_backward_input", "forward_input")
    )
    # Tinker >= 0.25 sends forward passes to this endpoint with `forward_only`.
    forward_only: StrictBool = False
    disable_adapter: StrictBool = False


class OptimStepRequest(_Sequenced):
    adam_params: AdamParams = Field(
        default_factory=AdamParams,
        validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params"),
    )


class SaveWeightsRequest(_Sequenced):
    path: Name = Field(validation_alias=AliasChoices("path", "name"))
    overwrite: StrictBool = False


class SaveWeightsForSamplerRequest(_Sequenced):
    path: Name = Field(validation_alias=AliasChoices("path", "name"))
    # When set, the public identity is "<path>-<client_suffix>" (per-client names never collide).
    client_suffix: StrictStr | None = Field(default=None, max_length=64)
    checkpoint_type: Literal["base", "delta"] | None = None


class LoadWeightsRequest(_Sequenced):
    path: Annotated[str, Field(min_length=1, max_length=1024, strict=True)]
    optimizer: StrictBool = False


class RetrieveFutureRequest(_Body):
    request_id: Annotated[str, Field(max_length=128, strict=True)]
    # Seconds to hold the long poll before answering try_again (capped by the server).
    timeout: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, strict=True)


class ReleaseSeqRequest(_Sequenced):
    """A client reserved `seq_id` but will never submit it (it failed before sending)."""


class CreateSessionRequest(_Body):
    """Tinker / fireworks `create_session`: bookkeeping only; the trainer answers with a fresh id."""

    tags: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=64)
    sdk_version: StrictStr | None = Field(default=None, max_length=64)
    project_id: StrictStr | None = Field(default=None, max_length=256)
    display_name: StrictStr | None = Field(default=None, max_length=256)


class SessionRef(_Body):
    session_id: Annotated[str, Field(min_length=1, max_length=128, strict=True)]
