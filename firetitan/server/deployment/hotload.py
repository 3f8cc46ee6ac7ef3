"""Hot-load on a replica: read, verify and prepare snapshot weights off the engine thread, hand them to
the engine, and track what is served and what is loading."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from firetitan.checkpoints import SnapshotStore, shm, validate_name
from firetitan.errors import APITimeoutError, ConflictError, SnapshotError
from firetitan.logging import get_logger
from firetitan.server.deployment.engine import WeightSwap
from firetitan.server.deployment.schemas import (
    HotLoadRequest,
    HotLoadStatus,
    LoadingState,
    ReplicaHotLoadStatus,
)
from firetitan.torch_threads import run_serial

log = get_logger("firetitan.deployment.hotload")

# How long an ASYNC load's answer waits for the engine to swap; past it the answer is a 504 that says
# the load is still pending (GET the status to follow it), never a success.
ASYNC_WAIT_ENV = "FIRETITAN_HOT_LOAD_WAIT_S"
_ASYNC_WAIT_S = 120.0
_HISTORY = 20  # bounded: the status shows the last loads only


@dataclass
class PreparedWeights:
    """A full state dict ready to copy into the model, and what it is."""

    identity: str
    kind: str  # base | delta | lora
    state_dict: dict[str, torch.Tensor]
    base_identity: str | None  # the base this leaves loaded (deltas and LoRA keep the previous one)
    source_dir: Path | None = None  # set by loaders for engines that reload from an HF directory (vLLM)
    # A base as stored (its snapshot dtype), which later deltas XOR against, when the served dtype differs.
    stored: dict[str, torch.Tensor] | None = None
    segment: shm.SegmentName | None = None  # read from this shared-memory segment, not from the files


@dataclass
class HotLoadState:
    """Which snapshot is served, which base deltas must apply to, and the base weights kept for them."""

    base_model: str
    current_identity: str | None = None
    base_identity: str | None = None
    base_state_dict: dict[str, torch.Tensor] | None = None
    loaded_adapters: list[dict[str, Any]] = field(default_factory=list)
    loading: LoadingState = field(default_factory=LoadingState)
    history: list[dict[str, Any]] = field(default_factory=list)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class SnapshotLoader:
    """Turns a snapshot identity into a full state dict for the served model (runs in a worker thread).

    `served` is the reference layout (names, shapes, dtypes) of the model's weights; `startup` the
    weights the deployment started with, which LoRA adapters are merged into. With `shm_sync` (and
    $FIRETITAN_SHM_SYNC not 0) the loader registers as a reader of the store's shared-memory directory
    on this host, and loads a snapshot a trainer published there from the segment (`checkpoints/shm.py`).
    """

    # A loader that needs the snapshot as files (vLLM reloads from an HF directory) sets this False.
    shm_sync = True

    def __init__(self, store: SnapshotStore, served: dict[str, torch.Tensor], startup: dict[str, torch.Tensor]) -> None:
        self.store = store
        self.layout = {k: (tuple(v.shape), v.dtype) for k, v in served.items()}
        self.startup = startup
        self.shm_dir = shm.segment_dir(store.root) if self.shm_sync and shm.enabled() else None
        if self.shm_dir is not None:
            shm.register_reader(self.shm_dir)

    def check_chain(self, identity: str, previous: str | None, state: HotLoadState) -> str:
        """Refuse (409) a delta whose base is not the loaded one before reading any payload; returns kind.
        A snapshot whose files a trainer still writes in the background answers from its pending marker."""
        kind, wanted = self.store.chain_facts(identity)
        if kind == "delta":
            # The official SDK names the snapshot it loaded last as `previous`: accept it when that is
            # what this replica serves on the delta's own base (the chain is then the same).
            chained = previous == state.current_identity and state.base_identity == wanted
            if previous is not None and previous != wanted and not chained:
                raise ConflictError(
                    f"incremental_snapshot_metadata.previous_snapshot_identity {previous!r} does not match "
                    f"the delta's base {wanted!r}", field="incremental_snapshot_metadata.previous_snapshot_identity")
            if state.base_identity != wanted:
                raise ConflictError(
                    f"delta {identity!r} applies to base {wanted!r}, but the loaded base is "
                    f"{state.base_identity!r}; hot-load that base first",
                    field="incremental_snapshot_metadata.previous_snapshot_identity")
        elif previous is not None:
            raise ConflictError(f"snapshot {identity!r} is a {kind} snapshot, not a delta; send "
                                "incremental_snapshot_metadata only for deltas",
                                field="incremental_snapshot_metadata")
        return kind

    def prepare(self, identity: str, state: HotLoadState) -> PreparedWeights:
        segment = shm.find(self.shm_dir, identity)
        if segment is not None:
            return self._from_segment(segment, identity, state)
        self.store.wait_published(identity)  # files a trainer writes in the background
        # Whole-file checksums first: a corrupt payload is refused. A base's weights file is skipped there
        # because load_state_dict checks each of its tensors against its digest (one hash per tensor).
        manifest = self.store.verify(identity, tensors_checked=True)
        if manifest.kind == "base":
            sd = self.store.load_state_dict(identity, verify=True)
            served = self._checked(sd, identity)
            same = all(served[k] is v for k, v in sd.items())  # no cast: one copy serves both purposes
            return PreparedWeights(identity, "base", served, identity, stored=None if same else sd)
        if manifest.kind == "delta":
            if state.base_identity is None:
                raise SnapshotError(f"delta {identity!r} needs its base loaded first")
            if state.base_state_dict is None:  # the base came from shared memory: read it from the store once
                # (the unchanged base weights later deltas XOR against, whatever this load's outcome)
                state.base_state_dict = self.store.load_state_dict(state.base_identity)
            sd = self.store.load_state_dict(identity, state.base_state_dict, base_identity=state.base_identity)
            return PreparedWeights(identity, "delta", self._checked(sd, identity), state.base_identity)
        merged = self._merge_lora(identity)
        return PreparedWeights(identity, "lora", merged, state.base_identity)

    def _from_segment(self, path: Path, identity: str, state: HotLoadState) -> PreparedWeights:
        """Full weights straight from a trainer's segment: each tensor CRC-checked once, then handed to the
        engine as views of the mapping, so the copy into the model is the only copy."""
        segment = shm.open_segment(path)
        kind = segment.header["kind"]
        if kind not in ("base", "delta"):
            raise SnapshotError(f"shared-memory segment {path.name!r} has kind {kind!r}; expected base or delta")
        served = self._checked(segment.tensors, identity)
        base = identity if kind == "base" else state.base_identity
        return PreparedWeights(identity, kind, served, base, segment=segment.name)

    def _checked(self, sd: dict[str, torch.Tensor], identity: str) -> dict[str, torch.Tensor]:
        """Same names and shapes as the served model (tied aliases may be absent); cast dtypes."""
        unknown = sorted(set(sd) - set(self.layout))
        if unknown:
            raise SnapshotError(f"snapshot {identity!r} has weights the model lacks: {unknown[:3]}")
        missing = sorted(set(self.layout) - set(sd))
        if missing:
            raise SnapshotError(f"snapshot {identity!r} lacks weights: {missing[:3]}")
        out = {}
        for name, tensor in sd.items():
            shape, dtype = self.layout[name]
            if tuple(tensor.shape) != shape:
                raise SnapshotError(f"snapshot {identity!r}: {name} has shape {tuple(tensor.shape)}, model has {shape}")
            out[name] = tensor.to(dtype)
        return out

    def _merge_lora(self, identity: str) -> dict[str, torch.Tensor]:
        """Fold a PEFT LoRA adapter into a copy of the startup weights: W + scale * B @ A."""
        directory = self.store.lora_dir(identity)
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
            adapter = load_file(str(directory / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"LoRA snapshot {identity!r} is unreadable: {exc}") from exc
        for flag in ("use_dora", "fan_in_fan_out"):
            if config.get(flag):
                raise SnapshotError(f"LoRA snapshot {identity!r} uses {flag}, which the deployment cannot merge")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in adapter.items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise SnapshotError(f"LoRA snapshot {identity!r} has an unsupported tensor {key!r}")
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        merged = dict(self.startup)
        for module, ab in pairs.items():
            target = f"{module}.weight"
            if target not in merged or set(ab) != {"A", "B"}:
                raise SnapshotError(f"LoRA snapshot {identity!r}: no base weight for {module!r}")
            base = merged[target]
            update = (ab["B"].double() @ ab["A"].double()) * scale
            if update.shape != base.shape:
                raise SnapshotError(f"LoRA snapshot {identity!r}: {module} update shape {tuple(update.shape)}")
            merged[target] = (base.double() + update).to(base.dtype)
        return merged


class ReplicaHotLoader:
    """One replica's hot-load route logic. Each load runs in one task that holds the load lock from
    reading the snapshot to the engine's swap, so loads never overlap and the lock never changes task."""

    def __init__(self, loader: SnapshotLoader | None, state: HotLoadState, engine: Any, *, deployment_id: str,
                 replica_index: int, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self.loader, self.state, self.engine = loader, state, engine
        self.deployment_id, self.replica_index = deployment_id, replica_index
        self._spawn = spawn
        self._lock = asyncio.Lock()
        self.async_wait_s = float(os.environ.get(ASYNC_WAIT_ENV, _ASYNC_WAIT_S))

    def status(self) -> HotLoadStatus:
        hot = self.state
        ready = hot.loading.stage not in ("loading", "swapping")
        replica = ReplicaHotLoadStatus(
            replica_index=self.replica_index, readiness=ready, current_snapshot_identity=hot.current_identity,
            base_snapshot_identity=hot.base_identity, policy_version=self.engine.policy_version,
            loading_state=hot.loading.model_copy(), loaded_adapters=list(hot.loaded_adapters))
        return HotLoadStatus(
            deployment_id=self.deployment_id, base_model=hot.base_model, readiness=ready,
            current_snapshot_identity=hot.current_identity, policy_version=self.engine.policy_version,
            loading_state=hot.loading.model_copy(), replica_count=1, replicas=[replica],
            history=hot.history[-_HISTORY:])

    async def load(self, req: HotLoadRequest) -> HotLoadStatus:
        """Refusals (unknown, corrupt, wrong chain) raise before any weight changes. SYNC answers once the
        swap is queued (the engine drains first); ASYNC once it is done, or 504 while it is pending."""
        identity = validate_name(req.identity, field="identity")
        if self.loader is None:
            raise ConflictError("this deployment was started without --store-dir; it cannot hot-load",
                                field="identity")
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._spawn(self._run(identity, req.previous, req.mode, queued))
        task.add_done_callback(lambda _t: queued.done() or queued.set_exception(
            ConflictError(f"hot-load of {identity!r} stopped: the replica is shutting down", field="identity")))
        await asyncio.shield(queued)
        if req.mode == "ASYNC":
            try:
                await asyncio.wait_for(asyncio.shield(task), self.async_wait_s)
            except TimeoutError:
                raise APITimeoutError(
                    f"hot-load of {identity!r} is still pending after {self.async_wait_s:g}s (stage "
                    f"{self.state.loading.stage}); GET /hot_load/v1/models/hot_load to follow it",
                    field="identity") from None
            loading = self.state.loading
            if loading.stage == "error" and loading.target_snapshot_identity == identity:
                raise ConflictError(f"hot-load of {identity!r} failed: {loading.error}", field="identity")
        return self.status().model_copy(update={"identity": identity, "mode": req.mode})

    async def _run(self, identity: str, previous: str | None, mode: str, queued: asyncio.Future[None]) -> None:
        assert self.loader is not None
        async with self._lock:
            self.state.loading = LoadingState(stage="loading", identity=identity, target_snapshot_identity=identity,
                                              mode=mode, started_at=time.time())
            try:
                # serial: the engine thread keeps the OpenMP pool to itself (see firetitan.torch_threads)
                await asyncio.to_thread(run_serial, self.loader.check_chain, identity, previous, self.state)
                prepared = await asyncio.to_thread(run_serial, self.loader.prepare, identity, self.state)
            except Exception as exc:
                self._record_error(identity, exc)
                queued.set_exception(exc)
                return
            self.state.loading.stage = "swapping"
            loop = asyncio.get_running_loop()
            done: asyncio.Future[BaseException | None] = loop.create_future()

            def on_done(error: BaseException | None) -> None:  # called on the engine thread
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(error))

            self.engine.swap_weights(WeightSwap(prepared.state_dict, identity, mode, on_done,
                                                source_dir=prepared.source_dir))
            queued.set_result(None)
            error = await done
            if error is not None:
                self._record_error(identity, error)
                return
            self._served(prepared)

    def _served(self, prepared: PreparedWeights) -> None:
        hot = self.state
        hot.current_identity = prepared.identity
        if prepared.kind == "base":
            hot.base_identity = prepared.identity
            # A base from shared memory is not kept (its mapping goes now): a later delta that comes as
            # files reads that base from the store once.
            hot.base_state_dict = None if prepared.segment is not None else (
                prepared.stored if prepared.stored is not None else prepared.state_dict)
        if prepared.segment is not None and self.loader is not None and self.loader.shm_dir is not None:
            shm.ack(self.loader.shm_dir, prepared.segment)
        hot.loaded_adapters = [{"identity": prepared.identity, "status": "loaded"}] if prepared.kind == "lora" else []
        hot.loading.stage, hot.loading.finished_at = "done", time.time()
        self._remember({"identity": prepared.identity, "kind": prepared.kind, "status": "loaded",
                        "at": hot.loading.finished_at})
        log.info("hot_loaded", identity=prepared.identity, kind=prepared.kind, deployment_id=self.deployment_id)

    def _record_error(self, identity: str, exc: BaseException) -> None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        loading = self.state.loading
        loading.stage, loading.error, loading.finished_at = "error", message, time.time()
        self._remember({"identity": identity, "status": "error", "error": message, "at": loading.finished_at})
        log.warning("hot_load_refused", identity=identity, error=message, serving=self.engine.policy_version)

    def _remember(self, entry: dict[str, Any]) -> None:
        self.state.history.append(entry)
        del self.state.history[:-_HISTORY]
