"""DeploymentSampler over real HTTP against the simulated deployment on loopback (and aioresponses for odd remotes)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aioresponses import CallbackResult, aioresponses

from firetitan.bench.simulated_deployment import FaultConfig, InProcessSimulation, SimConfig
from firetitan.client.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
from firetitan.client.sampling import DeploymentSampler
from firetitan.errors import (
    ConfigError,
    DeploymentSamplerTimeoutError,
    InvalidRequestError,
    SamplingRequestError,
)

FAST = SimConfig(capacity=8, time_scale=0.001)
PROMPT = [11, 12, 13, 14]


@pytest.fixture
async def sim() -> AsyncIterator[InProcessSimulation]:
    async with InProcessSimulation(FAST.model_copy(deep=True)) as s:
        yield s


def sampler_for(url: str, **kw: object) -> DeploymentSampler:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return DeploymentSampler(url, concurrency_controller=kw.pop("controller", FixedConcurrencyController(4)),  # type: ignore[arg-type]
                             http_timeout=30, **kw)  # type: ignore[arg-type]


async def test_fan_out_returns_n_aligned_completions_with_metrics(sim: InProcessSimulation) -> None:
    ctl = FixedConcurrencyController(2)
    async with sampler_for(sim.url, controller=ctl) as s:
        out = await s.sample_with_prompt_tokens(PROMPT, n=5, max_tokens=7, logprobs=True)
        assert len(out) == 5
        for c in out:
            assert c.full_tokens[:4] == PROMPT and c.prompt_len == 4 and c.completion_len == 7
            assert len(c.full_tokens) == 11 and c.finish_reason == "length"
            assert c.inference_logprobs is not None and len(c.inference_logprobs) == 7
            assert c.sampling_logprobs is not None and len(c.sampling_logprobs) == 7
            assert c.policy_version == "simulated-base" and c.policy_versions == ["simulated-base"] * 7
            assert c.text.strip() and c.metrics is not None
            assert c.metrics.prefill_queue_duration is not None and c.metrics.prompt_tokens == 4
            assert c.metrics.completion_tokens == 7 and c.metrics.http_status_code == 200
        # Distinct requests, distinct samples.
        assert len({tuple(c.completion_tokens) for c in out}) == 5
        drained = s.drain_metrics()
        assert len(drained) == 5 and s.drain_metrics() == []
        # Each completion took and gave back one slot; the window of 2 made some of them queue.
        assert ctl.in_flight == 0 and ctl.step_completed()["waited_acquires"] >= 3


async def test_without_logprobs_none_are_returned(sim: InProcessSimulation) -> None:
    async with sampler_for(sim.url) as s:
        (c,) = await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)
        assert c.inference_logprobs is None and c.sampling_logprobs is None


@pytest.mark.parametrize("status", [503, 429])
async def test_retries_status_errors_honouring_retry_after(sim: InProcessSimulation, status: int) -> None:
    sim.sim.config.faults = FaultConfig(fail_attempts=2, fail_status=status, retry_after_s=0.2)
    async with sampler_for(sim.url) as s:
        (c,) = await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)
        assert c.completion_len == 3
        ((_rid, times),) = sim.sim.attempts.items()
        assert len(times) == 3
        # Our own backoff is ~0.01 s; the waits are the server's Retry-After.
        assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.2
        records = s.drain_metrics()
        assert [m.http_status_code for m in records] == [status, status, 200]
        assert [m.retry_attempt for m in records] == [0, 1, 2]


async def test_retries_truncated_streams(sim: InProcessSimulation) -> None:
    sim.sim.config.faults = FaultConfig(truncate_attempts=2)
    async with sampler_for(sim.url) as s:
        (c,) = await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=6)
        assert c.completion_len == 6 and c.finish_reason == "length"
        assert sim.sim.outcomes["injected_truncation"] == 2
        errors = [m.error for m in s.drain_metrics()]
        assert errors[:2] == ["truncated: stream ended without [DONE]"] * 2 and errors[2] is None


async def test_typed_error_when_retries_run_out(sim: InProcessSimulation) -> None:
    sim.sim.config.faults = FaultConfig(fail_attempts=100, fail_status=503)
    ctl = AdaptiveConcurrencyController(initial_window=4)
    async with sampler_for(sim.url, controller=ctl, max_attempts=3) as s:
        with pytest.raises(SamplingRequestError) as info:
            await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)
    err = info.value
    assert err.attempts == 3 and err.final_status == 503 and err.final_error_kind == "http_status"
    assert len(next(iter(sim.sim.attempts.values()))) == 3
    assert ctl.in_flight == 0


async def test_gateway_timeouts_raise_the_timeout_subclass(sim: InProcessSimulation) -> None:
    sim.sim.config.faults = FaultConfig(fail_attempts=100, fail_status=504)
    async with sampler_for(sim.url, max_attempts=2) as s:
        with pytest.raises(DeploymentSamplerTimeoutError):
            await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)


async def test_bad_request_fails_at_once(sim: InProcessSimulation) -> None:
    async with sampler_for(sim.url) as s:
        with pytest.raises(InvalidRequestError) as info:
            await s.sample_with_prompt_tokens([1, 99999], n=2, max_tokens=3)
        assert info.value.field == "prompt"
        assert all(len(v) == 1 for v in sim.sim.attempts.values()) or not sim.sim.attempts
        with pytest.raises(InvalidRequestError):
            await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=0)


async def test_prompt_longer_than_max_seq_len_is_skipped(sim: InProcessSimulation) -> None:
    async with sampler_for(sim.url) as s:
        assert await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=3, max_seq_len=4) == []
        # Completions that would exceed max_seq_len are dropped.
        assert await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=3, max_seq_len=6) == []
        assert len(await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=2, max_seq_len=6)) == 2


async def test_chat_template_is_applied_on_the_client(sim: InProcessSimulation) -> None:
    from firetitan.models import load_tokenizer

    tok = load_tokenizer("firetitan/nano-qwen3")
    messages = [{"role": "user", "content": "hello there"}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    async with DeploymentSampler(sim.url, tokenizer=tok, concurrency_controller=FixedConcurrencyController(4),
                                 http_timeout=30) as s:
        out = await s.sample_with_tokens(messages, n=2, max_tokens=4)
        assert [c.prompt_tokens for c in out] == [list(expected)] * 2
        batch = await s.sample_with_tokens([messages, messages], n=1, max_tokens=2)
        assert len(batch) == 2


@pytest.fixture
def threaded_sim() -> Iterator[str]:
    """The simulation on its own loop in a thread, so the test can call asyncio.run repeatedly."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def serve() -> None:
        async with InProcessSimulation(FAST.model_copy(deep=True)) as s:
            holder["url"] = s.url
            holder["stop"] = stop = asyncio.Event()
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield str(holder["url"])
    loop.call_soon_threadsafe(holder["stop"].set)  # type: ignore[attr-defined]
    thread.join(timeout=30)
    loop.close()


