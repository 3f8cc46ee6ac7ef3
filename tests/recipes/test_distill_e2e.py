"""On-policy distillation end to end on real local services: a better (longer-SFT'd) teacher.

Slow: provisions two SFT warm starts (student and teacher), then the student's trainer (reattached to its
SFT job, whose train state it starts from) and deployment and the teacher's trainer (reattached to the
teacher's SFT job, whose train state it loads).

The test distils a teacher that is much better at the task (nano-qwen3 SFT'd 320 steps on
demonstrations, sampled success ~0.78) into a student that is the same model SFT'd 64 steps (~0.2):
close enough for the reverse KL to be learnable, far enough for the score to have room to follow. It asserts
both: the KL falls and a sampled eval over every train entity rises toward the teacher's. (A close random
teacher, tiny-qwen3, was tested here too; its KL falls as well, 0.28-0.44x, see docs/multiturn-rl.md; it
was dropped to keep the suite's time.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from firetitan.envs import LookupEnv, every_key_rows, lookup_rows
from firetitan.recipes.distill import DistillConfig, distill
from firetitan.recipes.warm_start import lookup_warm_start

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_helpers import worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def episodes_of(log_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "episodes"]


# The CI setting (also in docs/multiturn-rl.md): student SFT'd 64 steps, teacher SFT'd 320 (both lr 1e-2);
# distillation with 32 groups x 4 episodes per step (32 keys per step: the score varies a lot between keys),
# lr 6e-3, STEPS steps. The task score is a sampled eval (temperature 1) over every train key EVAL_REPEATS
# times, before and after; the KL is compared over the first and last K steps.
STEPS, K, EVAL_REPEATS = 16, 6, 8
# Measured in this setting (docs/multiturn-rl.md; three seeds, a second warm-start seed, six runs of this
# test): the eval rose +0.172 / +0.211 / +0.161 / +0.169 / +0.206 / +0.159 / +0.111 / +0.177 / +0.135 /
# +0.177, 0.168 +- 0.030 (mean +- std), toward the teacher's 0.77-0.78 from ~0.2. Two evals of 384 episodes
# at p ~ 0.2 differ by +-0.029 (binomial; two standstills: +0.016, -0.044), so RISE_MARGIN is ~2.8 standard
# errors above no change, ~2.9 std below the measured mean and below the smallest rise.
# The KL ratio (last K / first K steps) was 0.65 / 0.70 / 0.64 / 0.67 / 0.68 / 0.64 / 0.84 / 0.72 / 0.67 /
# 0.64, 0.69 +- 0.06; a standstill (lr 1e-9) gave 0.96 with per-step KL std 0.21 at ~3.3, i.e. 1.0 +- ~0.04.
# KL_RATIO is 0.9, not tighter: the 0.84 run fell to 1.95 at step 12 and rose back to 2.9 (lr 6e-3
# overshoots at times), and failed the 0.8 kept from the former 160-step-teacher setting.
RISE_MARGIN, KL_RATIO = 0.08, 0.9


async def test_distill_lowers_reverse_kl_and_moves_the_score_toward_a_better_teacher(ft_home: Path,
                                                                                      tmp_path: Path) -> None:
    service = {"home": str(ft_home)}
    student, student_job = await lookup_warm_start(tmp_path / "student", steps=64, learning_rate=1e-2,
                                                   service_kwargs=service)
    teacher, teacher_job = await lookup_warm_start(tmp_path / "teacher", steps=320, learning_rate=1e-2,
                                                   service_kwargs=service)
    cfg = DistillConfig(log_dir=tmp_path / "distill", teacher_model="firetitan/nano-qwen3", teacher_state=teacher,
                        teacher_job_id=teacher_job, init_state=student, trainer_job_id=student_job, steps=STEPS,
                        groups_per_step=32, group_size=4, max_concurrent_rollouts=16, max_tokens=4, max_turns=3,
                        learning_rate=6e-3, eval_every=0, eval_temperature=1.0, save_every=0,
                        service_kwargs=service)
    summary = await distill(cfg, lookup_rows(800, seed=0), every_key_rows(repeats=EVAL_REPEATS), LookupEnv)
    eps = episodes_of(cfg.log_dir)
    assert [r["step"] for r in eps] == list(range(1, STEPS + 1)) and summary["final_step"] == STEPS
    kl = [r["reverse_kl"] for r in eps]
    assert all(math.isfinite(x) for x in kl)
    # Both states come from nano-qwen3 trained on the same demonstrations; a KL this far from 0 means
    # the teacher really runs its own loaded state (two loads of the same state would give 0).
    assert kl[0] > 0.3, kl
    recs = [json.loads(line) for line in (cfg.log_dir / "metrics.jsonl").read_text().splitlines()]
    results = [r for r in recs if r["event"] == "train_result"]
    assert results and all(abs(r["ratio:mean"] - 1.0) < 0.05 for r in results), "on-policy: ratio ~ 1"
    first, last = sum(kl[:K]) / K, sum(kl[-K:]) / K
    evals = summary["evals"]
    assert len(evals) == 2 and evals[0]["requested_step"] == 0 and evals[1]["requested_step"] == STEPS, evals
    before, after = evals[0]["eval_success"], evals[1]["eval_success"]
    print(f"reverse KL {first:.3f} -> {last:.3f}; sampled eval success {before:.3f} -> {after:.3f}")
    assert last < KL_RATIO * first, kl
    assert after > before + RISE_MARGIN, (before, after)
    assert worker_processes(ft_home) == []
