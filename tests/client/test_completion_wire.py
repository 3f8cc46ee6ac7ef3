"""The completions wire as the deployment sends it: complete raw_output per choice, echo rows, top-k rows.

The deployment is a remote service here (aioresponses): these are the exact shapes of docs/contracts.md.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aioresponses import aioresponses

from firetitan.client.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
from firetitan.client.sampling import DeploymentSampler

URL = "http://deployment.invalid"
PATH = f"{URL}/inference/v1/completions"
PROMPT = [11, 12, 13]


def sampler(**kw: Any) -> DeploymentSampler:
    kw.setdefault("concurrency_controller", FixedConcurrencyController(8))
    return DeploymentSampler(URL, backoff_base=0.001, backoff_max=0.002, http_timeout=10, **kw)


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def row(lp: float, version: str = "v1") -> dict[str, Any]:
    return {"logprob": lp, "sampling_logprob": lp / 2, "policy_version": version}


def final_raw(completion: list[int], versions: list[str]) -> dict[str, Any]:
    return {"prompt_token_ids": PROMPT, "completion_token_ids": completion, "policy_versions": versions}


async def test_stream_takes_each_choices_complete_final_raw_output() -> None:
    """Two interleaved choices; intermediate chunks carry no raw_output, each final chunk the whole choice."""
    chunks = [
        {"choices": [{"index": 0, "text": "a", "logprobs": {"content": [row(-0.1)]}, "finish_reason": None}]},
        {"choices": [{"index": 1, "text": "x", "logprobs": {"content": [row(-0.5)]}, "finish_reason": None}]},
        {"choices": [{"index": 0, "text": "b", "logprobs": {"content": [row(-0.2, "v2")]}, "finish_reason": None}]},
        {"choices": [{"index": 1, "text": "y", "logprobs": {"content": [row(-0.6)]}, "finish_reason": "stop",
                      "raw_output": final_raw([7, 8], ["v1", "v1"])}]},
        {"choices": [{"index": 0, "text": "c", "logprobs": {"content": [row(-0.3, "v2")]}, "finish_reason": "length",
                      "raw_output": final_raw([4, 5, 6], ["v1", "v2", "v2"])}],
         "perf_metrics": {"prefill-queue-duration": 0.01}},
    ]
    with aioresponses() as m:
        m.post(PATH, status=200, body=sse(*chunks), headers={"Content-Type": "text/event-stream"})
        s = sampler(fanout="choices")
        a, b = await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=3, logprobs=True)
        await s.close()
    assert a.full_tokens == [*PROMPT, 4, 5, 6] and a.prompt_len == 3 and a.completion_len == 3
    assert a.text == "abc" and a.finish_reason == "length"
    assert a.inference_logprobs == [-0.1, -0.2, -0.3] and a.sampling_logprobs == [-0.05, -0.1, -0.15]
    assert a.policy_versions == ["v1", "v2", "v2"] and a.policy_version == "v2"
    assert b.full_tokens == [*PROMPT, 7, 8] and b.completion_len == 2 and b.policy_versions == ["v1", "v1"]
    assert b.inference_logprobs == [-0.5, -0.6] and not a.logprobs_echoed


async def test_json_answer_reads_the_same_per_choice() -> None:
    answer = {"choices": [
        {"index": 1, "text": "q", "finish_reason": "stop", "logprobs": {"content": [row(-1.0)]},
         "raw_output": final_raw([9], ["v3"])},
        {"index": 0, "text": "pq", "finish_reason": "length", "logprobs": {"content": [row(-1.0), row(-2.0)]},
         "raw_output": final_raw([5, 6], ["v3", "v3"])}]}
    with aioresponses() as m:
        m.post(PATH, status=200, payload=answer)
        s = sampler(fanout="choices", stream=False)
        a, b = await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=2, logprobs=True)
        await s.close()
    assert (a.completion_tokens, b.completion_tokens) == ([5, 6], [9])
    assert a.sampling_logprobs == [-0.5, -1.0] and b.policy_versions == ["v3"]


async def test_echo_gives_training_aligned_prompt_and_completion_rows() -> None:
    """echo=True: P+C token ids and rows come back; the sampler keeps P+C-1 rows, like a trainer forward."""
    ids = [*PROMPT, 21, 22]
    rows = [row(-0.0), row(-1.1), row(-1.2), row(-2.1), row(-2.2)]
    answer = {"choices": [{"index": 0, "text": "..", "finish_reason": "length", "logprobs": {"content": rows},
                           "raw_output": {"completion_token_ids": ids, "prompt_token_ids": PROMPT}}]}
    with aioresponses() as m:
        m.post(PATH, status=200, payload=answer)
        s = sampler(stream=False)
        (c,) = await s.sample_with_prompt_tokens(PROMPT, max_tokens=2, logprobs=True, echo=True)
        body = next(iter(m.requests.values()))[0].kwargs["json"]
        await s.close()
    assert body["echo"] is True
    assert c.full_tokens == ids and c.prompt_len == 3 and c.completion_len == 2
    assert c.logprobs_echoed and c.echoed_prompt_logprob_count == 2
    assert c.inference_logprobs == [-1.1, -1.2, -2.1, -2.2]  # P + C - 1 rows


async def test_echo_that_does_not_start_with_the_prompt_is_retried_then_refused() -> None:
    answer = {"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": {"content": [row(0.0)]},
                           "raw_output": {"completion_token_ids": [99]}}]}
    from firetitan.errors import SamplingRequestError

    with aioresponses() as m:
        m.post(PATH, status=200, payload=answer, repeat=True)
        s = sampler(stream=False, max_attempts=2)
        with pytest.raises(SamplingRequestError) as info:
            await s.sample_with_prompt_tokens(PROMPT, max_tokens=1, logprobs=True, echo=True)
        await s.close()
    assert "echoed tokens" in str(info.value)


async def test_top_logprobs_rows_are_read() -> None:
    top = [{"token_id": 4, "logprob": -0.1}, {"token_id": 8, "logprob": -2.5}]
    answer = {"choices": [{"index": 0, "text": "z", "finish_reason": "length",
                           "logprobs": {"content": [{**row(-0.1), "top_logprobs": top}]},
                           "raw_output": final_raw([4], ["v1"])}]}
    with aioresponses() as m:
        m.post(PATH, status=200, payload=answer)
        s = sampler(stream=False)
        (c,) = await s.sample_with_prompt_tokens(PROMPT, max_tokens=1, top_logprobs=2)
        body = next(iter(m.requests.values()))[0].kwargs["json"]
        await s.close()
    assert body["top_logprobs"] == 2 and body["logprobs"] is True
    assert c.inference_topk_token_ids == [[4, 8]] and c.inference_topk_logprobs == [[-0.1, -2.5]]


async def test_result_api_and_bounded_attempt_records() -> None:
    answer = {"choices": [{"index": 0, "text": "z", "finish_reason": "stop", "raw_output": final_raw([4], ["v1"])}]}
    with aioresponses() as m:
        m.post(PATH, status=503, payload={"error": "busy"})
        m.post(PATH, status=200, payload=answer, repeat=True)
        s = sampler(stream=False, metrics_limit=2)
        result = await s.sample_with_prompt_tokens_result(PROMPT, max_tokens=1, logical_request_id="rid-1")
        for _ in range(3):
            await s.sample_with_prompt_tokens(PROMPT, max_tokens=1)
        await s.close()
    assert result.attempts == 2 and result.logical_request_id == "rid-1"
    assert [c.completion_tokens for c in result.completions] == [[4]] and result.wall_seconds > 0
    assert len(s.drain_metrics()) == 2  # five attempts recorded, the ring keeps the last two


async def test_adaptive_controller_history_is_a_ring() -> None:
    from firetitan.client.server_metrics import ServerMetrics

    ctl = AdaptiveConcurrencyController(initial_window=4, adjustment_interval=1, history_limit=3)
    for _ in range(40):
        await ctl.acquire()
        ctl.release(ServerMetrics(prefill_queue_duration=0.01))
    assert len(ctl.history) == 3  # many more adjustments happened; the last three are kept


def test_compute_logprobs_is_one_echo_request() -> None:
    from firetitan.client.sampling_client import SamplingClient
    from firetitan.types import ModelInput

    rows = [row(0.0), row(-1.1), row(-1.2), row(-3.0)]  # P=3 prompt rows (first unconditional) + 1 sampled
    answer = {"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": {"content": rows},
                           "raw_output": {"completion_token_ids": [*PROMPT, 30], "prompt_token_ids": PROMPT}}]}
    with aioresponses() as m:
        m.post(PATH, status=200, payload=answer, repeat=True)
        client = SamplingClient(sampler(stream=False), base_model="m")
        logprobs = client.compute_logprobs(ModelInput.from_ints(PROMPT)).result()
        last = client.compute_logprobs(ModelInput.from_ints(PROMPT), prompt_logprobs_last_n=1).result()
        body = next(iter(m.requests.values()))[0].kwargs["json"]
    assert body["echo"] is True and body["max_tokens"] == 1 and body["logprobs"] is True
    assert logprobs == [None, -1.1, -1.2] and last == [None, None, -1.2]


async def test_429_retry_after_http_date_is_a_floor_for_the_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full deployment answers 429 with Retry-After as an HTTP date; the retry waits at least that long."""
    import asyncio
    import email.utils
    import time

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, *a: object) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    answer = {"choices": [{"index": 0, "text": "z", "finish_reason": "stop", "raw_output": final_raw([4], ["v1"])}]}
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with aioresponses() as m:
        m.post(PATH, status=429, payload={"error": "full"}, headers={"Retry-After": when})
        m.post(PATH, status=200, payload=answer)
        s = sampler(stream=False)  # own backoff ~1 ms
        (c,) = await s.sample_with_prompt_tokens(PROMPT, max_tokens=1)
        await s.close()
    assert c.completion_tokens == [4]
    assert slept and slept[0] >= 28.0  # the date, less the second or two the clock moved meanwhile


def test_close_works_awaited_and_as_the_official_sync_call() -> None:
    import asyncio

    s = sampler()
    s.close()  # no loop running: nothing to close, and no coroutine left un-awaited

    async def use() -> None:
        await s._sessions.get()
        s.close()  # plain call inside a loop: closing is scheduled there
        await asyncio.sleep(0.05)
        assert all(sess.closed for sess in list(s._sessions._sessions.values())) or not s._sessions._sessions
        await s.close()  # awaited form

    asyncio.run(use())
