"""The `ray` provisioner: each trainer / deployment replica worker runs inside its own Ray actor.

The actor only places and babysits the worker: it requests the worker's resources from Ray (num_cpus =
the worker's torch threads, num_gpus = `gpus_per_worker`), then runs the very same
`python -m firetitan.server.trainer|deployment ...` process that the local provisioner runs
(`spawn_worker`), on whichever node Ray chose, and reports its url, pid and ready info. Workers still
serve HTTP; the control plane learns their addresses from the actor. A trainer is one process today
(with `--world-size`, rank 0 starts the other ranks itself), so one actor per trainer requesting its
threads keeps its ranks together without a placement group.

Death is seen two ways: every actor has one long call `wait_exit` in flight, which returns the worker's
exit code and log tail when the worker exits, and fails when the actor itself dies (`ray.kill`, a lost
node). The worker's parent is the actor, and it gets no adoption grace: when the actor dies, the
worker's parent watchdog stops it within a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from firetitan.errors import APITimeoutError, ConfigError, FiretitanError, WorkerCrashedError
from firetitan.logging import get_logger
from firetitan.server.control_plane.provisioner import OnStart, Worker
from firetitan.server.process import ADOPTER_FILE_ENV, PARENT_GRACE_ENV, WorkerProcess, spawn_worker

log = get_logger("firetitan.control_plane.ray")

NAMESPACE = "firetitan"
# A control plane that starts its own local Ray cluster gives its object store this much: workers
# exchange only small dicts with the control plane through Ray (the model traffic is HTTP).
OWN_CLUSTER_OBJECT_STORE_BYTES = 256 * 1024 * 1024
_TAIL_BYTES = 2000
# The worker's environment is the actor's (the Ray node's) plus these, taken from the control plane.
_FORWARDED_ENV_PREFIXES = ("FIRETITAN_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "PYTHONPATH")


class _WorkerActor:
    """Runs one worker process on its Ray node. Threaded (max_concurrency): `wait_exit` blocks for
    the worker's whole life while `stop` and `log_tail` still answer."""

    def __init__(self) -> None:
        self._worker: WorkerProcess | None = None
        self._log_path: Path | None = None
        self._started = threading.Event()

    def start(self, module: str, args: list[str], log_path: str, env: dict[str, str], host: str,
              threads: int, ready_timeout: float) -> dict[str, Any]:
        self._log_path = Path(log_path)
        try:
            worker = spawn_worker(module, args, ready_timeout=ready_timeout, log_path=self._log_path, env=env,
                                  host=host, threads=threads)
        except FiretitanError as exc:
            # Errors cross back as plain data: our exception classes take keyword-only arguments.
            return {"error": type(exc).__name__, "message": exc.message}
        finally:
            self._started.set()
        self._worker = worker
        return {"url": worker.url, "pid": worker.pid, "ready": worker.ready,
                "node_ip": ray.util.get_node_ip_address()}

    def wait_exit(self) -> dict[str, Any]:
        """Block until the worker exits; its exit code and log tail (the tail is read on this node)."""
        self._started.wait()
        worker = self._worker
        code = worker.popen.wait() if worker is not None and worker.popen is not None else None
        return {"code": code, "tail": self.log_tail()}

    def stop(self, timeout: float) -> None:
        if self._worker is not None:
            self._worker.stop(timeout)

    def log_tail(self) -> str:
        try:
            return self._log_path.read_bytes()[-_TAIL_BYTES:].decode(errors="replace").strip() \
                if self._log_path else ""
        except OSError:
            return ""


class RayWorker:
    """The supervisor's handle on one actor and its worker."""

    def __init__(self, actor: Any, info: dict[str, Any], name: str) -> None:
        self.actor = actor
        self.name = name
        self.url = str(info["url"])
        self.pid = int(info["pid"])
        self.ready: dict[str, Any] = dict(info.get("ready") or {})
        self.node_ip = str(info.get("node_ip") or "")
        self._done = actor.wait_exit.remote()
        self._outcome: dict[str, Any] | None = None
        self._actor_error = ""

    @property
    def health_url(self) -> str | None:
        value = self.ready.get("health_url")
        return str(value) if value else None

    def alive(self) -> bool:
        ready, _ = ray.wait([self._done], timeout=0)
        return not ready

    def gone(self) -> bool:
        # The actor reports its worker's exit within milliseconds: give it a second to do so.
        ready, _ = ray.wait([self._done], timeout=1.0)
        return bool(ready)

    def _result(self) -> dict[str, Any]:
        if self._outcome is None:
            try:
                self._outcome = ray.get(self._done, timeout=5.0)
            except GetTimeoutError:
                return {}
            except RayError as exc:
                self._outcome = {}
                self._actor_error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return self._outcome

    def exit_detail(self) -> str:
        outcome = self._result()
        if "code" in outcome:
            return f"exited with code {outcome['code']} (Ray actor {self.name})"
        return f"exited: its Ray actor {self.name} died ({self._actor_error or 'no reason given'})"

    def log_tail(self, path: Path, n: int) -> str:
        tail = str(self._result().get("tail") or "")
        if not tail:  # the actor died with its worker: read the log here (same file system on one machine)
            with contextlib.suppress(OSError):
                tail = path.read_bytes()[-n:].decode(errors="replace").strip()
        return tail[-n:]

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(RayError):
            ray.get(self.actor.stop.remote(timeout), timeout=timeout + 10.0)
        self.release()

    def release(self) -> None:
        with contextlib.suppress(RayError, ValueError):
            ray.kill(self.actor)


