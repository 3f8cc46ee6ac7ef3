"""On-policy distillation: the student samples episodes, a teacher scores its tokens, reverse KL is the advantage.

The teacher is a forward-only trainer on `teacher_model` (another model sharing the tokenizer, e.g.
tiny-qwen3 teaching nano-qwen3; default: the student's own base model), optionally loaded with a train
state (`teacher_state`) and optionally given a privileged `teacher_prompt` the student never sees.
Each sampled token's advantage is `kl_coef * (log p_teacher - log p_student)` with the student's
sampling logprobs, trained with the importance-sampling loss (as tinker-cookbook's on-policy
distillation); no reward is used for training, the task score is only logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from firetitan.envs.base import EnvFactory
from firetitan.recipes.clients import Clients, open_clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.episode_loop import EpisodeRLConfig, ScoreFn, run_episode_rl
from firetitan.recipes.episodes import Episode
from firetitan.recipes.scoring import model_token_logprobs
from firetitan.recipes.supervised import ProgressFn
from firetitan.recipes.text import encode_prompt
from firetitan.recipes.turn_rewards import distill_advantages, reverse_kl
from firetitan.runtime.remote import call
from firetitan.runtime.trajectory import Trajectory


class DistillConfig(EpisodeRLConfig):
    teacher_model: str | None = Field(default=None, description="the teacher's base model (default: base_model)")
    teacher_state: str | None = Field(default=None, description="a train state loaded into the teacher")
    teacher_job_id: str | None = Field(
        default=None, description="trainer job whose states hold teacher_state (train states are per job: to "
        "use another run's state, reattach to that run's job id, e.g. stable_job_id('sft', its log_dir))")
    teacher_prompt: str | None = Field(default=None, description="privileged text prepended for the teacher only")
    kl_coef: float = Field(default=1.0, gt=0)
    loss_fn: Literal["ppo", "importance_sampling", "cispo"] = "importance_sampling"


def student_logprobs(traj: Trajectory) -> list[float]:
    return [lp for lp, m in zip(traj.logprobs, traj.mask, strict=True) if m]


def distill_token_advantages(traj: Trajectory, teacher: Sequence[float], coef: float) -> list[float]:
    """Full-length per-token advantages: `coef * (teacher - student)` at the model's tokens, 0 elsewhere."""
    adv = iter(distill_advantages(student_logprobs(traj), teacher, coef=coef))
    return [next(adv) if m else 0.0 for m in traj.mask]


def distill_score(cfg: DistillConfig, teacher: Any, prefix: list[int]) -> ScoreFn:
    async def score(episodes: list[Episode], row: Mapping[str, Any]) -> tuple[list[list[float]], dict[str, float]]:
        trajs = [e.trajectory for e in episodes]
        teacher_lp = await model_token_logprobs(teacher, trajs, prefix=prefix, timeout_s=cfg.timeout_s)
        kls = [reverse_kl(student_logprobs(t), lp) for t, lp in zip(trajs, teacher_lp, strict=True)]
        return ([distill_token_advantages(t, lp, cfg.kl_coef) for t, lp in zip(trajs, teacher_lp, strict=True)],
                {"reverse_kl": sum(kls) / len(kls)})

    return score


async def distill(cfg: DistillConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
                  env_factory: EnvFactory, *, service: Any = None, teacher_service: Any = None,
                  on_progress: ProgressFn | None = None) -> dict[str, Any]:
    teacher_cfg = RecipeConfig(log_dir=cfg.log_dir / "teacher", base_model=cfg.teacher_model or cfg.base_model,
                               timeout_s=cfg.timeout_s, service_kwargs=cfg.service_kwargs,
                               trainer_job_id=cfg.teacher_job_id)
    async with open_clients(teacher_cfg, name="distill-teacher", deployment=False,
                            service=teacher_service) as teacher:
        if cfg.teacher_state:
            await call(teacher.training.load_state(cfg.teacher_state), timeout=cfg.timeout_s,
                       what=f"loading the teacher state {cfg.teacher_state}")
        prefix = encode_prompt(teacher.tokenizer, cfg.teacher_prompt) if cfg.teacher_prompt else []

        def make(clients: Clients) -> ScoreFn:
            if len(clients.tokenizer) != len(teacher.tokenizer):
                raise ValueError(f"teacher_model: {teacher_cfg.base_model!r} has a different tokenizer "
                                 f"({len(teacher.tokenizer)} vs {len(clients.tokenizer)} tokens)")
            return distill_score(cfg, teacher.training, prefix)

        return await run_episode_rl(cfg, rows, eval_rows, env_factory, make, name="distill", service=service,
                                    on_progress=on_progress)
