"""Sampling for Tinker clients: one deployment per served snapshot (LRU-bounded), and prompt logprobs."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from typing import Any

from firetitan.errors import FiretitanError
from firetitan.logging import get_logger
from firetitan.server.control_plane.controller import ControlPlane
from firetitan.server.control_plane.resources import (
    DEP_FAILED,
    DEP_READY,
    CreateDeploymentRequest,
)
from firetitan.server.deployment.schemas import HotLoadRequest, wait_until_serving
from firetitan.server.tinker_gateway.futures import Failure
from firetitan.server.tinker_gateway.gateway import ACCOUNT, START_TIMEOUT_S, Snapshot

log = get_logger("firetitan.tinker_gateway")

# A deployment holds one LoRA at a time, so each snapshot being sampled gets its own deployment.
# At most this many run at once; the least recently used idle one is deleted to make room.
MAX_SAMPLING_DEPLOYMENTS = 2


class DeploymentPool:
    """Snapshot identity (or base model) -> a ready deployment serving exactly that."""

    def __init__(self, cp: ControlPlane, limit: int = MAX_SAMPLING_DEPLOYMENTS) -> None:
        self.cp = cp
        self.limit = limit
        self._deps: OrderedDict[str, str] = OrderedDict()  # key -> deployment id, least recent first
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._inflight: dict[str, int] = {}
        self._owners: dict[str, set[str]] = {}  # key -> the sessions that sampled from it
        self._lock = asyncio.Lock()

    async def acquire(self, target: Snapshot | str, session_id: str) -> str:
        """A ready deployment id for `target` (creating, hot-loading or evicting as needed)."""
        key = target.identity if isinstance(target, Snapshot) else f"base:{target}"
        async with self._lock:
            self._owners.setdefault(key, set()).add(session_id)
            if key in self._deps:
                self._deps.move_to_end(key)
            else:
                await self._make_room()
                dep_id = f"tks-{secrets.token_hex(5)}"
                self._deps[key] = dep_id
                self._ready[key] = asyncio.get_running_loop().create_task(self._bring_up(dep_id, target))
            dep_id, ready = self._deps[key], self._ready[key]
            self._inflight[dep_id] = self._inflight.get(dep_id, 0) + 1
        try:
            await asyncio.shield(ready)
        except BaseException:
            self.release(dep_id)
            async with self._lock:
                if self._deps.get(key) == dep_id and ready.done():
                    # A deployment that failed to come up is removed, so the next sample tries afresh.
                    del self._deps[key], self._ready[key]
                    await self._delete(dep_id)
            raise
        return dep_id

    def release(self, dep_id: str) -> None:
        self._inflight[dep_id] = max(0, self._inflight.get(dep_id, 0) - 1)

    async def drop_session(self, session_id: str) -> None:
        """Delete the deployments only this (finished) session used, so `close()` leaves no worker."""
        async with self._lock:
            for key in [k for k, owners in self._owners.items() if owners == {session_id}]:
                del self._owners[key]
                dep_id = self._deps.pop(key, None)
                self._ready.pop(key, None)
                if dep_id is not None:
                    await self._delete(dep_id)
            for owners in self._owners.values():
                owners.discard(session_id)

    async def _delete(self, dep_id: str) -> None:
        self._inflight.pop(dep_id, None)
        try:
            await self.cp.deployments.delete(ACCOUNT, dep_id)
        except FiretitanError as exc:
            log.warning("tinker_sampling_delete_failed", deployment=dep_id, error=str(exc))

    async def _make_room(self) -> None:
        while len(self._deps) >= self.limit:
            idle = [k for k, d in self._deps.items() if not self._inflight.get(d)]
            if not idle:
                # Every deployment is busy: serve one more than the bound rather than fail a sample.
                log.warning("tinker_sampling_pool_over_limit", limit=self.limit)
                return
            key = idle[0]
            dep_id = self._deps.pop(key)
            self._ready.pop(key, None)
            self._owners.pop(key, None)
            await self._delete(dep_id)
            log.info("tinker_sampling_evicted", key=key, deployment=dep_id)

    async def _bring_up(self, dep_id: str, target: Snapshot | str) -> None:
        base = target.base_model if isinstance(target, Snapshot) else target
        await self.cp.deployments.create(ACCOUNT, CreateDeploymentRequest(base_model=base), dep_id)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            dep = self.cp.deployments.get(ACCOUNT, dep_id)
            if dep.state == DEP_READY and self.cp.deployments.ready_replicas(ACCOUNT, dep_id):
                break
            if dep.state == DEP_FAILED:
                raise Failure(f"sampling deployment failed to start: {dep.status.message}", "server")
            if time.monotonic() > deadline:
                raise Failure("sampling deployment did not become ready in time", "server")
            await asyncio.sleep(0.2)
        if isinstance(target, Snapshot):
            await self.cp.hot_loads.load(ACCOUNT, dep_id, HotLoadRequest(identity=target.identity, mode="SYNC"))
            await self._wait_loaded(dep_id, target.identity)

    async def _wait_loaded(self, dep_id: str, identity: str) -> None:
        try:
            await wait_until_serving(lambda: self.cp.hot_loads.status(ACCOUNT, dep_id), identity, START_TIMEOUT_S,
                                     where=f"sampling deployment {dep_id}", poll_s=0.2)
        except FiretitanError as exc:
            raise Failure(f"snapshot {identity!r} did not load: {exc}", "server") from exc

    async def close(self) -> None:
        for dep_id in list(self._deps.values()):
            await self._delete(dep_id)
        self._deps.clear()


async def sample(cp: ControlPlane, dep_id: str, prompt: list[int], num_samples: int,
                 params: dict[str, Any]) -> list[dict[str, Any]]:
    """Sample `num_samples` continuations on one replica: [{tokens, logprobs, stop_reason}]."""
    ready = cp.deployments.ready_replicas(ACCOUNT, dep_id)
    if not ready:
        raise Failure("the sampling deployment has no ready replica", "server")
    url = ready[sorted(ready)[0]]
    body: dict[str, Any] = {"prompt": prompt, "n": num_samples, "logprobs": True, "raw_output": True,
                            "max_tokens": params.get("max_tokens") or 16,
                            "temperature": params.get("temperature", 1.0),
                            "top_p": params.get("top_p", 1.0), "top_k": params.get("top_k", -1),
                            "seed": params.get("seed")}
    stop = params.get("stop")
    if stop == []:
        body["ignore_eos"] = True  # Tinker: an empty stop list turns off every stop, EOS included
    elif isinstance(stop, str):
        body["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, int) for s in stop):
        body["stop_token_ids"] = stop
    elif isinstance(stop, list):
        body["stop"] = stop
    import aiohttp

    async with cp.session.post(f"{url}/v1/completions", json=body,
                               timeout=aiohttp.ClientTimeout(total=3600)) as resp:
        reply = await resp.json(content_type=None)
        if resp.status != 200:
            message = reply.get("error", {}).get("message") if isinstance(reply, dict) else str(reply)
            raise Failure(f"sample: {message}", "user" if resp.status < 500 else "server")
    out = []
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
        tokens = choice["raw_output"]["completion_token_ids"]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or [0.0] * len(tokens)
        out.append({"tokens": tokens, "logprobs": logprobs,
                    "stop_reason": "length" if choice.get("finish_reason") == "length" else "stop"})
    return out
