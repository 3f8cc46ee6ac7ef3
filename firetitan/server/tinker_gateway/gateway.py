"""The Tinker front door's state: sessions, models (one trainer job each), snapshots, and the trainer calls."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firetitan.errors import NotFoundError
from firetitan.logging import get_logger
from firetitan.server.control_plane.controller import ControlPlane
from firetitan.server.control_plane.resources import (
    JOB_CREATING,
    JOB_RUNNING,
    CreateTrainerJobRequest,
    TrainingConfig,
)
from firetitan.server.tinker_gateway.futures import Failure, FutureTable, Outcome

log = get_logger("firetitan.tinker_gateway")

ACCOUNT = "tinker"
# The SDK heartbeats every 10 s; a session silent this long is over and its models are stopped.
SESSION_TTL_S = 120.0
SESSION_TTL_ENV = "FIRETITAN_TINKER_SESSION_TTL"
POLL_S = 25.0  # each long poll of a worker future (the SDK's own retrieve timeout is 45 s)
START_TIMEOUT_S = 600.0
MAX_ENTRIES = 10_000  # remembered sampler paths and sampling sessions, oldest forgotten first


@dataclass
class Session:
    session_id: str
    last_seen: float = field(default_factory=time.monotonic)
    models: set[str] = field(default_factory=set)
    samplers: set[str] = field(default_factory=set)


@dataclass
class Model:
    model_id: str
    session_id: str
    job_id: str
    base_model: str
    lora_rank: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        return self.job_id.replace("-", "")


@dataclass
class Snapshot:
    """A sampler snapshot: its store identity, and which model at which policy version saved it."""

    identity: str
    base_model: str
    model_id: str
    policy_version: int | None


def parse_tinker_path(path: str, segment: str) -> tuple[str, str]:
    """`tinker://<model_id>/<segment>/<name>` -> (model_id, name)."""
    parts = path[len("tinker://"):].split("/") if path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] != segment or not parts[0] or not parts[2]:
        raise Failure(f"path {path!r} is not a tinker://<model_id>/{segment}/<name> path")
    return parts[0], parts[2]


def _error_message(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return f"HTTP {status}: {str(body)[:300]}"


class TinkerGateway:
    """Maps Tinker's session/model/sampler ids onto the control plane's trainer jobs and deployments."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.futures = FutureTable()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        # tinker sampler path -> snapshot; sampling_session_id -> snapshot or base model (each capped).
        self.snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self.samplers: OrderedDict[str, Snapshot | str] = OrderedDict()
        self._reaper: asyncio.Task[None] | None = None
        self.pool: Any = None  # the sampling DeploymentPool, set by add_tinker_routes
        self.session_ttl = float(os.environ.get(SESSION_TTL_ENV) or SESSION_TTL_S)

    def remember_snapshot(self, path: str, snap: Snapshot) -> None:
        _put(self.snapshots, path, snap)

    def remember_sampler(self, sampler_id: str, target: Snapshot | str) -> None:
        _put(self.samplers, sampler_id, target)
        sess = self.sessions.get(sampler_id.split(":", 1)[0])
        if sess is not None:
            sess.samplers.add(sampler_id)

    # sessions ----------------------------------------------------------------------------------
    def create_session(self) -> str:
        sess = Session(str(uuid.uuid4()))
        self.sessions[sess.session_id] = sess
        return sess.session_id

    def touch(self, session_id: str) -> Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            raise NotFoundError(f"session_id {session_id!r} is unknown or has expired", field="session_id")
        sess.last_seen = time.monotonic()
        return sess

    async def finish_session(self, session_id: str) -> None:
        sess = self.sessions.pop(session_id, None)
        if sess is None:
            return
        for model_id in sorted(sess.models):
            model = self.models.pop(model_id, None)
            if model is not None:
                with _quiet():
                    await self.cp.jobs.delete(ACCOUNT, model.job_id)
        for sampler_id in sess.samplers:
            self.samplers.pop(sampler_id, None)
        if self.pool is not None:
            await self.pool.drop_session(session_id)
        log.info("tinker_session_finished", session_id=session_id, models=len(sess.models))

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), name="tinker-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self.futures.cancel_all()

    async def _reap_loop(self) -> None:
        while True:
            interval = min(5.0, self.session_ttl / 4)
            slept_from = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - slept_from > 2 * interval + 1.0:
                # The loop was blocked (or the machine asleep): heartbeats that arrived meanwhile are
                # still queued behind this task, so judge silence on the next round instead.
                continue
            for sid in [s.session_id for s in self.sessions.values() if now - s.last_seen > self.session_ttl]:
                log.info("tinker_session_expired", session_id=sid)
                await self.finish_session(sid)

    # models ------------------------------------------------------------------------------------
    def model(self, model_id: str) -> Model:
        model = self.models.get(model_id)
        if model is None:
            raise Failure(f"model_id {model_id!r} is unknown (known: {sorted(self.models)[:8]})")
        sess = self.sessions.get(model.session_id)
        if sess is not None:  # any use of a model keeps its session alive, heartbeat or not
            sess.last_seen = time.monotonic()
        return model

    async def create_model(self, session_id: str, model_seq_id: int, base_model: str, rank: int) -> Model:
        sess = self.touch(session_id)
        model_id = f"{session_id}:train:{model_seq_id}"
        job_id = f"tk-{secrets.token_hex(5)}"
        req = CreateTrainerJobRequest(training_config=TrainingConfig(base_model=base_model, lora_rank=rank),
                                      display_name=f"tinker {model_id}"[:63])
        await self.cp.jobs.create(ACCOUNT, req, job_id, None)
        model = Model(model_id, session_id, job_id, base_model, rank)
        self.models[model_id] = model
        sess.models.add(model_id)
        return model

    async def trainer_url(self, model: Model) -> str:
        """The job's worker URL once it runs (a create or resume may still be starting it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            job = self.cp.jobs.get(ACCOUNT, model.job_id)
            if job.state == JOB_RUNNING and job.trainer_url:
                return job.trainer_url
            if job.state != JOB_CREATING:
                raise Failure(f"trainer for {model.model_id!r} is {job.state}: {job.status.message}", "server")
            if time.monotonic() > deadline:
                raise Failure(f"trainer for {model.model_id!r} did not start in {START_TIMEOUT_S:.0f}s", "server")
            await asyncio.sleep(0.2)

    async def worker_call(self, model: Model, path: str, body: dict[str, Any],
                          timeout: float = 600.0) -> tuple[int, Any]:
        import aiohttp

        url = await self.trainer_url(model)
        with self.cp.jobs.activity(ACCOUNT, model.job_id):
            try:
                async with self.cp.session.post(f"{url}/api/v1/{path}", json=body,
                                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    return resp.status, await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Failure(f"trainer for {model.model_id!r} did not answer {path}: {exc!r}", "server") from exc

    async def load_info(self, model: Model) -> dict[str, Any]:
        status, body = await self.worker_call(model, "get_info", {"model_id": model.job_id})
        if status != 200:
            raise Failure(f"model {model.model_id!r} failed to load: {_error_message(status, body)}", "server")
        model.info = body
        return body

    def info_view(self, model: Model) -> dict[str, Any]:
        return {"type": "get_info", "model_id": model.model_id, "model_name": model.base_model,
                "is_lora": model.lora_rank > 0, "lora_rank": model.lora_rank or None,
                "model_data": {"arch": model.info.get("model_data", {}).get("arch"),
                               "model_name": model.base_model, "tokenizer_id": model.base_model}}

    async def submit(self, model: Model, path: str, body: dict[str, Any],
                     post: Callable[[dict[str, Any]], Outcome]) -> str:
        """Queue one sequenced request on the model's worker and return the gateway future's id.

        A request the worker rejects outright still consumes its seq_id (`release_seq`), so the
        client's next call does not wait forever for the gap; its future fails with the reason.
        """
        body = {**body, "model_id": model.job_id}
        try:
            status, reply = await self.worker_call(model, path, body, timeout=60.0)
        except Failure as exc:
            return self.futures.failed(exc.message, exc.category)
        if status != 200:
            await self.release(model, body.get("seq_id"))
            return self.futures.failed(_error_message(status, reply), "user" if status < 500 else "server")
        return self.futures.spawn(self._await_worker(model, str(reply["request_id"]), post))

    async def release(self, model: Model, seq_id: Any) -> None:
        """Tell the worker `seq_id` will never come (a rejected request), so later ones are not held."""
        if not isinstance(seq_id, int):
            return
        with _quiet():
            await self.worker_call(model, "release_seq", {"model_id": model.job_id, "seq_id": seq_id},
                                   timeout=30.0)

    async def _await_worker(self, model: Model, worker_rid: str,
                            post: Callable[[dict[str, Any]], Outcome]) -> Outcome:
        while True:
            status, body = await self.worker_call(model, "retrieve_future",
                                                  {"request_id": worker_rid, "timeout": POLL_S},
                                                  timeout=POLL_S + 30)
            if status == 200 and isinstance(body, dict) and body.get("type") == "try_again":
                continue
            if status != 200:
                raise Failure(_error_message(status, body), "user" if status < 500 else "server")
            return post(body)

    async def run_and_wait(self, model: Model, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Submit and await in one go (gateway-internal steps such as create-via-load)."""
        status, reply = await self.worker_call(model, path, {**body, "model_id": model.job_id})
        if status != 200:
            raise Failure(_error_message(status, reply), "user" if status < 500 else "server")
        out = await self._await_worker(model, str(reply["request_id"]), lambda b: Outcome(json=b))
        assert out.json is not None
        return out.json

    # checkpoints -------------------------------------------------------------------------------
    def copy_state(self, src_model_id: str, name: str, dst: Model) -> None:
        """Make the train state `name` of run `src_model_id` loadable by `dst`'s worker (per-job dirs)."""
        from firetitan.checkpoints import TrainStateStore

        src = self.models.get(src_model_id)
        if src is None:
            raise Failure(f"path: training run {src_model_id!r} is unknown to this server")
        if src.job_id == dst.job_id:
            return
        src_store = TrainStateStore(self.cp.layout.trainer_state_dir(ACCOUNT, src.job_id))
        dst_store = TrainStateStore(self.cp.layout.trainer_state_dir(ACCOUNT, dst.job_id))
        if not src_store.exists(name):
            raise Failure(f"path: no train state named {name!r} in run {src_model_id!r}")
        target = dst_store.path(name)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src_store.path(name), target)

    def state_config(self, src_model_id: str, name: str) -> tuple[str, int]:
        """(base model, LoRA rank) a train state was saved with."""
        src = self.models.get(src_model_id)
        if src is None:
            raise Failure(f"path: training run {src_model_id!r} is unknown to this server")
        return src.base_model, src.lora_rank


def _put(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_ENTRIES:
        table.popitem(last=False)


class _quiet:
    """Swallow (and log) a failure of best-effort cleanup."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, Exception):
            log.warning("tinker_cleanup_failed", error=repr(exc))
            return True
        return False
