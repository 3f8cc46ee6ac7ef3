"""bf16 end to end on nano-qwen3: a bf16 trainer writes bf16 snapshots that bf16 and float32 deployments serve.

Tolerance of the logprob comparison (bf16 deployment vs bf16 trainer forward), derived, not tuned:
bf16 keeps 8 significant bits, so one rounding of a value m is off by at most |m| * 2^-9. The two sides
round differently: the trainer keeps float32 weights, residual stream and norms and rounds matmul
operands and results (autocast); the deployment holds bf16 weights and a bf16 residual stream. The
logits of nano-qwen3 on these prompts are at most 0.82 in magnitude, so one rounding of a logit moves
it by <= 0.0016, and a logprob z_t - logsumexp(z) by <= 2 x 0.0016 = 0.0032. Each of the 2 layers adds
about two more such roundings (attention and MLP outputs into the residual), so the worst case is
about 0.0032 x (1 + 2 x 2) = 0.016: BF16_LOGPROB_ATOL = 0.02. Measured: 0.0030 (bf16 deployment) and
0.0029 (float32 deployment of the same bf16 snapshot) over 4 prompts x 23 positions; the base snapshot
alone, two optimizer steps (lr 3e-3) behind, is 0.117 off, so the bound still tells the weights apart.
A float32 deployment of float32 weights agrees with the trainer to 1e-4 (test_deployment_http.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deployment_http_helpers import post

from firetitan.checkpoints import SnapshotStore
from firetitan.server.process import WorkerProcess, spawn_worker
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

NANO = "firetitan/nano-qwen3"
PROMPT = [1, 40, 41, 42, 43, 44]
BF16_LOGPROB_ATOL = 0.02


def _worker(store_dir: Path, logs: Path, dtype: str) -> Iterator[WorkerProcess]:
    # Own workers (not the session's shared one): these tests hot-load other weights into them.
    proc = spawn_worker("firetitan.server.deployment",
                        ["--base-model", NANO, "--store-dir", str(store_dir), "--deployment-id", f"{dtype}-dep",
                         "--max-running-seqs", "4", "--max-cached-tokens", "4096", "--device", "cpu",
                         "--dtype", dtype],
                        threads=1, log_path=logs / f"{dtype}-worker.log", ready_timeout=180)
    yield proc
    proc.stop(timeout=10)
    assert not proc.alive()


@pytest.fixture(scope="module")
def bf16_worker(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    yield from _worker(store_dir, tmp_path_factory.mktemp("bf16-logs"), "bfloat16")


@pytest.fixture(scope="module")
def fp32_worker(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    yield from _worker(store_dir, tmp_path_factory.mktemp("fp32-logs"), "float32")


@pytest.fixture(scope="module")
def trained(store_dir: Path) -> tuple[TrainerEngine, list[str]]:
    """A bf16 trainer after 3 steps (base saved) and 2 more (delta saved): the engine and both identities."""
    engine = TrainerEngine("bf16", ModelSpec(NANO, device="cpu", dtype="bfloat16"),
                           store=SnapshotStore(store_dir), states=None)
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 4096, (12,), generator=gen).tolist() for _ in range(4)]
    data = [Datum(model_input=ModelInput.from_ints(s[:-1]),
                  loss_fn_inputs={"target_tokens": TensorData.from_list(s[1:], "int64")}) for s in seqs]
    losses, identities = [], []
    for step in range(5):
        batch = prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id)
        losses.append(engine.forward(batch, backward=True)["metrics"]["loss:sum"])
        engine.optim_step(AdamParams(learning_rate=3e-3))
        if step in (2, 4):
            identities.append(engine.save_for_sampler(f"bf16-{step}", None, None)["path"])
    assert losses[-1] < losses[0]  # it trains under autocast
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())  # float32 master weights
    return engine, identities


def trainer_logprobs(engine: TrainerEngine, seq: list[int]) -> torch.Tensor:
    """The trainer's forward: logprob of seq[t + 1] given seq[: t + 1], for every t."""
    datum = Datum(model_input=ModelInput.from_ints(seq[:-1]),
                  loss_fn_inputs={"target_tokens": TensorData.from_list(seq[1:], "int64")})
    out = engine.forward(prepare_batch([datum], "cross_entropy", None, engine.vocab_size), backward=False)
    return TensorData.model_validate(out["loss_fn_outputs"][0]["logprobs"]).to_torch()


