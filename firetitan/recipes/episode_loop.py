"""The recipe body IGPO and distillation share: multi-turn episodes on the deployment, per-token advantages.

Same runtime as GRPO / async RL (`RLLoop`: bounded staleness, periodic syncs, train states and evals,
resume from the last train state + data cursor): only the rollout (episodes through an environment,
assembled token-exactly) and the advantages (a recipe's `score` callback) differ.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import Field

from firetitan.client.concurrency import FixedConcurrencyController
from firetitan.envs.base import EnvFactory
from firetitan.recipes.clients import Clients, open_clients
from firetitan.recipes.episodes import Episode, EpisodeSettings, run_episode, run_group, success_rate
from firetitan.recipes.rl import RLConfig
from firetitan.recipes.rl_driver import RecipeSteps, drive_rl, report_results
from firetitan.recipes.run_setup import start_rl_run
from firetitan.recipes.supervised import ProgressFn
from firetitan.runtime.remote import gather
from firetitan.runtime.rollouts import RolloutGroup
from firetitan.runtime.trajectory import ChatMLRenderer, Renderer, trajectory_datum
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry

# (episodes of one group, its row) -> (per-token advantages of each episode, metrics of the group)
ScoreFn = Callable[[list[Episode], Mapping[str, Any]], Awaitable[tuple[list[list[float]], dict[str, float]]]]


class EpisodeRLConfig(RLConfig):
    max_turns: int = Field(default=3, ge=1, description="model turns per episode")
    max_context: int = Field(default=512, ge=8, description="tokens per trajectory; longer ones fail closed")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="stop strings of every turn")
    init_state: str | None = Field(
        default=None, description="train state the policy starts from (weights only, fresh optimizer) when the run "
        "is not resumed, e.g. an SFT warm start (firetitan.recipes.warm_start); train states are per trainer job, "
        "so trainer_job_id must name the job that saved it")


def episode_version(ep: Episode, registry: PolicyVersionRegistry, admitted: int) -> int:
    """The oldest policy version among an episode's turns (a hot-load may land between turns)."""
    known = [v for v in (registry.version_of(i) for i in ep.policy_versions) if v is not None]
    return min(known) if known else admitted


async def run_episode_rl(cfg: EpisodeRLConfig, rows: Sequence[Mapping[str, Any]],
                         eval_rows: Sequence[Mapping[str, Any]], env_factory: EnvFactory,
                         make_score: Callable[[Clients], ScoreFn], *, name: str, service: Any = None,
                         reference: bool = False, on_progress: ProgressFn | None = None,
                         renderer: Callable[[Any], Renderer] = ChatMLRenderer) -> dict[str, Any]:
    controller = FixedConcurrencyController(cfg.max_concurrent_rollouts * cfg.group_size * 2)
    async with open_clients(cfg, name=name, deployment=True, reference=reference, service=service,
                            concurrency_controller=controller, fanout="requests",
                            stream=cfg.stream_rollouts) as clients:
        return await _run(cfg, clients, rows, eval_rows, env_factory, make_score(clients), renderer(clients.tokenizer),
                          name=name, on_progress=on_progress)


async def _run(cfg: EpisodeRLConfig, clients: Clients, rows: Sequence[Mapping[str, Any]],
               eval_rows: Sequence[Mapping[str, Any]], env_factory: EnvFactory, score: ScoreFn,
               renderer: Renderer, *, name: str, on_progress: ProgressFn | None) -> dict[str, Any]:
    training, sampler = clients.training, clients.sampler
    run = await start_rl_run(cfg, clients, len(rows), name=name, init_state=cfg.init_state)
    cursor, metrics, registry, pipeline = run.cursor, run.metrics, run.registry, run.pipeline
    adam, loss_config = run.adam, run.loss_config
    train_settings = EpisodeSettings(cfg.max_turns, cfg.max_tokens, cfg.temperature, cfg.stop, cfg.max_context)
    eval_settings = EpisodeSettings(cfg.max_turns, cfg.max_tokens, cfg.eval_temperature, cfg.stop, cfg.max_context)
    last_eval: dict[str, Any] = {}
    tokens_total = {"sampled": 0}

    async def rollout(position: int, pv: PolicyVersion) -> RolloutGroup:
        started = time.monotonic()
        row = rows[cursor.index(position)]
        episodes = await run_group(env_factory, row, cfg.group_size, sampler, renderer, train_settings)
        version = min(episode_version(e, registry, pv.version) for e in episodes)
        advantages, group_metrics = await score(episodes, row)
        rewards = [e.reward for e in episodes]
        metrics.log("rollout", None, position=position, admitted_version=pv.version, version=version,
                    sample_s=round(time.monotonic() - started, 4), reward=sum(rewards) / len(rewards),
                    success=success_rate(episodes), **group_metrics)
        return RolloutGroup(position=position, version=version, samples=episodes, rewards=rewards,
                            identity=pv.identity, extra={"advantages": advantages, **group_metrics})

    async def train_step(step: int, batch: list[RolloutGroup]) -> None:
        episodes = [e for g in batch for e in g.samples]
        sampled = sum(e.sampled_tokens for e in episodes)
        tokens_total["sampled"] += sampled
        keys = sorted({k for g in batch for k in g.extra if k != "advantages"})
        metrics.log("episodes", step + 1, success=success_rate(episodes), sampled_tokens=sampled,
                    sampled_tokens_total=tokens_total["sampled"],
                    turns=sum(len(e.trajectory.turns) for e in episodes) / len(episodes),
                    **{k: sum(g.extra[k] for g in batch) / len(batch) for k in keys})
        data = [trajectory_datum(e.trajectory, adv) for g in batch
                for e, adv in zip(g.samples, g.extra["advantages"], strict=True) if any(a != 0.0 for a in adv)]
        if not data:
            metrics.log("no_signal_step", step + 1)
            return
        report_results(run, await pipeline.submit(step, data, adam, loss_fn=cfg.loss_fn, loss_fn_config=loss_config))

    async def evaluate(step: int, pv: PolicyVersion) -> None:
        episodes = await gather([run_episode(env_factory(r), sampler, renderer, eval_settings) for r in eval_rows])
        last_eval.update(metrics.record_eval(pv.version, [dict(r) for r in eval_rows], pv.identity, {
            "eval_success": success_rate(episodes), "eval_reward": sum(e.reward for e in episodes) / len(episodes),
            "eval_turns": sum(len(e.trajectory.turns) for e in episodes) / len(episodes), "requested_step": step}))

    def on_step(rec: dict[str, Any]) -> None:
        if on_progress:
            on_progress(rec["step"], cfg.steps, {**rec, **last_eval})

    steps = RecipeSteps(rollout, train_step, evaluate, on_step, summary=lambda: {"sampled_tokens": tokens_total["sampled"]})
    return await drive_rl(cfg, run, training, steps, name=name, has_evals=bool(eval_rows), last_eval=last_eval)
