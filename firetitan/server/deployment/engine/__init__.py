"""The deployment's continuous-batching engine: core loop, scheduler, model runner, KV cache, sampler."""

from firetitan.server.deployment.engine.core import PREFILL_QUEUE_BUCKETS, Engine, EngineStats, WeightSwap
from firetitan.server.deployment.engine.request import (
    EngineRequest,
    RequestState,
    SamplingOptions,
    StepOutput,
    TokenOut,
)
from firetitan.server.deployment.engine.runner import DecodeOptions

__all__ = ["PREFILL_QUEUE_BUCKETS", "DecodeOptions", "Engine", "EngineRequest", "EngineStats", "RequestState", "SamplingOptions",
           "StepOutput", "TokenOut", "WeightSwap"]
