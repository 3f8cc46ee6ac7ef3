"""Concurrency controllers: the adaptive math as pure functions, and the gate across loops and threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from firetitan.client.concurrency import (
    AdaptiveConcurrencyController,
    AdaptiveParams,
    AdaptiveState,
    FixedConcurrencyController,
    IntervalStats,
    interval_length,
    littles_law_factor,
    next_window,
    slow_start_exit_threshold,
)
from firetitan.client.server_metrics import ServerMetrics, parse_server_metrics
from firetitan.errors import ConfigError
from firetitan.stats import percentile

P = AdaptiveParams()  # target 0.5, p95 signal, slow start x1.5 per round trip until the queue passes 0.1 s


# ---------------------------------------------------------------------------------------------- pure math


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    assert percentile([4.0], 0.99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_interval_is_at_least_one_window() -> None:
    assert interval_length(8, 32) == 32
    assert interval_length(100.2, 32) == 101


def test_slow_start_decides_after_exactly_one_round_trip() -> None:
    # No `adjustment_interval` floor in slow start: 8 releases at window 8 are one round trip.
    assert interval_length(8, 32, "slow_start") == 8
    assert interval_length(100.2, 32, "slow_start") == 101
    assert interval_length(0.5, 32, "slow_start") == 1


def test_littles_law_factor_removes_only_the_excess_queue() -> None:
    # 2 s of an 8 s latency is queueing; the target allows 0.5 s -> keep 1 - 1.5/8 of the window.
    assert littles_law_factor(2.0, 8.0, 0.5) == pytest.approx(0.8125)
    assert littles_law_factor(0.5, 8.0, 0.5) == pytest.approx(1.0)


def test_slow_start_multiplies_when_the_window_is_full_and_queue_empty() -> None:
    st, reason = next_window(AdaptiveState(8.0), IntervalStats(pq=(0.0,) * 8, max_in_flight=8), P)
    assert st.window == pytest.approx(12.0) and st.phase == "slow_start" and st.last_good == 8.0
    assert reason == "slow start"
    # 12 -> 18 -> 27: each clean round trip grows x1.5 and remembers the window it came from.
    st, _ = next_window(st, IntervalStats(pq=(0.05,) * 12, max_in_flight=12), P)  # 0.05 s <= 0.1 s
    st, _ = next_window(st, IntervalStats(pq=(0.0,) * 18, max_in_flight=18), P)
    assert st.window == 27.0 and st.phase == "slow_start" and st.last_good == 18.0
    # A true doubling is one parameter away (measured: it overshoots, see docs/sampling.md).
    st, _ = next_window(AdaptiveState(16.0), IntervalStats(pq=(0.0,) * 16, max_in_flight=16),
                        AdaptiveParams(slow_start_factor=2.0))
    assert st.window == 32.0


def test_slow_start_exit_threshold_is_the_start_of_the_hold_band() -> None:
    assert slow_start_exit_threshold(P) == pytest.approx(0.1)
    assert slow_start_exit_threshold(AdaptiveParams(prefill_queue_target=2.0, slow_start_exit_fraction=0.5)) == 1.0


def test_slow_start_exits_without_decreasing_once_the_queue_forms() -> None:
    # 64 samples, 4 of them 0.3 s: p95 sits at sorted index 0.95 * 63 = 59.85, inside the four -> 0.3 s,
    # over 0.1 s and under the 0.5 s target. Keep 64; 32 (the window doubled into it) stays the floor.
    stats = IntervalStats(pq=(0.0,) * 60 + (0.3,) * 4, max_in_flight=64)
    st, reason = next_window(AdaptiveState(64.0, "slow_start", 32.0), stats, P)
    assert (st.window, st.phase, st.last_good) == (64.0, "avoidance", 32.0)
    assert reason == "slow start exit (queue forming)"


def test_slow_start_overshoot_falls_back_no_lower_than_the_last_clean_window() -> None:
    # Doubled 64 -> 128 on a 64-slot server: p95 queue 2 s, median latency 3 s. Little's law keeps
    # 1 - (2 - 0.5) / 3 = 0.5 of 128 = 64, and 64 is also the floor (the last clean window).
    stats = IntervalStats(pq=(2.0,) * 20, latency=(3.0,) * 20, max_in_flight=128)
    st, reason = next_window(AdaptiveState(128.0, "slow_start", 64.0), stats, P)
    assert (st.window, st.phase, st.last_good) == (64.0, "avoidance", 64.0)
    assert reason.startswith("probe failed")
    # A milder overshoot (p95 0.8 s, latency 3 s -> keep 0.9, the clamp) keeps 115.2, above the floor.
    stats = IntervalStats(pq=(0.8,) * 20, latency=(3.0,) * 20, max_in_flight=128)
    assert next_window(AdaptiveState(128.0, "slow_start", 64.0), stats, P)[0].window == pytest.approx(115.2)


def test_no_growth_when_the_window_is_not_full() -> None:
    st, reason = next_window(AdaptiveState(64.0), IntervalStats(pq=(0.0,) * 32, max_in_flight=20), P)
    assert st.window == 64.0 and reason.startswith("hold")


def test_server_concurrency_alone_does_not_end_slow_start() -> None:
    # firetitan's num-concurrent-requests counts queued requests, the hosted one a replica's share:
    # a count under the window is release lag or load balancing, not a full batch. Only the queue ends it.
    stats = IntervalStats(pq=(0.0,) * 64, max_in_flight=64, server_concurrency=(40,) * 64)
    st, _ = next_window(AdaptiveState(64.0), stats, P)
    assert st.window == 96.0 and st.phase == "slow_start"


def test_decrease_is_sized_by_littles_law() -> None:
    # p95 of pq = 2.0 s, median latency 8 s -> factor 0.8125 (inside the [0.5, 0.9] clamp).
    stats = IntervalStats(pq=(2.0,) * 40, latency=(8.0,) * 40, max_in_flight=100)
    st, reason = next_window(AdaptiveState(100.0, "avoidance", 120.0), stats, P)
    assert st.window == pytest.approx(81.25)
    assert st.last_good == pytest.approx(81.25)  # congestion below the good window forgets it
    assert reason == "decrease x0.81"


def test_decrease_is_clamped() -> None:
    big = IntervalStats(pq=(10.0,) * 40, latency=(11.0,) * 40, max_in_flight=100)
    assert next_window(AdaptiveState(100.0, "avoidance"), big, P)[0].window == pytest.approx(50.0)
    tiny = IntervalStats(pq=(0.6,) * 40, latency=(50.0,) * 40, max_in_flight=100)
    assert next_window(AdaptiveState(100.0, "avoidance"), tiny, P)[0].window == pytest.approx(90.0)


def test_failed_probe_returns_to_the_last_good_window() -> None:
    stats = IntervalStats(pq=(3.0,) * 40, latency=(4.0,) * 40, max_in_flight=136)
    st, reason = next_window(AdaptiveState(136.0, "avoidance", 128.0), stats, P)
    assert st.window == pytest.approx(128.0) and st.last_good == 128.0
    assert reason.startswith("probe failed")


def test_congestion_at_the_last_good_window_cuts_but_keeps_the_memory() -> None:
    # A spike at 73 = last good (p95 1.6 s, median latency 2 s): Little's law keeps 1 - 1.1/2 = 0.45,
    # clamped to 0.5 -> 36.5; 73 stays remembered.
    spike = IntervalStats(pq=(1.6,) * 48, latency=(2.0,) * 48, max_in_flight=73)
    st, reason = next_window(AdaptiveState(73.0, "avoidance", 73.0), spike, P)
    assert (st.window, st.last_good) == (36.5, 73.0) and reason == "decrease x0.50 (kept)"
    # The queue clears: recover halfway back, 36.5 + (73 - 36.5) / 2 = 54.75, not +4 at a time.
    st, reason = next_window(st, IntervalStats(pq=(0.02,) * 37, max_in_flight=37), P)
    assert st.window == pytest.approx(54.75) and reason == "recover"
    # In the hold band (0.3 s) below the memory: hold, no recovery into a queue that already exists.
    held, reason = next_window(st, IntervalStats(pq=(0.3,) * 55, max_in_flight=55), P)
    assert held.window == pytest.approx(54.75) and reason == "hold (near target)"
    # Congestion again below the memory: the server really is slower, forget 73.
    st, reason = next_window(st, IntervalStats(pq=(1.6,) * 48, latency=(2.0,) * 48, max_in_flight=55), P)
    assert st.window == pytest.approx(27.375) and st.last_good == pytest.approx(27.375)
    assert reason == "decrease x0.50"


def test_recovery_jumps_halfway_back_to_the_last_good_window() -> None:
    stats = IntervalStats(pq=(0.0,) * 40, max_in_flight=64)
    st, reason = next_window(AdaptiveState(64.0, "avoidance", 128.0), stats, P)
    assert st.window == pytest.approx(96.0) and reason == "recover"


def test_probe_is_proportional_to_headroom_and_holds_near_target() -> None:
    full = 200
    st, _ = next_window(AdaptiveState(100.0, "avoidance", 100.0), IntervalStats(pq=(0.0,) * 40,
                                                                                 max_in_flight=full), P)
    assert st.window == pytest.approx(104.0)  # headroom capped at 4
    wide = AdaptiveParams(hold_fraction=0.7)
    st, _ = next_window(AdaptiveState(100.0, "avoidance", 100.0), IntervalStats(pq=(0.25,) * 40,
                                                                                 max_in_flight=full), wide)
    assert st.window == pytest.approx(102.0)  # 0.5 / 0.25 = 2
    # Default band: above 0.2 x target a queue already exists, so more window only adds queue.
    st, reason = next_window(AdaptiveState(100.0, "avoidance", 100.0), IntervalStats(pq=(0.25,) * 40,
                                                                                     max_in_flight=full), P)
    assert st.window == 100.0 and reason == "hold (near target)"


def test_status_congestion_without_queue_data_halves() -> None:
    st, _ = next_window(AdaptiveState(40.0, "avoidance"), IntervalStats(congestion_errors=3, max_in_flight=40), P)
    assert st.window == pytest.approx(20.0)


def test_window_is_clamped_to_bounds() -> None:
    p = AdaptiveParams(min_window=4.0, max_window=10.0)
    assert next_window(AdaptiveState(8.0), IntervalStats(pq=(0.0,), max_in_flight=8), p)[0].window == 10.0
    st, _ = next_window(AdaptiveState(5.0, "avoidance"), IntervalStats(pq=(9.0,), latency=(9.5,),
                                                                       max_in_flight=5), p)
    assert st.window == 4.0


def test_metrics_parse_headers_and_perf_metrics() -> None:
    m = parse_server_metrics({"Fireworks-Prefill-Queue-Duration": "0.25", "fireworks-prompt-tokens": "7"},
                             {"prefill-queue-duration": 0.5, "num_concurrent_requests": "3", "bogus": 1,
                              "server-processing-time": "nan?"})
    assert m.prefill_queue_duration == 0.5  # perf_metrics wins over headers
    assert m.prompt_tokens == 7 and m.num_concurrent_requests == 3 and m.server_processing_time is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        FixedConcurrencyController(0)
    with pytest.raises(ConfigError):
        AdaptiveConcurrencyController(adjustment_interval=-1)
    with pytest.raises(ConfigError):
        AdaptiveConcurrencyController(min_window=10, max_window=5)


# ---------------------------------------------------------------------------------------------- the gate


def test_acquire_from_two_loops_in_two_threads_never_exceeds_the_window() -> None:
    ctl = FixedConcurrencyController(3)
    lock = threading.Lock()
    current = peak = done = 0

    async def worker() -> None:
        nonlocal current, peak, done
        await ctl.acquire()
        with lock:
            current += 1
            peak = max(peak, current)
        await asyncio.sleep(0.001)
        with lock:
            current -= 1
            done += 1
        ctl.release()

    async def many() -> None:
        await asyncio.gather(*(worker() for _ in range(60)))

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert done == 120
    assert peak <= 3
    assert ctl.in_flight == 0


async def test_shrink_with_requests_in_flight_blocks_until_the_debt_is_paid() -> None:
    ctl = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=1000, multiplicative_decrease=0.1,
                                        slow_start=False)
    for _ in range(16):
        await ctl.acquire()
    congested = ServerMetrics(prefill_queue_duration=5.0, server_processing_time=6.0)
    for _ in range(8):
        ctl.release(congested)
    summary = ctl.step_completed()  # factor 1 - 4.5/6 = 0.25 -> window 4 with 8 still in flight
    assert summary["window_after"] == 4.0
    assert ctl.window_size == 4 and ctl.in_flight == 8 and ctl.pending_decrease == 4

    admitted = 0

    async def newcomer() -> None:
        nonlocal admitted
        await ctl.acquire()
        admitted += 1

    tasks = [asyncio.create_task(newcomer()) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert admitted == 0
    for _ in range(4):  # pays the debt exactly: nothing may be admitted yet
        ctl.release()
    await asyncio.sleep(0.01)
    assert admitted == 0 and ctl.in_flight == 4
    ctl.release()
    await asyncio.sleep(0.01)
    assert admitted == 1 and ctl.in_flight == 4
    for _ in range(3):
        ctl.release()
    await asyncio.sleep(0.01)
    assert admitted == 4 and ctl.in_flight <= ctl.window_size
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert ctl.in_flight == 4  # cancelled waiters hold nothing


async def test_cancelled_waiter_leaks_no_slot() -> None:
    ctl = FixedConcurrencyController(1)
    await ctl.acquire()
    waiter = asyncio.create_task(ctl.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    ctl.release()
    assert ctl.in_flight == 0
    await asyncio.wait_for(ctl.acquire(), timeout=5)
    ctl.release()


async def test_weighted_requests_take_their_slots_first_come_first_served() -> None:
    ctl = FixedConcurrencyController(8)
    await ctl.acquire(weight=6)
    heavy = asyncio.create_task(ctl.acquire(weight=4))  # 6 + 4 > 8: waits
    await asyncio.sleep(0.01)
    light = asyncio.create_task(ctl.acquire(weight=1))  # would fit, but queues behind the heavy one
    await asyncio.sleep(0.01)
    assert not heavy.done() and not light.done() and ctl.in_flight == 6
    ctl.release(None, weight=6)
    await asyncio.wait_for(asyncio.gather(heavy, light), timeout=5)
    assert ctl.in_flight == 5
    ctl.release(None, weight=4)
    ctl.release()
    # A request heavier than the whole window runs once nothing else does, instead of never.
    await asyncio.wait_for(ctl.acquire(weight=20), timeout=5)
    assert ctl.in_flight == 20 and ctl.pending_decrease == 12
    blocked = asyncio.create_task(ctl.acquire(weight=1))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    ctl.release(None, weight=20)
    await asyncio.wait_for(blocked, timeout=5)
    ctl.release()
    with pytest.raises(RuntimeError):
        ctl.release(None, weight=2)
    with pytest.raises(ValueError):
        await ctl.acquire(weight=0)


async def test_cancelling_a_heavy_waiter_lets_lighter_ones_behind_it_in() -> None:
    ctl = FixedConcurrencyController(4)
    await ctl.acquire(weight=3)
    heavy = asyncio.create_task(ctl.acquire(weight=4))
    await asyncio.sleep(0.01)
    light = asyncio.create_task(ctl.acquire(weight=1))
    await asyncio.sleep(0.01)
    assert not light.done()
    heavy.cancel()
    await asyncio.gather(heavy, return_exceptions=True)
    await asyncio.wait_for(light, timeout=5)
    assert ctl.in_flight == 4


async def test_adaptive_counts_weighted_releases_as_sequences() -> None:
    ctl = AdaptiveConcurrencyController(initial_window=8, adjustment_interval=8)
    await ctl.acquire(weight=8)
    ctl.release(ServerMetrics(prefill_queue_duration=0.0), weight=8)  # one request of 8 choices: a full interval
    assert ctl.window_size == 12 and ctl.in_flight == 0


async def test_adaptive_adjusts_every_window_of_releases_and_summarises_steps() -> None:
    ctl = AdaptiveConcurrencyController(initial_window=8, adjustment_interval=8)
    for _ in range(8):
        await ctl.acquire()
    for _ in range(8):
        ctl.release(ServerMetrics(prefill_queue_duration=0.0, prompt_tokens=10, cached_prompt_tokens=5))
    assert ctl.window_size == 12  # slow start x1.5 after one full interval
    summary = ctl.step_completed()
    assert summary["requests"] == 8 and summary["cache_hit_rate"] == 0.5 and summary["max_in_flight"] == 8
    assert ctl.step_completed()["requests"] == 0
    with pytest.raises(RuntimeError):
        ctl.release()


def test_official_helpers_server_metrics_from_headers_and_retry_exhaustion() -> None:
    m = ServerMetrics.from_headers({"fireworks-prefill-queue-duration": "0.25", "Fireworks-Prompt-Tokens": "12"},
                                   http_status_code=200, retry_attempt=1)
    assert m.prefill_queue_duration == 0.25 and m.prompt_tokens == 12 and m.retry_attempt == 1
    ctl = AdaptiveConcurrencyController()
    ctl.note_retry_exhausted(m)
    assert ctl.retry_exhaustions == 1


async def test_slow_start_grows_per_window_of_releases_and_stops_early_on_a_forming_queue() -> None:
    ctl = AdaptiveConcurrencyController(initial_window=4, adjustment_interval=32, slow_start_factor=2.0)
    for window in (4, 8, 16):  # one window of clean releases each: 4 -> 8 -> 16 -> 32, despite interval 32
        for _ in range(window):
            await ctl.acquire()
        for _ in range(window):
            ctl.release(ServerMetrics(prefill_queue_duration=0.0))
    assert ctl.window_size == 32 and ctl.state.phase == "slow_start"
    for _ in range(32):
        await ctl.acquire()
    # Two of 32 samples over 0.1 s (>= 5% of the round trip, and at least 2): stop growing at once.
    ctl.release(ServerMetrics(prefill_queue_duration=0.0))
    ctl.release(ServerMetrics(prefill_queue_duration=0.2))
    assert ctl.state.phase == "slow_start"
    ctl.release(ServerMetrics(prefill_queue_duration=0.3))
    assert ctl.window_size == 32 and ctl.state.phase == "avoidance" and ctl.state.last_good == 16.0
    assert ctl.history[-1]["trigger"] == "early" and ctl.history[-1]["reason"].startswith("slow start exit")
