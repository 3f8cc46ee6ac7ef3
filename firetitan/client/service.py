"""`FiretitanServiceClient`: provisions a trainer and a deployment, syncs weights, and cleans up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from typing import Any

from firetitan.client.config import FiretitanProvisioningConfig
from firetitan.client.hotload import DeploymentHotLoader
from firetitan.client.http import HttpClient
from firetitan.client.reference import ReferenceClient
from firetitan.client.sampling import DeploymentSampler, FanOut
from firetitan.client.sampling_client import SamplingClient
from firetitan.client.training import TrainingClient
from firetitan.errors import (
    APITimeoutError,
    ConfigError,
    ConflictError,
    FiretitanError,
    NotFoundError,
    WorkerCrashedError,
)
from firetitan.futures import run_coroutine, run_sync
from firetitan.logging import get_logger

log = get_logger("firetitan.client.service")

BASE_URL_ENV = "FIRETITAN_BASE_URL"
API_KEY_ENV = "FIRETITAN_API_KEY"
_POLL_S = 0.25


class FiretitanServiceClient:
    """The managed-service entry point: one trainer job, an optional deployment and reference.

    Provisioning is lazy (first `create_*` call) and idempotent. Every blocking method has an
    `*_async` twin; blocking calls run on the SDK's background loop, so they also work inside a
    notebook cell whose own loop is running.
    """

    def __init__(self, config: FiretitanProvisioningConfig, *, api_key: str | None = None,
                 base_url: str | None = None) -> None:
        self.config = config
        self._api_key = api_key or os.environ.get(API_KEY_ENV)
        self._base_url = (base_url or os.environ.get(BASE_URL_ENV) or "").rstrip("/") or None
        self._http: HttpClient | None = None
        self._provisioning: asyncio.Task[None] | None = None
        self._closed = False
        self._job: dict[str, Any] | None = None
        self._deployment: dict[str, Any] | None = None
        self._trainer_created = False
        self._deployment_created = False
        self._deployment_reattached = False
        self._hot_loader: DeploymentHotLoader | None = None  # firetitan/client/hotload.py
        # Replicas a re-attached deployment had before this service scaled it up; restored on close.
        self._replicas_found: int | None = None
        self._reference_job_id: str | None = None
        self._reference_created = False
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
        if self._job is not None:
            return str(self._job["name"]).rsplit("/", 1)[-1]
        return self.config.trainer_job_id

    @property
    def deployment_id(self) -> str | None:
        if self._deployment is not None:
            return str(self._deployment["name"]).rsplit("/", 1)[-1]
        return self.config.deployment_id

    @property
    def reference_job_id(self) -> str | None:
        return self._reference_job_id

    @property
    def base_url(self) -> str | None:
        return self._base_url

    @property
    def account(self) -> str:
        return self.config.account

    @property
    def inference_url(self) -> str | None:
        return self._deployment.get("inferenceUrl") if self._deployment else None

    @property
    def max_context_length(self) -> int | None:
        cfg = (self._job or {}).get("trainingConfig", {})
        return cfg.get("maxContextLength") or self.config.max_context_length

    def requires_initial_sampler_sync(self) -> bool:
        """True after re-attaching to an existing deployment: its weights may be from another run."""
        return self._deployment_reattached

    # ------------------------------------------------------------------ provisioning

    async def _connect(self) -> HttpClient:
        if self._http is None:
            if self._base_url is None:
                from firetitan.client.provision import ensure_control_plane

                url, key = await asyncio.to_thread(ensure_control_plane, self.config.home)
                self._base_url, self._api_key = url, self._api_key or key
            self._http = HttpClient(self._base_url or "", self._api_key, timeout=60.0)
        return self._http

    def _acct(self, path: str) -> str:
        return f"/v1/accounts/{self.config.account}{path}"

    async def _ensure_provisioned(self) -> None:
        if self._closed:
            raise ConfigError("this FiretitanServiceClient is closed", field="service")
        if self._provisioning is None or (self._provisioning.done() and self._provisioning.exception()):
            self._provisioning = asyncio.ensure_future(self._provision())
        await asyncio.shield(self._provisioning)

    async def _provision(self) -> None:
        http = await self._connect()
        profile = None
        if self.config.training_shape_id:
            profile = await self._resolve_shape(http, self.config.training_shape_id)
        if self.config.create_deployment and not self.config.wait_for_trainer_before_deployment:
            # Trainer boot and deployment start overlap: both load a model.
            self._job, self._deployment = await asyncio.gather(
                self._provision_trainer(http, profile), self._provision_deployment(http, profile))
        else:
            self._job = await self._provision_trainer(http, profile)
            if self.config.create_deployment:
                self._deployment = await self._provision_deployment(http, profile)
        job_id = self.trainer_job_id or ""
        self._training_client = TrainingClient(
            self._job["serviceUrl"], job_id, self._api_key, tokenizer_model=self.config.tokenizer_name)
        self._clients.append(self._training_client)
        if not self._trainer_created:
            # Re-attached: ask once, so a trainer restarted from its saved state warns now (steps lost).
            try:
                await self._training_client.get_info_async()
            except FiretitanError as exc:  # the info is advisory here; the first real call reports errors
                log.warning("trainer_info_unavailable", trainer_job_id=job_id, error=str(exc))
        log.info("provisioned", trainer_job_id=job_id, deployment_id=self.deployment_id,
                 trainer_created=self._trainer_created, deployment_created=self._deployment_created)

    async def _resolve_shape(self, http: HttpClient, shape_id: str) -> dict[str, Any]:
        path = shape_id if "/versions/" in shape_id else f"{shape_id}/versions"
        body = await http.request_json("GET", f"/v1/{path}")
        profile = body["trainingShapeVersions"][0] if "trainingShapeVersions" in body else body
        if profile.get("baseModel") and profile["baseModel"] != self.config.base_model:
            raise ConfigError(f"training shape {shape_id!r} trains {profile['baseModel']!r}, but base_model is "
                              f"{self.config.base_model!r}", field="training_shape_id")
        return profile

    async def _provision_trainer(self, http: HttpClient, profile: dict[str, Any] | None,
                                 *, forward_only: bool = False, job_id: str | None = None) -> dict[str, Any]:
        cfg = self.config
        requested = job_id if forward_only else cfg.trainer_job_id
        if requested is not None:
            try:
                job = await http.request_json("GET", self._acct(f"/rlorTrainerJobs/{requested}"))
            except NotFoundError:
                job = None
            if job is not None and job["state"] in ("JOB_STATE_FAILED", "JOB_STATE_PAUSED"):
                log.info("resuming_trainer", job=job["name"], state=job["state"])
                job = await http.request_json("POST", self._acct(f"/rlorTrainerJobs/{requested}:resume"))
            if job is not None and job["state"] != "JOB_STATE_DELETED":
                return await self._wait_job(http, requested)
        new_id = requested or f"firetitan-{secrets.token_hex(4)}"
        # Marked before the request: an interrupted create is still cleaned up by close().
        if forward_only:
            self._reference_job_id, self._reference_created = new_id, True
        else:
            self._trainer_created = True
            self._job = {"name": f"accounts/{cfg.account}/rlorTrainerJobs/{new_id}"}
        body: dict[str, Any] = {
            "trainingConfig": {"baseModel": cfg.base_model, "loraRank": 0 if forward_only else cfg.lora_rank,
                               "learningRate": cfg.learning_rate, "maxContextLength": cfg.max_context_length},
            "displayName": cfg.display_name, "forwardOnly": forward_only, "serviceMode": True,
            "inactivityTimeout": f"{cfg.inactivity_timeout:.0f}s" if cfg.inactivity_timeout else None}
        params = {"rlorTrainerJobId": new_id}
        if profile is not None:
            params["trainingShape"] = str(profile.get("trainingShape") or cfg.training_shape_id)
        await http.request_json("POST", self._acct("/rlorTrainerJobs"), json=body, params=params)
        return await self._wait_job(http, new_id)

    async def _wait_job(self, http: HttpClient, job_id: str) -> dict[str, Any]:
        """Until the job is RUNNING and its trainer answers health checks through the gateway."""
        deadline = time.monotonic() + self.config.trainer_timeout_s
        while True:
            job = await http.request_json("GET", self._acct(f"/rlorTrainerJobs/{job_id}"))
            state = job["state"]
            if state == "JOB_STATE_RUNNING":
                with contextlib.suppress(FiretitanError):
                    await http.request_json("GET", f"{job['serviceUrl']}/api/v1/healthz", timeout=10.0)
                    return job
            elif state in ("JOB_STATE_FAILED", "JOB_STATE_DELETED", "JOB_STATE_PAUSED"):
                raise WorkerCrashedError(f"trainer job {job['name']} is {state}: {job['status'].get('message')}")
            if time.monotonic() > deadline:
                raise APITimeoutError(f"trainer job {job['name']} not ready after "
                                      f"{self.config.trainer_timeout_s:.0f}s (state {state})")
            await asyncio.sleep(_POLL_S)

    def _new_deployment_id(self) -> str:
        short = re.sub(r"[^a-z0-9-]+", "-", self.config.base_model.rsplit("/", 1)[-1].lower()).strip("-")
        return f"{short[:40] or 'deployment'}-{int(time.time())}"

    async def _provision_deployment(self, http: HttpClient, profile: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.config
        dep_id = cfg.deployment_id or self._new_deployment_id()
        want = cfg.replica_count
        try:
            dep = await http.request_json("GET", self._acct(f"/deployments/{dep_id}"))
        except NotFoundError:
            dep = None
        if dep is not None:
            self._deployment_reattached = True
            if dep["baseModel"] != cfg.base_model:
                raise ConflictError(f"deployment {dep['name']} serves {dep['baseModel']!r}, not base_model "
                                    f"{cfg.base_model!r}", field="deployment_id")
            if dep["state"] == "FAILED" or dep.get("maxReplicaCount", 0) < want:
                # Re-attached (never deleted by us), but it must have replicas to serve; close()
                # puts the count back so a deployment woken from zero does not stay up.
                if dep["state"] != "FAILED":
                    self._replicas_found = int(dep.get("maxReplicaCount", 0))
                await http.request_json("PATCH", self._acct(f"/deployments/{dep_id}"),
                                        json={"minReplicaCount": want, "maxReplicaCount": want})
        else:
            self._deployment_created = True
            self._deployment = {"name": f"accounts/{cfg.account}/deployments/{dep_id}"}
            body = {"baseModel": cfg.base_model, "minReplicaCount": want, "maxReplicaCount": want,
                    "deploymentShape": (profile or {}).get("deploymentShape") or None,
                    "displayName": cfg.display_name,
                    "hotLoadTrainerJob": f"accounts/{cfg.account}/rlorTrainerJobs/{cfg.trainer_job_id}"
                    if cfg.trainer_job_id else None}
            await http.request_json("POST", self._acct("/deployments"), json=body,
                                    params={"deploymentId": dep_id})
        return await self._wait_deployment(http, dep_id, want)

    async def _wait_deployment(self, http: HttpClient, dep_id: str, replicas: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.deployment_timeout_s
        while True:
            dep = await http.request_json("GET", self._acct(f"/deployments/{dep_id}"))
            if dep["state"] == "READY" and dep.get("replicaCount", 0) >= replicas:
                return dep
            if dep["state"] == "FAILED":
                raise WorkerCrashedError(f"deployment {dep['name']} failed: {dep['status'].get('message')}")
            if time.monotonic() > deadline:
                raise APITimeoutError(f"deployment {dep['name']} not ready after "
                                      f"{self.config.deployment_timeout_s:.0f}s (state {dep['state']})")
            await asyncio.sleep(_POLL_S)

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
        http = await self._connect()
        ref_id = cfg.reference_trainer_job_id or f"{self.trainer_job_id}-ref"[:63]
        profile = await self._resolve_shape(http, cfg.reference_training_shape_id) \
            if cfg.reference_training_shape_id else None
        job = await self._provision_trainer(http, profile, forward_only=True, job_id=ref_id)
        self._reference_job_id = ref_id
        client = TrainingClient(job["serviceUrl"], ref_id, self._api_key, tokenizer_model=cfg.tokenizer_name)
        self._clients.append(client)
        self._reference = ReferenceClient(client, disable_adapter=False, job_id=ref_id)
        return self._reference

    def release_references(self) -> None:
        """Delete the service-owned reference trainer now (e.g. once reference logprobs are cached)."""
        run_sync(self._release_reference())

    async def _release_reference(self) -> None:
        if self._reference_created and self._reference_job_id and self.config.cleanup_reference_trainer_on_close:
            http = await self._connect()
            with contextlib.suppress(NotFoundError):
                await http.request_json("DELETE", self._acct(f"/rlorTrainerJobs/{self._reference_job_id}"))
            self._reference_created = False
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
                self.deployment_id, account_path=self._acct, mode=self.config.hot_load_transition_type or "ASYNC",
                timeout_s=self.config.hotload_timeout_s)
        status = await self._hot_loader.load(await self._connect(), identity, careful=self._deployment_reattached)
        self._deployment_reattached = False
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
        http = await self._connect()
        job = job_id or self.trainer_job_id
        body = await http.request_json("GET", self._acct(f"/rlorTrainerJobs/{job}/checkpoints"))
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
        errors: list[BaseException] = []
        cfg = self.config
        http = self._http

        async def step(what: str, method: str, path: str, body: Any = None) -> None:
            assert http is not None
            try:
                await http.request_json(method, self._acct(path), json=body, timeout=120.0)
                log.info("cleanup", action=what, path=path)
            except NotFoundError:
                pass
            except Exception as exc:
                errors.append(exc)

        if http is not None:
            if self._reference_created and self._reference_job_id and cfg.cleanup_reference_trainer_on_close:
                await step("delete_reference", "DELETE", f"/rlorTrainerJobs/{self._reference_job_id}")
            dep_id = self.deployment_id
            if self._deployment_created and dep_id and cfg.cleanup_deployment_on_close == "scale_to_zero":
                await step("scale_to_zero", "PATCH", f"/deployments/{dep_id}",
                           {"minReplicaCount": 0, "maxReplicaCount": 0})
            elif self._deployment_created and dep_id and cfg.cleanup_deployment_on_close == "delete":
                await step("delete_deployment", "DELETE", f"/deployments/{dep_id}")
            elif (not self._deployment_created and dep_id and self._replicas_found is not None
                  and cfg.cleanup_deployment_on_close is not None):
                await step("restore_replicas", "PATCH", f"/deployments/{dep_id}",
                           {"minReplicaCount": self._replicas_found, "maxReplicaCount": self._replicas_found})
            job_id = self.trainer_job_id
            if self._trainer_created and job_id and cfg.cleanup_trainer_on_close:
                await step("delete_trainer", "DELETE", f"/rlorTrainerJobs/{job_id}")
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close_async()
        if http is not None:
            await http.close()
        if errors:
            raise errors[0]

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
