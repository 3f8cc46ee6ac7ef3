"""What the runtime and the recipes need of the SDK's clients, as `Protocol`s (any object with these methods fits).

The SDK's own classes satisfy them (`TrainingClient`, `DeploymentSampler`, `FiretitanServiceClient`,
`ReferenceClient`); tests and other backends can pass anything shaped alike. A result that is
"awaitable" is an `APIFuture` in the SDK: awaitable, with `.result()` and done-callbacks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from firetitan.client.custom_loss import CustomLossFn


@runtime_checkable
class TrainingClientLike(Protocol):
    """A policy on a trainer: queued steps, sampler snapshots and train states."""

    def forward_backward(self, data: Sequence[Any], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str] | None = None) -> Awaitable[Any]: ...

    def forward_backward_custom(self, data: Sequence[Any], loss_fn: CustomLossFn) -> Awaitable[Any]: ...

    def optim_step(self, adam_params: Any = None) -> Awaitable[Any]: ...

    def save_weights_for_sampler(self, name: str) -> Awaitable[Any]: ...

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False) -> Awaitable[Any]: ...

    def load_state_with_optimizer(self, path: str) -> Awaitable[Any]: ...


@runtime_checkable
class SamplerLike(Protocol):
    """Completions of token-id prompts, aligned for training (`SampledCompletion`s)."""

    @property
    def concurrency_controller(self) -> Any: ...

    async def sample_with_prompt_tokens(self, prompt_token_ids: Sequence[int], n: int = 1,
                                        max_tokens: int = 1024, temperature: float = 1.0,
                                        max_seq_len: int | None = None, **kwargs: Any) -> list[Any]: ...

    async def close(self) -> None: ...


@runtime_checkable
class ReferenceLike(Protocol):
    """A frozen reference policy: per-token logprobs, no training."""

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy") -> Awaitable[Any]: ...


@runtime_checkable
class ServiceLike(Protocol):
    """Provisions the run's trainer, deployment and reference, hot-loads snapshots, and cleans up."""

    async def create_training_client_async(self) -> TrainingClientLike: ...

    async def create_reference_client_async(self) -> ReferenceLike: ...

    async def create_deployment_sampler_async(self, model_path: str | None = None, *, tokenizer: Any = None,
                                              concurrency_controller: Any = None, **kwargs: Any) -> SamplerLike: ...

    async def hotload_sampler_snapshot_async(self, model_path: str) -> Any: ...

    async def close_async(self) -> None: ...
