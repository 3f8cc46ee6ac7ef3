"""Concurrency controllers that gate sampling requests: a fixed limit and an adaptive prefill-queue AIMD.

Both share one admission gate that works from any number of event loops and threads: a lock, a
count of requests in flight and a FIFO of waiter futures, each woken on its own loop with
`call_soon_threadsafe`. An `asyncio.Semaphore` would bind to the first loop that used it, and the
SDK's samplers are used from the background loop and from `asyncio.run` in user code alike.

The adaptive controller's decisions are pure functions (`next_window`, in `client/aimd.py`) of an
interval's statistics, so the math is tested directly; the class only collects statistics and
applies the results.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from typing import Any, Protocol, runtime_checkable

from firetitan.client.aimd import (  # noqa: F401  (re-exported: the rule is part of this API)
    AdaptiveParams,
    AdaptiveState,
    IntervalStats,
    Phase,
    interval_length,
    littles_law_factor,
    next_window,
    slow_start_exit_threshold,
)
from firetitan.client.server_metrics import ServerMetrics
from firetitan.errors import ConfigError
from firetitan.logging import get_logger
from firetitan.stats import percentile

log = get_logger("firetitan.client.concurrency")

CONGESTION_STATUSES = frozenset({429, 503})


@runtime_checkable
class ConcurrencyController(Protocol):
    """What `DeploymentSampler` needs: slots per HTTP attempt, released with that attempt's metrics.

    An attempt takes one slot per sequence it asks for: 1, or `n` when the sampler sends one
    request with `n` choices (`fanout="choices"`); the window counts sequences either way.
    """

    @property
    def window_size(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    async def acquire(self, *, weight: int = 1) -> None: ...

    def release(self, metrics: ServerMetrics | None = None, *, weight: int = 1) -> None: ...

    def step_completed(self) -> dict[str, float]: ...


# ----------------------------------------------------------------------------------------------
# Admission gate
# ----------------------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("fut", "granted", "loop", "weight")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], weight: int) -> None:
        self.loop = loop
        self.fut = fut
        self.weight = weight
        self.granted = False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Gate:
    """Admits while `in_flight + weight <= window`; a smaller window never cancels work, it only blocks
    new admissions until enough releases have paid the difference (the "shrink debt").

    Admission is first come, first served: a heavy request at the head is not overtaken by light
    ones behind it (it would starve). One heavier than the whole window runs once nothing else does.
    """

    def __init__(self, window: int) -> None:
        self.lock = threading.Lock()
        self.window = max(1, int(window))
        self.in_flight = 0
        self.waiters: deque[_Waiter] = deque()

    @property
    def debt(self) -> int:
        return max(0, self.in_flight - self.window)

    def fits_locked(self, weight: int) -> bool:
        return self.in_flight + weight <= self.window or self.in_flight == 0

    def try_admit_locked(self, weight: int) -> bool:
        if not self.waiters and self.fits_locked(weight):
            self.in_flight += weight
            return True
        return False

    def wake_locked(self) -> None:
        # Caller holds the lock. Each grant counts the slots before the waiter runs, so a burst of
        # releases cannot over-admit.
        while self.waiters and self.fits_locked(self.waiters[0].weight):
            w = self.waiters.popleft()
            w.granted = True
            self.in_flight += w.weight
            try:
                w.loop.call_soon_threadsafe(_resolve, w.fut)
            except RuntimeError:  # that loop is closed: its waiter is gone, give the slots back
                self.in_flight -= w.weight

    async def acquire(self, weight: int = 1) -> bool:
        """Take `weight` slots; returns True if it had to wait."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.try_admit_locked(weight):
                return False
            waiter = _Waiter(loop, loop.create_future(), weight)
            self.waiters.append(waiter)
        try:
            await waiter.fut
        except asyncio.CancelledError:
            with self.lock:
                if waiter.granted:
                    # Granted and cancelled in the same instant: hand the slots on.
                    self.in_flight -= weight
                else:
                    self.waiters.remove(waiter)  # may unblock lighter waiters queued behind it
                self.wake_locked()
            raise
        return True

    def release_locked(self, weight: int = 1) -> None:
        if self.in_flight < weight:
            raise RuntimeError("release() called for more slots than acquire() took")
        self.in_flight -= weight
        self.wake_locked()