class RayProvisioner:
    """Workers as Ray actors on the cluster at `address` (None: a new local cluster of `cpus` CPUs,
    started here and shut down by `close`)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, cpus: int | None = None,
                 gpus_per_worker: float = 0.0) -> None:
        self._address = address
        self._cpus = cpus
        self._gpus = gpus_per_worker
        self._starting: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.startup_s: float | None = None

    def open(self) -> None:

        began = time.monotonic()
        common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False,
                                  "logging_level": logging.WARNING, "ignore_reinit_error": True}
        try:
            if self._address:
                ray.init(address=self._address, **common)
            else:
                # "local": always a new cluster, never one found through $RAY_ADDRESS or `ray start` (for
                # those, pass --ray-address, "auto" included).
                ray.init(address="local", num_cpus=self._cpus, object_store_memory=OWN_CLUSTER_OBJECT_STORE_BYTES,
                         include_dashboard=False, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at --ray-address {self._address!r}" if self._address else "a local Ray cluster"
            raise ConfigError(f"could not connect to {where}: {exc}", field="ray_address") from exc
        self.startup_s = time.monotonic() - began
        log.info("ray_connected", address=self._address or "local (started here)",
                 gcs=ray.get_runtime_context().gcs_address, seconds=round(self.startup_s, 2),
                 resources=ray.cluster_resources())

    def start(self, label: str, module: str, args: list[str], *, log_path: Path, env: dict[str, str],
              host: str, threads: int, ready_timeout: float, on_start: OnStart) -> Worker:
        name = _actor_name(label, log_path)
        _kill_named(name)  # a leftover of an earlier start of this key
        actor_cls = ray.remote(_WorkerActor)
        actor = actor_cls.options(name=name, namespace=NAMESPACE, num_cpus=threads, num_gpus=self._gpus,
                                  max_concurrency=4, max_restarts=0).remote()
        with self._lock:
            self._starting[name] = actor

        def abort() -> bool:
            with self._lock:
                if self._starting.pop(name, None) is None:
                    return False
            ray.kill(actor)
            return True

        on_start(abort)
        worker_env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        worker_env.update(env)
        # The actor is the worker's parent: when the actor dies the worker must stop, not wait to be adopted.
        worker_env.pop(PARENT_GRACE_ENV, None)
        worker_env.pop(ADOPTER_FILE_ENV, None)
        ref = actor.start.remote(module, args, str(log_path), worker_env, host, threads, ready_timeout)
        try:
            # Placement (waiting for free CPUs) counts against the ready timeout too.
            info = ray.get(ref, timeout=ready_timeout + 30.0)
        except GetTimeoutError as exc:
            ray.kill(actor)
            raise APITimeoutError(f"{module} did not become ready within {ready_timeout:.0f}s on Ray (actor {name} "
                                  f"asks num_cpus={threads}, num_gpus={self._gpus}; cluster has "
                                  f"{ray.available_resources()} free)", field="provisioner") from exc
        except RayError as exc:
            raise WorkerCrashedError(f"{module} exited before listening: its Ray actor {name} died "
                                     f"({type(exc).__name__})") from exc
        finally:
            with self._lock:
                self._starting.pop(name, None)
        if "error" in info:
            ray.kill(actor)
            cls = APITimeoutError if info["error"] == "APITimeoutError" else WorkerCrashedError
            raise cls(str(info["message"]))
        return RayWorker(actor, info, name)

    def close(self) -> None:
        with self._lock:
            starting, self._starting = list(self._starting.values()), {}
        for actor in starting:
            with contextlib.suppress(RayError, ValueError):
                ray.kill(actor)
        # Actors this driver created die with it; for a cluster started here this also stops the cluster.
        if ray.is_initialized():
            ray.shutdown()


def _actor_name(label: str, log_path: Path) -> str:
    """Unique per control-plane home and worker key, so two homes sharing a cluster never collide."""
    home = hashlib.sha1(str(log_path.parent.resolve()).encode()).hexdigest()[:10]
    return f"{home}:{label}"


def _kill_named(name: str) -> None:
    with contextlib.suppress(ValueError, RayError):
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
