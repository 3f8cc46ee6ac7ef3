"""A job trainer (preloaded model): create_model reuses it, the model cap holds, its latest train state
survives kill -9 and SIGTERM, and a reconnecting client is told what was lost."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import aiohttp
import pytest
import torch
from trainer_procs import NANO, Trainer, start_trainer

from firetitan.checkpoints import SnapshotStore
from firetitan.client.training import TrainingClient
from firetitan.errors import ConflictError
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

KEY = "test-key"
JOB = ["--base-model", NANO, "--job-id", "job", "--max-models", "2", "--autosave-every", "2",
       "--autosave-keep", "2", "--api-key", KEY]
SEQ = [5, 17, 42, 99, 7, 300, 11]
DATA = [Datum(model_input=ModelInput.from_ints(SEQ[:-1]),
              loss_fn_inputs={"target_tokens": TensorData.from_list(SEQ[1:], "int64")})]


def train(tc: TrainingClient, steps: int) -> None:
    for _ in range(steps):
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(AdamParams(learning_rate=1e-2))
    tc.forward(DATA).result(120)  # everything before it ran


def weights(tc: TrainingClient, store: SnapshotStore, name: str) -> dict[str, torch.Tensor]:
    return store.load_state_dict(tc.save_weights_for_sampler(name, checkpoint_type="base").result(120).path)


def kill9(t: Trainer) -> None:
    os.kill(t.process.pid, signal.SIGKILL)
    t.process.stop()  # reaps it


def info_with_warning(t: Trainer) -> tuple[object, list[warnings.WarningMessage]]:
    tc = TrainingClient(t.url, "job", api_key=KEY)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = tc.get_info().result(120)
        return info, [w for w in caught if issubclass(w.category, RuntimeWarning)]
    finally:
        tc.close()


@pytest.mark.slow
async def test_create_model_reuses_the_preloaded_model_and_the_cap_holds(tmp_path: Path) -> None:
    t = start_trainer(tmp_path, *JOB)
    try:
        same = await TrainingClient.create_async(t.url, NANO, api_key=KEY)
        assert same.model_id == "job"  # no second full copy
        # The official fireworks SDK's request for the same full-parameter model (rank 0, alpha unset).
        from fireworks.training.sdk import types as fw

        official = fw.CreateModelRequest(session_id="s", model_seq_id=0, base_model=NANO,
                                         lora_config=fw.LoraConfig(rank=0, train_mlp=True))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.post(f"{t.url}/api/v1/create_model",
                                 json=official.model_dump(exclude_none=True, mode="json")) as resp:
                assert (resp.status, (await resp.json())["model_id"]) == (200, "job")
            async with http.post(f"{t.url}/api/v1/get_info", json={"model_id": "s:train:0"}) as resp:
                assert (await resp.json())["model_id"] == "job"  # the Tinker id is an alias
        ref = await TrainingClient.create_async(t.url, NANO, forward_only=True, api_key=KEY)
        assert ref.model_id != "job"
        with pytest.raises(ConflictError) as err:  # a third model is over --max-models 2
            await TrainingClient.create_async(t.url, NANO, lora_rank=4, api_key=KEY)
        assert err.value.field == "base_model"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{t.url}/health") as resp:
                assert await resp.json() == {"status": "ok"}  # no key: alive, nothing more
            async with http.get(f"{t.url}/health", headers={"Authorization": f"Bearer {KEY}"}) as resp:
                assert set((await resp.json())["models"]) == {"job", ref.model_id}
        for tc in (same, ref):
            await tc.close_async()
    finally:
        t.process.stop()


@pytest.mark.slow
def test_latest_state_survives_kill_and_stop_and_the_client_is_told_what_was_lost(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_trainer(tmp_path / "a", *JOB, state_dir=state)
    try:
        tc = TrainingClient(first.url, "job", api_key=KEY)
        train(tc, 4)  # autosaved at steps 2 and 4
        at_four = weights(tc, SnapshotStore(first.store_dir), "four")
        train(tc, 1)  # step 5: recorded, not saved
        tc.close()
    finally:
        kill9(first)
    assert sorted(p.name for p in (state / "latest").iterdir() if p.name.startswith("step-")) == [
        "step-0000000002", "step-0000000004"]

    second = start_trainer(tmp_path / "b", *JOB, state_dir=state)
    try:
        info, warned = info_with_warning(second)
        assert (info.step, info.restored_from_step, info.steps_lost) == (4, 4, 1)
        assert warned and "1 step(s)" in str(warned[0].message)
        tc = TrainingClient(second.url, "job", api_key=KEY)
        restored = weights(tc, SnapshotStore(second.store_dir), "restored")
        assert all(torch.equal(restored[k], at_four[k]) for k in at_four)
        train(tc, 1)  # step 5 again, then a graceful stop saves it
        tc.close()
    finally:
        second.process.stop()

    third = start_trainer(tmp_path / "c", *JOB, state_dir=state)
    try:
        info, _ = info_with_warning(third)
        assert (info.step, info.restored_from_step, info.steps_lost) == (5, 5, 0)
    finally:
        third.process.stop()
    # Bounded: only the newest two automatic states are kept.
    assert sorted(p.name for p in (state / "latest").iterdir() if p.name.startswith("step-")) == [
        "step-0000000004", "step-0000000005"]
