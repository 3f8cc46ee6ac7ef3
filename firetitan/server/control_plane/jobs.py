"""Trainer jobs: create, launch, resume, delete, idle stop and crash marking of trainer workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from firetitan.devices import DEFAULT_DEVICE, DEFAULT_DTYPE
from firetitan.errors import ConflictError, FiretitanError, InvalidRequestError, NotFoundError
from firetitan.logging import get_logger
from firetitan.server.control_plane.resources import (
    JOB_CREATING,
    JOB_DELETED,
    JOB_FAILED,
    JOB_PAUSED,
    JOB_RUNNING,
    TRAINER,
    CreateTrainerJobRequest,
    Status,
    TrainerJob,
    TrainingConfig,
    check_resource_id,
    now_rfc3339,
    parse_duration,
)
from firetitan.server.control_plane.shapes import TrainingShape, local_base_model, resolve_shape
from firetitan.server.control_plane.supervisor import TRAINER_MODULE, WorkerKey, kill_leftover
from firetitan.server.process import WorkerProcess

if TYPE_CHECKING:
    from firetitan.server.control_plane.controller import ControlPlane, Settings

log = get_logger("firetitan.control_plane.jobs")


class TrainerJobs:
    """The trainer-job records and their workers; every change of one job holds that job's lock."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._activity: dict[tuple[str, str], float] = {}
        self._inflight: defaultdict[tuple[str, str], int] = defaultdict(int)

    async def recover(self) -> None:
        """After a restart: a running job whose worker outlived the old control plane (and still answers
        with this key) is adopted; otherwise the worker is gone and the job becomes FAILED (resumable)."""
        for raw in self.cp.store.list(TRAINER):
            job = TrainerJob.model_validate(raw)
            if job.state not in (JOB_CREATING, JOB_RUNNING):
                continue
            account = _account(job.name)
            if job.state == JOB_RUNNING and await self.cp.supervisor.adoptable(
                    TRAINER_MODULE, job.pid, job.trainer_url, expect={"status": "ok"}, health_url=job.health_url):
                assert job.pid is not None and job.trainer_url is not None
                self.cp.supervisor.adopt(WorkerKey(TRAINER, account, job.job_id), TRAINER_MODULE,
                                         WorkerProcess(url=job.trainer_url, pid=job.pid, popen=None,
                                                       ready={"health_url": job.health_url}))
                self._activity[(account, job.job_id)] = time.monotonic()
                continue
            kill_leftover(job.pid, TRAINER_MODULE)
            job.state = JOB_FAILED
            job.status = Status(code="UNAVAILABLE", message="the control plane restarted and the trainer "
                                "worker is gone; POST :resume to start it again")
            job.trainer_url, job.pid = None, None
            self.save(account, job)

    @staticmethod
    def name(account: str, job_id: str) -> str:
        return f"accounts/{account}/rlorTrainerJobs/{job_id}"

    def get(self, account: str, job_id: str) -> TrainerJob:
        raw = self.cp.store.get(TRAINER, account, job_id)
        if raw is None:
            raise NotFoundError(f"trainer job {self.name(account, job_id)!r} not found", field="rlorTrainerJobId")
        return TrainerJob.model_validate(raw)

    def list(self, account: str | None) -> list[TrainerJob]:
        return [TrainerJob.model_validate(r) for r in self.cp.store.list(TRAINER, account)]

    def save(self, account: str, job: TrainerJob) -> None:
        job.update_time = now_rfc3339()
        self.cp.store.put(TRAINER, account, job.job_id, job.wire())

    async def create(self, account: str, req: CreateTrainerJobRequest, job_id: str | None,
                     shape_name: str | None) -> TrainerJob:
        from firetitan.server.control_plane.controller import split_threads

        job_id = check_resource_id(job_id, "rlorTrainerJobId") if job_id else f"trainer-{secrets.token_hex(4)}"
        async with self.cp.lock(TRAINER, account, job_id):
            existing = self.cp.store.get(TRAINER, account, job_id)
            if existing is not None and existing.get("state") != JOB_DELETED:
                raise ConflictError(f"trainer job {self.name(account, job_id)!r} already exists "
                                    f"(state {existing.get('state')})", field="rlorTrainerJobId")
            shape_name = shape_name or req.training_shape
            home = self.cp.layout.root
            shape = resolve_shape(shape_name, "trainingShape", home) if shape_name else None
            config = _resolve_training_config(req.training_config, shape, home, self.cp.settings)
            threads, _ = split_threads(self.cp.settings.cpus, 1, self.cp.settings.trainer_threads)
            job = TrainerJob(
                name=self.name(account, job_id), display_name=req.display_name, training_config=config,
                training_shape=shape.name if shape else None, forward_only=req.forward_only,
                threads=(shape.trainer_threads if shape and shape.trainer_threads else threads),
                inactivity_timeout_s=parse_duration(req.inactivity_timeout, "inactivityTimeout"),
                status=Status(message="starting the trainer worker"))
            self.save(account, job)
        self.cp.spawn(self._launch(account, job_id), f"launch-{job.name}")
        return job

    async def _launch(self, account: str, job_id: str) -> None:
        async with self.cp.lock(TRAINER, account, job_id):
            job = self.get(account, job_id)
            if job.state != JOB_CREATING:
                return
            layout = self.cp.layout
            state_dir = layout.trainer_state_dir(account, job_id)
            state_dir.mkdir(parents=True, exist_ok=True)
            args = ["--store-dir", str(layout.store), "--state-dir", str(state_dir),
                    "--base-model", str(job.training_config.base_model),
                    "--lora-rank", str(job.training_config.lora_rank), "--job-id", job_id]
            if job.forward_only:
                args.append("--forward-only")
            if job.training_config.world_size > 1:
                args += ["--world-size", str(job.training_config.world_size)]
            args += ["--device", job.training_config.device or DEFAULT_DEVICE,
                     "--dtype", job.training_config.dtype or DEFAULT_DTYPE]
            try:
                worker = await self.cp.supervisor.start(WorkerKey(TRAINER, account, job_id), TRAINER_MODULE, args,
                                                        threads=job.threads)
            except FiretitanError as exc:
                job.state, job.status = JOB_FAILED, Status(code="INTERNAL", message=str(exc))
                self.save(account, job)
                return
            job.state, job.status = JOB_RUNNING, Status(message="")
            job.trainer_url, job.pid, job.health_url = worker.url, worker.pid, worker.health_url
            self._activity[(account, job_id)] = time.monotonic()
            self.save(account, job)

    async def delete(self, account: str, job_id: str) -> TrainerJob:
        # A launch holds the job's lock until its worker is ready (model load: up to minutes); a
        # delete meanwhile (a client interrupted while provisioning) ends that startup instead.
        self.cp.supervisor.abort_start(WorkerKey(TRAINER, account, job_id))
        async with self.cp.lock(TRAINER, account, job_id):
            job = self.get(account, job_id)
            await self.cp.supervisor.stop(WorkerKey(TRAINER, account, job_id))
            job.state, job.status = JOB_DELETED, Status(message="deleted")
            job.trainer_url, job.pid = None, None
            self.save(account, job)
        await self.cp.deployments.release_woken(account, job.name)
        return job

    async def resume(self, account: str, job_id: str) -> TrainerJob:
        async with self.cp.lock(TRAINER, account, job_id):
            job = self.get(account, job_id)
            if job.state in (JOB_CREATING, JOB_RUNNING):
                return job
            if job.state == JOB_DELETED:
                raise ConflictError(f"trainer job {job.name!r} was deleted and cannot be resumed",
                                    field="rlorTrainerJobId")
            job.state, job.status = JOB_CREATING, Status(message="resuming: starting the trainer worker")
            self.save(account, job)
        self.cp.spawn(self._launch(account, job_id), f"resume-{job.name}")
        return job

    @contextlib.contextmanager
    def activity(self, account: str, job_id: str) -> Iterator[None]:
        """Mark a request to the trainer as in flight, so the idle timer never stops a busy one."""
        key = (account, job_id)
        self._inflight[key] += 1
        self._activity[key] = time.monotonic()
        try:
            yield
        finally:
            self._inflight[key] -= 1
            self._activity[key] = time.monotonic()

    async def idle_loop(self) -> None:
        settings = self.cp.settings
        while True:
            await asyncio.sleep(settings.idle_check_interval)
            if self._idle_long_enough():
                log.info("control_plane_idle_exit", idle_s=round(time.monotonic() - self.cp.last_request))
                os.kill(os.getpid(), signal.SIGTERM)  # the server's normal shutdown path
                return
            for job in self.list(None):
                if job.state != JOB_RUNNING:
                    continue
                key = (_account(job.name), job.job_id)
                timeout = job.inactivity_timeout_s or settings.trainer_idle_timeout
                last = self._activity.setdefault(key, time.monotonic())
                if self._inflight[key] == 0 and time.monotonic() - last > timeout:
                    await self._pause_idle(*key, timeout)

    def _idle_long_enough(self) -> bool:
        limit = self.cp.settings.exit_when_idle
        return (limit > 0 and not self.cp.supervisor.workers()
                and time.monotonic() - self.cp.last_request > limit)

    async def _pause_idle(self, account: str, job_id: str, timeout: float) -> None:
        async with self.cp.lock(TRAINER, account, job_id):
            job = self.get(account, job_id)
            if job.state != JOB_RUNNING or self._inflight[(account, job_id)]:
                return
            await self.cp.supervisor.stop(WorkerKey(TRAINER, account, job_id))
            job.state = JOB_PAUSED
            job.status = Status(code="DEADLINE_EXCEEDED", message=f"stopped after {timeout:.0f}s without "
                                "requests; POST :resume to start it again")
            job.trainer_url, job.pid = None, None
            self.save(account, job)
            log.info("trainer_idle_stopped", job=job.name, timeout_s=timeout)

    async def worker_lost(self, key: WorkerKey, reason: str) -> None:
        async with self.cp.lock(TRAINER, key.account, key.resource_id):
            with contextlib.suppress(NotFoundError):
                job = self.get(key.account, key.resource_id)
                if job.state in (JOB_RUNNING, JOB_CREATING):
                    job.state, job.status = JOB_FAILED, Status(code="INTERNAL", message=reason)
                    job.trainer_url, job.pid = None, None
                    self.save(key.account, job)