def test_one_sampler_from_a_new_event_loop_every_step(threaded_sim: str) -> None:
    ctl = AdaptiveConcurrencyController(initial_window=2)
    s = DeploymentSampler(threaded_sim, concurrency_controller=ctl, http_timeout=30)
    for _ in range(3):  # what the seed walkthrough does: asyncio.run per step
        out = asyncio.run(s.sample_with_prompt_tokens(PROMPT, n=3, max_tokens=2))
        assert len(out) == 3
        ctl.step_completed()
    assert ctl.in_flight == 0


async def test_odd_remote_responses_are_retried_or_refused() -> None:
    url = "http://remote.invalid"
    done = b'data: {"choices":[{"index":0,"text":"x","finish_reason":"stop","raw_output":{"completion_token_ids":[5]}}]}\n\ndata: [DONE]\n\n'
    with aioresponses() as m:
        path = f"{url}/inference/v1/completions"
        m.post(path, status=200, body=b'event: error\ndata: {"error": {"code": 503, "message": "overloaded"}}\n\n')
        m.post(path, status=200, body=b'data: {"choices":[{"index":0,"text":"x","finish_reason":"weird"}]}\n\n'
                                      b"data: [DONE]\n\n")
        m.post(path, status=200, body=done, headers={"fireworks-prefill-queue-duration": "0.125"})
        m.post(path, status=401, payload={"error": {"type": "AuthenticationError", "message": "no"}})
        s = sampler_for(url, max_attempts=4)
        (c,) = await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)
        assert c.completion_tokens == [5] and c.finish_reason == "stop"
        assert c.metrics is not None and c.metrics.prefill_queue_duration == 0.125
        kinds = [r.error.split(":")[0] if r.error else None for r in s.drain_metrics()]
        assert kinds == ["upstream_error", "upstream_error", None]
        from firetitan.errors import AuthenticationError

        with pytest.raises(AuthenticationError):
            await s.sample_with_prompt_tokens(PROMPT, n=1, max_tokens=3)
        await s.close()


