"""IGPO recipe: multi-turn episodes, turn rewards = information gain about the ground truth + the outcome.

Each turn's reward is how much it raised the policy's (teacher-forced, `forward` on the training
client) probability of the ground-truth answer; the last turn's is the outcome reward; rewards are
z-normalised over the group and summed (discounted by `gamma`) from each turn on, so every token of
a turn is credited with what it and later turns gained (`firetitan.recipes.turn_rewards`).
`advantage="outcome"` is the GRPO baseline on the same episodes: one group-normalised outcome
advantage for every turn. Sync (`max_steps_off_policy=0`) or async within the staleness bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from firetitan.envs.base import EnvFactory
from firetitan.recipes.clients import Clients
from firetitan.recipes.episode_loop import EpisodeRLConfig, ScoreFn, run_episode_rl
from firetitan.recipes.episodes import Episode
from firetitan.recipes.scoring import answer_probabilities
from firetitan.recipes.supervised import ProgressFn
from firetitan.recipes.text import encode_prompt
from firetitan.recipes.turn_rewards import igpo_advantages, igpo_turn_rewards
from firetitan.runtime.advantages import group_advantages
from firetitan.runtime.trajectory import token_advantages


class IGPOConfig(EpisodeRLConfig):
    gamma: float = Field(default=1.0, ge=0.0, le=1.0, description="discount of later turns' normalised rewards")
    advantage: Literal["igpo", "outcome"] = Field(
        default="igpo", description="igpo: information gain + outcome per turn; outcome: GRPO on the episodes")
    # The trainer's weights move between sampling and scoring in async mode; CISPO corrects the ratio
    # instead of clipping it away (see AsyncRLConfig). On-policy its gradient is PPO's.
    loss_fn: Literal["ppo", "importance_sampling", "cispo"] = "cispo"


def outcome_turn_advantages(episodes: Sequence[Episode], *, normalize: bool = True) -> list[list[float]]:
    """GRPO on episodes: each episode's group-relative outcome advantage on every one of its turns."""
    adv = group_advantages([e.reward for e in episodes], normalize_std=normalize)
    return [[a] * len(e.trajectory.turns) for e, a in zip(episodes, adv, strict=True)]


def igpo_score(cfg: IGPOConfig, clients: Clients) -> ScoreFn:
    async def score(episodes: list[Episode], row: Mapping[str, Any]) -> tuple[list[list[float]], dict[str, float]]:
        if cfg.advantage == "outcome":
            per_turn = outcome_turn_advantages(episodes, normalize=cfg.normalize_advantages)
            return [token_advantages(e.trajectory, a) for e, a in zip(episodes, per_turn, strict=True)], {}
        answers = []
        for e in episodes:
            if not e.answer:
                raise ValueError("answer: IGPO needs the environment's ground-truth answer (Env.answer is empty)")
            answers.append(encode_prompt(clients.tokenizer, e.answer))
        probs = await answer_probabilities(clients.training, [e.trajectory for e in episodes], answers,
                                           timeout_s=cfg.timeout_s)
        rewards = [igpo_turn_rewards(p, e.reward) for p, e in zip(probs, episodes, strict=True)]
        per_turn = igpo_advantages(rewards, gamma=cfg.gamma)
        gains = [g for r in rewards for g in r[:-1]]
        return ([token_advantages(e.trajectory, a) for e, a in zip(episodes, per_turn, strict=True)],
                {"info_gain": sum(gains) / len(gains) if gains else 0.0,
                 "answer_prob": sum(p[0] for p in probs) / len(probs)})

    return score


async def igpo(cfg: IGPOConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
               env_factory: EnvFactory, *, service: Any = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train on groups of `group_size` episodes per row of `rows`; evaluate greedy success on `eval_rows`."""
    name = "igpo" if cfg.advantage == "igpo" else "grpo_episodes"
    return await run_episode_rl(cfg, rows, eval_rows, env_factory, lambda clients: igpo_score(cfg, clients),
                                name=name, service=service, on_progress=on_progress)