class _GatedController:
    """Shared bookkeeping for both controllers; subclasses decide how the window moves."""

    def __init__(self, window: int) -> None:
        self._gate = _Gate(window)
        self._reset_step_locked()

    def _reset_step_locked(self) -> None:
        self._step_requests = 0
        self._step_max_in_flight = self._gate.in_flight if hasattr(self, "_gate") else 0
        self._step_window_sum = 0.0
        self._step_waited = 0
        self._step_pq: list[float] = []
        self._step_prompt_tokens = 0
        self._step_cached_tokens = 0

    @property
    def window_size(self) -> int:
        return self._gate.window

    @property
    def in_flight(self) -> int:
        return self._gate.in_flight

    @property
    def pending_decrease(self) -> int:
        return self._gate.debt

    async def acquire(self, *, weight: int = 1) -> None:
        waited = await self._gate.acquire(weight)
        with self._gate.lock:
            self._step_max_in_flight = max(self._step_max_in_flight, self._gate.in_flight)
            self._on_acquired_locked(waited)

    def _on_acquired_locked(self, waited: bool) -> None:
        if waited:
            self._step_waited += 1

    def release(self, metrics: ServerMetrics | None = None, *, weight: int = 1) -> None:
        with self._gate.lock:
            self._gate.release_locked(weight)
            self._step_requests += 1
            self._step_window_sum += self._gate.window
            if metrics is not None:
                if metrics.prefill_queue_duration is not None:
                    self._step_pq.append(metrics.prefill_queue_duration)
                self._step_prompt_tokens += metrics.prompt_tokens or 0
                self._step_cached_tokens += metrics.cached_prompt_tokens or 0
            self._on_release_locked(metrics, weight)

    def _on_release_locked(self, metrics: ServerMetrics | None, weight: int) -> None:
        pass

    def _set_window_locked(self, window: int) -> None:
        self._gate.window = max(1, int(window))
        self._gate.wake_locked()

    def _step_summary_locked(self) -> dict[str, float]:
        n = self._step_requests
        out: dict[str, float] = {
            "window": float(self._gate.window),
            "requests": float(n),
            "avg_window": self._step_window_sum / n if n else float(self._gate.window),
            "max_in_flight": float(self._step_max_in_flight),
            "pending_decrease": float(self._gate.debt),
            "waited_acquires": float(self._step_waited),
        }
        if self._step_pq:
            out["avg_pq"] = sum(self._step_pq) / len(self._step_pq)
            out["p50_pq"] = percentile(self._step_pq, 0.5)
            out["p95_pq"] = percentile(self._step_pq, 0.95)
        if self._step_prompt_tokens:
            out["cache_hit_rate"] = self._step_cached_tokens / self._step_prompt_tokens
        return out


class FixedConcurrencyController(_GatedController):
    """A plain limit of `max_concurrency` requests in flight; metrics are only summarised."""

    def __init__(self, max_concurrency: int) -> None:
        if int(max_concurrency) < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}", field="max_concurrency")
        self.max_concurrency = int(max_concurrency)
        super().__init__(self.max_concurrency)

    def step_completed(self) -> dict[str, float]:
        with self._gate.lock:
            out = self._step_summary_locked()
            self._reset_step_locked()
        return out

    def __repr__(self) -> str:
        return f"FixedConcurrencyController(max_concurrency={self.max_concurrency})"

    def __getstate__(self) -> dict[str, Any]:
        return {"max_concurrency": self.max_concurrency}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_concurrency"])  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Adaptive controller
# ----------------------------------------------------------------------------------------------

HISTORY_LIMIT = 4096  # window adjustments kept in `AdaptiveConcurrencyController.history`


