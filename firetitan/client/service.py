"""`FiretitanServiceClient`: provisions a trainer and a deployment, syncs weights, and cleans up.

The user-facing face: provisioning lives in `service_resources.py`, cleanup on close in
`service_cleanup.py`, the hot-load in `hotload.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from firetitan.client.config import FiretitanProvisioningConfig
from firetitan.client.hotload import DeploymentHotLoader
from firetitan.client.http import HttpClient
from firetitan.client.reference import ReferenceClient
from firetitan.client.sampling import DeploymentSampler, FanOut
from firetitan.client.sampling_client import SamplingClient
from firetitan.client.service_cleanup import close_resources, delete_reference
from firetitan.client.service_resources import ServiceResources
from firetitan.client.training import TrainingClient
from firetitan.errors import ConfigError, FiretitanError
from firetitan.futures import run_coroutine, run_sync
from firetitan.logging import get_logger

log = get_logger("firetitan.client.service")

BASE_URL_ENV = "FIRETITAN_BASE_URL"
API_KEY_ENV = "FIRETITAN_API_KEY"


class FiretitanServiceClient:
    """The managed-service entry point: one trainer job, an optional deployment and reference.

    Provisioning is lazy (first `create_*` call) and idempotent. Every blocking method has an
    `*_async` twin; blocking calls run on the SDK's background loop, so they also work inside a
    notebook cell whose own loop is running.
    """

    def __init__(self, config: FiretitanProvisioningConfig, *, api_key: str | None = None,
                 base_url: str | None = None) -> None:
        self.config = config
        # The trainer jobs and deployment on the control plane, and which of them this service created.
        self._res = ServiceResources(
            config, api_key or os.environ.get(API_KEY_ENV),
            (base_url or os.environ.get(BASE_URL_ENV) or "").rstrip("/") or None)
        self._provisioning: asyncio.Task[None] | None = None
        self._closed = False
        self._hot_loader: DeploymentHotLoader | None = None  # firetitan/client/hotload.py
        self._training_client: TrainingClient | None = None
        self._reference: ReferenceClient | None = None
        self._clients: list[TrainingClient] = []
        self._tokenizer: Any = None

    @classmethod
    def from_firetitan_config(cls, *, api_key: str | None = None,
                              managed_config: FiretitanProvisioningConfig | None = None,
                              base_url: str | None = None, **kwargs: Any) -> FiretitanServiceClient:
        """Validate the seed's keyword arguments into a config; nothing starts until it is needed.

        With no `base_url` (and no `$FIRETITAN_BASE_URL`) the SDK uses the local control plane of
        the state directory (`home=` or `$FIRETITAN_HOME`), starting it as a daemon if needed.
        """
        for key in ("inference_url", "hotload_api_url", "additional_headers", "verify_ssl", "user_metadata"):
            kwargs.pop(key, None)  # hosted-only plumbing: the control plane gives these URLs
        if kwargs.pop("project_id", None) is not None:
            raise ConfigError("project_id is not supported", field="project_id")
        if managed_config is not None and kwargs:
            raise ConfigError("pass either managed_config or keyword arguments, not both",
                              field=sorted(kwargs)[0])
        config = managed_config or FiretitanProvisioningConfig.from_kwargs(**kwargs)
        return cls(config, api_key=api_key, base_url=base_url)

    # ------------------------------------------------------------------ properties

    @property
    def trainer_job_id(self) -> str | None:
        return self._res.trainer_job_id

    @property
    def deployment_id(self) -> str | None:
        return self._res.deployment_id

    @property
    def reference_job_id(self) -> str | None:
        return self._res.reference_job_id

    @property
    def base_url(self) -> str | None:
        return self._res.base_url

    @property
    def _http(self) -> HttpClient | None:
        return self._res.http

    @property
    def _api_key(self) -> str | None:
        return self._res.api_key

    @property
    def _deployment(self) -> dict[str, Any] | None:
        return self._res.deployment

    @property
    def account(self) -> str:
        return self.config.account

    @property
    def inference_url(self) -> str | None:
        return self._deployment.get("inferenceUrl") if self._deployment else None

    @property
    def max_context_length(self) -> int | None:
        cfg = (self._res.job or {}).get("trainingConfig", {})
        return cfg.get("maxContextLength") or self.config.max_context_length

    def requires_initial_sampler_sync(self) -> bool:
        """True after re-attaching to an existing deployment: its weights may be from another run."""
        return self._res.deployment_reattached

    # ------------------------------------------------------------------ provisioning

    async def _ensure_provisioned(self) -> None:
        if self._closed:
            raise ConfigError("this FiretitanServiceClient is closed", field="service")
        if self._provisioning is None or (self._provisioning.done() and self._provisioning.exception()):
            self._provisioning = asyncio.ensure_future(self._provision())
        await asyncio.shield(self._provisioning)

    async def _provision(self) -> None:
        await self._res.provision()
        job_id = self.trainer_job_id or ""
        self._training_client = TrainingClient(
            self._res.job["serviceUrl"], job_id, self._api_key, tokenizer_model=self.config.tokenizer_name)
        self._clients.append(self._training_client)
        if not self._res.trainer_created:
            # Re-attached: ask once, so a trainer restarted from its saved state warns now (steps lost).
            try:
                await self._training_client.get_info_async()
            except FiretitanError as exc:  # the info is advisory here; the first real call reports errors
                log.warning("trainer_info_unavailable", trainer_job_id=job_id, error=str(exc))
        log.info("provisioned", trainer_job_id=job_id, deployment_id=self.deployment_id,
                 trainer_created=self._res.trainer_created, deployment_created=self._res.deployment_created)

    # ------------------------------------------------------------------ training clients

    def create_training_client(self, base_model: str | None = None, lora_rank: int = 0, seed: int | None = None,
                               train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                               lora_alpha: int | None = 32, user_metadata: dict[str, str] | None = None,
                               projection_head_dim: int | None = None,
                               lora_init_method: str | None = None) -> TrainingClient:
        """The policy's training client (provisions on first call; later calls return the same one).

        As hosted, the managed config is authoritative: the model arguments are the config's
        (`FiretitanProvisioningConfig`); a differing `base_model` or non-zero `lora_rank` is
        warned about and ignored.
        """
        return run_sync(self.create_training_client_async(base_model, lora_rank))

    async def create_training_client_async(self, base_model: str | None = None, lora_rank: int = 0,
                                           seed: int | None = None, train_mlp: bool = True, train_attn: bool = True,
                                           train_unembed: bool = True, lora_alpha: int | None = 32,
                                           user_metadata: dict[str, str] | None = None,
                                           projection_head_dim: int | None = None,
                                           lora_init_method: str | None = None) -> TrainingClient:
        return await run_coroutine(self._training(base_model, lora_rank))

    async def _training(self, base_model: str | None, lora_rank: int | None) -> TrainingClient:
        if base_model is not None and base_model != self.config.base_model:
            log.warning("base_model_ignored", requested=base_model, configured=self.config.base_model)
        if lora_rank and lora_rank != self.config.lora_rank:
            log.warning("lora_rank_ignored", requested=lora_rank, configured=self.config.lora_rank)
        await self._ensure_provisioned()
        assert self._training_client is not None
        return self._training_client

    def create_reference_client(self, base_model: str | None = None, *, lora_rank: int | None = None,
                                policy_client: TrainingClient | None = None,
                                user_metadata: dict[str, str] | None = None) -> ReferenceClient:
        """A frozen reference: the LoRA policy's trainer with adapters off, else a forward-only trainer."""
        return run_sync(self.create_reference_client_async(base_model, lora_rank=lora_rank,
                                                           policy_client=policy_client))

    async def create_reference_client_async(self, base_model: str | None = None, *, lora_rank: int | None = None,
                                            policy_client: TrainingClient | None = None,
                                            user_metadata: dict[str, str] | None = None) -> ReferenceClient:
        return await run_coroutine(self._make_reference(policy_client))

    async def _make_reference(self, policy_client: TrainingClient | None) -> ReferenceClient:
        await self._ensure_provisioned()
        if self._reference is not None:
            return self._reference
        cfg = self.config
        if cfg.lora_rank > 0 and not cfg.reference_training_shape_id and not cfg.reference_trainer_job_id:
            policy = policy_client or self._training_client
            assert policy is not None
            self._reference = ReferenceClient(policy, disable_adapter=True, job_id=self.trainer_job_id)
            return self._reference
        job, ref_id = await self._res.provision_reference()
        client = TrainingClient(job["serviceUrl"], ref_id, self._api_key, tokenizer_model=cfg.tokenizer_name)
        self._clients.append(client)
        self._reference = ReferenceClient(client, disable_adapter=False, job_id=ref_id)
        return self._reference

    def release_references(self) -> None:
        """Delete the service-owned reference trainer now (e.g. once reference logprobs are cached)."""
        run_sync(self._release_reference())

    async def _release_reference(self) -> None:
        await delete_reference(self._res)
        self._reference = None

    # ------------------------------------------------------------------ weight sync and sampling

    def hotload_sampler_snapshot(self, model_path: str) -> dict[str, Any]:
        """Load a sampler snapshot into every replica and wait until all of them serve it."""
        return run_sync(self.hotload_sampler_snapshot_async(model_path))

    async def hotload_sampler_snapshot_async(self, model_path: str) -> dict[str, Any]:
        return await run_coroutine(self._hotload(model_path))

    async def _hotload(self, identity: str) -> dict[str, Any]:
        await self._ensure_provisioned()
        if self._deployment is None or self.deployment_id is None:
            raise ConfigError("this service has no deployment (create_deployment=False)", field="create_deployment")
        if self._hot_loader is None or self._hot_loader.deployment_id != self.deployment_id:
            self._hot_loader = DeploymentHotLoader(
                self.deployment_id, account_path=self._res.acct, mode=self.config.hot_load_transition_type or "ASYNC",
                timeout_s=self.config.hotload_timeout_s)
        status = await self._hot_loader.load(await self._res.connect(), identity,
                                             careful=self._res.deployment_reattached)
        self._res.deployment_reattached = False
        return status

    def _default_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from firetitan.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.tokenizer_name)
        return self._tokenizer

    def create_deployment_sampler(self, model_path: str | None = None, *, tokenizer: Any = None,
                                  training_client: TrainingClient | None = None,
                                  concurrency_controller: Any = None, fanout: FanOut = "requests",
                                  stream: bool = True) -> DeploymentSampler:
        """A new sampler for the deployment; with `model_path`, that snapshot is hot-loaded first.

        `fanout="choices"` samples the `n` completions of a prompt in one request (see `FanOut`);
        `stream=False` takes whole JSON answers instead of token streams (see `DeploymentSampler`).
        """
        return run_sync(self.create_deployment_sampler_async(
            model_path, tokenizer=tokenizer, training_client=training_client,
            concurrency_controller=concurrency_controller, fanout=fanout, stream=stream))

    async def create_deployment_sampler_async(self, model_path: str | None = None, *, tokenizer: Any = None,
                                              training_client: TrainingClient | None = None,
                                              concurrency_controller: Any = None, fanout: FanOut = "requests",
                                              stream: bool = True) -> DeploymentSampler:
        return await run_coroutine(self._sampler(model_path, tokenizer, concurrency_controller, fanout, stream))

    async def _sampler(self, model_path: str | None, tokenizer: Any, controller: Any,
                       fanout: FanOut, stream: bool) -> DeploymentSampler:
        await self._ensure_provisioned()
        if self._deployment is None:
            raise ConfigError("this service has no deployment (create_deployment=False)", field="create_deployment")
        if model_path is not None:
            await self._hotload(model_path)
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(self._default_tokenizer)
        return DeploymentSampler(self._deployment["inferenceUrl"], str(self._deployment["name"]), self._api_key,
                                 tokenizer, controller, direct_replicas=self.config.direct_replica_routing, fanout=fanout,
                                 stream=stream)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config: Any = None, *, training_client: TrainingClient | None = None,
                               tokenizer: Any = None, concurrency_controller: Any = None,
                               fanout: FanOut = "requests", stream: bool = True) -> SamplingClient:
        """Tinker-shaped `SamplingClient` over the deployment (hot-loading `model_path` first if given).

        `fanout` and `stream` choose how its deployment sampler asks for `num_samples` sequences.
        """
        sampler = self.create_deployment_sampler(model_path, tokenizer=tokenizer,
                                                 concurrency_controller=concurrency_controller, fanout=fanout,
                                                 stream=stream)
        return SamplingClient(sampler, base_model=self.config.base_model, model_path=model_path)

    async def create_sampling_client_async(self, model_path: str | None = None, base_model: str | None = None,
                                           retry_config: Any = None, deployment_sampler: DeploymentSampler | None = None,
                                           *, training_client: TrainingClient | None = None, tokenizer: Any = None,
                                           concurrency_controller: Any = None, fanout: FanOut = "requests",
                                           stream: bool = True) -> SamplingClient:
        if deployment_sampler is not None:
            if model_path is not None:
                await self.hotload_sampler_snapshot_async(model_path)
            return SamplingClient(deployment_sampler, base_model=self.config.base_model, model_path=model_path)
        sampler = await self.create_deployment_sampler_async(model_path, tokenizer=tokenizer,
                                                             concurrency_controller=concurrency_controller,
                                                             fanout=fanout, stream=stream)
        return SamplingClient(sampler, base_model=self.config.base_model, model_path=model_path)

    # ------------------------------------------------------------------ checkpoints

    def list_checkpoints(self, job_id: str | None = None, *, page_size: int = 200) -> list[dict[str, Any]]:
        """The job's train states (this service's trainer job by default); one page holds them all."""
        return run_sync(self._list_checkpoints(job_id))

    async def _list_checkpoints(self, job_id: str | None) -> list[dict[str, Any]]:
        http = await self._res.connect()
        job = job_id or self.trainer_job_id
        body = await http.request_json("GET", self._res.acct(f"/rlorTrainerJobs/{job}/checkpoints"))
        return list(body["checkpoints"])

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Idempotent. Cleans up only what this service created, as configured; raises the first
        cleanup error after attempting every step."""
        run_sync(self._close())

    async def close_async(self) -> None:
        await run_coroutine(self._close())

    aclose = close_async

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._provisioning is not None and not self._provisioning.done():
            self._provisioning.cancel()
            with contextlib.suppress(BaseException):
                await self._provisioning
        await close_resources(self._res, self._clients)

    def __enter__(self) -> FiretitanServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FiretitanServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    def __repr__(self) -> str:
        return (f"FiretitanServiceClient(base_model={self.config.base_model!r}, "
                f"trainer_job_id={self.trainer_job_id!r}, deployment_id={self.deployment_id!r})")


ServiceClient = FiretitanServiceClient
