"""IGPO end to end on the built-in lookup environment against real local services (nano-qwen3).

Slow: provisions a trainer (SFT warm start, then IGPO on the same job) and a deployment. The first test
asserts learning from an SFT warm start, with a margin chosen from measured run-to-run spreads; the
second checks async mode, the staleness bound and resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from firetitan.envs import LookupEnv, lookup_rows
from firetitan.recipes.igpo import IGPOConfig, igpo
from firetitan.recipes.warm_start import lookup_warm_start

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_helpers import worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The CI setting of the learning test (also in docs/multiturn-rl.md): 64 SFT steps (lr 1e-2) on
# demonstrations, then IGPO with 8 groups x 8 episodes per step, lr 2e-3, for STEPS steps; the start is
# the mean success of the first FIRST steps, the end that of the last LAST steps.
STEPS, FIRST, LAST, RISE_MARGIN = 30, 5, 10, 0.10


def episodes_of(log_dir: Path) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "episodes"]


async def test_igpo_from_an_sft_warm_start_raises_success(ft_home: Path, tmp_path: Path) -> None:
    service = {"home": str(ft_home)}
    state, job = await lookup_warm_start(tmp_path / "warm", steps=64, learning_rate=1e-2, service_kwargs=service)
    cfg = IGPOConfig(log_dir=tmp_path / "igpo", steps=STEPS, groups_per_step=8, group_size=8, max_tokens=4,
                     max_turns=3, learning_rate=2e-3, eval_every=0, save_every=15, init_state=state,
                     trainer_job_id=job, service_kwargs=service)
    summary = await igpo(cfg, lookup_rows(400, seed=0), lookup_rows(16, seed=1, split="eval"),
                         lambda row: LookupEnv(row, max_turns=3))
    eps = episodes_of(cfg.log_dir)
    assert [r["step"] for r in eps] == list(range(1, STEPS + 1))
    assert summary["staleness"]["max"] == 0 and summary["sampled_tokens"] == eps[-1]["sampled_tokens_total"]
    assert all(r["info_gain"] != 0.0 for r in eps), "turn rewards come from real teacher-forced scoring"
    # The warm start really is the starting policy: a random-init model calls at turn 1 about 1 time
    # in 3 (mean turns ~1.4); the warm-started one calls, then answers (measured 1.97-2.14).
    assert eps[0]["turns"] > 1.8, eps[0]
    success = [r["success"] for r in eps]
    start, end = sum(success[:FIRST]) / FIRST, sum(success[-LAST:]) / LAST
    # Measured with this exact setup (docs/multiturn-rl.md, "Measured from an SFT warm start"): nine
    # runs (seeds 0-4, and this test four times) started at 0.18-0.33 and rose (last 10 minus first 5
    # steps) +0.149 to +0.289, mean 0.220, std 0.048. A standstill (the same warm start, lr 1e-9,
    # seeds 0-2) "rose" -0.002, +0.011, -0.028: the binomial standard error of a rise between 320 and
    # 640 episodes at p ~ 0.2 is 0.027. The margin 0.10 is ~3.7 standstill standard errors above no
    # learning and ~2.5 std of the measured rises below their mean.
    assert end - start > RISE_MARGIN, (start, end, success)
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
