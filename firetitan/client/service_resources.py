"""What one service client holds on the control plane: its trainer jobs and deployment, created, re-attached or resumed.

`ServiceResources` is `FiretitanServiceClient`'s record of the control-plane resources it uses and
whether it created them (only those are cleaned up on close, see `service_cleanup.py`). Creation
is marked before the create request, so an interrupted create is still cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from typing import Any

from firetitan.client.config import FiretitanProvisioningConfig
from firetitan.client.http import HttpClient
from firetitan.errors import (
    APITimeoutError,
    ConfigError,
    ConflictError,
    FiretitanError,
    NotFoundError,
    WorkerCrashedError,
)
from firetitan.logging import get_logger

log = get_logger("firetitan.client.service")

_POLL_S = 0.25


class ServiceResources:
    """The connection to the control plane and the trainer jobs / deployment one service uses."""

    def __init__(self, config: FiretitanProvisioningConfig, api_key: str | None, base_url: str | None) -> None:
        self.config = config
        self.api_key = api_key
        self.base_url = base_url
        self.http: HttpClient | None = None
        self.job: dict[str, Any] | None = None
        self.deployment: dict[str, Any] | None = None
        self.trainer_created = False
        self.deployment_created = False
        self.deployment_reattached = False
        # Replicas a re-attached deployment had before this service scaled it up; restored on close.
        self.replicas_found: int | None = None
        self.reference_job_id: str | None = None
        self.reference_created = False

    @property
    def trainer_job_id(self) -> str | None:
        if self.job is not None:
            return str(self.job["name"]).rsplit("/", 1)[-1]
        return self.config.trainer_job_id

    @property
    def deployment_id(self) -> str | None:
        if self.deployment is not None:
            return str(self.deployment["name"]).rsplit("/", 1)[-1]
        return self.config.deployment_id

    async def connect(self) -> HttpClient:
        if self.http is None:
            if self.base_url is None:
                from firetitan.client.provision import ensure_control_plane

                url, key = await asyncio.to_thread(ensure_control_plane, self.config.home)
                self.base_url, self.api_key = url, self.api_key or key
            self.http = HttpClient(self.base_url or "", self.api_key, timeout=60.0)
        return self.http

    def acct(self, path: str) -> str:
        return f"/v1/accounts/{self.config.account}{path}"

    async def provision(self) -> None:
        """The policy's trainer job and (if configured) the deployment, each created or re-attached."""
        http = await self.connect()
        profile = None
        if self.config.training_shape_id:
            profile = await self.resolve_shape(http, self.config.training_shape_id)
        if self.config.create_deployment and not self.config.wait_for_trainer_before_deployment:
            # Trainer boot and deployment start overlap: both load a model.
            self.job, self.deployment = await asyncio.gather(
                self.provision_trainer(http, profile), self._provision_deployment(http, profile))
        else:
            self.job = await self.provision_trainer(http, profile)
            if self.config.create_deployment:
                self.deployment = await self._provision_deployment(http, profile)

    async def provision_reference(self) -> tuple[dict[str, Any], str]:
        """The forward-only reference trainer job (created or re-attached) and its id."""
        cfg = self.config
        http = await self.connect()
        ref_id = cfg.reference_trainer_job_id or f"{self.trainer_job_id}-ref"[:63]
        profile = await self.resolve_shape(http, cfg.reference_training_shape_id) \
            if cfg.reference_training_shape_id else None
        job = await self.provision_trainer(http, profile, forward_only=True, job_id=ref_id)
        self.reference_job_id = ref_id
        return job, ref_id

    async def resolve_shape(self, http: HttpClient, shape_id: str) -> dict[str, Any]:
        path = shape_id if "/versions/" in shape_id else f"{shape_id}/versions"
        body = await http.request_json("GET", f"/v1/{path}")
        profile = body["trainingShapeVersions"][0] if "trainingShapeVersions" in body else body
        if profile.get("baseModel") and profile["baseModel"] != self.config.base_model:
            raise ConfigError(f"training shape {shape_id!r} trains {profile['baseModel']!r}, but base_model is "
                              f"{self.config.base_model!r}", field="training_shape_id")
        return profile

    async def provision_trainer(self, http: HttpClient, profile: dict[str, Any] | None,
                                *, forward_only: bool = False, job_id: str | None = None) -> dict[str, Any]:
        cfg = self.config
        requested = job_id if forward_only else cfg.trainer_job_id
        if requested is not None:
            try:
                job = await http.request_json("GET", self.acct(f"/rlorTrainerJobs/{requested}"))
            except NotFoundError:
                job = None
            if job is not None and job["state"] in ("JOB_STATE_FAILED", "JOB_STATE_PAUSED"):
                log.info("resuming_trainer", job=job["name"], state=job["state"])
                job = await http.request_json("POST", self.acct(f"/rlorTrainerJobs/{requested}:resume"))
            if job is not None and job["state"] != "JOB_STATE_DELETED":
                return await self._wait_job(http, requested)
        new_id = requested or f"firetitan-{secrets.token_hex(4)}"
        # Marked before the request: an interrupted create is still cleaned up by close().
        if forward_only:
            self.reference_job_id, self.reference_created = new_id, True
        else:
            self.trainer_created = True
            self.job = {"name": f"accounts/{cfg.account}/rlorTrainerJobs/{new_id}"}
        body: dict[str, Any] = {
            "trainingConfig": {"baseModel": cfg.base_model, "loraRank": 0 if forward_only else cfg.lora_rank,
                               "learningRate": cfg.learning_rate, "maxContextLength": cfg.max_context_length,
                               "worldSize": 1 if forward_only else cfg.world_size,
                               "device": cfg.device, "dtype": cfg.dtype},
            "displayName": cfg.display_name, "forwardOnly": forward_only, "serviceMode": True,
            "inactivityTimeout": f"{cfg.inactivity_timeout:.0f}s" if cfg.inactivity_timeout else None}
        params = {"rlorTrainerJobId": new_id}
        if profile is not None:
            params["trainingShape"] = str(profile.get("trainingShape") or cfg.training_shape_id)
        await http.request_json("POST", self.acct("/rlorTrainerJobs"), json=body, params=params)
        return await self._wait_job(http, new_id)

    async def _wait_job(self, http: HttpClient, job_id: str) -> dict[str, Any]:
        """Until the job is RUNNING and its trainer answers health checks through the gateway."""
        deadline = time.monotonic() + self.config.trainer_timeout_s
        while True:
            job = await http.request_json("GET", self.acct(f"/rlorTrainerJobs/{job_id}"))
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
            dep = await http.request_json("GET", self.acct(f"/deployments/{dep_id}"))
        except NotFoundError:
            dep = None
        if dep is not None:
            self.deployment_reattached = True
            if dep["baseModel"] != cfg.base_model:
                raise ConflictError(f"deployment {dep['name']} serves {dep['baseModel']!r}, not base_model "
                                    f"{cfg.base_model!r}", field="deployment_id")
            if cfg.deployment_engine and dep.get("engine", "embedded") != cfg.deployment_engine:
                raise ConflictError(f"deployment {dep['name']} runs engine {dep.get('engine')!r}, not "
                                    f"deployment_engine {cfg.deployment_engine!r}", field="deployment_engine")
            if dep["state"] == "FAILED" or dep.get("maxReplicaCount", 0) < want:
                # Re-attached (never deleted by us), but it must have replicas to serve; close()
                # puts the count back so a deployment woken from zero does not stay up.
                if dep["state"] != "FAILED":
                    self.replicas_found = int(dep.get("maxReplicaCount", 0))
                await http.request_json("PATCH", self.acct(f"/deployments/{dep_id}"),
                                        json={"minReplicaCount": want, "maxReplicaCount": want})
        else:
            self.deployment_created = True
            self.deployment = {"name": f"accounts/{cfg.account}/deployments/{dep_id}"}
            body = {"baseModel": cfg.base_model, "minReplicaCount": want, "maxReplicaCount": want,
                    "deploymentShape": (profile or {}).get("deploymentShape") or None,
                    "displayName": cfg.display_name, "engine": cfg.deployment_engine,
                    "device": cfg.device, "dtype": cfg.dtype,
                    "hotLoadTrainerJob": f"accounts/{cfg.account}/rlorTrainerJobs/{cfg.trainer_job_id}"
                    if cfg.trainer_job_id else None}
            await http.request_json("POST", self.acct("/deployments"), json=body,
                                    params={"deploymentId": dep_id})
        return await self._wait_deployment(http, dep_id, want)

    async def _wait_deployment(self, http: HttpClient, dep_id: str, replicas: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.deployment_timeout_s
        while True:
            dep = await http.request_json("GET", self.acct(f"/deployments/{dep_id}"))
            if dep["state"] == "READY" and dep.get("replicaCount", 0) >= replicas:
                return dep
            if dep["state"] == "FAILED":
                raise WorkerCrashedError(f"deployment {dep['name']} failed: {dep['status'].get('message')}")
            if time.monotonic() > deadline:
                raise APITimeoutError(f"deployment {dep['name']} not ready after "
                                      f"{self.config.deployment_timeout_s:.0f}s (state {dep['state']})")
            await asyncio.sleep(_POLL_S)
