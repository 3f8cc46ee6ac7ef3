"""Tinker-shaped data types (pydantic v2) that also accept objects from the real `tinker` package.

`firetitan.types` is the import path; the definitions live in sibling modules by concern:
`tensors` (TensorData), `inputs` (ModelInput, Datum), `params` (AdamParams, SamplingParams,
LoraConfig and their bounds), `responses` (what training and sampling calls return), `base` (shared
base classes).
"""

from firetitan.types.base import COMPACT_TENSORS
from firetitan.types.inputs import (
    Datum,
    EncodedTextChunk,
    ModelInput,
    TokenId,
    coerce_datum,
    coerce_model_input,
)
from firetitan.types.params import (
    MAX_ADAM_EPS,
    MAX_GRAD_CLIP_NORM,
    MAX_LEARNING_RATE,
    MAX_LORA_RANK,
    MAX_WEIGHT_DECAY,
    MIN_ADAM_EPS,
    AdamParams,
    LoraConfig,
    LossFnType,
    SamplingParams,
    coerce_adam_params,
    coerce_sampling_params,
)
from firetitan.types.responses import (
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    ModelData,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
)

# Private, but tests read it as `firetitan.types._NP_DTYPES`.
from firetitan.types.tensors import _NP_DTYPES as _NP_DTYPES
from firetitan.types.tensors import TensorData, TensorDType

__all__ = [
    "COMPACT_TENSORS",
    "MAX_ADAM_EPS",
    "MAX_GRAD_CLIP_NORM",
    "MAX_LEARNING_RATE",
    "MAX_LORA_RANK",
    "MAX_WEIGHT_DECAY",
    "MIN_ADAM_EPS",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "TensorDType",
    "TensorData",
    "TokenId",
    "coerce_adam_params",
    "coerce_datum",
    "coerce_model_input",
    "coerce_sampling_params",
]
