"""Running multi-turn episodes against a sampler: one token-exact trajectory per episode, groups per prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from firetitan.envs.base import Env, EnvFactory
from firetitan.runtime.remote import gather
from firetitan.runtime.trajectory import Renderer, Trajectory, TrajectoryAssembler


@dataclass
class Episode:
    trajectory: Trajectory
    reward: float  # sum of the environment's rewards (the outcome reward for the built-in env)
    success: bool
    answer: str | None  # the environment's ground truth (IGPO teacher-forces it)
    policy_versions: list[str] = field(default_factory=list)  # snapshot identities that sampled its turns
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sampled_tokens(self) -> int:
        return self.trajectory.model_tokens


@dataclass
class EpisodeSettings:
    max_turns: int
    max_tokens: int  # per turn
    temperature: float
    stop: list[str] | None = None
    max_context: int | None = None  # tokens; a longer trajectory fails closed


async def run_episode(env: Env, sampler: Any, renderer: Renderer, s: EpisodeSettings) -> Episode:
    """Alternate sampling and `env.step` until done or `max_turns` (the turn limit ends with reward 0)."""
    asm = TrajectoryAssembler(renderer, max_tokens=s.max_context)
    observation = [m.as_dict() for m in await env.reset()]
    versions: list[str] = []
    success = False
    for _ in range(s.max_turns):
        prompt = asm.prompt(observation)
        sample = (await sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=s.max_tokens,
                                                          temperature=s.temperature, stop=s.stop, logprobs=True))[0]
        if sample.prompt_tokens != prompt:
            raise RuntimeError("sampler: the completion is aligned to a different prompt than the one sent")
        logprobs = sample.sampling_logprobs
        if logprobs is None:
            logprobs = [0.0] * sample.completion_len  # greedy evals need no logprobs
        asm.add_turn(sample.completion_tokens, logprobs, sample.text)
        versions += [v for v in (sample.policy_versions or [sample.policy_version]) if v]
        step = await env.step(sample.text)
        asm.add_reward(step.reward)
        success = bool(step.info.get("success", success))
        if step.done:
            break
        observation = [m.as_dict() for m in step.observation]
    traj = asm.finish()
    return Episode(trajectory=traj, reward=sum(traj.rewards), success=success, answer=env.answer,
                   policy_versions=versions)


async def run_group(factory: EnvFactory, row: Mapping[str, Any], group_size: int, sampler: Any,
                    renderer: Renderer, s: EpisodeSettings) -> list[Episode]:
    """`group_size` episodes of the same row, run concurrently."""
    return await gather([run_episode(factory(row), sampler, renderer, s) for _ in range(group_size)])


def success_rate(episodes: Sequence[Episode]) -> float:
    return sum(e.success for e in episodes) / len(episodes) if episodes else 0.0
