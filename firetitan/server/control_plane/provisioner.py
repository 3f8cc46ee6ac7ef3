"""The provisioner seam: how the supervisor starts a worker, asks whether it lives, stops it and reads how it ended.

`local` runs workers as child processes of the control plane (firetitan.process.spawn_worker);
`ray` runs each one inside a Ray actor (control_plane/ray_provisioner.py). Either way the worker is the
same `python -m firetitan.server.trainer|deployment ...` process serving HTTP; the supervisor's health
checks, crash reports and restart rules do not depend on which provisioner started it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from firetitan.errors import ConfigError
from firetitan.server.process import WorkerProcess, pid_alive, spawn_worker

PROVISIONERS = ("local", "ray")
# Called as soon as a worker exists (before it is ready) with a function that kills it: a delete during
# startup ends the load at once. The function returns whether it killed anything.
OnStart = Callable[[Callable[[], bool]], None]


class Worker(Protocol):
    """A started worker as the supervisor sees it: where it listens, whether it runs, how it ended."""

    url: str
    pid: int

    @property
    def health_url(self) -> str | None: ...

    def alive(self) -> bool:
        """Cheap and non-blocking: called for every worker on every health tick."""
        ...

    def gone(self) -> bool:
        """A thorough check (may block ~1 s), asked when a proxied call could not reach the worker."""
        ...

    def exit_detail(self) -> str:
        """How it ended, for a FAILED message: "exited with code -9", "its Ray actor died ..."."""
        ...

    def log_tail(self, path: Path, n: int) -> str:
        """The last `n` bytes of its log (read from `path`, or as reported by a remote node)."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL after `timeout`) and free what it held. Blocking."""
        ...

    def release(self) -> None:
        """After it died on its own: reap the process and free what it held (a Ray actor). Blocking."""
        ...


class Provisioner(Protocol):
    """Starts workers somewhere; `close` frees whatever the provisioner itself holds."""

    name: str

    def open(self) -> None:
        """Connect (a Ray cluster); called once by the control plane before any start. Blocking."""
        ...

    def start(self, label: str, module: str, args: list[str], *, log_path: Path, env: dict[str, str],
              host: str, threads: int, ready_timeout: float, on_start: OnStart) -> Worker:
        """Start `python -m module ... *args` and return once it listens. Blocking: run it in a thread."""
        ...

    def close(self) -> None:
        """Stop anything still starting, and disconnect. Blocking."""
        ...


class LocalWorker(WorkerProcess):
    """A child process of this control plane (or one it adopted after a restart: `popen` is None)."""

    def gone(self) -> bool:
        # A killed multithreaded process is a zombie leader while its other threads still exit: popen
        # still reads it as running, /proc already says Z. Wait (bounded) for it, to read its code.
        if self.alive() and pid_alive(self.pid):
            return False
        self.release()
        return True

    def exit_detail(self) -> str:
        code = self.popen.returncode if self.popen is not None else None
        return f"exited with code {code}"

    def log_tail(self, path: Path, n: int) -> str:
        try:
            return path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5.0)


def local_worker(worker: WorkerProcess) -> LocalWorker:
    """The supervisor's view of a `WorkerProcess` (spawned here, or adopted from a record)."""
    return LocalWorker(url=worker.url, pid=worker.pid, popen=worker.popen, log_path=worker.log_path,
                       ready=worker.ready)


class LocalProvisioner:
    """Today's workers: child processes of the control plane on this machine."""

    name = "local"

    def open(self) -> None:
        return None

    def start(self, label: str, module: str, args: list[str], *, log_path: Path, env: dict[str, str],
              host: str, threads: int, ready_timeout: float, on_start: OnStart) -> Worker:
        def started(popen: subprocess.Popen[bytes]) -> None:
            def abort() -> bool:
                if popen.poll() is not None:
                    return False
                popen.kill()  # it has served and saved nothing yet: SIGKILL loses nothing
                return True
            on_start(abort)

        return local_worker(spawn_worker(module, args, ready_timeout=ready_timeout, log_path=log_path, env=env,
                                         host=host, threads=threads, on_start=started))

    def close(self) -> None:
        return None


def make_provisioner(name: str, *, ray_address: str | None = None, cpus: int | None = None,
                     gpus_per_worker: float = 0.0) -> Provisioner:
    """The provisioner a `provisioner:` setting names; `ray` needs the optional extra `firetitan[ray]`."""
    if name == "local":
        return LocalProvisioner()
    if name == "ray":
        if not ray_address:
            # A cluster of its own is this machine's alone: Ray binds loopback only when this is set
            # before it is imported. No usage reports over the network either way.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            from firetitan.server.control_plane.ray_provisioner import RayProvisioner
        except ImportError as exc:
            raise ConfigError(f"provisioner 'ray' needs Ray: pip install 'firetitan[ray]' ({exc})",
                              field="provisioner") from exc
        return RayProvisioner(address=ray_address, cpus=cpus, gpus_per_worker=gpus_per_worker)
    raise ConfigError(f"provisioner {name!r} is not one of {', '.join(PROVISIONERS)}", field="provisioner")