async def hot_load(url: str, identities: list[str]) -> None:
    for i, identity in enumerate(identities):
        meta = {"incremental_snapshot_metadata": {"previous_snapshot_identity": identities[0]}} if i else {}
        status, out, _ = await post(f"{url}/hot_load/v1/models/hot_load", {"identity": identity, **meta})
        assert status == 200, out


async def served_logprobs(url: str, prompt: list[int], seed: int) -> tuple[list[int], torch.Tensor]:
    """Sample 8 tokens with echo: the prompt + completion ids and the served logprob of each after the first."""
    status, body, _ = await post(f"{url}/inference/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "logprobs": True, "raw_output": True,
        "echo": True, "ignore_eos": True, "seed": seed})
    assert status == 200, body
    choice = body["choices"][0]
    return choice["raw_output"]["completion_token_ids"], torch.tensor([e["logprob"] for e in choice["logprobs"]["content"][1:]])


async def max_diff(url: str, engine: TrainerEngine) -> float:
    """Largest |served - trainer| logprob over 4 random prompts (prompt rows teacher-forced, then sampled)."""
    gen = torch.Generator().manual_seed(11)
    worst = 0.0
    for seed in range(4):
        prompt = torch.randint(3, 4096, (16,), generator=gen).tolist()
        ids, got = await served_logprobs(url, prompt, seed)
        worst = max(worst, float((got - trainer_logprobs(engine, ids)).abs().max()))
    return worst


async def test_bf16_snapshots_hot_load_into_a_bf16_deployment_and_match_the_trainer(
        bf16_worker: WorkerProcess, trained: tuple[TrainerEngine, list[str]], store_dir: Path) -> None:
    engine, identities = trained
    store = SnapshotStore(store_dir)
    base, delta = store.manifest(identities[0]), store.manifest(identities[1])
    assert (base.kind, delta.kind) == ("base", "delta")
    assert set(base.dtypes.values()) == {"bfloat16"} and set(delta.dtypes.values()) == {"bfloat16"}
    config = json.loads((store.base_dir(base.identity) / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # from_pretrained(dir) loads it as stored
    await hot_load(bf16_worker.url, identities)
    diff = await max_diff(bf16_worker.url, engine)
    print(f"bf16 deployment vs bf16 trainer forward: max |logprob diff| = {diff:.5f} nats")
    assert diff <= BF16_LOGPROB_ATOL
    # The bound still tells weights apart: the base alone (two optimizer steps behind) is further off.
    await hot_load(bf16_worker.url, identities[:1])
    stale = await max_diff(bf16_worker.url, engine)
    print(f"bf16 deployment at the base (2 steps behind) vs the trainer: {stale:.5f} nats")
    assert stale > BF16_LOGPROB_ATOL


async def test_bf16_snapshots_hot_load_into_a_float32_deployment(
        fp32_worker: WorkerProcess, trained: tuple[TrainerEngine, list[str]]) -> None:
    """A float32 deployment casts the bf16 base up to serve it and still applies the bf16 delta to the base
    as stored (the XOR is over bf16 bits)."""
    engine, identities = trained
    await hot_load(fp32_worker.url, identities)
    diff = await max_diff(fp32_worker.url, engine)
    print(f"float32 deployment of bf16 snapshots vs bf16 trainer forward: {diff:.5f} nats")
    assert diff <= BF16_LOGPROB_ATOL