def _account(name: str) -> str:
    return name.split("/")[1]


def _resolve_training_config(config: TrainingConfig, shape: TrainingShape | None, home: Path,
                             settings: Settings) -> TrainingConfig:
    # Hosted names resolve here, once: the record and the worker's --base-model hold the local model.
    base_model = local_base_model(config.base_model, home, "trainingConfig.baseModel") if config.base_model \
        else (shape.base_model if shape else None)
    if not base_model:
        raise InvalidRequestError("trainingConfig.baseModel is required when no trainingShape is given",
                                  field="trainingConfig.baseModel")
    if shape is not None and base_model != shape.base_model:
        raise InvalidRequestError(f"trainingConfig.baseModel {base_model!r} does not match training shape "
                                  f"{shape.name!r}, which trains {shape.base_model!r}",
                                  field="trainingConfig.baseModel")
    if config.world_size > 1 and config.lora_rank:
        raise InvalidRequestError(f"trainingConfig.worldSize {config.world_size} needs trainingConfig.loraRank 0: "
                                  "a data-parallel trainer trains full parameters only (or use worldSize 1)",
                                  field="trainingConfig.worldSize")
    max_ctx = config.max_context_length or (shape.max_context_length if shape else None)
    device = config.device or settings.device or (shape.device if shape else DEFAULT_DEVICE)
    dtype = config.dtype or settings.dtype or (shape.dtype if shape else DEFAULT_DTYPE)
    return config.model_copy(update={"base_model": base_model, "max_context_length": max_ctx,
                                     "device": device, "dtype": dtype})
