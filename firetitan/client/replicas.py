"""Client-side routing straight to a deployment's replicas, skipping the control plane's gateway hop.

The gateway forwards every SSE chunk of every sampling stream: on a small host that proxying costs
as much CPU as the replica spends answering. When the replicas are reachable (they listen on the
same loopback as an embedded control plane), the sampler can send each request to the replica with
the fewest requests outstanding from this client, as the gateway would, and use the gateway only
while it knows no live replica. The replica list comes from the deployment resource (its URL is the
sampler's gateway URL) and is refreshed periodically and after any replica fails to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from firetitan.bind import is_loopback
from firetitan.logging import get_logger

log = get_logger("firetitan.client.replicas")

FetchReplicas = Callable[[], Awaitable[list[str]]]


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def reachable_replica_urls(deployment: dict, gateway_url: str) -> list[str]:
    """Base URLs of a deployment resource's READY replicas that are reachable from here.

    A replica is reachable when it listens on the gateway's own host, or when both are on loopback
    (an embedded or local control plane). Replicas of a control plane on another machine listen on
    that machine's loopback, so they are never picked: their 127.0.0.1 is not ours.
    """
    gateway = _host(gateway_url)
    out = []
    for replica in deployment.get("replicas") or []:
        url = replica.get("url") if isinstance(replica, dict) else None
        if not url or replica.get("state") != "READY":
            continue
        host = _host(url)
        if host == gateway or (is_loopback(host) and is_loopback(gateway)):
            out.append(str(url).rstrip("/"))
    return out


class ReplicaRouting:
    """Least-outstanding choice among known replicas; None means "use the gateway".

    Usable from several event loops (so is the sampler): the state is plain counters (a race between
    threads can only skew a count by one, i.e. the choice, never a request), and callers on one loop
    that need a lookup share the one under way on that loop.
    """

    def __init__(self, fetch: FetchReplicas, *, refresh_s: float = 10.0, bench_s: float = 30.0) -> None:
        self._fetch = fetch
        self.refresh_s = refresh_s
        self.bench_s = bench_s  # how long a replica that failed stays out (the lookup may still list it)
        self._benched: dict[str, float] = {}
        self._urls: list[str] = []
        self._outstanding: dict[str, int] = {}
        self._fetched_at: float | None = None
        self._lookups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary())
        self._tiebreak = itertools.count()

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    async def acquire(self) -> str | None:
        """A replica base URL to send one request to (release it afterwards), or None for the gateway."""
        if self._fetched_at is None or time.monotonic() - self._fetched_at > self.refresh_s:
            loop = asyncio.get_running_loop()
            lookup = self._lookups.get(loop)
            if lookup is None or lookup.done():
                lookup = self._lookups[loop] = loop.create_task(self.refresh())
            try:
                await asyncio.shield(lookup)
            except asyncio.CancelledError:
                if not lookup.cancelled():
                    raise  # this caller is being cancelled
                # the sampler closed mid-lookup: go on with what is known (the request then fails cleanly)
        if not self._urls:
            return None
        start = next(self._tiebreak) % len(self._urls)  # rotate, so ties spread over the replicas
        url = min(self._urls[start:] + self._urls[:start], key=lambda u: self._outstanding.get(u, 0))
        self._outstanding[url] = self._outstanding.get(url, 0) + 1
        return url

    async def cancel_lookup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop a replica lookup still running on `loop` (the sampler is closing there)."""
        lookup = self._lookups.pop(loop, None)
        if lookup is not None and not lookup.done():
            lookup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lookup

    def release(self, url: str | None) -> None:
        if url is not None and self._outstanding.get(url, 0) > 0:
            self._outstanding[url] -= 1

    def failed(self, url: str) -> None:
        """A replica did not answer: stop using it and look the list up again before the next choice."""
        self._benched[url] = time.monotonic() + self.bench_s
        if url in self._urls:
            self._urls.remove(url)
            log.info("replica_unreachable", url=url, remaining=len(self._urls))
        self._fetched_at = None

    async def refresh(self) -> None:
        try:
            urls = await self._fetch()
        except Exception as exc:  # the gateway still works; try the lookup again next time
            log.info("replica_lookup_failed", error=repr(exc))
            urls = []
        now = time.monotonic()
        self._benched = {u: until for u, until in self._benched.items() if until > now}
        self._urls = [u for u in urls if u not in self._benched]
        self._outstanding = {u: self._outstanding.get(u, 0) for u in urls}
        self._fetched_at = time.monotonic()
