"""The control plane's resource logic: trainer jobs and deployments, their workers, and their states."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from firetitan.errors import (
    APIStatusError,
    ConflictError,
    FiretitanError,
    InvalidRequestError,
    NotFoundError,
    SnapshotError,
    from_response,
)
from firetitan.logging import get_logger
from firetitan.server.control_plane.home import HomeLayout
from firetitan.server.control_plane.resources import (
    DEP_CREATING,
    DEP_FAILED,
    DEP_READY,
    DEP_UPDATING,
    JOB_CREATING,
    JOB_DELETED,
    JOB_FAILED,
    JOB_PAUSED,
    JOB_RUNNING,
    CreateDeploymentRequest,
    CreateTrainerJobRequest,
    Deployment,
    HotLoadRecord,
    HotLoadRequest,
    Replica,
    Status,
    TrainerJob,
    TrainingConfig,
    UpdateDeploymentRequest,
    check_resource_id,
    now_rfc3339,
    parse_duration,
)
from firetitan.server.control_plane.router import ReplicaRouter
from firetitan.server.control_plane.shapes import SHAPES, TrainingShape, resolve_shape
from firetitan.server.control_plane.state import StateStore
from firetitan.server.control_plane.supervisor import (
    DEPLOYMENT_MODULE,
    TRAINER_MODULE,
    Supervisor,
    WorkerKey,
)
from firetitan.server.process import pid_alive, stop_pid

log = get_logger("firetitan.control_plane")

TRAINER = "trainer"
DEPLOYMENT = "deployment"
HOT_LOAD_PATH = "/hot_load/v1/models/hot_load"


@dataclass
class Settings:
    """Knobs of one control plane; the defaults suit a laptop."""

    trainer_idle_timeout: float = 3600.0
    health_interval: float = 2.0
    idle_check_interval: float = 5.0
    ready_timeout: float = 300.0
    hot_load_timeout: float = 600.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    trainer_threads: int | None = None
    replica_threads: int | None = None
    worker_host: str = "127.0.0.1"
    # The embedded daemon stops itself after this long with no workers and no requests (0 = never),
    # so `make demo` or a notebook does not leave a process behind for good.
    exit_when_idle: float = 0.0


def split_threads(cpus: int, replicas: int, trainer: int | None = None,
                  replica: int | None = None) -> tuple[int, int]:
    """Torch threads for (the trainer, each replica) so training and sampling overlap on few cores:
    the trainer takes half the cores, the replicas share the rest."""
    trainer_threads = trainer or max(1, cpus // 2)
    rest = max(1, cpus - trainer_threads)
    return trainer_threads, replica or max(1, rest // max(1, replicas))


class ControlPlane:
    """Owns the state store and the supervisor; every mutation of one resource holds its lock."""

    def __init__(self, layout: HomeLayout, settings: Settings, api_key: str | None) -> None:
        self.layout = layout.ensure()
        self.settings = settings
        self.api_key = api_key
        self.store = StateStore(layout.state_db)
        self.router = ReplicaRouter()
        self.supervisor = Supervisor(
            logs_dir=layout.logs, api_key=api_key, on_exit=self._on_worker_exit,
            health_interval=settings.health_interval, ready_timeout=settings.ready_timeout,
            host=settings.worker_host)
        self._locks: defaultdict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._activity: dict[tuple[str, str], float] = {}
        self._inflight: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._session: aiohttp.ClientSession | None = None
        self.last_request = time.monotonic()

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
        self._recover()
        self._spawn(self.supervisor.run(), "supervisor")
        self._spawn(self._idle_loop(), "idle-trainers")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.stop_all()
        if self._session is not None:
            await self._session.close()
        self.store.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "ControlPlane.start() was not called"
        return self._session

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))

    def _lock(self, kind: str, account: str, rid: str) -> asyncio.Lock:
        return self._locks[(kind, account, rid)]

    def _recover(self) -> None:
        """After a restart the records are all there but the workers died with the old process:
        trainers become FAILED (resumable), deployments restart their replicas."""
        for raw in self.store.list(TRAINER):
            job = TrainerJob.model_validate(raw)
            account = job.name.split("/")[1]
            if job.state in (JOB_CREATING, JOB_RUNNING):
                _kill_leftover(job.pid, TRAINER_MODULE)
                job.state = JOB_FAILED
                job.status = Status(code="UNAVAILABLE", message="the control plane restarted and the trainer "
                                    "worker is gone; POST :resume to start it again")
                job.trainer_url, job.pid = None, None
                self._save_job(account, job)
        for raw in self.store.list(DEPLOYMENT):
            dep = Deployment.model_validate(raw)
            account = dep.name.split("/")[1]
            for replica in dep.replicas:
                _kill_leftover(replica.pid, DEPLOYMENT_MODULE)
            dep.replicas = []
            dep.state = DEP_UPDATING if dep.max_replica_count > 0 else DEP_READY
            self._save_dep(account, dep)
            if dep.max_replica_count > 0:
                self._spawn(self._reconcile_deployment(account, dep.deployment_id), f"recover-{dep.name}")

    # trainer jobs ----------------------------------------------------------------------------

    def _job_name(self, account: str, job_id: str) -> str:
        return f"accounts/{account}/rlorTrainerJobs/{job_id}"

    def get_job(self, account: str, job_id: str) -> TrainerJob:
        raw = self.store.get(TRAINER, account, job_id)
        if raw is None:
            raise NotFoundError(f"trainer job {self._job_name(account, job_id)!r} not found", field="rlorTrainerJobId")
        return TrainerJob.model_validate(raw)

    def list_jobs(self, account: str | None) -> list[TrainerJob]:
        return [TrainerJob.model_validate(r) for r in self.store.list(TRAINER, account)]

    def _save_job(self, account: str, job: TrainerJob) -> None:
        job.update_time = now_rfc3339()
        self.store.put(TRAINER, account, job.job_id, job.wire())

    async def create_job(self, account: str, req: CreateTrainerJobRequest, job_id: str | None,
                         shape_name: str | None) -> TrainerJob:
        job_id = check_resource_id(job_id, "rlorTrainerJobId") if job_id else f"trainer-{secrets.token_hex(4)}"
        async with self._lock(TRAINER, account, job_id):
            existing = self.store.get(TRAINER, account, job_id)
            if existing is not None and existing.get("state") != JOB_DELETED:
                raise ConflictError(f"trainer job {self._job_name(account, job_id)!r} already exists "
                                    f"(state {existing.get('state')})", field="rlorTrainerJobId")
            shape_name = shape_name or req.training_shape
            shape = resolve_shape(shape_name, "trainingShape") if shape_name else None
            config = _resolve_training_config(req.training_config, shape)
            threads, _ = split_threads(self.settings.cpus, 1, self.settings.trainer_threads)
            job = TrainerJob(
                name=self._job_name(account, job_id), display_name=req.display_name, training_config=config,
                training_shape=shape.name if shape else None, forward_only=req.forward_only,
                threads=(shape.trainer_threads if shape and shape.trainer_threads else threads),
                inactivity_timeout_s=parse_duration(req.inactivity_timeout, "inactivityTimeout"),
                status=Status(message="starting the trainer worker"))
            self._save_job(account, job)
        self._spawn(self._launch_job(account, job_id), f"launch-{job.name}")
        return job

    async def _launch_job(self, account: str, job_id: str) -> None:
        async with self._lock(TRAINER, account, job_id):
            job = self.get_job(account, job_id)
            if job.state != JOB_CREATING:
                return
            state_dir = self.layout.trainer_state_dir(account, job_id)
            state_dir.mkdir(parents=True, exist_ok=True)
            args = ["--store-dir", str(self.layout.store), "--state-dir", str(state_dir),
                    "--base-model", str(job.training_config.base_model),
                    "--lora-rank", str(job.training_config.lora_rank), "--job-id", job_id]
            if job.forward_only:
                args.append("--forward-only")
            try:
                worker = await self.supervisor.start(WorkerKey(TRAINER, account, job_id), TRAINER_MODULE, args,
                                                     threads=job.threads)
            except FiretitanError as exc:
                job.state, job.status = JOB_FAILED, Status(code="INTERNAL", message=str(exc))
                self._save_job(account, job)
                return
            job.state, job.status = JOB_RUNNING, Status(message="")
            job.trainer_url, job.pid = worker.url, worker.pid
            self._activity[(account, job_id)] = time.monotonic()
            self._save_job(account, job)

    async def delete_job(self, account: str, job_id: str) -> TrainerJob:
        async with self._lock(TRAINER, account, job_id):
            job = self.get_job(account, job_id)
            await self.supervisor.stop(WorkerKey(TRAINER, account, job_id))
            job.state, job.status = JOB_DELETED, Status(message="deleted")
            job.trainer_url, job.pid = None, None
            self._save_job(account, job)
            return job

    async def resume_job(self, account: str, job_id: str) -> TrainerJob:
        async with self._lock(TRAINER, account, job_id):
            job = self.get_job(account, job_id)
            if job.state in (JOB_CREATING, JOB_RUNNING):
                return job
            if job.state == JOB_DELETED:
                raise ConflictError(f"trainer job {job.name!r} was deleted and cannot be resumed",
                                    field="rlorTrainerJobId")
            job.state, job.status = JOB_CREATING, Status(message="resuming: starting the trainer worker")
            self._save_job(account, job)
        self._spawn(self._launch_job(account, job_id), f"resume-{job.name}")
        return job

    @contextlib.contextmanager
    def trainer_activity(self, account: str, job_id: str) -> Iterator[None]:
        """Mark a request to the trainer as in flight, so the idle timer never stops a busy one."""
        key = (account, job_id)
        self._inflight[key] += 1
        self._activity[key] = time.monotonic()
        try:
            yield
        finally:
            self._inflight[key] -= 1
            self._activity[key] = time.monotonic()

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_check_interval)
            if self._idle_long_enough():
                log.info("control_plane_idle_exit", idle_s=round(time.monotonic() - self.last_request))
                os.kill(os.getpid(), signal.SIGTERM)  # the server's normal shutdown path
                return
            for job in self.list_jobs(None):
                if job.state != JOB_RUNNING:
                    continue
                account = job.name.split("/")[1]
                key = (account, job.job_id)
                timeout = job.inactivity_timeout_s or self.settings.trainer_idle_timeout
                last = self._activity.setdefault(key, time.monotonic())
                if self._inflight[key] == 0 and time.monotonic() - last > timeout:
                    await self._pause_idle(account, job.job_id, timeout)

    def _idle_long_enough(self) -> bool:
        limit = self.settings.exit_when_idle
        return (limit > 0 and not self.supervisor.workers()
                and time.monotonic() - self.last_request > limit)

    async def _pause_idle(self, account: str, job_id: str, timeout: float) -> None:
        async with self._lock(TRAINER, account, job_id):
            job = self.get_job(account, job_id)
            if job.state != JOB_RUNNING or self._inflight[(account, job_id)]:
                return
            await self.supervisor.stop(WorkerKey(TRAINER, account, job_id))
            job.state = JOB_PAUSED
            job.status = Status(code="DEADLINE_EXCEEDED", message=f"stopped after {timeout:.0f}s without "
                                "requests; POST :resume to start it again")
            job.trainer_url, job.pid = None, None
            self._save_job(account, job)
            log.info("trainer_idle_stopped", job=job.name, timeout_s=timeout)

    async def _on_worker_exit(self, key: WorkerKey, reason: str) -> None:
        # Runs inside the supervisor's check loop: hand off so a held resource lock cannot stall it.
        self._spawn(self._mark_lost(key, reason), f"lost-{key}")

    async def _mark_lost(self, key: WorkerKey, reason: str) -> None:
        if key.kind == TRAINER:
            async with self._lock(TRAINER, key.account, key.resource_id):
                with contextlib.suppress(NotFoundError):
                    job = self.get_job(key.account, key.resource_id)
                    if job.state in (JOB_RUNNING, JOB_CREATING):
                        job.state, job.status = JOB_FAILED, Status(code="INTERNAL", message=reason)
                        job.trainer_url, job.pid = None, None
                        self._save_job(key.account, job)
            return
        async with self._lock(DEPLOYMENT, key.account, key.resource_id):
            with contextlib.suppress(NotFoundError):
                dep = self.get_deployment(key.account, key.resource_id)
                for replica in dep.replicas:
                    if replica.index == key.index:
                        replica.state, replica.message, replica.url, replica.pid = DEP_FAILED, reason, None, None
                dep.state, dep.status = DEP_FAILED, Status(code="INTERNAL", message=reason)
                self._save_dep(key.account, dep)

    # deployments -----------------------------------------------------------------------------

    def _dep_name(self, account: str, deployment_id: str) -> str:
        return f"accounts/{account}/deployments/{deployment_id}"

    def get_deployment(self, account: str, deployment_id: str) -> Deployment:
        raw = self.store.get(DEPLOYMENT, account, deployment_id)
        if raw is None:
            raise NotFoundError(f"deployment {self._dep_name(account, deployment_id)!r} not found",
                                field="deploymentId")
        return Deployment.model_validate(raw)

    def list_deployments(self, account: str | None) -> list[Deployment]:
        return [Deployment.model_validate(r) for r in self.store.list(DEPLOYMENT, account)]

    def _save_dep(self, account: str, dep: Deployment) -> None:
        dep.update_time = now_rfc3339()
        self.store.put(DEPLOYMENT, account, dep.deployment_id, dep.wire())

    async def create_deployment(self, account: str, req: CreateDeploymentRequest,
                                deployment_id: str | None) -> Deployment:
        if deployment_id:
            deployment_id = check_resource_id(deployment_id, "deploymentId")
        else:
            deployment_id = f"deployment-{secrets.token_hex(4)}"
        _check_base_model(req.base_model, "baseModel")
        shape = _deployment_shape(req.deployment_shape)
        if shape is not None and shape.base_model != req.base_model:
            raise InvalidRequestError(f"deploymentShape {req.deployment_shape!r} serves {shape.base_model!r}, "
                                      f"not baseModel {req.base_model!r}", field="deploymentShape")
        async with self._lock(DEPLOYMENT, account, deployment_id):
            existing = self.store.get(DEPLOYMENT, account, deployment_id)
            if existing is not None and existing.get("state") != DEP_FAILED:
                raise ConflictError(f"deployment {self._dep_name(account, deployment_id)!r} already exists",
                                    field="deploymentId")
            await self._stop_replicas(account, deployment_id, range(16))
            replicas = max(req.min_replica_count, req.max_replica_count)
            _, per_replica = split_threads(self.settings.cpus, replicas, self.settings.trainer_threads,
                                           self.settings.replica_threads)
            dep = Deployment(
                name=self._dep_name(account, deployment_id), display_name=req.display_name,
                description=req.description, base_model=req.base_model,
                deployment_shape=shape.deployment.name if shape else None,
                min_replica_count=replicas, max_replica_count=replicas,
                hot_load_trainer_job=req.hot_load_trainer_job, threads_per_replica=per_replica,
                state=DEP_CREATING if replicas else DEP_READY)
            self._save_dep(account, dep)
        self._spawn(self._reconcile_deployment(account, deployment_id), f"create-{dep.name}")
        return dep

    async def update_deployment(self, account: str, deployment_id: str, req: UpdateDeploymentRequest) -> Deployment:
        async with self._lock(DEPLOYMENT, account, deployment_id):
            dep = self.get_deployment(account, deployment_id)
            desired = req.max_replica_count if req.max_replica_count is not None else req.min_replica_count
            if desired is not None:
                dep.min_replica_count = dep.max_replica_count = desired
                _, dep.threads_per_replica = split_threads(self.settings.cpus, desired,
                                                           self.settings.trainer_threads,
                                                           self.settings.replica_threads)
                dep.state = DEP_UPDATING
            if req.hot_load_trainer_job is not None:
                dep.hot_load_trainer_job = req.hot_load_trainer_job
            if req.display_name is not None:
                dep.display_name = req.display_name
            self._save_dep(account, dep)
            scale_down = desired is not None and desired <= len(dep.replicas)
        if scale_down:
            # Stopping is quick: do it before answering so "scaled to zero" means no process is left.
            await self._reconcile_deployment(account, deployment_id)
            return self.get_deployment(account, deployment_id)
        self._spawn(self._reconcile_deployment(account, deployment_id), f"scale-{dep.name}")
        return dep

    async def delete_deployment(self, account: str, deployment_id: str) -> None:
        async with self._lock(DEPLOYMENT, account, deployment_id):
            self.get_deployment(account, deployment_id)
            await self._stop_replicas(account, deployment_id, range(16))
            self.store.delete(DEPLOYMENT, account, deployment_id)
            self.router.forget(self._dep_name(account, deployment_id))

    async def _stop_replicas(self, account: str, deployment_id: str, indexes: range | list[int]) -> None:
        await asyncio.gather(*(self.supervisor.stop(WorkerKey("replica", account, deployment_id, i))
                               for i in indexes))

    async def _reconcile_deployment(self, account: str, deployment_id: str) -> None:
        """Run exactly `maxReplicaCount` healthy replicas; new ones replay the snapshot chain first."""
        async with self._lock(DEPLOYMENT, account, deployment_id):
            try:
                dep = self.get_deployment(account, deployment_id)
            except NotFoundError:
                return
            desired = dep.max_replica_count
            extra = [r.index for r in dep.replicas if r.index >= desired]
            await self._stop_replicas(account, deployment_id, extra)
            keep = {r.index: r for r in dep.replicas if r.index < desired and r.state == DEP_READY
                    and self.supervisor.get(WorkerKey("replica", account, deployment_id, r.index))}
            missing = [i for i in range(desired) if i not in keep]
            await self._stop_replicas(account, deployment_id, missing)
            dep.replicas = [*keep.values(), *(Replica(index=i) for i in missing)]
            dep.replicas.sort(key=lambda r: r.index)
            if missing:
                dep.state = DEP_CREATING if not keep else DEP_UPDATING
                self._save_dep(account, dep)
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
            if errors:
                dep.state, dep.status = DEP_FAILED, Status(code="INTERNAL", message="; ".join(errors))
            else:
                dep.state, dep.status = DEP_READY, Status()
            self._save_dep(account, dep)

    async def _start_replica(self, account: str, dep: Deployment, index: int) -> tuple[str, int]:
        key = WorkerKey("replica", account, dep.deployment_id, index)
        args = ["--store-dir", str(self.layout.store), "--base-model", dep.base_model,
                "--deployment-id", dep.deployment_id, "--replica-index", str(index)]
        shape = _deployment_shape(dep.deployment_shape)
        if shape is not None:
            args += ["--max-running-seqs", str(shape.deployment.max_running_seqs),
                     "--max-cached-tokens", str(shape.deployment.max_cached_tokens)]
        worker = await self.supervisor.start(key, DEPLOYMENT_MODULE, args, threads=dep.threads_per_replica)
        try:
            for record in dep.snapshot_chain:
                await self._replica_hot_load(worker.url, _replay_body(record))
                await self._wait_replica_identity(worker.url, record.identity, self.settings.hot_load_timeout)
        except BaseException:
            await self.supervisor.stop(key)
            raise
        return worker.url, worker.pid

    # hot load --------------------------------------------------------------------------------

    async def hot_load(self, account: str, deployment_id: str, req: HotLoadRequest) -> dict[str, Any]:
        """Load one snapshot into every replica; remember it so later replicas load it too."""
        async with self._lock(DEPLOYMENT, account, deployment_id):
            dep = self.get_deployment(account, deployment_id)
            ready = [r for r in dep.replicas if r.state == DEP_READY and r.url]
            if not ready:
                raise ConflictError(f"deployment {dep.name!r} has no ready replicas (state {dep.state}, "
                                    f"maxReplicaCount {dep.max_replica_count}); scale it up before hot-loading",
                                    field="deploymentId")
            # Each replica checks that a delta applies to the base it holds; this only keeps the record.
            previous = req.incremental_snapshot_metadata.previous_snapshot_identity \
                if req.incremental_snapshot_metadata else None
            body = req.model_dump(mode="json", exclude_none=True)
            if previous is None and (previous := self._delta_base(req.identity)) is not None:
                # A client may leave the base out (one request per sync); the record needs it so that
                # a replica started later loads the base before this delta.
                body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": previous}
            results = await asyncio.gather(*(self._replica_hot_load(r.url or "", body) for r in ready),
                                           return_exceptions=True)
            failures = [(r.index, res) for r, res in zip(ready, results, strict=True)
                        if isinstance(res, BaseException)]
            if failures:
                index, first = failures[0]
                if isinstance(first, FiretitanError):
                    first.message = f"replica {index}: {first.message}"
                    raise first
                raise APIStatusError(f"hot-load failed on replica {index}: {first!r}", status_code=502)
            dep.snapshot_chain = _next_chain(dep.snapshot_chain, HotLoadRecord(
                identity=req.identity, previous_snapshot_identity=previous))
            self._save_dep(account, dep)
            return {"identity": req.identity, "deployment": dep.name, "replica_count": dep.max_replica_count,
                    "replicas": [{"replica_index": r.index, **_replica_status(res)}
                                 for r, res in zip(ready, results, strict=True)]}

    def _delta_base(self, identity: str) -> str | None:
        """The base a stored delta snapshot applies to; None for other kinds or unknown identities."""
        from firetitan.checkpoints import SnapshotStore  # torch-heavy: only once snapshots are in play

        try:
            manifest = SnapshotStore(self.layout.store).manifest(identity)
        except FiretitanError:
            return None  # unknown here: the replicas answer with the precise error
        return manifest.previous_snapshot_identity if manifest.kind == "delta" else None

    async def hot_load_status(self, account: str, deployment_id: str) -> dict[str, Any]:
        dep = self.get_deployment(account, deployment_id)
        ready = [r for r in dep.replicas if r.state == DEP_READY and r.url]

        async def one(replica: Replica) -> dict[str, Any]:
            try:
                status = await self._request_json("GET", f"{replica.url}{HOT_LOAD_PATH}", None, 10.0)
            except FiretitanError as exc:
                return {"replica_index": replica.index, "readiness": False, "error": exc.message}
            return {"replica_index": replica.index, **_replica_status(status)}

        replicas = await asyncio.gather(*(one(r) for r in ready))
        return {"deployment": dep.name, "current_snapshot_identity": dep.current_snapshot_identity,
                "replica_count": dep.max_replica_count, "replicas": list(replicas)}

    async def _replica_hot_load(self, url: str, body: dict[str, Any]) -> Any:
        return await self._request_json("POST", f"{url}{HOT_LOAD_PATH}", body, self.settings.hot_load_timeout)

    async def _wait_replica_identity(self, url: str, identity: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = _replica_status(await self._request_json("GET", f"{url}{HOT_LOAD_PATH}", None, 10.0))
            if status.get("current_snapshot_identity") == identity and status.get("readiness", True):
                return
            loading = status.get("loading_state") or {}
            if loading.get("stage") == "error" and loading.get("identity") == identity:
                raise SnapshotError(f"replica at {url} failed to load {identity!r}: {loading.get('error')}")
            if time.monotonic() > deadline:
                raise SnapshotError(f"replica at {url} did not load {identity!r} within {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def _request_json(self, method: str, url: str, body: Any, timeout: float) -> Any:
        try:
            async with self.session.request(method, url, json=body,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                payload = await resp.json(content_type=None) if resp.content_length != 0 else None
                if resp.status >= 400:
                    raise from_response(resp.status, payload)
                return payload
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise APIStatusError(f"{method} {url} failed: {type(exc).__name__}: {exc}", status_code=502) from exc

    # routing ---------------------------------------------------------------------------------

    def ready_replicas(self, account: str, deployment_id: str) -> dict[int, str]:
        dep = self.get_deployment(account, deployment_id)
        return {r.index: r.url for r in dep.replicas if r.state == DEP_READY and r.url}

    # checkpoints -----------------------------------------------------------------------------

    def trainer_state_dir(self, account: str, job_id: str) -> Path:
        return self.layout.trainer_state_dir(account, job_id)


def _resolve_training_config(config: TrainingConfig, shape: TrainingShape | None) -> TrainingConfig:
    base_model = config.base_model or (shape.base_model if shape else None)
    if not base_model:
        raise InvalidRequestError("trainingConfig.baseModel is required when no trainingShape is given",
                                  field="trainingConfig.baseModel")
    if shape is not None and base_model != shape.base_model:
        raise InvalidRequestError(f"trainingConfig.baseModel {base_model!r} does not match training shape "
                                  f"{shape.name!r}, which trains {shape.base_model!r}",
                                  field="trainingConfig.baseModel")
    _check_base_model(base_model, "trainingConfig.baseModel")
    max_ctx = config.max_context_length or (shape.max_context_length if shape else None)
    return config.model_copy(update={"base_model": base_model, "max_context_length": max_ctx})


def _check_base_model(name: str, field: str) -> None:
    """Fail the create request (not the worker, later) when the model cannot be found locally."""
    from firetitan.models import BUILTIN_MODELS

    if name in BUILTIN_MODELS or Path(name).expanduser().is_dir():
        return
    raise NotFoundError(f"{field} {name!r} is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) "
                        "nor a local Hugging Face model directory", field=field)


def _deployment_shape(name: str | None) -> TrainingShape | None:
    """Deployment shapes are named after their training shape: accounts/<a>/deploymentShapes/<id>."""
    if not name:
        return None
    shape_id = name.split("/versions/")[0].rsplit("/", 1)[-1]
    shape = SHAPES.get(shape_id)
    if shape is None:
        raise NotFoundError(f"deploymentShape {name!r} not found; known: "
                            + ", ".join(s.deployment.name for s in SHAPES.values()), field="deploymentShape")
    return shape


def _next_chain(chain: list[HotLoadRecord], record: HotLoadRecord) -> list[HotLoadRecord]:
    """What a fresh replica must load to serve `record`: the base its delta applies to, then it.
    Deltas are taken against a base (not against each other), so older deltas drop out."""
    if record.previous_snapshot_identity is None:
        return [record]
    bases = [r for r in chain if r.identity == record.previous_snapshot_identity]
    return [*bases[:1], record]


def _replay_body(record: HotLoadRecord) -> dict[str, Any]:
    meta = {"previous_snapshot_identity": record.previous_snapshot_identity} \
        if record.previous_snapshot_identity else None
    return {"identity": record.identity, "incremental_snapshot_metadata": meta,
            "reset_prompt_cache": True, "mode": "SYNC"}


def _replica_status(status: Any) -> dict[str, Any]:
    """A replica's hot-load status, flattened whether it reports itself at top level or as replicas[0]."""
    if not isinstance(status, dict):
        return {}
    replicas = status.get("replicas")
    if isinstance(replicas, list) and replicas and isinstance(replicas[0], dict):
        return {**{k: v for k, v in status.items() if k != "replicas"}, **replicas[0]}
    return status


def _kill_leftover(pid: int | None, module: str) -> None:
    """Stop a worker that outlived a crashed control plane, only if the pid still runs that module."""
    if not pid or not pid_alive(pid):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if module in cmdline:
        stop_pid(pid, timeout=5.0)
