"""Deployments: create, scale (re-attach restores the last count), delete, and keep their replicas
running: reconcile to the wanted count, restart a crashed replica with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING

from firetitan.devices import DEFAULT_DEVICE, DEFAULT_DTYPE
from firetitan.errors import ConflictError, InvalidRequestError, NotFoundError
from firetitan.logging import get_logger
from firetitan.server.control_plane import engines
from firetitan.server.control_plane.resources import (
    DEP_CREATING,
    DEP_DEGRADED,
    DEP_FAILED,
    DEP_READY,
    DEP_UPDATING,
    DEPLOYMENT,
    CreateDeploymentRequest,
    Deployment,
    Replica,
    Status,
    UpdateDeploymentRequest,
    check_resource_id,
    now_rfc3339,
)
from firetitan.server.control_plane.shapes import deployment_shape, local_base_model
from firetitan.server.control_plane.supervisor import WorkerKey, kill_leftover
from firetitan.server.process import WorkerProcess

if TYPE_CHECKING:
    from firetitan.server.control_plane.controller import ControlPlane

log = get_logger("firetitan.control_plane.deployments")

MAX_REPLICAS = 16
# A replica that stayed up this long has its restart count reset: later crashes start the backoff anew.
_STABLE_S = 60.0


class Deployments:
    """The deployment records and their replicas; every change of one deployment holds its lock."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._restarts: dict[tuple[str, str, int], int] = {}
        self._started: dict[tuple[str, str, int], float] = {}

    @staticmethod
    def name(account: str, deployment_id: str) -> str:
        return f"accounts/{account}/deployments/{deployment_id}"

    def get(self, account: str, deployment_id: str) -> Deployment:
        raw = self.cp.store.get(DEPLOYMENT, account, deployment_id)
        if raw is None:
            raise NotFoundError(f"deployment {self.name(account, deployment_id)!r} not found", field="deploymentId")
        return Deployment.model_validate(raw)

    def list(self, account: str | None) -> list[Deployment]:
        return [Deployment.model_validate(r) for r in self.cp.store.list(DEPLOYMENT, account)]

    def save(self, account: str, dep: Deployment) -> None:
        dep.update_time = now_rfc3339()
        self.cp.store.put(DEPLOYMENT, account, dep.deployment_id, dep.wire())

    def ready_replicas(self, account: str, deployment_id: str) -> dict[int, str]:
        dep = self.get(account, deployment_id)
        return {r.index: r.url for r in dep.replicas if r.state == DEP_READY and r.url}

    async def recover(self) -> None:
        """After a restart: replicas that outlived the old control plane (same pid, url, key and
        deployment id) are adopted; the others are stopped and started again (replaying the chain)."""
        supervisor = self.cp.supervisor
        for raw in self.cp.store.list(DEPLOYMENT):
            dep = Deployment.model_validate(raw)
            account = dep.name.split("/")[1]
            adopted = []
            module = engines.replica_module(dep.engine)
            for replica in dep.replicas:
                if replica.state == DEP_READY and replica.index < dep.max_replica_count and \
                        await supervisor.adoptable(module, replica.pid, replica.url,
                                                   expect={"deployment_id": dep.deployment_id},
                                                   health_url=replica.health_url):
                    assert replica.pid is not None and replica.url is not None
                    supervisor.adopt(WorkerKey("replica", account, dep.deployment_id, replica.index),
                                     module, WorkerProcess(url=replica.url, pid=replica.pid, popen=None,
                                                           ready={"health_url": replica.health_url}))
                    adopted.append(replica)
                else:
                    kill_leftover(replica.pid, module)
            dep.replicas = adopted
            missing = dep.max_replica_count > len(adopted)
            dep.state = DEP_UPDATING if missing else DEP_READY
            self.save(account, dep)
            if missing:
                self.cp.spawn(self.reconcile(account, dep.deployment_id), f"recover-{dep.name}")

    async def create(self, account: str, req: CreateDeploymentRequest, deployment_id: str | None) -> Deployment:
        from firetitan.server.control_plane.controller import split_threads

        if deployment_id:
            deployment_id = check_resource_id(deployment_id, "deploymentId")
        else:
            deployment_id = f"deployment-{secrets.token_hex(4)}"
        base_model = local_base_model(req.base_model, self.cp.layout.root, "baseModel")
        shape = deployment_shape(req.deployment_shape)
        engine = req.engine or (shape.deployment.engine if shape else "embedded")
        engines.check_engine(engine)
        if engine == "vllm" and req.dtype not in (None, "float32"):
            raise InvalidRequestError(f"dtype: {req.dtype!r} is not served by engine 'vllm' (its CPU build runs "
                                      "float32); use dtype 'float32' or engine 'embedded'", field="dtype")
        req = req.model_copy(update={"base_model": base_model, "engine": engine})
        if shape is not None and shape.base_model != req.base_model:
            raise InvalidRequestError(f"deploymentShape {req.deployment_shape!r} serves {shape.base_model!r}, "
                                      f"not baseModel {req.base_model!r}", field="deploymentShape")
        settings = self.cp.settings
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            existing = self.cp.store.get(DEPLOYMENT, account, deployment_id)
            if existing is not None and existing.get("state") != DEP_FAILED:
                raise ConflictError(f"deployment {self.name(account, deployment_id)!r} already exists",
                                    field="deploymentId")
            await self._stop_replicas(account, deployment_id, range(MAX_REPLICAS))
            replicas = max(req.min_replica_count, req.max_replica_count)
            _, per_replica = split_threads(settings.cpus, replicas, settings.trainer_threads, settings.replica_threads)
            dep = Deployment(
                name=self.name(account, deployment_id), display_name=req.display_name,
                description=req.description, base_model=req.base_model,
                deployment_shape=shape.deployment.name if shape else None, engine=engine,
                min_replica_count=replicas, max_replica_count=replicas, last_replica_count=replicas,
                hot_load_trainer_job=req.hot_load_trainer_job, threads_per_replica=per_replica,
                device=req.device or settings.device or (shape.device if shape else DEFAULT_DEVICE),
                dtype=req.dtype or settings.dtype or (shape.dtype if shape else DEFAULT_DTYPE),
                state=DEP_CREATING if replicas else DEP_READY)
            self.save(account, dep)
        self.cp.spawn(self.reconcile(account, deployment_id), f"create-{dep.name}")
        return dep

    async def update(self, account: str, deployment_id: str, req: UpdateDeploymentRequest) -> Deployment:
        from firetitan.server.control_plane.controller import split_threads

        settings = self.cp.settings
        target = req.max_replica_count if req.max_replica_count is not None else req.min_replica_count
        if target is not None:  # replicas still loading beyond the new count: end their startup now
            self._abort_starts(account, deployment_id, range(target, MAX_REPLICAS))
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            dep = self.get(account, deployment_id)
            desired = req.max_replica_count if req.max_replica_count is not None else req.min_replica_count
            if desired is None and dep.max_replica_count == 0 and dep.last_replica_count > 0 \
                    and req.hot_load_trainer_job is not None:
                # A trainer re-attaching to a deployment left at zero (the official SDK's second run
                # PATCHes hotLoadTrainerJob, then waits for READY): bring back what it ran before.
                desired = dep.last_replica_count
                woken_by = req.hot_load_trainer_job
            else:
                woken_by = None
            if desired is not None:
                dep.woken_by_trainer_job = woken_by
                if desired == 0 and dep.max_replica_count > 0:
                    dep.last_replica_count = dep.max_replica_count
                elif desired > 0:
                    dep.last_replica_count = desired
                dep.min_replica_count = dep.max_replica_count = desired
                _, dep.threads_per_replica = split_threads(settings.cpus, desired, settings.trainer_threads,
                                                           settings.replica_threads)
                dep.state = DEP_UPDATING
            if req.hot_load_trainer_job is not None:
                dep.hot_load_trainer_job = req.hot_load_trainer_job
            if req.display_name is not None:
                dep.display_name = req.display_name
            self.save(account, dep)
            scale_down = desired is not None and desired <= len(dep.replicas)
        if scale_down:
            # Stopping is quick: do it before answering so "scaled to zero" means no process is left.
            await self.reconcile(account, deployment_id)
            return self.get(account, deployment_id)
        self.cp.spawn(self.reconcile(account, deployment_id), f"scale-{dep.name}")
        return dep

    async def release_woken(self, account: str, job_name: str) -> None:
        """The trainer job `job_name` was deleted: deployments its re-attach woke from zero go back to zero
        (the official SDK's close never scales down a deployment it re-attached, and a local worker
        must not outlive the run)."""
        job_id = job_name.rsplit("/", 1)[-1]
        for dep in self.list(account):
            woken = dep.woken_by_trainer_job
            if woken is None or woken.rsplit("/", 1)[-1] != job_id or dep.max_replica_count == 0:
                continue
            current = dep.hot_load_trainer_job
            if current is not None and current.rsplit("/", 1)[-1] != job_id:
                continue  # another trainer took the deployment over since: it stays up for that one
            log.info("deployment_released", deployment=dep.name, trainer_job=job_name)
            await self.update(account, dep.deployment_id, UpdateDeploymentRequest(max_replica_count=0,
                                                                                   min_replica_count=0))

    async def delete(self, account: str, deployment_id: str) -> None:
        self._abort_starts(account, deployment_id, range(MAX_REPLICAS))
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            self.get(account, deployment_id)
            await self._stop_replicas(account, deployment_id, range(MAX_REPLICAS))
            self.cp.store.delete(DEPLOYMENT, account, deployment_id)
            self.cp.router.forget(self.name(account, deployment_id))
            engines.remove_scratch(self.cp.layout.root, account, deployment_id)

    def _abort_starts(self, account: str, deployment_id: str, indexes: range) -> None:
        """A reconcile holds the lock while replicas load; kill those loading ones rather than wait."""
        for i in indexes:
            self.cp.supervisor.abort_start(WorkerKey("replica", account, deployment_id, i))

    async def _stop_replicas(self, account: str, deployment_id: str, indexes: range | list[int]) -> None:
        await asyncio.gather(*(self.cp.supervisor.stop(WorkerKey("replica", account, deployment_id, i))
                               for i in indexes))

    async def reconcile(self, account: str, deployment_id: str) -> bool:
        """Run exactly `maxReplicaCount` healthy replicas; new ones replay the snapshot chain first.
        Returns whether every replica is ready."""
        supervisor = self.cp.supervisor
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            try:
                dep = self.get(account, deployment_id)
            except NotFoundError:
                return True
            desired = dep.max_replica_count
            extra = [r.index for r in dep.replicas if r.index >= desired]
            await self._stop_replicas(account, deployment_id, extra)
            keep = {r.index: r for r in dep.replicas if r.index < desired and r.state == DEP_READY
                    and supervisor.get(WorkerKey("replica", account, deployment_id, r.index))}
            missing = [i for i in range(desired) if i not in keep]
            await self._stop_replicas(account, deployment_id, missing)
            dep.replicas = sorted([*keep.values(), *(Replica(index=i) for i in missing)], key=lambda r: r.index)
            if missing:
                # CREATING stays until the first replica is up; DEGRADED while a restart runs beside a
                # serving replica; otherwise the deployment is UPDATING until every replica is ready.
                if dep.state not in (DEP_CREATING, DEP_DEGRADED) or not keep:
                    dep.state = DEP_CREATING if dep.state == DEP_CREATING else DEP_UPDATING
                self.save(account, dep)
            started = await asyncio.gather(*(self._start_replica(account, dep, i) for i in missing),
                                           return_exceptions=True)
            errors = []
            for index, result in zip(missing, started, strict=True):
                replica = next(r for r in dep.replicas if r.index == index)
                if isinstance(result, BaseException):
                    replica.state, replica.message = DEP_FAILED, str(result)
                    errors.append(f"replica {index}: {result}")
                else:
                    replica.state, replica.url, replica.pid, replica.message = DEP_READY, result[0], result[1], ""
                    replica.health_url = result[2]
                    self._started[(account, deployment_id, index)] = time.monotonic()
            if not errors:
                dep.state, dep.status = DEP_READY, Status()
            elif any(r.state == DEP_READY for r in dep.replicas):
                dep.state, dep.status = DEP_DEGRADED, Status(code="UNAVAILABLE", message="; ".join(errors))
            else:
                dep.state, dep.status = DEP_FAILED, Status(code="INTERNAL", message="; ".join(errors))
            self.save(account, dep)
            return not errors

    async def _start_replica(self, account: str, dep: Deployment, index: int) -> tuple[str, int, str | None]:
        key = WorkerKey("replica", account, dep.deployment_id, index)
        args = ["--store-dir", str(self.cp.layout.store), "--base-model", dep.base_model,
                "--deployment-id", dep.deployment_id, "--replica-index", str(index)]
        shape = deployment_shape(dep.deployment_shape)
        if shape is not None:
            args += ["--max-running-seqs", str(shape.deployment.max_running_seqs),
                     "--max-cached-tokens", str(shape.deployment.max_cached_tokens)]
        if dep.engine == "embedded":  # the vLLM worker has its own dtype handling (float32 on CPU)
            args += ["--device", dep.device, "--dtype", dep.dtype]
        args += engines.replica_args(dep.engine, self.cp.layout.root, account, dep.deployment_id, index)
        timeout = engines.ready_timeout(dep.engine, self.cp.settings.ready_timeout, self.cp.settings.vllm_ready_timeout)
        worker = await self.cp.supervisor.start(key, engines.replica_module(dep.engine), args,
                                                threads=dep.threads_per_replica, ready_timeout=timeout)
        try:
            await self.cp.hot_loads.replay(worker.url, dep.snapshot_chain)
        except BaseException:
            await self.cp.supervisor.stop(key)
            raise
        return worker.url, worker.pid, worker.health_url

    async def replica_lost(self, key: WorkerKey, reason: str) -> None:
        """A replica died: mark it, read DEGRADED while another serves (FAILED if none does), and
        restart it after a backoff."""
        account, deployment_id, index = key.account, key.resource_id, key.index
        slot = (account, deployment_id, index)
        if time.monotonic() - self._started.get(slot, 0.0) > _STABLE_S:
            self._restarts.pop(slot, None)
        attempt = self._restarts.get(slot, 0) + 1
        settings = self.cp.settings
        retry = attempt <= settings.replica_restart_attempts
        delay = min(settings.replica_restart_backoff_max_s, settings.replica_restart_backoff_s * 2 ** (attempt - 1))
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            try:
                dep = self.get(account, deployment_id)
            except NotFoundError:
                return
            for replica in dep.replicas:
                if replica.index == index:
                    replica.state, replica.message, replica.url, replica.pid = DEP_FAILED, reason, None, None
            note = f"; restarting it in {delay:g}s (attempt {attempt} of {settings.replica_restart_attempts})" \
                if retry else f"; not restarted after {settings.replica_restart_attempts} attempts"
            serving = any(r.state == DEP_READY for r in dep.replicas)
            dep.state = DEP_DEGRADED if serving else DEP_FAILED
            dep.status = Status(code="UNAVAILABLE" if serving else "INTERNAL", message=f"replica {index}: {reason}{note}")
            self.save(account, dep)
        if not retry:
            return
        self._restarts[slot] = attempt
        await asyncio.sleep(delay)
        with contextlib.suppress(NotFoundError):
            log.info("replica_restart", deployment=self.name(account, deployment_id), index=index, attempt=attempt)
            if not await self.reconcile(account, deployment_id):
                # The restart itself failed: count it and try again later, within the same bound.
                self.cp.spawn(self.replica_lost(key, f"restart attempt {attempt} failed"), f"restart-{key}")
