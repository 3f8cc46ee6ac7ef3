"""Same-host hot-load over HTTP: a trainer publishes through shared memory, the replica worker serves it; a damaged segment is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import torch
from deployment_http_helpers import TIMEOUT, post
from shm_helpers import flip_one_bit

from firetitan.checkpoints import SnapshotStore, shm
from firetitan.models import load_model
from firetitan.server.process import WorkerProcess
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

NANO = "firetitan/nano-qwen3"
PROMPT = [1, 40, 41, 42, 43, 44]


def train_step(engine: TrainerEngine, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, engine.vocab_size, (2, 9), generator=gen)
    data = [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": TensorData.from_torch(r[1:])}) for r in ids]
    engine.forward(prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id), backward=True)
    engine.optim_step(AdamParams(learning_rate=1e-2))


async def status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(f"{url}/hot_load/v1/models/hot_load") as resp:
        assert resp.status == 200
        return await resp.json()


async def served_vs_trainer(url: str, engine: TrainerEngine) -> tuple[float, set[str]]:
    """Largest |served - trainer weights| logprob over 10 sampled tokens, and the policy versions seen."""
    code, body, _ = await post(f"{url}/inference/v1/completions", {
        "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "logprobs": True, "raw_output": True,
        "ignore_eos": True, "seed": 3})
    assert code == 200, body
    choice = body["choices"][0]
    tokens = choice["raw_output"]["completion_token_ids"]
    got = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
    model = load_model(NANO)
    model.load_state_dict(engine.model.state_dict())
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT + tokens])).logits[0].float(), dim=-1)
    want = lp[len(PROMPT) - 1: -1].gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    return float((got - want).abs().max()), {e["policy_version"] for e in choice["logprobs"]["content"]}


async def test_shm_base_and_delta_hot_load_over_http_and_a_damaged_segment_is_refused(
        worker: WorkerProcess, store_dir: Path) -> None:
    directory = shm.segment_dir(store_dir)
    assert directory is not None and shm.has_live_reader(directory)  # the replica worker registered itself
    engine = TrainerEngine("shm", ModelSpec(NANO), store=SnapshotStore(store_dir), states=None)
    published: set[str] = set()  # this engine's snapshots (other tests' engines share the session's store)
    try:
        train_step(engine, 1)
        base = engine.save_for_sampler("shm-http-base", None, None)
        assert base["size_bytes"] is None  # published in shared memory; files follow in the background
        published.add(base["path"])
        code, body, _ = await post(f"{worker.url}/hot_load/v1/models/hot_load", {"identity": base["path"]})
        assert code == 200, body
        diff, versions = await served_vs_trainer(worker.url, engine)
        assert versions == {base["path"]} and diff < 1e-4

        train_step(engine, 2)
        delta = engine.save_for_sampler("shm-http-delta", None, None)
        assert delta["checkpoint_type"] == "delta"
        published.add(delta["path"])
        assert {s.identity for s in shm.live_segments(directory)} >= published  # both live until close()
        path = shm.find(directory, delta["path"])
        assert path is not None
        flip_one_bit(path)
        code, body, _ = await post(f"{worker.url}/hot_load/v1/models/hot_load", {
            "identity": delta["path"],
            "incremental_snapshot_metadata": {"previous_snapshot_identity": base["path"]}})
        assert code == 409 and "CRC-32" in str(body), body
        assert (await status(worker.url))["current_snapshot_identity"] == base["path"]
        _diff, versions = await served_vs_trainer(worker.url, engine)
        assert versions == {base["path"]}
    finally:
        engine.close()
    assert len(published) == 2
    assert [s for s in shm.live_segments(directory) if s.identity in published] == []
