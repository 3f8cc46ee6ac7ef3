"""Hot-load into the vLLM child: prepare a snapshot as an HF directory, then swap vLLM's weights in place.

Preparation (read, verify checksums, check the delta chain, apply a delta or merge a LoRA adapter) is
firetitan's own `SnapshotLoader`, run in a worker thread by the shared `ReplicaHotLoader` (the hot-load
routes, the load lock and the status are the embedded worker's); a base snapshot is already an HF directory and
is handed to vLLM as is, anything else is written once as `model.safetensors` + `config.json` under a
scratch directory (only the latest prepared one is kept: one model's worth of disk).

The swap uses vLLM's development API (the child runs with `VLLM_SERVER_DEV_MODE=1` on loopback only):
`POST /pause?mode=keep` freezes running requests with their KV cache, `POST /collective_rpc`
`reload_weights(weights_path=DIR)` reloads every parameter in place, `POST /update_weight_version`
labels the new weights, `POST /resume` continues the frozen requests on the new weights (ASYNC).
SYNC stops admission at the front, lets running requests finish on the old weights, then swaps
(`VllmEngine.swap_weights`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import torch
from safetensors.torch import load_file, save_file

from firetitan.checkpoints import SnapshotStore
from firetitan.errors import APIStatusError
from firetitan.logging import get_logger
from firetitan.server.deployment.hotload import HotLoadState, PreparedWeights, SnapshotLoader

log = get_logger("firetitan.deployment.vllm")

_QUIET_S = 0.05  # a paused engine emits nothing new: this long without a chunk means none is in flight
# The relay can trail vLLM by seconds (8 nano streams on 2 cores: up to ~20 s behind vLLM's engine), and
# every chunk still on its way was sampled on the old weights: the swap waits for it rather than tag it new.
_QUIET_MAX_S = 60.0
_RELOAD_TIMEOUT_S = 600.0


def startup_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The startup weights (reference layout for snapshots, and what LoRA adapters merge into)."""
    files = sorted(model_dir.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


class VllmSnapshotLoader(SnapshotLoader):
    """The shared snapshot loader, plus the HF directory vLLM reloads from (`PreparedWeights.source_dir`).

    The reference layout and the LoRA merge base are the startup weights read from the served directory
    (no model lives in the worker process)."""

    shm_sync = False  # vLLM reloads from an HF directory: it needs the snapshot's files

    def __init__(self, store: SnapshotStore, model_dir: Path, scratch: Path) -> None:
        startup = startup_state_dict(model_dir)
        super().__init__(store, startup, startup)
        self.model_dir = model_dir
        self.scratch = scratch

    def prepare(self, identity: str, state: HotLoadState) -> PreparedWeights:
        """Runs in a worker thread: a base is already an HF directory; anything else is written once."""
        prepared = super().prepare(identity, state)
        if prepared.kind == "base":
            prepared.source_dir = self.store.base_dir(identity)
            return prepared
        target = self.scratch / "prepared"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        # Tied weights must be stored once (safetensors refuses shared storage); vLLM ties them again.
        tied = json.loads((self.model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
        tensors = {k: v.contiguous() for k, v in prepared.state_dict.items() if not (tied and k == "lm_head.weight")}
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(self.model_dir / "config.json", target / "config.json")
        for extra in ("generation_config.json",):
            if (self.model_dir / extra).is_file():
                shutil.copy(self.model_dir / extra, target / extra)
        prepared.source_dir = target
        return prepared


async def _post(session: aiohttp.ClientSession, url: str, path: str, **kwargs: object) -> None:
    async with session.post(f"{url}{path}", **kwargs) as resp:  # type: ignore[arg-type]
        if resp.status != 200:
            raise APIStatusError(f"vLLM {path} answered HTTP {resp.status}: {(await resp.text())[:500]}",
                                 status_code=502)


async def wait_quiet(last_chunk_at: Callable[[], float], limit: float = _QUIET_MAX_S) -> None:
    """Wait until no stream chunk has arrived for `_QUIET_S`. Chunks still arriving after `limit` seconds of
    pause mean vLLM did not stop: raise, since flipping the version then would tag old tokens as new."""
    deadline = time.monotonic() + limit
    while (idle := time.monotonic() - last_chunk_at()) < _QUIET_S:
        if time.monotonic() >= deadline:
            raise APIStatusError(f"vLLM streams did not go quiet within {limit:.0f} s of its pause; the swap "
                                 "was not made", status_code=502)
        await asyncio.sleep(_QUIET_S - idle)


async def swap_in_place(session: aiohttp.ClientSession, url: str, directory: Path, identity: str,
                        freeze: bool, before_resume: Callable[[], None],
                        last_chunk_at: Callable[[], float]) -> float:
    """Reload vLLM's weights from `directory`; `freeze` pauses running requests (ASYNC). Returns seconds."""
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=_RELOAD_TIMEOUT_S)
    await _post(session, url, "/pause", params={"mode": "keep" if freeze else "wait", "clear_cache": "false"},
                timeout=timeout)
    try:
        # Chunks sampled before the pause may still be on their way to us: let them land under the old
        # version, so the version a token is tagged with is the one that produced it.
        await wait_quiet(last_chunk_at)
        await _post(session, url, "/collective_rpc", timeout=timeout,
                    json={"method": "reload_weights", "kwargs": {"weights_path": str(directory)}})
        await _post(session, url, "/update_weight_version", json={"new_version": identity})
        before_resume()
    finally:
        await _post(session, url, "/resume")
    seconds = time.perf_counter() - started
    log.info("vllm_weights_reloaded", identity=identity, seconds=round(seconds, 3), directory=str(directory))
    return seconds
