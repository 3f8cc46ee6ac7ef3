"""The RL loop under simulated trainer/sampler timings: staleness bound, cancellation, exact-once resume.

The trainer, sampler and weight sync here are timed sleeps; what is under test is our runtime's
admission, stale-drop, cursor and task ownership logic, run on real anyio task groups.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.periodic import Pending, PeriodicJob, PeriodicTasks
from firetitan.runtime.rl_loop import RLLoop, RLLoopSettings
from firetitan.runtime.rollouts import RolloutGroup
from firetitan.runtime.run_metrics import RunMetrics
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry

delays = st.lists(st.sampled_from([0.0, 0.0005, 0.002, 0.006]), min_size=1, max_size=12)


def make_loop(tmp_path, *, steps: int, bound: int, groups: int, sync_every: int, rollout_delays: list[float],
              train_delays: list[float], sync_delays: list[float], cursor: DataCursor | None = None,
              start_step: int = 0, saves: list[tuple[int, dict[str, Any]]] | None = None,
              concurrency: int = 3, stop: tuple[int, anyio.CancelScope] | None = None,
              fail_first: set[int] | None = None) -> RLLoop:
    registry = PolicyVersionRegistry("snap-0")
    if start_step:
        registry.publish(start_step, f"snap-{start_step}")
    r_delay, t_delay, s_delay = (itertools.cycle(d) for d in (rollout_delays, train_delays, sync_delays))
    cursor = cursor or DataCursor(1000, epochs=None)

    async def rollout(position: int, pv: PolicyVersion) -> RolloutGroup | None:
        if fail_first and position in fail_first:
            fail_first.discard(position)
            # Fail only once version 1 is served and the workers have had time to find the cursor
            # empty and go idle: the give-back below is then the only thing that can wake them.
            await registry.wait_for(1)
            await anyio.sleep(0.01)
            return None  # a failed rollout: its prompt is given back and must be redone
        await anyio.sleep(next(r_delay))
        return RolloutGroup(position=position, version=-1, samples=[], rewards=[float(pv.version)])

    async def train_step(step: int, batch: list[RolloutGroup]) -> None:
        if stop is not None and step == stop[0]:
            stop[1].cancel()  # like Ctrl-C arriving mid-step
        await anyio.sleep(next(t_delay))

    async def publish(step: int, result: Any, context: Any) -> None:
        await anyio.sleep(next(s_delay))
        registry.publish(step, f"snap-{step}")

    jobs = [PeriodicJob("sync", sync_every, submit=lambda step: Pending(None), finish=publish, timeout_s=10)]
    if saves is not None:
        jobs.append(PeriodicJob("state", 2, submit=lambda step: Pending(None, cursor.state()),
                                finish=_record(saves), timeout_s=10))
    s = RLLoopSettings(steps=steps, groups_per_step=groups, max_steps_off_policy=bound,
                       max_concurrency=concurrency, rollout_timeout_s=10)
    s.validate(sync_every)
    return RLLoop(s, cursor=cursor, registry=registry, rollout_fn=rollout, train_step=train_step,
                  periodic=PeriodicTasks(jobs), metrics=RunMetrics(tmp_path / "m"), start_step=start_step)


def _record(saves: list[tuple[int, dict[str, Any]]]):
    async def finish(step: int, result: Any, context: Any) -> None:
        saves.append((step, context))
    return finish


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bound=st.integers(0, 3), groups=st.integers(1, 3), rd=delays, td=delays, sd=delays,
       concurrency=st.integers(1, 6), size=st.sampled_from([None, 5, 11, 12, 18]), data=st.data())
def test_staleness_bound_never_exceeded(tmp_path, bound, groups, rd, td, sd, concurrency, size, data) -> None:
    """Any timing, bound and data size: the bound holds, and the run ends (data may run out first)."""
    sync_every = data.draw(st.integers(1, bound + 1))
    cursor = DataCursor(1000, epochs=None) if size is None else DataCursor(size, epochs=1)
    loop = make_loop(tmp_path, steps=6, bound=bound, groups=groups, sync_every=sync_every, rollout_delays=rd,
                     train_delays=td, sync_delays=sd, concurrency=concurrency, cursor=cursor)
    steps = 6 if size is None else min(6, size // groups)
    anyio.run(run_guarded, loop)
    assert loop.trainer_step == steps
    assert len(loop.trained) == steps * groups
    for step, version, _ in loop.trained:
        assert 0 <= step - version <= bound, (step, version, bound)
    if bound == 0:
        assert all(step == version for step, version, _ in loop.trained)
    positions = [p for _, _, p in loop.trained]
    assert len(positions) == len(set(positions)), "a prompt was trained twice"
    hist = loop.metrics.staleness.summary()
    assert hist["max"] <= bound and sum(hist["histogram"].values()) == steps * groups


async def run_guarded(loop: RLLoop, limit_s: float = 60.0) -> None:
    """Run the loop; a hang fails the test (TimeoutError) instead of hanging the suite. The limit is
    far above any run here (well under a second): it detects "never ends", it does not time anything."""
    with anyio.fail_after(limit_s):
        await loop.run()


@pytest.mark.parametrize(("size", "steps"), [(5, 2), (6, 3)])
async def test_run_ends_when_the_data_runs_out(tmp_path, size, steps) -> None:
    # Regression: with a finite cursor the trainer used to wait forever for a batch that could not be
    # filled (one prompt left over, or none) while the workers polled an empty cursor.
    loop = make_loop(tmp_path, steps=10, bound=1, groups=2, sync_every=1, rollout_delays=[0.0, 0.001],
                     train_delays=[0.0], sync_delays=[0.0], cursor=DataCursor(size, epochs=1))
    await run_guarded(loop)
    assert loop.trainer_step == steps and len(loop.trained) == 2 * steps
    events = [json.loads(line)["event"] for line in loop.metrics.path.read_text().splitlines()]
    assert events.count("data_exhausted") == 1, "the early end is recorded, not silent"


async def test_last_prompt_failing_is_redone_not_taken_for_the_end(tmp_path) -> None:
    # Forced interleaving: every other prompt is buffered and the cursor is empty when the last prompt's
    # rollout fails. Its give-back must wake the idle workers (no poll), and the run must not end early.
    loop = make_loop(tmp_path, steps=2, bound=1, groups=2, sync_every=1, rollout_delays=[0.0],
                     train_delays=[0.0], sync_delays=[0.0], cursor=DataCursor(4, epochs=1), fail_first={3})
    await run_guarded(loop)
    assert loop.trainer_step == 2
    assert sorted(p for _, _, p in loop.trained) == [0, 1, 2, 3]


async def test_stale_groups_are_dropped_and_redone(tmp_path) -> None:
    # One straggling rollout per few: out-of-order completion makes some groups stale at consumption.
    loop = make_loop(tmp_path, steps=8, bound=1, groups=2, sync_every=1,
                     rollout_delays=[0.0, 0.0, 0.05, 0.0, 0.0], train_delays=[0.0], sync_delays=[0.0],
                     concurrency=6)
    await loop.run()
    assert all(0 <= s - v <= 1 for s, v, _ in loop.trained)
    trained = sorted(p for _, _, p in loop.trained)
    assert len(trained) == len(set(trained)) == 16


async def test_cancel_mid_run_leaves_no_task(tmp_path) -> None:
    before = set(asyncio.all_tasks())
    loop = make_loop(tmp_path, steps=10_000, bound=1, groups=2, sync_every=1, rollout_delays=[0.001],
                     train_delays=[0.002], sync_delays=[0.001])
    with anyio.move_on_after(0.2):
        await loop.run()
    assert 0 < loop.trainer_step < 10_000
    await anyio.lowlevel.checkpoint()
    leftover = {t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task()}
    assert not leftover, leftover
    state = loop.cursor.state()
    trained = {p for _, _, p in loop.trained}
    assert set(range(state["next"])) - trained == set(state["redo"]), "untrained prompts are redone on resume"


@pytest.mark.parametrize("bound", [0, 2])
async def test_stop_and_resume_trains_every_prompt_once(tmp_path, bound) -> None:
    total, groups = 40, 2
    saves: list[tuple[int, dict[str, Any]]] = []
    scope = anyio.CancelScope()
    first = make_loop(tmp_path / "a", steps=total // groups, bound=bound, groups=groups, sync_every=1,
                      rollout_delays=[0.0, 0.003, 0.001], train_delays=[0.002], sync_delays=[0.001],
                      cursor=DataCursor(total, epochs=1), saves=saves, stop=(13, scope))
    with scope:
        await first.run()
    assert saves and first.trainer_step < total // groups, "the first run must stop mid-way"
    step, state = saves[-1]
    before = [p for s, _, p in first.trained if s < step]
    second = make_loop(tmp_path / "b", steps=total // groups, bound=bound, groups=groups, sync_every=1,
                       rollout_delays=[0.001, 0.0], train_delays=[0.0], sync_delays=[0.0],
                       cursor=DataCursor.from_state(state), start_step=step)
    await second.run()
    after = [p for _, _, p in second.trained]
    assert sorted(before + after) == list(range(total))
