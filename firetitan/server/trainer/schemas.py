"""Request bodies of the trainer worker's Tinker-style REST API (pydantic, 400 naming the field)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from firetitan.types import AdamParams, Datum, LoraConfig


class _Body(BaseModel):
    # Tinker SDKs send extra bookkeeping fields (type, ttl_seconds, user_metadata...): ignore them.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Sequenced(_Body):
    """A submission executed in per-session `seq_id` order on its model."""

    model_id: str
    seq_id: int | None = Field(default=None, ge=0)
    # Our SDK sends its per-client id so several clients (and reconnects) each get their own sequence.
    session_id: str | None = Field(default=None, max_length=128)


class CreateModelRequest(_Body):
    base_model: str | None = None
    lora_config: LoraConfig | None = None
    model_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    seed: int | None = None
    # A reference model: forward passes only (the worker's --forward-only makes every model one).
    forward_only: bool = False
    # Tinker addressing: the model id is "<session_id>:train:<model_seq_id>" when both are given.
    session_id: str | None = Field(default=None, max_length=100)
    model_seq_id: int | None = Field(default=None, ge=0)

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
            if value["lora_config"].get("rank") == 0:
                value = {**value, "lora_config": None}
        return value


class ModelRef(_Body):
    model_id: str


class ForwardBackwardInput(_Body):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None


class ForwardRequest(_Sequenced):
    forward_input: ForwardBackwardInput = Field(
        validation_alias=AliasChoices("forward_input", "forward_backward_input")
    )
    # Run the LoRA model with its adapters switched off (a reference policy without a second model).
    disable_adapter: bool = False


class ForwardBackwardRequest(_Sequenced):
    forward_backward_input: ForwardBackwardInput = Field(
        validation_alias=AliasChoices("forward_backward_input", "forward_input")
    )
    # Tinker >= 0.25 sends forward passes to this endpoint with `forward_only`.
    forward_only: bool = False
    disable_adapter: bool = False


class OptimStepRequest(_Sequenced):
    adam_params: AdamParams = Field(
        default_factory=AdamParams, validation_alias=AliasChoices("adam_params", "optim_params")
    )


class SaveWeightsRequest(_Sequenced):
    path: str = Field(validation_alias=AliasChoices("path", "name"))
    overwrite: bool = False


class SaveWeightsForSamplerRequest(_Sequenced):
    path: str = Field(validation_alias=AliasChoices("path", "name"))
    # When set, the public identity is "<path>-<client_suffix>" (per-client names never collide).
    client_suffix: str | None = None
    checkpoint_type: Literal["base", "delta"] | None = None


class LoadWeightsRequest(_Sequenced):
    path: str
    optimizer: bool = False


class RetrieveFutureRequest(_Body):
    request_id: str
    # Seconds to hold the long poll before answering try_again (capped by the server).
    timeout: float | None = Field(default=None, ge=0.0)


class ReleaseSeqRequest(_Sequenced):
    """A client reserved `seq_id` but will never submit it (it failed before sending)."""
