"""Direct replica routing: least-outstanding choice, failover through the gateway, reachability."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from firetitan.bench.simulated_deployment import InProcessSimulation, SimConfig
from firetitan.client.concurrency import FixedConcurrencyController
from firetitan.client.replicas import ReplicaRouting, reachable_replica_urls
from firetitan.client.sampling import DeploymentSampler
from firetitan.server.control_plane.proxy import forward
from firetitan.transport import RetryPolicy

PROMPT = [11, 12, 13, 14]
DEP_PATH = "/v1/accounts/local/deployments/d"


def test_only_ready_replicas_on_the_gateways_host_or_both_loopback_are_reachable() -> None:
    dep = {"replicas": [{"url": "http://127.0.0.1:1", "state": "READY"},
                        {"url": "http://127.0.0.1:2", "state": "CREATING"},
                        {"url": "http://localhost:3/", "state": "READY"},
                        {"url": "http://10.0.0.5:4", "state": "READY"},
                        {"state": "READY"}]}
    assert reachable_replica_urls(dep, "http://127.0.0.1:9/v1/x") == ["http://127.0.0.1:1", "http://localhost:3"]
    # A control plane on another machine: its replicas' loopback is not ours.
    assert reachable_replica_urls(dep, "http://10.0.0.5:9/v1/x") == ["http://10.0.0.5:4"]
    assert reachable_replica_urls(dep, "https://api.example.com/v1/x") == []


async def test_routing_spreads_by_outstanding_requests_and_benches_failed_replicas() -> None:
    listed = ["http://a", "http://b"]
    lookups = 0

    async def fetch() -> list[str]:
        nonlocal lookups
        lookups += 1
        return list(listed)

    routing = ReplicaRouting(fetch, refresh_s=60, bench_s=60)
    first, second = await routing.acquire(), await routing.acquire()
    assert {first, second} == {"http://a", "http://b"} and lookups == 1
    routing.release(first)
    assert await routing.acquire() == first  # the one with nothing outstanding
    routing.failed("http://a")
    # Looked up again, but a replica that just failed stays out though the lookup still lists it.
    assert [await routing.acquire() for _ in range(3)] == ["http://b"] * 3 and lookups == 2
    listed.clear()
    routing.failed("http://b")
    assert await routing.acquire() is None  # nothing known: the gateway


async def test_concurrent_first_requests_share_one_lookup() -> None:
    calls = 0

    async def fetch() -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return ["http://a"]

    routing = ReplicaRouting(fetch)
    assert await asyncio.gather(*(routing.acquire() for _ in range(8))) == ["http://a"] * 8
    assert calls == 1


@dataclass
class FakeDeployment:
    """Two simulated replicas behind a gateway that lists them and forwards what reaches it."""

    replicas: list[InProcessSimulation]
    gateway: InProcessSimulation
    url: str = ""
    lookups: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)

    def served(self) -> list[int]:
        return [r.sim.outcomes["ok"] for r in (*self.replicas, self.gateway)]


@pytest.fixture
async def deployment() -> AsyncIterator[FakeDeployment]:
    config = SimConfig(capacity=8, time_scale=0.001)
    async with InProcessSimulation(config.model_copy(deep=True)) as a, \
            InProcessSimulation(config.model_copy(deep=True)) as b, \
            InProcessSimulation(config.model_copy(deep=True)) as gw, aiohttp.ClientSession() as session:
        fake = FakeDeployment([a, b], gw, listed=[{"url": a.url, "state": "READY"}, {"url": b.url, "state": "READY"}])

        async def resource(_: web.Request) -> web.Response:
            fake.lookups += 1
            return web.json_response({"name": "accounts/local/deployments/d", "replicas": fake.listed})

        async def inference(request: web.Request) -> web.StreamResponse:
            return await forward(request, gw.url + "/inference/v1/completions", session)

        app = web.Application()
        app.router.add_get(DEP_PATH, resource)
        app.router.add_post(DEP_PATH + "/inference/v1/completions", inference)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{DEP_PATH}"  # type: ignore[union-attr]
        try:
            yield fake
        finally:
            await runner.cleanup()


def direct_sampler(url: str) -> DeploymentSampler:
    return DeploymentSampler(url, concurrency_controller=FixedConcurrencyController(16), http_timeout=30,
                             direct_replicas=True)


async def test_requests_go_straight_to_both_replicas(deployment: FakeDeployment) -> None:
    async with direct_sampler(deployment.url) as sampler:
        out = await sampler.sample_with_prompt_tokens(PROMPT, n=16, max_tokens=4, logprobs=True)
    assert len(out) == 16 and all(c.completion_len == 4 for c in out)
    a, b, gateway = deployment.served()
    assert gateway == 0 and a + b == 16 and min(a, b) >= 4  # 16 concurrent requests, least-outstanding
    assert deployment.lookups == 1


async def test_a_dead_replica_is_routed_around_at_once(deployment: FakeDeployment,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    backoffs: list[int] = []

    def no_backoff(_policy: RetryPolicy, attempt: int, *_: Any, **__: Any) -> float:
        backoffs.append(attempt)
        return 0.0

    monkeypatch.setattr(RetryPolicy, "delay", no_backoff)
    async with direct_sampler(deployment.url) as sampler:
        await sampler.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=2)
        dead = deployment.replicas[1]
        await dead.__aexit__(None, None, None)  # gone, though the gateway still lists it
        before = deployment.served()
        out = await sampler.sample_with_prompt_tokens(PROMPT, n=8, max_tokens=2)
    assert len(out) == 8
    a, _, gateway = (x - y for x, y in zip(deployment.served(), before, strict=True))
    assert a + gateway == 8 and a >= 1
    assert dead.url not in (sampler.routing.urls if sampler.routing else [])
    assert backoffs == []  # rerouted at once, without the backoff a retry of the same target takes


async def test_without_a_replica_list_the_gateway_serves(deployment: FakeDeployment) -> None:
    deployment.listed = []
    async with direct_sampler(deployment.url) as sampler:
        out = await sampler.sample_with_prompt_tokens(PROMPT, n=4, max_tokens=2)
    assert len(out) == 4 and deployment.served() == [0, 0, 4]


async def test_closing_the_sampler_cancels_a_lookup_in_flight() -> None:
    started = asyncio.Event()

    async def slow_fetch() -> list[str]:
        started.set()
        await asyncio.sleep(60)
        return []

    sampler = DeploymentSampler("http://127.0.0.1:9/v1/accounts/a/deployments/d", direct_replicas=True)
    assert sampler.routing is not None
    sampler.routing._fetch = slow_fetch
    waiter = asyncio.ensure_future(sampler.routing.acquire())
    await started.wait()
    await sampler.close()
    assert await waiter is None  # the caller is not cancelled: it falls back to the gateway URL
