"""Opening and always closing the service, training client, sampler and reference client of a run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from firetitan.client.sampling import FanOut
from firetitan.logging import get_logger
from firetitan.models import load_tokenizer
from firetitan.recipes.config import RecipeConfig, stable_job_id
from firetitan.runtime.protocols import ReferenceLike, SamplerLike, ServiceLike, TrainingClientLike
from firetitan.runtime.remote import call

log = get_logger("firetitan.recipes")


@dataclass
class Clients:
    service: ServiceLike
    training: TrainingClientLike
    tokenizer: Any  # a Hugging Face tokenizer
    sampler: SamplerLike | None = None
    reference: ReferenceLike | None = None
    hot_load: Callable[[str], Awaitable[None]] | None = None


def _hot_loader(service: ServiceLike, timeout_s: float) -> Callable[[str], Awaitable[None]]:
    async def hot_load(identity: str) -> None:
        # Returns once every replica serves `identity`; rollouts keep running meanwhile.
        await call(service.hotload_sampler_snapshot_async(identity), timeout=timeout_s,
                   what=f"hot-load of {identity}")

    return hot_load


@asynccontextmanager
async def open_clients(cfg: RecipeConfig, *, name: str, deployment: bool, reference: bool = False,
                       service: ServiceLike | None = None, concurrency_controller: Any = None,
                       fanout: FanOut = "requests", stream: bool = True) -> AsyncIterator[Clients]:
    """Create (or reuse `service`) and yield the run's clients; everything created here is closed on exit.

    Closing runs shielded from cancellation, so a cancelled or failed run still tears down its
    trainer and deployment (the service deletes only what it created).
    """
    own = service is None
    sampler = None
    try:
        if own:
            from firetitan.client.service import FiretitanServiceClient

            kwargs: dict[str, Any] = {
                "base_model": cfg.base_model, "tokenizer_model": cfg.base_model, "lora_rank": cfg.lora_rank,
                "learning_rate": cfg.learning_rate, "create_deployment": deployment,
                "cleanup_trainer_on_close": True, "cleanup_deployment_on_close": "delete",
                "trainer_job_id": cfg.trainer_job_id or stable_job_id(name, cfg.log_dir),
                **cfg.service_kwargs,
            }
            service = FiretitanServiceClient.from_firetitan_config(**kwargs)  # lazy: starts nothing yet
        training = await call(service.create_training_client_async(), timeout=cfg.timeout_s,
                              what="provisioning the trainer")
        tokenizer = load_tokenizer(cfg.base_model)
        ref = None
        if reference:
            ref = await call(service.create_reference_client_async(), timeout=cfg.timeout_s,
                             what="provisioning the reference")
        hot_load = None
        if deployment:
            sampler = await call(service.create_deployment_sampler_async(
                tokenizer=tokenizer, concurrency_controller=concurrency_controller, fanout=fanout,
                stream=stream),
                timeout=cfg.timeout_s,
                what="provisioning the deployment")
            hot_load = _hot_loader(service, cfg.timeout_s)
        yield Clients(service=service, training=training, tokenizer=tokenizer, sampler=sampler, reference=ref,
                      hot_load=hot_load)
    finally:
        with anyio.CancelScope(shield=True):
            if sampler is not None:
                try:
                    await call(sampler.close(), timeout=30, what="closing the sampler")
                except Exception as exc:  # keep closing the rest
                    log.warning("sampler_close_failed", error=repr(exc))
            if own and service is not None:
                await call(service.close_async(), timeout=cfg.timeout_s, what="closing the service")
