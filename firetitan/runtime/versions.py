"""Policy-version registry: which snapshot identity each deployment serves, under which version number."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

DEFAULT_DEPLOYMENT = "default"
KEEP_VERSIONS = 1024  # published versions remembered (history, identity -> version)


@dataclass(frozen=True)
class PolicyVersion:
    """Version `version` = the weights after that many optimizer steps; `identity` the snapshot served."""

    version: int
    identity: str | None
    deployment: str = DEFAULT_DEPLOYMENT
    published_at: float = field(default_factory=time.time)


class PolicyVersionRegistry:
    """Tracks published versions per deployment; versions only move forward.

    Waiters (`wait_for`) and listeners are woken on every publish, so rollout admission reacts to a
    weight sync as soon as the deployment reports it loaded.
    """

    def __init__(self, initial_identity: str | None = None, *, initial_version: int = 0,
                 deployments: tuple[str, ...] = (DEFAULT_DEPLOYMENT,)) -> None:
        self._current: dict[str, PolicyVersion] = {
            d: PolicyVersion(initial_version, initial_identity, d) for d in deployments
        }
        self._by_identity: dict[str, int] = {}
        if initial_identity is not None:
            self._by_identity[initial_identity] = initial_version
        # Both bounded: a run publishes one version per sync, and nothing older than the staleness
        # bound is ever looked up again.
        self.history: deque[PolicyVersion] = deque(self._current.values(), maxlen=KEEP_VERSIONS)
        self._listeners: list[Callable[[PolicyVersion], None]] = []
        self._changed = anyio.Event()

    def current(self, deployment: str = DEFAULT_DEPLOYMENT) -> PolicyVersion:
        try:
            return self._current[deployment]
        except KeyError:
            raise KeyError(f"deployment: {deployment!r} is not registered; known: {sorted(self._current)}") from None

    def version_of(self, identity: str) -> int | None:
        return self._by_identity.get(identity)

    def add_listener(self, fn: Callable[[PolicyVersion], None]) -> None:
        self._listeners.append(fn)

    def publish(self, version: int, identity: str | None, deployment: str = DEFAULT_DEPLOYMENT) -> PolicyVersion:
        """Record that `deployment` now serves `identity` as policy `version`."""
        current = self.current(deployment)
        if version < current.version:
            raise ValueError(
                f"version: {version} is older than {current.version} already served by {deployment!r}"
            )
        pv = PolicyVersion(version, identity, deployment)
        self._current[deployment] = pv
        if identity is not None:
            self._by_identity[identity] = version
            while len(self._by_identity) > KEEP_VERSIONS:
                del self._by_identity[next(iter(self._by_identity))]  # the oldest published
        self.history.append(pv)
        for fn in self._listeners:
            fn(pv)
        self._changed.set()
        self._changed = anyio.Event()
        return pv

    def oldest_served(self) -> int:
        """The lowest version any deployment serves: what staleness admission must assume."""
        return min(pv.version for pv in self._current.values())

    async def wait_for(self, min_version: int, deployment: str = DEFAULT_DEPLOYMENT) -> PolicyVersion:
        while self.current(deployment).version < min_version:
            await self._changed.wait()
        return self.current(deployment)
