"""The official `fireworks.training.sdk` (fireworks-ai 1.2.30) runs the seed walkthrough against firetitan.

Nothing from firetitan's client is used on the SDK side: the official `FiretitanServiceClient`,
`DeploymentSampler` and `AdaptiveConcurrencyController` drive a local control plane on
`firetitan/nano-qwen3`, reached through the seed's hosted names and the model-alias table. Checks:
the eval score rises; every completion's `full_tokens`, `completion_len` and `sampling_logprobs`
line up and the logprobs equal a trainer forward of the same tokens (temperature 1, 1e-4); a second
run re-attaches to the deployment the first left at zero replicas; `close()` leaves no worker and
takes under 5 s (an e2e acceptance goal, measured with the machine's own load).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("fireworks.training.sdk")

from fireworks.training import tinker
from fireworks.training.sdk import AdaptiveConcurrencyController, FiretitanServiceClient
from transformers import AutoTokenizer

from firetitan.client.provision import ensure_control_plane
from firetitan.home import fireworks_api_key
from firetitan.models.aliases import set_alias
from firetitan.models.registry import TOKENIZER_DIR

Home = Any  # the `home` fixture (tests/e2e/conftest.py)
REPO = Path(__file__).resolve().parents[2]
QWEN = "accounts/fireworks/models/qwen3-8b"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"
DEPLOYMENT = "research-serving"
CLOSE_GOAL_S = 5.0
LOGPROB_TOL = 1e-4


def _walkthrough() -> ModuleType:
    """The example's task helpers (prompts, micro-batches, objective, score), imported by path."""
    spec = importlib.util.spec_from_file_location("official_walkthrough",
                                                  REPO / "examples" / "official_fireworks_walkthrough.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _service(url: str, key: str, base_model: str, shape: str) -> FiretitanServiceClient:
    # The seed's call with only the URL, key and names changed. The home's key is `tml-...` (the
    # tinker SDK's rule); the fireworks SDK refuses that prefix, so it gets the `fw_` spelling.
    return FiretitanServiceClient.from_firetitan_config(
        api_key=fireworks_api_key(key), base_url=url, base_model=base_model, tokenizer_model=str(TOKENIZER_DIR), lora_rank=0,
        training_shape_id=shape, deployment_id=DEPLOYMENT, learning_rate=3e-3, replica_count=1,
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="scale_to_zero")


def _sample_eval(sampler: Any, prompts: list[list[dict[str, str]]]) -> list[Any]:
    async def one_each() -> list[Any]:
        # The official `sample_with_tokens` takes one conversation per call.
        return await asyncio.gather(*(sampler.sample_with_tokens(messages=p, n=1, max_tokens=4, temperature=1.0,
                                                                 logprobs=True) for p in prompts))

    return [c for per_prompt in asyncio.run(one_each()) for c in per_prompt]


def assert_aligned(completions: list[Any], prompt_lens: list[int]) -> None:
    """Every completion: full_tokens = prompt + completion_len tokens, one finite logprob per token."""
    assert len(completions) == len(prompt_lens)
    for c, plen in zip(completions, prompt_lens, strict=True):
        assert c.prompt_len == plen
        assert c.completion_len >= 1
        assert len(c.full_tokens) == c.prompt_len + c.completion_len, (c.prompt_len, c.completion_len, c.full_tokens)
        assert c.sampling_logprobs is not None and len(c.sampling_logprobs) == c.completion_len
        assert all(math.isfinite(x) and x <= 0.0 for x in c.sampling_logprobs)


def assert_logprobs_match_trainer(training_client: Any, completions: list[Any]) -> float:
    """The served logprobs equal the trainer's forward of the same tokens (weights not stepped since)."""
    data = [tinker.Datum(model_input=tinker.ModelInput.from_ints(list(c.full_tokens[:-1])),
                         loss_fn_inputs={"target_tokens": list(c.full_tokens[1:]),
                                         "weights": [1.0] * (len(c.full_tokens) - 1)}) for c in completions]
    out = training_client.forward(data, "cross_entropy").result()
    worst = 0.0
    for c, row in zip(completions, out.loss_fn_outputs, strict=True):
        trainer = row["logprobs"].tolist()[c.prompt_len - 1:]
        assert len(trainer) == c.completion_len
        worst = max(worst, *(abs(a - b) for a, b in zip(trainer, c.sampling_logprobs, strict=True)))
    assert worst <= LOGPROB_TOL, f"served logprobs differ from a trainer forward by {worst:.2e}"
    return worst


def run_seed(url: str, key: str, base_model: str, shape: str, *, max_steps: int, eval_every: int,
             target: float = 0.5) -> dict[str, Any]:
    """One run of the seed loop through the official SDK; returns scores, close time and ids."""
    walk = _walkthrough()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    prompts = [walk.prompt_for(x) for x in walk.LETTERS]
    prompt_lens = [len(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False))
                   for p in prompts]
    service = _service(url, key, base_model, shape)
    result: dict[str, Any] = {"scores": [], "logprob_error": None}
    try:
        training_client = service.create_training_client(base_model=base_model, lora_rank=0)
        concurrency = AdaptiveConcurrencyController(initial_window=16)
        sampler = service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=concurrency)
        result.update(trainer_job_id=service.trainer_job_id, deployment_id=service.deployment_id)
        rng = walk.random.Random(0)
        completions: list[Any] = []
        for step in range(max_steps + 1):
            if step:
                for micro_batch in walk.build_micro_batches(tokenizer, rng):
                    training_client.forward_backward_custom(micro_batch, walk.objective).result()
                training_client.optim_step(tinker.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                                             weight_decay=0.01)).result()
            if step % eval_every and step != max_steps:
                continue
            saved = training_client.save_weights_for_sampler(f"step_{step:05d}").result()
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                        concurrency_controller=concurrency)
            completions = _sample_eval(sampler, prompts)
            assert_aligned(completions, prompt_lens)
            result["scores"].append((step, walk.evaluate_responses(completions, list(walk.LETTERS))))
            if result["scores"][-1][1] >= target:
                break
        # No optim_step since the last save: the trainer holds exactly the weights that were served.
        result["logprob_error"] = assert_logprobs_match_trainer(training_client, completions)
    finally:
        started = time.monotonic()
        service.close()
        result["close_s"] = time.monotonic() - started
    return result


