"""Hot-load over HTTP: base then delta, LoRA, ASYNC/SYNC swaps mid-stream, refused deltas and corrupt snapshots."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from deployment_http_helpers import TIMEOUT, post, stream
from lora_helpers import random_lora

from firetitan.checkpoints import SnapshotStore
from firetitan.models import load_model
from firetitan.server.process import WorkerProcess

NANO = "firetitan/nano-qwen3"
PROMPT = [1, 40, 41, 42, 43, 44]


async def hot_load(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, out, _ = await post(f"{url}/hot_load/v1/models/hot_load", body)
    return status, out


async def hot_status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(f"{url}/hot_load/v1/models/hot_load") as resp:
        assert resp.status == 200
        return await resp.json()


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def reference(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT + tokens])).logits[0].float(), dim=-1)
    return lp[len(PROMPT) - 1: -1].gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


async def sample(url: str, **kw: Any) -> tuple[list[int], torch.Tensor, set[str]]:
    status, body, _ = await post(f"{url}/inference/v1/completions", {
        "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "logprobs": True, "raw_output": True,
        "ignore_eos": True, "seed": 3, **kw})
    assert status == 200, body
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    return (choice["raw_output"]["completion_token_ids"], torch.tensor([e["logprob"] for e in content]),
            {e["policy_version"] for e in content})


@pytest.fixture(scope="module")
def store(store_dir: Path) -> SnapshotStore:
    return SnapshotStore(store_dir)


@pytest.fixture(scope="module")
def nano_sd() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(NANO).state_dict().items()}


async def test_base_then_delta_logprobs_match_full_weights_and_bad_loads_are_refused(
        worker: WorkerProcess, store: SnapshotStore, nano_sd: dict[str, torch.Tensor]) -> None:
    model = load_model(NANO)
    sd1 = perturbed(nano_sd, 1)
    base = store.save_base("swap-base-a1", sd1, model.config, base_model=NANO)
    status, out = await hot_load(worker.url, {"identity": base.identity})
    assert status == 200, out
    state = await hot_status(worker.url)
    assert state["current_snapshot_identity"] == base.identity and state["replicas"][0]["readiness"] is True
    model.load_state_dict(sd1)
    tokens, lps, versions = await sample(worker.url)
    assert versions == {base.identity}
    assert torch.allclose(lps, reference(model, tokens), atol=1e-4)

    sd2 = perturbed(sd1, 2, scale=0.01)
    delta = store.save_delta("swap-delta-a1", sd2, base.identity)
    status, out = await hot_load(worker.url, {"identity": delta.identity, "incremental_snapshot_metadata": {
        "previous_snapshot_identity": base.identity}})
    assert status == 200, out
    model.load_state_dict(sd2)
    tokens, lps, versions = await sample(worker.url)
    assert versions == {delta.identity}
    assert torch.allclose(lps, reference(model, tokens), atol=1e-4)

    # A delta made against another base is refused with 409; the deployment keeps serving the delta above.
    other = store.save_base("swap-base-b1", perturbed(nano_sd, 3), model.config, base_model=NANO)
    stray = store.save_delta("swap-delta-b1", perturbed(nano_sd, 4), other.identity)
    status, out = await hot_load(worker.url, {"identity": stray.identity, "incremental_snapshot_metadata": {
        "previous_snapshot_identity": other.identity}})
    assert status == 409 and out["error"]["type"] == "ConflictError"
    # ... also when the body claims the loaded base but the delta says otherwise.
    status, out = await hot_load(worker.url, {"identity": stray.identity, "incremental_snapshot_metadata": {
        "previous_snapshot_identity": base.identity}})
    assert status == 409
    tokens2, lps2, versions = await sample(worker.url)
    assert versions == {delta.identity} and tokens2 == tokens and torch.allclose(lps2, lps, atol=1e-6)

    # A corrupt base (flipped bytes in its payload) is refused the same way.
    bad = store.save_base("swap-base-corrupt", perturbed(nano_sd, 5), model.config, base_model=NANO)
    weights = store.base_dir(bad.identity) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-64] ^= 0xFF
    weights.write_bytes(bytes(raw))
    status, out = await hot_load(worker.url, {"identity": bad.identity})
    assert status == 409 and out["error"]["type"] == "SnapshotError"
    state = await hot_status(worker.url)
    assert state["current_snapshot_identity"] == delta.identity
    assert state["loading_state"]["stage"] == "error" and "corrupt" in state["loading_state"]["error"]
    tokens3, _, versions = await sample(worker.url)
    assert versions == {delta.identity} and tokens3 == tokens

    status, out = await hot_load(worker.url, {"identity": "no-such-snapshot"})
    assert status == 404
    status, out = await hot_load(worker.url, {"identity": "../etc"})
    assert status == 400 and out["error"]["field"] == "identity"


async def test_async_swap_mid_stream_and_sync_swap_after_drain(
        worker: WorkerProcess, store: SnapshotStore, nano_sd: dict[str, torch.Tensor]) -> None:
    config = load_model(NANO).config
    new = store.save_base("swap-base-async", perturbed(nano_sd, 6), config, base_model=NANO)
    old_version = (await hot_status(worker.url))["policy_version"]
    url = f"{worker.url}/inference/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 200, "logprobs": True, "raw_output": True, "ignore_eos": True}
    started = asyncio.Event()
    task = asyncio.create_task(stream(url, body, started))
    await asyncio.wait_for(started.wait(), 60)
    status, out = await hot_load(worker.url, {"identity": new.identity, "mode": "ASYNC"})
    assert status == 200, out
    chunks, _ = await task
    versions = chunks[-1]["choices"][0]["raw_output"]["policy_versions"]  # complete, on the final chunk
    assert versions[0] == old_version and versions[-1] == new.identity
    switch = versions.index(new.identity)
    assert set(versions[:switch]) == {old_version} and set(versions[switch:]) == {new.identity}

    sync = store.save_base("swap-base-sync", perturbed(nano_sd, 7), config, base_model=NANO)
    started = asyncio.Event()
    task = asyncio.create_task(stream(url, {**body, "max_tokens": 60}, started))
    await asyncio.wait_for(started.wait(), 60)
    status, out = await hot_load(worker.url, {"identity": sync.identity, "mode": "SYNC"})
    assert status == 200, out
    # A request arriving during the drain waits for the swap, then runs on the new weights.
    _, _, late_versions = await sample(worker.url, max_tokens=3)
    assert late_versions == {sync.identity}
    chunks, _ = await task
    versions = set(chunks[-1]["choices"][0]["raw_output"]["policy_versions"])
    assert versions == {new.identity}  # SYNC drained the running request on the old weights
    for _ in range(100):
        if (await hot_status(worker.url))["current_snapshot_identity"] == sync.identity:
            break
        await asyncio.sleep(0.05)
    _, _, versions = await sample(worker.url)
    assert versions == {sync.identity}


async def test_lora_adapter_logprobs_match_peft_model(worker: WorkerProcess, store: SnapshotStore,
                                                      nano_sd: dict[str, torch.Tensor]) -> None:
    peft_model = random_lora(load_model(NANO))
    adapter = store.save_lora("swap-lora", peft_model, base_model=NANO)
    status, out = await hot_load(worker.url, {"identity": adapter.identity})
    assert status == 200, out
    state = await hot_status(worker.url)
    assert state["replicas"][0]["loaded_adapters"] == [{"identity": adapter.identity, "status": "loaded"}]
    tokens, lps, versions = await sample(worker.url)
    assert versions == {adapter.identity}
    assert torch.allclose(lps, reference(peft_model, tokens), atol=1e-4)

    # Leave the worker serving the original weights for any test that runs after this module.
    restore = store.save_base("swap-restore", nano_sd, load_model(NANO).config, base_model=NANO)
    status, _ = await hot_load(worker.url, {"identity": restore.identity})
    assert status == 200


@pytest.mark.slow
async def test_async_load_reports_pending_and_sdk_delta_chains_are_accepted(
        store: SnapshotStore, store_dir: Path, nano_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """A replica whose ASYNC answer may not wait (FIRETITAN_HOT_LOAD_WAIT_S=0) says 504 "pending", never
    success, and its status names the target; a delta naming the last loaded delta as `previous` (the
    official SDK's chain) is accepted when that delta is served on the same base."""
    from firetitan.server.process import spawn_worker

    config = load_model(NANO).config
    base = store.save_base("chain-base", perturbed(nano_sd, 11), config, base_model=NANO)
    d1 = store.save_delta("chain-d1", perturbed(nano_sd, 12), base.identity)
    d2 = store.save_delta("chain-d2", perturbed(nano_sd, 13), base.identity)
    assert store.delta_base(d2.identity) == base.identity and store.delta_base(base.identity) is None
    proc = spawn_worker("firetitan.server.deployment",
                        ["--base-model", NANO, "--store-dir", str(store_dir), "--deployment-id", "pending-dep"],
                        threads=1, log_path=tmp_path / "worker.log", ready_timeout=180,
                        env={"FIRETITAN_HOT_LOAD_WAIT_S": "0"})
    try:
        status, out = await hot_load(proc.url, {"identity": base.identity, "mode": "ASYNC"})
        assert status == 504 and out["error"]["field"] == "identity" and "pending" in out["error"]["message"]
        state = await hot_status(proc.url)
        assert state["loading_state"]["target_snapshot_identity"] == base.identity
        for _ in range(200):
            state = await hot_status(proc.url)
            if state["current_snapshot_identity"] == base.identity:
                break
            await asyncio.sleep(0.05)
        assert state["replicas"][0]["readiness"] and state["loading_state"]["stage"] == "done"

        # SYNC answers once the swap is queued, so the chain below is driven with SYNC loads.
        async def load_and_wait(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            status, out = await hot_load(proc.url, {**body, "mode": "SYNC"})
            for _ in range(200):
                if status != 200 or (await hot_status(proc.url))["current_snapshot_identity"] == body["identity"]:
                    break
                await asyncio.sleep(0.05)
            return status, out

        meta = {"compression_format": "arc_v2", "checksum_format": "sha256"}
        assert (await load_and_wait({"identity": d1.identity, "incremental_snapshot_metadata": {
            "previous_snapshot_identity": base.identity, **meta}}))[0] == 200
        status, out = await load_and_wait({"identity": d2.identity, "incremental_snapshot_metadata": {
            "previous_snapshot_identity": d1.identity, **meta}})
        assert status == 200, out
        state = await hot_status(proc.url)
        assert (state["current_snapshot_identity"], state["replicas"][0]["base_snapshot_identity"]) == \
            (d2.identity, base.identity)
        # A `previous` that is neither the base nor the served snapshot is still refused.
        status, out = await hot_load(proc.url, {"identity": d1.identity, "incremental_snapshot_metadata": {
            "previous_snapshot_identity": "chain-other"}})
        assert status == 409 and out["error"]["field"] == "incremental_snapshot_metadata.previous_snapshot_identity"
    finally:
        proc.stop(timeout=10)
