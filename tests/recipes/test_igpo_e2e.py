"""IGPO end to end on the built-in lookup environment against real local services (nano-qwen3, random init).

Slow: provisions a trainer and a deployment. Learning itself is measured in benchmarks/igpo_vs_grpo.py,
not asserted (see the comment in the first test and docs/multiturn-rl.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from firetitan.envs import LookupEnv, lookup_rows
from firetitan.recipes.igpo import IGPOConfig, igpo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_helpers import worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def episodes_of(log_dir: Path) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "episodes"]


async def test_igpo_runs_multi_turn_episodes_with_teacher_forced_turn_rewards(ft_home: Path, tmp_path: Path) -> None:
    steps = 12
    cfg = IGPOConfig(log_dir=tmp_path / "igpo", steps=steps, groups_per_step=4, group_size=8, max_tokens=4,
                     max_turns=3, learning_rate=1e-2, eval_every=0, save_every=6,
                     service_kwargs={"home": str(ft_home)})
    summary = await igpo(cfg, lookup_rows(400, seed=0), lookup_rows(16, seed=1, split="eval"),
                         lambda row: LookupEnv(row, max_turns=3))
    eps = episodes_of(cfg.log_dir)
    assert [r["step"] for r in eps] == list(range(1, steps + 1))
    assert summary["staleness"]["max"] == 0 and summary["sampled_tokens"] == eps[-1]["sampled_tokens_total"]
    assert all(r["info_gain"] != 0.0 for r in eps), "turn rewards come from real teacher-forced scoring"
    success = [r["success"] for r in eps]
    assert all(0.0 <= x <= 1.0 for x in success) and any(x > 0.0 for x in success), success
    # Learning is not asserted here: over seeds 0-2 (benchmarks/igpo_vs_grpo.py) train success rose by
    # +0.103, +0.063, +0.047 from the first to the last 10 steps, against a standstill spread of
    # +-0.028 (one standard error) — under 3 standard errors, so any margin would either fail CI now and
    # then or pass without learning. Larger batches (8 x 16 episodes, lr 1e-2) rose +0.045 / +0.057 in
    # 20 steps (~4 standard errors) but took 85-115 s of training on the shared host, over a CI test's
    # budget; higher learning rates collapse. The cause is the task, not the optimiser: a turn-blind
    # random-init policy is capped near 0.19 success, just above its 0.12 start (docs/multiturn-rl.md).
    assert worker_processes(ft_home) == []


async def test_igpo_async_within_bound_and_resumes(ft_home: Path, tmp_path: Path) -> None:
    kwargs = dict(log_dir=tmp_path / "igpo_async", groups_per_step=2, group_size=4, max_tokens=4, max_turns=3,
                  learning_rate=1e-2, eval_every=0, save_every=3, max_steps_off_policy=1,
                  service_kwargs={"home": str(ft_home)})
    rows, evalset = lookup_rows(100, seed=0), lookup_rows(4, seed=1, split="eval")
    first = await igpo(IGPOConfig(steps=3, **kwargs), rows, evalset, LookupEnv)
    assert first["final_step"] == 3
    second = await igpo(IGPOConfig(steps=6, **kwargs), rows, evalset, LookupEnv)
    assert second["start_step"] == 3 and second["final_step"] == 6
    assert second["staleness"]["max"] <= 1
    eps = episodes_of(kwargs["log_dir"])
    assert [r["step"] for r in eps] == list(range(1, 7)), "the resumed run rewrote nothing twice"
    assert second["evals"] and "eval_success" in second["evals"][-1]
    assert worker_processes(ft_home) == []
