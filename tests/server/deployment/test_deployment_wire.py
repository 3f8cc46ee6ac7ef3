"""The completions wire contract: complete raw_output per choice, echo logprobs, strict body types, bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from deployment_http_helpers import TIMEOUT, post, stream

from firetitan.models import load_model
from firetitan.server.process import WorkerProcess, spawn_worker

NANO = "firetitan/nano-qwen3"


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    return load_model(NANO)


def _forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, as the trainer's forward computes them."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


async def test_stream_carries_the_complete_raw_output_on_each_choices_final_chunk(worker: WorkerProcess) -> None:
    prompt = [1, 21, 22, 23]
    chunks, _ = await stream(f"{worker.url}/inference/v1/completions", {
        "prompt": prompt, "max_tokens": 24, "n": 2, "logprobs": True, "raw_output": True, "ignore_eos": True,
        "seed": 3})
    per_choice: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            per_choice[choice["index"]].append(choice)
    for choices in per_choice.values():
        *middle, last = choices  # how many chunks depends on timing; whatever they are, only the last is whole
        assert all("raw_output" not in c and c["finish_reason"] is None for c in middle)
        assert last["finish_reason"] == "length"
        raw = last["raw_output"]
        streamed = [e["token_id"] for c in choices for e in c["logprobs"]["content"]]
        assert raw["prompt_token_ids"] == prompt
        assert raw["completion_token_ids"] == streamed and len(streamed) == 24
        assert len(raw["policy_versions"]) == 24
        assert raw["policy_versions"] == [e["policy_version"] for c in choices for e in c["logprobs"]["content"]]


async def test_json_answer_carries_the_same_complete_raw_output(worker: WorkerProcess) -> None:
    status, body, _ = await post(f"{worker.url}/inference/v1/completions", {
        "prompt": [1, 31, 32], "max_tokens": 7, "n": 2, "logprobs": True, "raw_output": True, "ignore_eos": True,
        "seed": 4})
    assert status == 200 and len(body["choices"]) == 2
    for choice in body["choices"]:
        raw = choice["raw_output"]
        assert raw["prompt_token_ids"] == [1, 31, 32]
        assert raw["completion_token_ids"] == [e["token_id"] for e in choice["logprobs"]["content"]]
        assert len(raw["completion_token_ids"]) == 7 == len(raw["policy_versions"])


@pytest.mark.parametrize("streamed", [False, True])
async def test_echo_logprobs_equal_a_full_forward(worker: WorkerProcess, nano: torch.nn.Module,
                                                  streamed: bool) -> None:
    prompt = [1, 40, 41, 99, 7, 300]
    body = {"prompt": prompt, "max_tokens": 5, "echo": True, "logprobs": True, "top_logprobs": 3,
            "raw_output": True, "ignore_eos": True, "temperature": 1.0, "seed": 9}
    url = f"{worker.url}/inference/v1/completions"
    if streamed:
        chunks, _ = await stream(url, body)
        choices = [c for chunk in chunks for c in chunk["choices"]]
        content = [e for c in choices for e in c["logprobs"]["content"]]
        raw = choices[-1]["raw_output"]
    else:
        status, answer, _ = await post(url, body)
        assert status == 200
        content = answer["choices"][0]["logprobs"]["content"]
        raw = answer["choices"][0]["raw_output"]
    ids = raw["completion_token_ids"]
    # The official SDK's echo shape: P + C ids and rows; it drops the first (unconditional) row.
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 5
    assert [e["token_id"] for e in content] == ids
    got = torch.tensor([e["logprob"] for e in content[1:]])
    assert torch.allclose(got, _forward_logprobs(nano, ids), atol=1e-4)  # P + C - 1 training-aligned rows
    assert all(len(e["top_logprobs"]) == 3 for e in content[1:])
    assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6 for e in content[1:])


@pytest.mark.parametrize(("patch", "field"), [
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": True}, "temperature"),
    ({"n": "2"}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"prompt": [1, 10**20]}, "prompt.1"),  # the shared body check names the element
    ({"prompt": "abc\ud800def"}, "prompt"),
    ({"max_tokens": 2**21}, "max_tokens"),
    ({"prompt": [[1, 2]] * 20, "n": 8}, "n"),
    ({"stop_token_ids": [10**20]}, "stop_token_ids.0"),
])
async def test_hostile_and_loosely_typed_bodies_are_a_400_naming_the_field(worker: WorkerProcess,
                                                                            patch: dict[str, Any],
                                                                            field: str) -> None:
    status, err, _ = await post(f"{worker.url}/inference/v1/completions", {"prompt": [1, 2], **patch})
    assert status == 400, err
    assert err["error"]["field"] == field, err


@pytest.fixture(scope="module")
def small_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with 2 slots and room for 4 more queued choices."""
    log_path: Path = tmp_path_factory.mktemp("small-deployment") / "worker.log"
    proc = spawn_worker("firetitan.server.deployment",
                        ["--base-model", NANO, "--deployment-id", "small", "--max-running-seqs", "2",
                         "--max-waiting-requests", "4"], threads=1, log_path=log_path, ready_timeout=180)
    yield proc
    proc.stop(timeout=10)
    assert not proc.alive()


async def test_a_full_queue_answers_429_with_retry_after_and_health_still_answers(
        small_worker: WorkerProcess) -> None:
    url = f"{small_worker.url}/inference/v1/completions"
    body = {"prompt": [1, 2, 3], "max_tokens": 64, "ignore_eos": True}
    health_s: list[float] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def one() -> tuple[int, str | None]:
            async with session.post(url, json=body) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After")

        flood = [asyncio.create_task(one()) for _ in range(40)]
        await asyncio.sleep(0.3)
        for _ in range(5):  # health is not queued behind engine work
            started = time.perf_counter()
            async with session.get(f"{small_worker.url}/health") as resp:
                assert resp.status == 200
            health_s.append(time.perf_counter() - started)
        results = await asyncio.gather(*flood)
    statuses = [s for s, _ in results]
    assert statuses.count(200) >= 6  # 2 running + 4 queued were never refused
    assert statuses.count(429) >= 1
    assert {s for s in statuses} <= {200, 429}
    assert all(r is not None and float(r) > 0 for s, r in results if s == 429)
    print(f"health latency under flood: max {max(health_s):.3f} s")
    status, ok, _ = await post(url, {"prompt": [1, 2], "max_tokens": 2})  # the queue drains: served again
    assert status == 200 and ok["choices"]
