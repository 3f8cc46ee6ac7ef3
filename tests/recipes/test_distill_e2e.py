"""On-policy distillation end to end on real local services: a better (longer-SFT'd) teacher.

Slow: provisions two SFT warm starts (student and teacher), then the student's trainer (reattached to its
SFT job, whose train state it starts from) and deployment and the teacher's trainer (reattached to the
teacher's SFT job, whose train state it loads).

The first test distils a teacher that is better at the task (nano-qwen3 SFT'd 160 steps on
demonstrations, success ~0.47) into a student that is the same model SFT'd 64 steps (success ~0.2):
close enough for the reverse KL to be learnable. (A close random teacher, tiny-qwen3, was tested here
too; its KL falls as well, 0.28-0.44x, see docs/multiturn-rl.md; it was dropped to keep the suite's time,
as this test covers the same falling KL with a teacher that is also better at the task.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from firetitan.envs import LookupEnv, lookup_rows
from firetitan.recipes.distill import DistillConfig, distill
from firetitan.recipes.warm_start import lookup_warm_start

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_helpers import worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def episodes_of(log_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "episodes"]


async def test_distill_lowers_reverse_kl_to_a_better_sft_teacher(ft_home: Path, tmp_path: Path) -> None:
    service = {"home": str(ft_home)}
    student, student_job = await lookup_warm_start(tmp_path / "student", steps=64, learning_rate=1e-2,
                                                   service_kwargs=service)
    teacher, teacher_job = await lookup_warm_start(tmp_path / "teacher", steps=160, learning_rate=1e-2,
                                                   service_kwargs=service)
    steps = 24
    cfg = DistillConfig(log_dir=tmp_path / "distill", teacher_model="firetitan/nano-qwen3", teacher_state=teacher,
                        teacher_job_id=teacher_job, init_state=student, trainer_job_id=student_job, steps=steps,
                        groups_per_step=8, group_size=16, max_concurrent_rollouts=16, max_tokens=4, max_turns=3,
                        learning_rate=3e-3, eval_every=0, save_every=0, service_kwargs=service)
    summary = await distill(cfg, lookup_rows(800, seed=0), [], LookupEnv)
    eps = episodes_of(cfg.log_dir)
    assert [r["step"] for r in eps] == list(range(1, steps + 1)) and summary["final_step"] == steps
    kl = [r["reverse_kl"] for r in eps]
    assert all(math.isfinite(x) for x in kl)
    # Both states come from nano-qwen3 trained on the same demonstrations; a KL this far from 0 means
    # the teacher really runs its own loaded state (measured 1.39-1.65 at step 1; two loads of the same
    # state would give 0).
    assert kl[0] > 0.3, kl
    recs = [json.loads(line) for line in (cfg.log_dir / "metrics.jsonl").read_text().splitlines()]
    results = [r for r in recs if r["event"] == "train_result"]
    assert results and all(abs(r["ratio:mean"] - 1.0) < 0.05 for r in results), "on-policy: ratio ~ 1"
    first, last = sum(kl[:6]) / 6, sum(kl[-6:]) / 6
    # Measured with this setup (seeds 0, 1, and this test once): first 6 steps 1.03 / 1.18 / 1.14, last 6
    # 0.63 / 0.66 / 0.69, i.e. 0.61x / 0.56x / 0.61x. A standstill (lr 1e-9, seed 1) stayed at 1.52 +- 0.15 per step (ratio 1.00x), so a 6-step
    # mean is +-0.06 and the ratio of two is 1.0 +- ~0.05; 0.8x is ~4 standard errors below no change and above both runs.
    # The task score is not asserted: the students' success moved 0.262 -> 0.218, 0.233 -> 0.305 and
    # 0.285 -> 0.176 (first vs last 6 steps; teacher ~0.47), i.e. not reliably toward the teacher's.
    assert last < 0.8 * first, kl
    assert worker_processes(ft_home) == []