def _choice(index: int, token: int, finish: str | None = "length") -> dict[str, object]:
    return {"index": index, "text": f"t{token}", "finish_reason": finish,
            "logprobs": {"content": [{"logprob": -0.5, "sampling_logprob": -0.25, "policy_version": "v1"}]},
            "raw_output": {"completion_token_ids": [token], "policy_versions": ["v1"]}}


async def test_choices_fanout_without_streaming_is_one_request_retried_whole() -> None:
    url = "http://remote.invalid"
    path = f"{url}/inference/v1/completions"
    ctl = FixedConcurrencyController(2)
    with aioresponses() as m:
        # Choice 1 lacks a finish_reason: the answer is incomplete and the whole request is retried.
        m.post(path, status=200, payload={"choices": [_choice(0, 7), _choice(1, 8, None)]})
        m.post(path, status=200, payload={"choices": [_choice(1, 9), _choice(0, 8)],
                                          "perf_metrics": {"prefill-queue-duration": 0.02}})
        s = sampler_for(url, controller=ctl, fanout="choices", stream=False, max_attempts=3)
        out = await s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=1, logprobs=True)
        await s.close()
        bodies = [call.kwargs["json"] for calls in m.requests.values() for call in calls]
    assert len(bodies) == 2 and all(b["n"] == 2 and b["stream"] is False for b in bodies)
    assert [c.completion_tokens for c in out] == [[8], [9]]  # ordered by choice index, not by position
    assert all(c.sampling_logprobs == [-0.25] and c.policy_versions == ["v1"] for c in out)
    assert out[0].metrics is not out[1].metrics and out[0].metrics.prefill_queue_duration == 0.02
    records = s.drain_metrics()
    assert [r.error.split(":")[0] if r.error else None for r in records] == ["truncated", None]  # per attempt
    assert records[-1].completion_tokens == 2 and out[0].metrics.completion_tokens == 1
    assert ctl.in_flight == 0 and ctl.step_completed()["requests"] == 2  # each attempt gave back its 2 slots


async def test_choices_beyond_the_deployment_limit_are_split_into_requests() -> None:
    url = "http://remote.invalid"
    sizes: list[int] = []

    def answer(_url: object, **kwargs: Any) -> CallbackResult:
        n = kwargs["json"]["n"]
        sizes.append(n)
        return CallbackResult(status=200, payload={"choices": [_choice(i, 100 + i) for i in range(n)]})

    with aioresponses() as m:
        m.post(f"{url}/inference/v1/completions", callback=answer, repeat=True)
        s = sampler_for(url, controller=FixedConcurrencyController(256), fanout="choices", stream=False)
        out = await s.sample_with_prompt_tokens(PROMPT, n=130, max_tokens=1)
        await s.close()
    assert sorted(sizes) == [2, 128] and len(out) == 130
    assert [c.completion_tokens[0] for c in out] == [100 + i for i in range(128)] + [100, 101]


