"""`ControlPlane`: the thin owner of the state store, the supervisor, the replica router and the one
task group every background task of the control plane runs in; jobs, deployments and hot-load logic
live in their own modules and reach each other through it."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
from anyio.abc import TaskGroup

from firetitan.logging import get_logger
from firetitan.server.control_plane.deployments import Deployments
from firetitan.server.control_plane.home import HOME_ENV, HomeLayout
from firetitan.server.control_plane.hotload import HotLoads
from firetitan.server.control_plane.jobs import TrainerJobs
from firetitan.server.control_plane.provisioner import make_provisioner
from firetitan.server.control_plane.resources import TRAINER
from firetitan.server.control_plane.router import ReplicaRouter
from firetitan.server.control_plane.state import StateStore
from firetitan.server.control_plane.supervisor import Supervisor, WorkerKey
from firetitan.server.process import ADOPTER_FILE_ENV, PARENT_GRACE_ENV
from firetitan.transport import request_json

log = get_logger("firetitan.control_plane")

@dataclass
class Settings:
    """Knobs of one control plane; the defaults suit a laptop."""

    trainer_idle_timeout: float = 3600.0
    health_interval: float = 2.0
    idle_check_interval: float = 5.0
    ready_timeout: float = 300.0
    vllm_ready_timeout: float = 900.0  # `engine: vllm` replicas start a `vllm serve` child (minutes on CPU)
    hot_load_timeout: float = 600.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    trainer_threads: int | None = None
    replica_threads: int | None = None
    worker_host: str = "127.0.0.1"
    # The embedded daemon stops itself after this long with no workers and no requests (0 = never),
    # so `make demo` or a notebook does not leave a process behind for good.
    exit_when_idle: float = 0.0
    # A crashed replica is restarted after 2, 4, 8, ... seconds (capped), at most this many times in a row.
    replica_restart_attempts: int = 5
    replica_restart_backoff_s: float = 2.0
    replica_restart_backoff_max_s: float = 60.0
    # Workers outlive a crashed control plane this long; a control plane restarted on the same home
    # within it adopts the ones its records name (pid, url, key, identity), otherwise they stop.
    worker_grace_s: float = 15.0
    # Where workers run (control_plane/provisioner.py): "local" child processes, or "ray" actors on the
    # cluster at `ray_address` (None: a local Ray cluster started, and stopped, by this control plane).
    provisioner: str = "local"
    ray_address: str | None = None
    ray_gpus_per_worker: float = 0.0
    # `firetitan serve --device/--dtype`: this host's default for jobs and deployments that name none
    # (a request's own setting wins, then this, then its shape's, then auto / float32).
    device: str | None = None
    dtype: str | None = None


def split_threads(cpus: int, replicas: int, trainer: int | None = None,
                  replica: int | None = None) -> tuple[int, int]:
    """Torch threads for (the trainer, each replica) so training and sampling overlap on few cores:
    the trainer takes half the cores, the replicas share the rest."""
    trainer_threads = trainer or max(1, cpus // 2)
    rest = max(1, cpus - trainer_threads)
    return trainer_threads, replica or max(1, rest // max(1, replicas))


class ControlPlane:
    """Owns the store, the supervisor and the task group; every mutation of one resource holds its lock."""

    def __init__(self, layout: HomeLayout, settings: Settings, api_key: str | None) -> None:
        self.layout = layout.ensure()
        self.settings = settings
        self.api_key = api_key
        self.store = StateStore(layout.state_db)
        self.router = ReplicaRouter()
        self.supervisor = Supervisor(
            logs_dir=layout.logs, api_key=api_key, on_exit=self._on_worker_exit,
            health_interval=settings.health_interval, ready_timeout=settings.ready_timeout,
            host=settings.worker_host,
            provisioner=make_provisioner(settings.provisioner, ray_address=settings.ray_address, cpus=settings.cpus,
                                         gpus_per_worker=settings.ray_gpus_per_worker),
            # Workers read the alias table and their state from the same home as this control plane.
            worker_env={PARENT_GRACE_ENV: str(settings.worker_grace_s), ADOPTER_FILE_ENV: str(layout.discovery_file),
                        HOME_ENV: str(layout.root)})
        self._locks: defaultdict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._session: aiohttp.ClientSession | None = None
        self._group: TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.last_request = time.monotonic()
        self.jobs = TrainerJobs(self)
        self.deployments = Deployments(self)
        self.hot_loads = HotLoads(self)

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
        ready = asyncio.Event()
        self._runner = asyncio.create_task(self._run_group(ready), name="control-plane-tasks")
        await ready.wait()
        # Connecting to (or starting) a Ray cluster takes seconds; nothing is served before it is done.
        self.supervisor.provisioner.open()
        await self.jobs.recover()
        await self.deployments.recover()
        self.spawn(self.supervisor.run(), "supervisor")
        self.spawn(self.jobs.idle_loop(), "idle-trainers")

    async def _run_group(self, ready: asyncio.Event) -> None:
        """The task group lives in this one task: entered and left here, cancelled by `close`."""
        async with anyio.create_task_group() as group:
            self._group = group
            ready.set()
            await self._stopping.wait()
            group.cancel_scope.cancel()
        self._group = None

    async def close(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner
        await self.supervisor.stop_all()
        await asyncio.to_thread(self.supervisor.provisioner.close)
        if self._session is not None:
            await self._session.close()
        self.store.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The control plane's HTTP session to its workers (carries their key); open after `start`."""
        assert self._session is not None, "ControlPlane.start() was not called"
        return self._session

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `coro` in the control plane's task group; a failure is logged, never kills its siblings."""
        if self._group is None or self._stopping.is_set():
            coro.close()
            log.warning("background_task_dropped", task=name, reason="the control plane is stopping")
            return
        self._group.start_soon(_logged, coro, name, name=name)

    def lock(self, kind: str, account: str, rid: str) -> asyncio.Lock:
        return self._locks[(kind, account, rid)]

    async def _on_worker_exit(self, key: WorkerKey, reason: str) -> None:
        # Runs inside the supervisor's check loop: hand off so a held resource lock cannot stall it.
        if key.kind == TRAINER:
            self.spawn(self.jobs.worker_lost(key, reason), f"lost-{key}")
        else:
            self.spawn(self.deployments.replica_lost(key, reason), f"lost-{key}")

    # calls to workers ------------------------------------------------------------------------

    async def call_worker(self, method: str, url: str, body: Any, timeout: float) -> Any:
        """One JSON call to a worker: the only place the control plane talks to its workers over HTTP.
        No retry here: callers own their retry (hot-load is not idempotent); transport failures come back
        as `APIConnectionError` / `APITimeoutError`, error answers as the worker's typed error."""
        return await request_json(self.session, method, url, body, timeout=timeout)


async def _logged(coro: Coroutine[Any, Any, Any], name: str) -> None:
    try:
        await coro
    except Exception as exc:  # a background task's failure is logged; its siblings keep running
        log.error("background_task_failed", task=name, error=repr(exc))
