"""The deployment worker over HTTP: logprobs vs a full forward, OpenAI client, bad input, disconnects."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
import torch
from deployment_http_helpers import TIMEOUT, metrics, post, stream

from firetitan.models import load_model
from firetitan.server.deployment.engine.sampler import sampling_log_probs
from firetitan.server.process import WorkerProcess

NANO = "firetitan/nano-qwen3"


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    return load_model(NANO)


def full_forward_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """What the trainer's forward computes: log_softmax of the logits at each position, for the targets."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits, torch.log_softmax(logits, dim=-1)


async def test_stream_logprobs_equal_full_forward_at_temperature_one(worker: WorkerProcess, nano: torch.nn.Module) -> None:
    prompt = [1, 17, 230, 999, 42, 7]
    chunks, headers = await stream(f"{worker.url}/inference/v1/completions", {
        "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "logprobs": True, "raw_output": True,
        "perf_metrics_in_response": True, "seed": 11, "ignore_eos": True})
    tokens = chunks[-1]["choices"][0]["raw_output"]["completion_token_ids"]  # complete, on the final chunk
    content = [e for c in chunks for e in c["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == 12 and [e["token_id"] for e in content] == tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    _, ref = full_forward_logprobs(nano, prompt, tokens)
    want = ref[len(prompt) - 1: -1].gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    got = torch.tensor([e["logprob"] for e in content])
    got_sampling = torch.tensor([e["sampling_logprob"] for e in content])
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(got_sampling, want, atol=1e-4)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(f"{worker.url}/health") as resp:
        serving = (await resp.json())["policy_version"]
    assert {e["policy_version"] for e in content} == {serving}
    perf = chunks[-1]["perf_metrics"]
    for key in ("prefill-queue-duration", "generation-queue-duration", "server-time-to-first-token",
                "num-concurrent-requests", "prompt-tokens", "cached-prompt-tokens", "server-processing-time"):
        assert key in perf, key
    assert perf["prompt-tokens"] == len(prompt)
    assert 0 <= perf["prefill-queue-duration"] <= perf["server-time-to-first-token"] <= perf["server-processing-time"]
    assert float(headers["fireworks-prefill-queue-duration"]) == perf["prefill-queue-duration"]


async def test_sampling_logprob_is_of_the_tempered_filtered_distribution(worker: WorkerProcess,
                                                                          nano: torch.nn.Module) -> None:
    prompt = [1, 88, 99, 111]
    status, body, headers = await post(f"{worker.url}/inference/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "logprobs": True,
        "raw_output": True, "seed": 5, "ignore_eos": True, "perf_metrics_in_response": True})
    assert status == 200, body
    choice = body["choices"][0]
    tokens = choice["raw_output"]["completion_token_ids"]
    logits, ref = full_forward_logprobs(nano, prompt, tokens)
    steps = logits[len(prompt) - 1: -1]
    q = sampling_log_probs(steps, torch.full((len(tokens),), 0.7), torch.full((len(tokens),), 20),
                           torch.full((len(tokens),), 0.9))
    idx = torch.tensor(tokens).unsqueeze(1)
    got = torch.tensor([e["sampling_logprob"] for e in choice["logprobs"]["content"]])
    raw = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
    assert torch.allclose(got, q.gather(1, idx).squeeze(1), atol=1e-4)
    assert torch.allclose(raw, ref[len(prompt) - 1: -1].gather(1, idx).squeeze(1), atol=1e-4)
    assert "fireworks-server-processing-time" in headers and "perf_metrics" in body
    # The same seed reproduces the same tokens.
    _, again, _ = await post(f"{worker.url}/inference/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "raw_output": True,
        "seed": 5, "ignore_eos": True})
    assert again["choices"][0]["raw_output"]["completion_token_ids"] == tokens


async def test_batched_results_equal_unbatched_greedy(worker: WorkerProcess) -> None:
    url = f"{worker.url}/inference/v1/completions"
    prompts = [[1, *range(10, 10 + n)] for n in (1, 4, 9, 17, 30, 6)]
    bodies = [{"prompt": p, "max_tokens": 6 + 2 * i, "temperature": 0.0, "logprobs": True, "raw_output": True,
               "ignore_eos": True} for i, p in enumerate(prompts)]
    alone = [await post(url, b) for b in bodies]
    together = await asyncio.gather(*(post(url, b) for b in bodies))
    for (s1, b1, _), (s2, b2, _) in zip(alone, together, strict=True):
        assert s1 == s2 == 200
        c1, c2 = b1["choices"][0], b2["choices"][0]
        assert c1["raw_output"]["completion_token_ids"] == c2["raw_output"]["completion_token_ids"]
        lp1 = torch.tensor([e["logprob"] for e in c1["logprobs"]["content"]])
        lp2 = torch.tensor([e["logprob"] for e in c2["logprobs"]["content"]])
        assert torch.allclose(lp1, lp2, atol=1e-4)


