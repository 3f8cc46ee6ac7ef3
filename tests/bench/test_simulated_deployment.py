"""The simulated deployment: its HTTP API (Fireworks and OpenAI shapes), validation and queueing model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from firetitan.bench.simulated_deployment import SIM_HEADER, InProcessSimulation, QueueModel, SimConfig


@pytest.fixture
async def sim() -> AsyncIterator[InProcessSimulation]:
    async with InProcessSimulation(SimConfig(capacity=2, time_scale=0.002)) as s:
        yield s


async def test_openai_client_gets_completions(sim: InProcessSimulation) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    try:
        whole = await client.completions.create(model="sim", prompt=[1, 2, 3], max_tokens=5)
        assert whole.choices[0].finish_reason == "length" and whole.usage is not None
        assert whole.usage.completion_tokens == 5
        stream = await client.completions.create(model="sim", prompt="hello world", max_tokens=4, stream=True)
        texts = [c.choices[0].text async for c in stream if c.choices]
        assert "".join(texts).count(" s") == 4
    finally:
        await client.close()


async def test_fireworks_shape_and_simulation_marking(sim: InProcessSimulation) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/inference/v1/completions",
                          json={"prompt": [5, 6], "max_tokens": 3, "perf_metrics_in_response": True,
                                "raw_output": True}) as r:
            body = await r.json()
            assert r.headers[SIM_HEADER] == "1"
            assert float(r.headers["fireworks-prefill-queue-duration"]) >= 0.0
        assert body["simulation"] is True and body["perf_metrics"]["simulation"] is True
        assert len(body["choices"][0]["raw_output"]["completion_token_ids"]) == 3
        async with s.get(sim.url + "/metrics") as r:  # the real deployment's metrics, over the queue model
            assert "firetitan_requests_waiting" in await r.text()
        async with s.get(sim.url + "/health") as r:
            assert (await r.json())["simulation"] is True


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ({"prompt": [1, 5000], "max_tokens": 2}, "prompt"),
    ({"prompt": ["a", 2], "max_tokens": 2}, "prompt"),
    ({"prompt": [1] * 40000, "max_tokens": 2}, "prompt"),  # the real routes name the prompt that overflows
])
async def test_bad_requests_get_a_400_naming_the_field(sim: InProcessSimulation, body: dict, field: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/inference/v1/completions", json=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["field"] is not None and err["field"].startswith(field)
        async with s.post(sim.url + "/inference/v1/completions", json={"prompt": [1], "max_tokens": 1}) as r:
            assert r.status == 200  # still serving


async def test_requests_beyond_capacity_queue_for_prefill(sim: InProcessSimulation) -> None:
    async def one(s: aiohttp.ClientSession) -> float:
        async with s.post(sim.url + "/inference/v1/completions",
                          json={"prompt": [1, 2, 3], "max_tokens": 20, "perf_metrics_in_response": True}) as r:
            return float((await r.json())["perf_metrics"]["prefill-queue-duration"])

    async with aiohttp.ClientSession() as s:
        waits = await asyncio.gather(*(one(s) for _ in range(6)))
    assert sorted(waits)[:2] == [0.0, 0.0]  # two slots
    assert max(waits) > 0.0


def test_queue_model_batches_are_faster_in_total_and_slower_per_token() -> None:
    def run(capacity: int) -> tuple[float, float]:
        m = QueueModel(SimConfig(capacity=capacity, tick_tokens=1))
        reqs = [m.submit([i, i + 1], max_tokens=10, seed=i) for i in range(8)]
        while not m.idle:
            m.advance(m.tick_duration(m.admit()))
        per_token = max(r.done_vt - r.admit_vt for r in reqs) / 10  # type: ignore[operator]
        return m.vt, per_token

    total_1, per_tok_1 = run(1)
    total_8, per_tok_8 = run(8)
    assert total_8 < total_1 and per_tok_8 > per_tok_1


def test_prefix_cache_counts_shared_prompts() -> None:
    m = QueueModel(SimConfig())
    a = m.submit([1, 2, 3, 4], 2, 0)
    b = m.submit([1, 2, 3, 4], 2, 1)
    assert a.cached == 0 and b.cached == 3