@pytest.mark.slow
def test_official_sdk_runs_the_seed_walkthrough_and_reattaches(home: Home) -> None:
    url, key = ensure_control_plane(home.root)
    set_alias(home.root, QWEN, "firetitan/nano-qwen3")
    set_alias(home.root, SHAPE, "firetitan/nano-qwen3")
    call = home.http()

    first = run_seed(url, key, QWEN, SHAPE, max_steps=60, eval_every=20)
    print("first run:", first)
    scores = [s for _, s in first["scores"]]
    assert len(scores) >= 2 and max(scores[1:]) > scores[0], first["scores"]
    assert first["close_s"] < CLOSE_GOAL_S, f"close() took {first['close_s']:.1f}s"
    assert home.worker_pids() == []
    status, dep = call("GET", f"/v1/accounts/local/deployments/{DEPLOYMENT}")
    assert status == 200 and dep["maxReplicaCount"] == 0 and dep["replicaCount"] == 0

    # Second run: the same deployment, left at zero replicas, is re-attached, woken and hot-loaded.
    second = run_seed(url, key, QWEN, SHAPE, max_steps=1, eval_every=1, target=2.0)
    print("second run:", second)
    assert second["deployment_id"] == DEPLOYMENT and second["trainer_job_id"] != first["trainer_job_id"]
    assert len(second["scores"]) == 2  # steps 0 and 1 were served by the woken deployment
    assert second["close_s"] < CLOSE_GOAL_S, f"close() took {second['close_s']:.1f}s"
    assert home.worker_pids() == []
    jobs = call("GET", "/v1/accounts/local/rlorTrainerJobs")[1]["rlorTrainerJobs"]
    assert sorted(j["state"] for j in jobs) == ["JOB_STATE_DELETED", "JOB_STATE_DELETED"]


@pytest.mark.slow
def test_the_example_script_runs_unmodified_with_only_url_key_and_aliases(home: Home, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    url, key = ensure_control_plane(home.root)
    set_alias(home.root, QWEN, "firetitan/nano-qwen3")
    set_alias(home.root, SHAPE, "firetitan/nano-qwen3")
    record = tmp_path / "record.json"
    # The script's own defaults are the seed's hosted names; only the URL, the key, the tokenizer
    # directory (no hub) and where to write the record are set.
    env = {**home.env, "FIREWORKS_BASE_URL": url, "FIREWORKS_API_KEY": fireworks_api_key(key), "TOKENIZER_MODEL": str(TOKENIZER_DIR),
           "WALKTHROUGH_RECORD": str(record)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "official_fireworks_walkthrough.py"), "--steps", "2",
                           "--eval-interval", "2", "--deployment-id", "walk-official"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(record.read_text())
    assert [e["step"] for e in out["evals"]] == [0, 2]
    for e in out["evals"]:
        for c in e["completions"]:
            assert len(c["full_tokens"]) == c["prompt_len"] + c["completion_len"]
            assert len(c["sampling_logprobs"]) == c["completion_len"] >= 1
    assert out["close_s"] < CLOSE_GOAL_S, f"close() took {out['close_s']:.1f}s"
    assert home.worker_pids() == []
