"""firetitan: an open, self-hostable training-and-sampling service driven from an async Python loop.

The public API is re-exported here. Types, futures and errors import eagerly (they are light); the
clients import torch and aiohttp, so they load on first attribute access to keep `import firetitan`
and the CLI quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from firetitan._version import __version__
from firetitan.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    DeploymentSamplerTimeoutError,
    FiretitanError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    SamplingRequestError,
    SnapshotError,
    StalenessError,
    WorkerCrashedError,
)
from firetitan.futures import APIFuture, completed, run_coroutine
from firetitan.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    LossFnType,
    ModelData,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
    TensorData,
)

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY: dict[str, str] = {
    "FiretitanServiceClient": "firetitan.client.service",
    "ServiceClient": "firetitan.client.service",
    "FiretitanProvisioningConfig": "firetitan.client.config",
    "ensure_control_plane": "firetitan.client.provision",
    "TrainingClient": "firetitan.client.training",
    "DeploymentSampler": "firetitan.client.sampling",
    "SampledCompletion": "firetitan.client.sampling",
    "SamplingClient": "firetitan.client.sampling_client",
    "ReferenceClient": "firetitan.client.reference",
    "AdaptiveConcurrencyController": "firetitan.client.concurrency",
    "FixedConcurrencyController": "firetitan.client.concurrency",
    "ServerMetrics": "firetitan.client.server_metrics",
    "load_model": "firetitan.models",
    "load_tokenizer": "firetitan.models",
    "BUILTIN_MODELS": "firetitan.models",
    "get_logger": "firetitan.logging",
    "configure_logging": "firetitan.logging",
}

if TYPE_CHECKING:
    from firetitan.client.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
    from firetitan.client.config import FiretitanProvisioningConfig
    from firetitan.client.provision import ensure_control_plane
    from firetitan.client.reference import ReferenceClient
    from firetitan.client.sampling import DeploymentSampler, SampledCompletion
    from firetitan.client.sampling_client import SamplingClient
    from firetitan.client.server_metrics import ServerMetrics
    from firetitan.client.service import FiretitanServiceClient, ServiceClient
    from firetitan.client.training import TrainingClient
    from firetitan.logging import configure_logging, get_logger
    from firetitan.models import BUILTIN_MODELS, load_model, load_tokenizer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'firetitan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BUILTIN_MODELS",
    "APIConnectionError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AdaptiveConcurrencyController",
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "Datum",
    "DeploymentSampler",
    "DeploymentSamplerTimeoutError",
    "EncodedTextChunk",
    "FiretitanError",
    "FiretitanProvisioningConfig",
    "FiretitanServiceClient",
    "FixedConcurrencyController",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "InvalidRequestError",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "ModelNotFoundError",
    "NotFoundError",
    "OptimStepResponse",
    "ReferenceClient",
    "SampleResponse",
    "SampledCompletion",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SamplingRequestError",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerMetrics",
    "ServiceClient",
    "SnapshotError",
    "StalenessError",
    "StopReason",
    "TensorData",
    "TrainingClient",
    "WorkerCrashedError",
    "__version__",
    "completed",
    "configure_logging",
    "ensure_control_plane",
    "get_logger",
    "load_model",
    "load_tokenizer",
    "run_coroutine",
]