def test_fanout_must_be_known() -> None:
    with pytest.raises(ConfigError):
        DeploymentSampler("http://x", fanout="threads")  # type: ignore[arg-type]


def test_the_samplers_backoff_and_retry_after() -> None:
    import random

    from firetitan.transport import parse_retry_after

    rng = random.Random(0)
    policy = sampler_for("http://x", backoff_base=2.0, backoff_max=30.0).policy
    delays = [policy.delay(a, rng=rng) for a in range(1, 8)]
    assert 1.0 <= delays[0] < 3.0 and all(d < 45.0 for d in delays)
    fast = sampler_for("http://x").policy  # backoff 0.01..0.05
    assert fast.delay(1, retry_after=3.0) == 3.0
    # An HTTP date is honoured too (a past one means "now").
    assert parse_retry_after("1.5") == 1.5 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.slow
async def test_against_the_real_deployment_worker(tmp_path: object) -> None:
    """One end-to-end check on the real worker with the nano model."""
    from firetitan.models import load_tokenizer
    from firetitan.process import spawn_worker

    worker = await asyncio.to_thread(
        spawn_worker, "firetitan.server.deployment",
        ["--base-model", "firetitan/nano-qwen3", "--deployment-id", "sampler-test", "--max-running-seqs", "4"],
        ready_timeout=300, threads=1)
    try:
        tok = load_tokenizer("firetitan/nano-qwen3")
        ctl = AdaptiveConcurrencyController(initial_window=2)
        async with DeploymentSampler(worker.url, tokenizer=tok, concurrency_controller=ctl, http_timeout=120) as s:
            out = await s.sample_with_tokens([{"role": "user", "content": "count to three"}], n=3, max_tokens=6,
                                             logprobs=True)
            assert len(out) == 3
            for c in out:
                assert 1 <= c.completion_len <= 6 and c.finish_reason in ("stop", "length")
                assert len(c.full_tokens) == c.prompt_len + c.completion_len
                assert c.sampling_logprobs is not None and len(c.sampling_logprobs) == c.completion_len
                assert all(lp <= 0.0 for lp in c.sampling_logprobs)
                assert c.policy_version is not None
                assert c.metrics is not None and c.metrics.prefill_queue_duration is not None
            with pytest.raises(InvalidRequestError):
                await s.sample_with_prompt_tokens([10**7], n=1, max_tokens=2)
        assert ctl.in_flight == 0 and ctl.step_completed()["requests"] == 4  # the refused attempt too

        # The four ways to ask for a group agree: greedy tokens and logprobs are the same whether the
        # group is n requests or one request with n choices, streamed or answered whole.
        prompt = out[0].prompt_tokens
        groups = {}
        for fanout in ("requests", "choices"):
            for streamed in (True, False):
                async with DeploymentSampler(worker.url, tokenizer=tok, concurrency_controller=FixedConcurrencyController(8),
                                                     http_timeout=120,
                                             fanout=fanout, stream=streamed) as s:
                    groups[fanout, streamed] = await s.sample_with_prompt_tokens(
                        prompt, n=3, max_tokens=6, temperature=0.0, logprobs=True)
                    hot = await s.sample_with_prompt_tokens(prompt, n=4, max_tokens=6, logprobs=True, ignore_eos=True)
                    assert len({tuple(c.completion_tokens) for c in hot}) > 1  # the choices are independent draws
                    assert all(c.completion_len == 6 and len(c.sampling_logprobs or []) == 6 for c in hot)
        reference = groups["requests", True]
        assert len(reference) == 3 and len({tuple(c.completion_tokens) for c in reference}) == 1
        for key, group in groups.items():
            assert [c.full_tokens for c in group] == [c.full_tokens for c in reference], key
            for c, r in zip(group, reference, strict=True):
                assert c.inference_logprobs == pytest.approx(r.inference_logprobs, abs=1e-5), key
                assert c.policy_versions == r.policy_versions and c.metrics is not None
    finally:
        await asyncio.to_thread(worker.stop)
