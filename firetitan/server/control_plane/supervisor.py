"""Start, watch and stop the worker processes a control plane owns; report the ones that die."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from firetitan.logging import get_logger
from firetitan.server.control_plane.provisioner import LocalProvisioner, Provisioner, Worker, local_worker
from firetitan.server.process import WorkerProcess, pid_alive, stop_pid

log = get_logger("firetitan.control_plane.supervisor")

TRAINER_MODULE = "firetitan.server.trainer"
DEPLOYMENT_MODULE = "firetitan.server.deployment"
VLLM_DEPLOYMENT_MODULE = "firetitan.server.deployment.vllm_backend"  # `engine: vllm` (control_plane/engines.py)
_HEALTH_PATH = {TRAINER_MODULE: "/api/v1/healthz", DEPLOYMENT_MODULE: "/health", VLLM_DEPLOYMENT_MODULE: "/health"}


@dataclass(frozen=True)
class WorkerKey:
    """Which resource a worker serves: a trainer job, or one replica of a deployment."""

    kind: str  # "trainer" | "replica"
    account: str
    resource_id: str
    index: int = 0

    def __str__(self) -> str:
        suffix = f"/replica-{self.index}" if self.kind == "replica" else ""
        return f"{self.kind}:{self.account}/{self.resource_id}{suffix}"


@dataclass
class _Watched:
    module: str
    worker: Worker
    health_failures: int = 0
    last_failure: str = ""


ExitCallback = Callable[[WorkerKey, str], Awaitable[None]]


class Supervisor:
    """Owns workers by key, started through its provisioner (local subprocesses, or Ray actors). A
    worker that exits, or fails `max_health_failures` health checks in a row, is removed and reported
    through `on_exit(key, reason)`; workers stopped on purpose are not reported."""

    def __init__(self, *, logs_dir: Path, api_key: str | None, on_exit: ExitCallback,
                 health_interval: float = 2.0, max_health_failures: int = 3,
                 ready_timeout: float = 300.0, host: str = "127.0.0.1",
                 worker_env: dict[str, str] | None = None, provisioner: Provisioner | None = None) -> None:
        self.provisioner: Provisioner = provisioner or LocalProvisioner()
        self._logs_dir = logs_dir
        self._worker_env = dict(worker_env or {})
        self._api_key = api_key
        self._on_exit = on_exit
        self._health_interval = health_interval
        self._max_health_failures = max_health_failures
        self._ready_timeout = ready_timeout
        self._host = host
        self._workers: dict[WorkerKey, _Watched] = {}
        self._starting: dict[WorkerKey, Callable[[], bool]] = {}  # started, not yet ready: how to kill it

    def get(self, key: WorkerKey) -> Worker | None:
        watched = self._workers.get(key)
        return watched.worker if watched else None

    def workers(self) -> dict[WorkerKey, Worker]:
        return {k: w.worker for k, w in self._workers.items()}

    def log_path(self, key: WorkerKey) -> Path:
        name = f"{key.kind}-{key.account}-{key.resource_id}" + (f"-{key.index}" if key.kind == "replica" else "")
        return self._logs_dir / f"{name}.log"

    async def start(self, key: WorkerKey, module: str, args: list[str], *, threads: int,
                    ready_timeout: float | None = None) -> Worker:
        """Start a worker (in a thread: startup loads torch and a model) and watch it."""
        if key in self._workers:
            await self.stop(key)
        env = {**self._worker_env, **({"FIRETITAN_WORKER_API_KEY": self._api_key} if self._api_key else {})}
        try:
            worker = await asyncio.to_thread(
                self.provisioner.start, str(key), module, args, ready_timeout=ready_timeout or self._ready_timeout,
                log_path=self.log_path(key), env=env, host=self._host, threads=threads,
                on_start=lambda abort: self._starting.__setitem__(key, abort))
        finally:
            self._starting.pop(key, None)
        self._workers[key] = _Watched(module, worker)
        log.info("worker_started", key=str(key), pid=worker.pid, url=worker.url, provisioner=self.provisioner.name)
        return worker

    def abort_start(self, key: WorkerKey) -> bool:
        """Kill a worker that is still loading, so the `start` awaiting it fails at once
        (WorkerCrashedError) instead of a delete or scale-down waiting out its startup. It has served
        nothing and saved nothing yet: SIGKILL loses nothing. Returns whether one was killed."""
        abort = self._starting.get(key)
        if abort is None or not abort():
            return False
        log.info("worker_start_aborted", key=str(key))
        return True

    def adopt(self, key: WorkerKey, module: str, worker: WorkerProcess) -> None:
        """Watch a worker started by an earlier run of this control plane (a process on this machine)."""
        self._workers[key] = _Watched(module, local_worker(worker))
        log.info("worker_adopted", key=str(key), pid=worker.pid, url=worker.url)

    async def adoptable(self, module: str, pid: int | None, url: str | None, *, expect: dict[str, str],
                        health_url: str | None = None) -> bool:
        """Whether a recorded worker still runs `module` at `url` with this key and says it is `expect`
        (e.g. its deployment id) on its health route: only then may a restarted control plane keep it.
        A recorded `health_url` (the worker's health listener) is asked instead of the main port, and
        must also name the recorded pid."""
        if not pid or not url or not _runs(pid, module):
            return False
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        if health_url:
            expect = {**expect, "pid": str(pid)}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session, \
                    session.get(_health_target(module, url, health_url), headers=headers) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return isinstance(body, dict) and all(str(body.get(k)) == v for k, v in expect.items())

    async def stop(self, key: WorkerKey, timeout: float = 10.0) -> None:
        watched = self._workers.pop(key, None)
        if watched is not None:
            await asyncio.to_thread(watched.worker.stop, timeout)
            log.info("worker_stopped", key=str(key), pid=watched.worker.pid)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(k) for k in list(self._workers)), return_exceptions=True)

    async def run(self) -> None:
        """Check every worker each `health_interval` seconds until cancelled."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session:
            while True:
                await asyncio.sleep(self._health_interval)
                await asyncio.gather(*(self._check(session, k, w) for k, w in list(self._workers.items())))

    async def confirm_exit(self, key: WorkerKey) -> str | None:
        """Check now, not at the next health tick, whether `key`'s worker process has exited; if it has,
        report it and return why. A proxy that cannot reach a worker asks this, so a caller learns of a
        crash in one answer instead of retrying until the check loop catches up."""
        watched = self._workers.get(key)
        if watched is None or not await asyncio.to_thread(watched.worker.gone):
            return None
        reason = await asyncio.to_thread(self._exit_reason, key, watched)
        await self._report(key, watched, reason)
        return reason

    def _exit_reason(self, key: WorkerKey, watched: _Watched) -> str:
        """Blocking (a Ray worker's outcome comes from its actor): call it in a thread."""
        worker = watched.worker
        tail = worker.log_tail(self.log_path(key), 800)
        return f"{key.kind} worker (pid {worker.pid}) {worker.exit_detail()}" + (f"; last log lines: {tail}" if tail else "")

    async def _check(self, session: aiohttp.ClientSession, key: WorkerKey, watched: _Watched) -> None:
        worker = watched.worker
        if not worker.alive():
            await self._report(key, watched, await asyncio.to_thread(self._exit_reason, key, watched))
            return
        target = _health_target(watched.module, worker.url, worker.health_url)
        try:
            async with session.get(target) as resp:
                healthy = resp.status == 200
                if not healthy:
                    # A health listener's 503 says the worker's main loop stopped beating (hung).
                    text = (await resp.text())[:200]
                    watched.last_failure = f"HTTP {resp.status} {text}".strip()
        except (aiohttp.ClientError, TimeoutError) as exc:
            healthy = False
            watched.last_failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
        watched.health_failures = 0 if healthy else watched.health_failures + 1
        if watched.health_failures >= self._max_health_failures:
            reason = (f"{key.kind} worker (pid {worker.pid}) failed {watched.health_failures} health checks "
                      f"in a row at {target} (last: {watched.last_failure}) and was stopped")
            log.warning("worker_health_kill", key=str(key), pid=worker.pid, reason=reason)
            await asyncio.to_thread(worker.stop, 5.0)
            await self._report(key, watched, reason)

    async def _report(self, key: WorkerKey, watched: _Watched, reason: str) -> None:
        # Only report workers still registered: a concurrent stop() means the exit was wanted.
        if self._workers.get(key) is not watched:
            return
        del self._workers[key]
        await asyncio.to_thread(watched.worker.release)
        log.warning("worker_lost", key=str(key), reason=reason)
        await self._on_exit(key, reason)


def _health_target(module: str, url: str, health_url: str | None) -> str:
    """The worker's health listener when it published one, else the health route on its main port."""
    return f"{health_url}/health" if health_url else url + _HEALTH_PATH[module]


def kill_leftover(pid: int | None, module: str) -> None:
    """Stop a worker that outlived a crashed control plane, only if the pid still runs that module."""
    if pid and _runs(pid, module):
        stop_pid(pid, timeout=5.0)


def _runs(pid: int, module: str) -> bool:
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return module in cmdline