async def test_identical_prompts_share_prefill_and_keep_exact_logprobs(worker: WorkerProcess,
                                                                       nano: torch.nn.Module) -> None:
    url = f"{worker.url}/inference/v1/completions"
    prompt = [1, *range(500, 530)]
    bodies = [{"prompt": prompt, "max_tokens": 25, "logprobs": True, "raw_output": True, "ignore_eos": True,
               "perf_metrics_in_response": True, "seed": s} for s in range(4)]
    before = await metrics(worker.url)
    results = await asyncio.gather(*(post(url, b) for b in bodies))
    cached = [body["perf_metrics"]["cached-prompt-tokens"] for _, body, _ in results]
    assert set(cached) <= {0, len(prompt)} and cached.count(len(prompt)) >= 1, cached
    after = await metrics(worker.url)
    assert after["firetitan_prompt_tokens_cached_total"] - before["firetitan_prompt_tokens_cached_total"] == sum(cached)
    for status, body, _ in results:  # shared or not, every sample's logprobs equal the full forward
        assert status == 200
        choice = body["choices"][0]
        tokens = choice["raw_output"]["completion_token_ids"]
        _, ref = full_forward_logprobs(nano, prompt, tokens)
        want = ref[len(prompt) - 1: -1].gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        got = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
        assert torch.allclose(got, want, atol=1e-4)
    # n > 1 in one request: the choices share one prefill.
    status, body, _ = await post(url, {"prompt": [1, *range(600, 620)], "max_tokens": 4, "n": 3, "seed": 1,
                                       "ignore_eos": True})
    assert status == 200 and len(body["choices"]) == 3


async def test_n_choices_and_stop_strings(worker: WorkerProcess) -> None:
    url = f"{worker.url}/inference/v1/completions"
    status, body, _ = await post(url, {"prompt": [1, 2, 3], "max_tokens": 5, "n": 3, "seed": 1,
                                       "raw_output": True, "ignore_eos": True})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 15 and body["usage"]["prompt_tokens"] == 3
    # Find a greedy continuation, then stop on a piece of its text: the stop text is not returned.
    _, greedy, _ = await post(url, {"prompt": [1, 50, 60], "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    text = greedy["choices"][0]["text"]
    stop = text[4:7]
    assert len(stop) == 3
    _, stopped, _ = await post(url, {"prompt": [1, 50, 60], "max_tokens": 10, "temperature": 0,
                                     "ignore_eos": True, "stop": [stop], "raw_output": True})
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    assert len(choice["raw_output"]["completion_token_ids"]) < 10


async def test_openai_client_gets_completions(worker: WorkerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="unused", timeout=60, max_retries=0)
    try:
        out = await client.completions.create(model="test-dep", prompt=[1, 20, 30, 40], max_tokens=5,
                                              logprobs=2, temperature=1.0, extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert choice.finish_reason == "length"
        assert len(choice.logprobs.token_logprobs) == 5 and len(choice.logprobs.top_logprobs[0]) == 2
        assert out.usage.completion_tokens == 5
        text_out = await client.completions.create(model="test-dep", prompt="hello there", max_tokens=4,
                                                   extra_body={"ignore_eos": True})
        assert text_out.choices[0].text
        parts = [c async for c in await client.completions.create(
            model="test-dep", prompt=[1, 5], max_tokens=4, stream=True, extra_body={"ignore_eos": True})]
        assert parts[-1].choices[0].finish_reason == "length"
        assert "".join(p.choices[0].text for p in parts) != "" or len(parts) >= 1
    finally:
        await client.close()


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": [1, "two", 3]}, "prompt"),
    ({"prompt": [1, 2.5]}, "prompt"),
    ({"prompt": [1, 4096]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": -3}, "max_tokens"),
    ({"prompt": [1] * 2048}, "prompt"),
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
    ({"prompt": [1, 2], "top_p": 0}, "top_p"),
])
async def test_malformed_requests_get_400_naming_the_field(worker: WorkerProcess, body: dict[str, Any],
                                                           field: str) -> None:
    status, err, _ = await post(f"{worker.url}/inference/v1/completions", body)
    assert status == 400, err
    assert err["error"]["field"] == field
    status, ok, _ = await post(f"{worker.url}/inference/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    assert status == 200 and ok["choices"][0]["text"] is not None


async def test_client_disconnect_frees_slot_and_cache(worker: WorkerProcess) -> None:
    before = await metrics(worker.url)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        resp = await session.post(f"{worker.url}/inference/v1/completions", json={
            "prompt": [1, *range(100, 140)], "max_tokens": 1500, "stream": True, "ignore_eos": True})
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        during = await metrics(worker.url)
        assert during["firetitan_requests_running"] >= 1 and during["firetitan_kv_cache_used_tokens"] > 0
        resp.close()  # drop the connection mid-stream
    for _ in range(100):
        now = await metrics(worker.url)
        if now["firetitan_requests_running"] == 0 and now.get("firetitan_requests_finished_total:abort", 0) > \
                before.get("firetitan_requests_finished_total:abort", 0):
            break
        await asyncio.sleep(0.1)
    assert now["firetitan_requests_running"] == 0
    assert now["firetitan_kv_cache_used_tokens"] == 0 and now["firetitan_kv_cache_reserved_tokens"] == 0
    assert now["firetitan_requests_finished_total:abort"] == before.get("firetitan_requests_finished_total:abort", 0) + 1
    assert now["firetitan_generation_tokens_total"] < before["firetitan_generation_tokens_total"] + 1500


async def test_health_and_metrics(worker: WorkerProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(f"{worker.url}/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    m = await metrics(worker.url)
    assert "firetitan_requests_waiting" in m and "firetitan_prefill_queue_duration_seconds_count" in m
    assert m["firetitan_prefill_queue_duration_seconds_count"] >= 1