class AdaptiveConcurrencyController(_GatedController):
    """AIMD on the deployment's prefill-queue time, designed to beat the hosted SDK's rule.

    Differences from that rule (all measured in `benchmarks/controllers.py`):
    slow start (x1.5 per round trip until the prefill queue starts to form), a p95 instead of an EMA
    of means, a decrease sized by Little's law instead of a blind half, quick recovery to the last good
    window, no growth while the window is not full, and adjustments once per window of releases (after
    slow start never fewer than `adjustment_interval`) so decisions use samples admitted under the
    current window.
    """

    def __init__(self, initial_window: int = 8, min_window: int = 1, max_window: int = 256,
                 prefill_queue_target: float = 0.5, additive_increase: float = 1.0,
                 multiplicative_decrease: float = 0.5, ema_alpha: float = 0.3, adjustment_interval: int = 32,
                 shrink_cooldown_s: float = 1.0, *, signal_percentile: float = 0.95, slow_start: bool = True,
                 slow_start_factor: float = 1.5, max_decrease_factor: float = 0.9, min_step_samples: int = 8,
                 history_limit: int = HISTORY_LIMIT) -> None:
        # The hosted SDK's parameters, in its order. `multiplicative_decrease` is the deepest cut one
        # adjustment may make (our decrease is sized by Little's law between it and
        # `max_decrease_factor`). `ema_alpha` and `shrink_cooldown_s` tune the hosted rule's EMA and
        # cooldown, which this controller replaces (a percentile per window of releases, and a
        # hold-off of one window after a decrease): accepted so hosted scripts run, otherwise unused.
        min_decrease_factor = multiplicative_decrease
        self.ema_alpha = ema_alpha
        self.shrink_cooldown_s = shrink_cooldown_s
        if history_limit < 1:
            raise ConfigError(f"history_limit must be >= 1, got {history_limit}", field="history_limit")
        if min_window < 1 or max_window < min_window:
            raise ConfigError(f"need 1 <= min_window <= max_window, got {min_window}, {max_window}",
                              field="min_window")
        if prefill_queue_target <= 0:
            raise ConfigError(f"prefill_queue_target must be > 0, got {prefill_queue_target}",
                              field="prefill_queue_target")
        if adjustment_interval < 0:
            raise ConfigError(f"adjustment_interval must be >= 0, got {adjustment_interval}",
                              field="adjustment_interval")
        if not 0.0 <= signal_percentile <= 1.0:
            raise ConfigError(f"signal_percentile must be in [0, 1], got {signal_percentile}",
                              field="signal_percentile")
        if not 0 < min_decrease_factor <= max_decrease_factor < 1:
            raise ConfigError(f"need 0 < multiplicative_decrease <= max_decrease_factor < 1, got "
                              f"{min_decrease_factor}, {max_decrease_factor}", field="multiplicative_decrease")
        self.params = AdaptiveParams(
            min_window=float(min_window), max_window=float(max_window),
            prefill_queue_target=float(prefill_queue_target), signal_percentile=signal_percentile,
            slow_start_factor=slow_start_factor, additive_increase=additive_increase,
            min_decrease_factor=min_decrease_factor, max_decrease_factor=max_decrease_factor)
        self.adjustment_interval = int(adjustment_interval)
        self.min_step_samples = int(min_step_samples)
        initial = min(max_window, max(min_window, initial_window))
        self._state = AdaptiveState(float(initial), "slow_start" if slow_start else "avoidance")
        self._interval_releases = 0
        self._interval_pq: list[float] = []
        self._interval_latency: list[float] = []
        self._interval_errors = 0
        self._interval_over = 0
        self._interval_warm = 0
        self._interval_waited = 0
        self._interval_max_in_flight = 0
        self._interval_concurrency: list[int] = []
        self._holdoff = 0
        self._step_adjustments = 0
        # The last `history_limit` window adjustments (a ring: long runs keep bounded memory).
        self.history: deque[dict[str, Any]] = deque(maxlen=int(history_limit))
        self.retry_exhaustions = 0
        super().__init__(int(initial))

    def note_retry_exhausted(self, metrics: ServerMetrics | None) -> None:
        """A request ran out of retries (the official sampler reports this; ours need not: its
        failed attempts were released with their metrics already). Counted, nothing else."""
        with self._gate.lock:
            self.retry_exhaustions += 1

    @property
    def state(self) -> AdaptiveState:
        return self._state

    def _on_acquired_locked(self, waited: bool) -> None:
        super()._on_acquired_locked(waited)
        self._interval_max_in_flight = max(self._interval_max_in_flight, self._gate.in_flight)
        if waited:
            self._interval_waited += 1

    def _on_release_locked(self, metrics: ServerMetrics | None, weight: int) -> None:
        # Intervals and the hold-off count sequences (slots), as the window does.
        if self._holdoff > 0:
            # Requests admitted before the last decrease report the queue that decrease already
            # answered; one decrease per round trip, as TCP does after a loss.
            self._holdoff = max(0, self._holdoff - weight)
            return
        self._interval_releases += weight
        if metrics is not None:
            if metrics.prefill_queue_duration is not None:
                self._interval_pq.append(metrics.prefill_queue_duration)
                if metrics.server_processing_time is not None:
                    self._interval_latency.append(metrics.server_processing_time)
                if metrics.num_concurrent_requests is not None:
                    self._interval_concurrency.append(metrics.num_concurrent_requests)
                if metrics.prefill_queue_duration > self.params.prefill_queue_target:
                    self._interval_over += 1
                if metrics.prefill_queue_duration > slow_start_exit_threshold(self.params):
                    self._interval_warm += 1
            elif metrics.transport_error or metrics.http_status_code in CONGESTION_STATUSES:
                self._interval_errors += 1
        if not self.adjustment_interval:
            return
        length = interval_length(self._state.window, self.adjustment_interval, self._state.phase)
        if self._interval_releases >= length:
            self._adjust_locked("interval")
        elif self._state.phase == "slow_start" and self._interval_warm >= max(
                2, math.ceil((1 - self.params.signal_percentile) * length)):
            # Slow start: as soon as the interval's percentile is sure to show the queue forming,
            # stop growing (each further release at this window would be admitted into the queue).
            self._adjust_locked("early")
        elif self._interval_over >= max(4, math.ceil((1 - self.params.signal_percentile) * length)):
            # Enough samples are over target that the interval's percentile can only be over target
            # too: act now instead of queueing a full window more.
            self._adjust_locked("early")

    def _adjust_locked(self, trigger: str) -> bool:
        stats = IntervalStats(pq=tuple(self._interval_pq), latency=tuple(self._interval_latency),
                              max_in_flight=self._interval_max_in_flight, waited=self._interval_waited,
                              congestion_errors=self._interval_errors,
                              server_concurrency=tuple(self._interval_concurrency))
        if not stats.pq and not stats.congestion_errors:
            self._reset_interval_locked()
            return False
        before = self._state.window
        self._state, reason = next_window(self._state, stats, self.params)
        self._reset_interval_locked()
        self._step_adjustments += 1
        self.history.append({"t": time.monotonic(), "trigger": trigger, "before": before,
                             "after": self._state.window, "phase": self._state.phase, "reason": reason,
                             "signal": percentile(stats.pq, self.params.signal_percentile) if stats.pq else None,
                             "samples": len(stats.pq)})
        if self._state.window < before:
            # Everything now in flight, and the next window's worth queued behind it, was admitted
            # into the queue this decrease answers.
            self._holdoff = self._gate.in_flight + int(self._state.window)
        if int(self._state.window) != self._gate.window:
            log.debug("window_changed", before=self._gate.window, after=int(self._state.window), reason=reason)
            self._set_window_locked(int(self._state.window))
        return True

    def _reset_interval_locked(self) -> None:
        self._interval_releases = 0
        self._interval_pq = []
        self._interval_latency = []
        self._interval_errors = 0
        self._interval_over = 0
        self._interval_warm = 0
        self._interval_concurrency = []
        self._interval_waited = 0
        self._interval_max_in_flight = self._gate.in_flight

    def step_completed(self) -> dict[str, float]:
        """Summarise the step; adjust on what is left of the interval if it is big enough to trust."""
        with self._gate.lock:
            out = self._step_summary_locked()
            enough = len(self._interval_pq) >= max(1, self.min_step_samples) or (
                self.adjustment_interval == 0 and (self._interval_pq or self._interval_errors))
            if enough and self._adjust_locked("step"):
                out["window_after"] = float(self._gate.window)
            out["adjustments"] = float(self._step_adjustments)
            out["phase_slow_start"] = 1.0 if self._state.phase == "slow_start" else 0.0
            if self._state.last_good is not None:
                out["last_good_window"] = self._state.last_good
            self._step_adjustments = 0
            self._reset_step_locked()
        log.info("adaptive_concurrency_step", **out)
        return out

    def __repr__(self) -> str:
        return (f"AdaptiveConcurrencyController(window={self.window_size}, phase={self._state.phase}, "
                f"target={self.params.prefill_queue_target})")
