"""Response types returned by training and sampling calls (Tinker's shapes)."""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from pydantic import Field

from firetitan.types.base import _Model
from firetitan.types.tensors import TensorData

StopReason: TypeAlias = Literal["length", "stop"]


class SampledSequence(_Model):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(_Model):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


class ForwardBackwardOutput(_Model):
    """Per-datum outputs (each has `logprobs`) in input order, and metrics keyed `name:reduction`."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(_Model):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(_Model):
    path: str


class SaveWeightsForSamplerResponse(_Model):
    path: str


class LoadWeightsResponse(_Model):
    path: str | None = None
    model_id: str | None = None


class ModelData(_Model):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Model):
    model_id: str
    model_name: str | None = None
    model_data: ModelData | None = None
    is_lora: bool = False
    lora_rank: int | None = None
    optimizer_config: dict[str, Any] | None = None
