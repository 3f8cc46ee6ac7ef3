"""Start worker processes, wait until they listen, and stop them without leaving orphans."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firetitan.bind import require_key_off_loopback
from firetitan.errors import APITimeoutError, WorkerCrashedError

_PR_SET_PDEATHSIG = 1
# Set for non-detached workers: they stop themselves when this parent process is gone.
PARENT_PID_ENV = "FIRETITAN_PARENT_PID"
# Each worker reads its API key from here (add_common_args); the control plane sets it for its workers.
WORKER_KEY_ENV = "FIRETITAN_WORKER_API_KEY"
# A control plane's workers outlive it this long, waiting for a restarted one to adopt them.
PARENT_GRACE_ENV = "FIRETITAN_PARENT_GRACE_S"
ADOPTER_FILE_ENV = "FIRETITAN_ADOPTER_FILE"


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM when the parent thread dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class WorkerProcess:
    """A running worker: where it listens and how to stop it."""

    url: str
    pid: int
    popen: subprocess.Popen[bytes] | None
    log_path: Path | None = None
    ready: dict[str, object] = field(default_factory=dict)

    @property
    def health_url(self) -> str | None:
        """The worker's health listener (its own thread and port, see firetitan.server.health), if it has one."""
        value = self.ready.get("health_url")
        return str(value) if value else None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; reaps the child so no zombie remains."""
        stop_pid(self.pid, timeout=timeout, popen=self.popen)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] == "Z":
                return False
    return True


def stop_pid(pid: int, timeout: float = 10.0, popen: subprocess.Popen[bytes] | None = None) -> None:
    if popen is not None and popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)


def spawn_worker(module: str, args: list[str], *, ready_timeout: float = 120.0,
                 log_path: Path | None = None, detach: bool = False,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 threads: int | None = None,
                 on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> WorkerProcess:
    """Run `python -m module --host H --port 0 --ready-file F *args` and wait for its ready file.

    `on_start(popen)` is called as soon as the process exists: a caller that changes its mind while
    the worker loads (a delete during provisioning) can kill it instead of waiting for it to be ready.

    `detach=True` starts a new session that survives its parent (the control-plane daemon);
    otherwise the child gets SIGTERM when this process dies. A `host` off loopback needs a key
    ($FIRETITAN_WORKER_API_KEY in `env` or this environment, or `--api-key` in `args`).
    """
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    # The key travels in the environment (never argv, which `ps` shows to every user). Refuse here,
    # before a model loads, what the worker's serve_app would refuse anyway.
    if "--api-key" not in args:
        require_key_off_loopback(host, child_env.get(WORKER_KEY_ENV))
    ready_dir = Path(tempfile.mkdtemp(prefix="firetitan-ready-"))
    ready_file = ready_dir / "ready.json"
    cmd = [sys.executable, "-m", module, "--host", host, "--port", "0", "--ready-file", str(ready_file), *args]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if detach:
        child_env.pop(PARENT_PID_ENV, None)
    else:
        child_env[PARENT_PID_ENV] = str(os.getpid())
    if threads is not None:
        child_env.setdefault("OMP_NUM_THREADS", str(threads))
    out: int | object = subprocess.DEVNULL
    log_fh = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log_path, "ab")  # handed to the child, closed below
        out = log_fh
    try:
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=child_env,
            start_new_session=detach,
            # PDEATHSIG fires when the spawning *thread* exits, so only use it from the main thread;
            # the worker's own parent watchdog (FIRETITAN_PARENT_PID) covers the rest.
            preexec_fn=_die_with_parent if not detach and threading.current_thread() is threading.main_thread()
            else None,
        )
    finally:
        if log_fh is not None:
            log_fh.close()
    if on_start is not None:
        on_start(popen)
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            if ready_file.exists():
                info = json.loads(ready_file.read_text())
                return WorkerProcess(url=str(info["url"]), pid=int(info["pid"]), popen=popen,
                                     log_path=log_path, ready=info)
            code = popen.poll()
            if code is not None:
                tail = _tail(log_path)
                raise WorkerCrashedError(f"{module} exited with code {code} before listening{tail}")
            if time.monotonic() > deadline:
                stop_pid(popen.pid, popen=popen)
                raise APITimeoutError(f"{module} did not become ready within {ready_timeout:.0f}s{_tail(log_path)}")
            time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):
            ready_file.unlink()
        with contextlib.suppress(OSError):
            ready_dir.rmdir()


def _tail(log_path: Path | None, n: int = 2000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return "; log tail:\n" + log_path.read_bytes()[-n:].decode(errors="replace")
