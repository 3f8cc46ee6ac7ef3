"""The adaptive controller's window rule as pure functions: one adjustment from one interval's statistics.

AIMD on the deployment's prefill-queue time (see docs/sampling.md): a slow start that grows the
window x1.5 once per round trip until the queue starts to form, a decrease sized by Little's law, quick
recovery to the last good window.
`AdaptiveConcurrencyController` (client/concurrency.py) only collects the statistics and applies
`next_window`; the math is tested directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from firetitan.stats import percentile

Phase = Literal["slow_start", "avoidance"]


@dataclasses.dataclass(frozen=True)
class AdaptiveParams:
    """Tuning of `AdaptiveConcurrencyController` (see docs/sampling.md for the reasoning)."""

    min_window: float = 1.0
    max_window: float = 256.0
    prefill_queue_target: float = 0.5
    signal_percentile: float = 0.95
    slow_start_factor: float = 1.5
    slow_start_exit_fraction: float = 0.2
    additive_increase: float = 1.0
    max_increase_factor: float = 4.0
    min_decrease_factor: float = 0.5
    max_decrease_factor: float = 0.9
    recovery_fraction: float = 0.5
    hold_fraction: float = 0.2
    saturation_fraction: float = 0.9
    pq_floor: float = 1e-3


@dataclasses.dataclass(frozen=True)
class AdaptiveState:
    window: float
    phase: Phase = "slow_start"
    last_good: float | None = None


@dataclasses.dataclass(frozen=True)
class IntervalStats:
    """What one adjustment interval observed."""

    pq: tuple[float, ...] = ()
    latency: tuple[float, ...] = ()
    max_in_flight: int = 0
    waited: int = 0
    congestion_errors: int = 0
    # `num-concurrent-requests` as reported. Recorded, not used by the rule: firetitan counts queued
    # requests in it and the hosted service reports one replica's count, so neither says when the
    # batch is full (see docs/sampling.md).
    server_concurrency: tuple[int, ...] = ()


def interval_length(window: float, adjustment_interval: int, phase: Phase = "avoidance") -> int:
    """Releases per adjustment: at least one full window, so every sample the decision uses comes
    from a request admitted under the current window (one "round trip", as in TCP).

    Slow start decides after exactly one window of releases (the `adjustment_interval` floor would
    make it wait several round trips per step at small windows): it only asks whether a queue
    has started to form, and any sample that shows one ends it.
    """
    if phase == "slow_start":
        return max(1, math.ceil(window))
    return max(int(adjustment_interval), math.ceil(window))


def slow_start_exit_threshold(p: AdaptiveParams) -> float:
    """The queue time (s) at which slow start ends: the start of the "near target" band, where
    congestion avoidance holds. Crossing it means the window has passed the server's batch and
    requests have begun to wait for prefill (HyStart's delay-increase exit, on the queue itself)."""
    return p.slow_start_exit_fraction * p.prefill_queue_target


def littles_law_factor(signal: float, latency: float, target: float) -> float:
    """Fraction of the window to keep so the queued share drops from signal/latency to target/latency.

    By Little's law the share of in-flight requests waiting for prefill equals the share of their
    latency spent waiting, so cutting the window by (signal - target) / latency removes just the
    excess queue instead of a blind half.
    """
    if latency <= 0:
        return 0.0
    return 1.0 - (signal - target) / latency


def next_window(state: AdaptiveState, stats: IntervalStats, p: AdaptiveParams) -> tuple[AdaptiveState, str]:
    """One adjustment. Returns the new state and a short reason."""
    w = state.window
    saturated = stats.max_in_flight >= p.saturation_fraction * w or stats.waited > 0
    signal = percentile(stats.pq, p.signal_percentile) if stats.pq else None

    congested = (signal is not None and signal > p.prefill_queue_target) or (
        signal is None and stats.congestion_errors > 0)
    if congested:
        if signal is not None and stats.latency:
            lat = max(percentile(stats.latency, 0.5), signal)
            factor = littles_law_factor(signal, lat, p.prefill_queue_target)
        else:
            factor = p.min_decrease_factor
        factor = min(p.max_decrease_factor, max(p.min_decrease_factor, factor))
        new_w = _clamp(w * factor, p)
        if state.last_good is not None and w > state.last_good:
            # A probe above the last good window failed (or slow start overshot): never fall below
            # the window that was known to be fine.
            new_w = max(new_w, _clamp(state.last_good, p))
            return AdaptiveState(new_w, "avoidance", state.last_good), f"probe failed x{new_w / w:.2f}"
        if state.last_good is not None and w >= state.last_good:
            # Congestion at the remembered good window: a spike (the worker stalled) or a slower
            # server. Cut, but keep the memory, so a spike costs one round trip and a quick recovery
            # instead of a climb from the cut window in additive steps.
            return AdaptiveState(new_w, "avoidance", state.last_good), f"decrease x{factor:.2f} (kept)"
        # Congestion again below the remembered good window: the server really got slower
        # (weights changed, other tenants); the old operating point is no longer good.
        return AdaptiveState(new_w, "avoidance", new_w), f"decrease x{factor:.2f}"

    if not saturated:
        # App-limited (e.g. the tail of an RL step): the queue says nothing about a larger window.
        return state, "hold (not saturated)"
    if signal is None:
        return state, "hold (no signal)"

    if state.phase == "slow_start":
        if signal > slow_start_exit_threshold(p):
            # The queue has started to form: the server's batch lies between the last good window
            # (the one grown into this) and this one. Keep the window, and keep the last good one
            # as the floor: avoidance cuts back towards it if the queue passes the target.
            return AdaptiveState(w, "avoidance", state.last_good), "slow start exit (queue forming)"
        # A full round trip at this window and no queue: grow it x1.5 (the server's capacity is not
        # known, so find it in a logarithmic number of round trips instead of crawling up to it).
        # Not x2: the queue signal arrives a round trip late, so slow start overshoots by up to its
        # factor (x2 measured: p95 queue 4.8 s in the simulation, docs/sampling.md).
        new_w = _clamp(w * p.slow_start_factor, p)
        return AdaptiveState(new_w, "slow_start", max(state.last_good or 0.0, w)), "slow start"
    last_good = max(state.last_good or 0.0, w)
    if state.last_good is not None and w < state.last_good and signal <= p.hold_fraction * p.prefill_queue_target:
        # Recover quickly towards the last window that was known to be fine (CUBIC's memory).
        step = max(p.additive_increase, (state.last_good - w) * p.recovery_fraction)
        new_w = _clamp(min(state.last_good, w + step), p)
        return AdaptiveState(new_w, "avoidance", last_good), "recover"
    if signal > p.hold_fraction * p.prefill_queue_target:
        # Close to the target: hold, so the tail percentile settles below the target, not on it.
        return AdaptiveState(w, "avoidance", last_good), "hold (near target)"
    headroom = p.prefill_queue_target / max(signal, p.pq_floor)
    new_w = _clamp(w + p.additive_increase * min(headroom, p.max_increase_factor), p)
    return AdaptiveState(new_w, "avoidance", last_good), "probe"


def _clamp(w: float, p: AdaptiveParams) -> float:
    return min(p.max_window, max(p.min_window, w))
