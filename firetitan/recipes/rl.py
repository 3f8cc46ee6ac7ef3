"""The RL recipe body GRPO and async RL share: rollouts on the deployment, PPO-style updates, weight syncs.

GRPO is this with `max_steps_off_policy = 0` (on-policy, sampling and training alternate); async RL
lets sampling run up to `max_steps_off_policy` versions ahead so the two overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from firetitan.client.concurrency import FixedConcurrencyController
from firetitan.client.sampling import FanOut
from firetitan.logging import get_logger
from firetitan.recipes.clients import Clients, open_clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.data import rl_datum
from firetitan.recipes.rl_driver import RecipeSteps, drive_rl, report_results
from firetitan.recipes.run_setup import start_rl_run
from firetitan.recipes.supervised import ProgressFn
from firetitan.recipes.text import encode_prompt
from firetitan.runtime.advantages import group_advantages, is_constant
from firetitan.runtime.protocols import ServiceLike
from firetitan.runtime.remote import gather as anyio_gather
from firetitan.runtime.rollouts import RolloutGroup
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry

log = get_logger("firetitan.recipes.rl")
RewardFn = Callable[[str, Mapping[str, Any]], float]


class RLConfig(RecipeConfig):
    groups_per_step: int = Field(default=4, ge=1, description="prompts (groups) per optimizer step")
    group_size: int = Field(default=8, ge=2, description="completions per prompt")
    max_tokens: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    loss_fn: Literal["ppo", "importance_sampling", "cispo"] = "ppo"
    clip_low: float = Field(default=0.8, gt=0, le=1.0)
    clip_high: float = Field(default=1.2, ge=1.0)
    normalize_advantages: bool = Field(default=True, description="divide by the group's reward std (GRPO)")
    max_steps_off_policy: int = Field(default=0, ge=0)
    sync_every: int = Field(default=1, ge=1, description="sampler snapshot + hot-load every N steps")
    max_concurrent_rollouts: int = Field(default=8, ge=1, description="groups sampled at once")
    rollout_timeout_s: float = Field(default=300.0, gt=0)
    eval_temperature: float = Field(default=0.0, ge=0)
    sampler_fanout: FanOut = Field(
        default="choices", description="how a group's completions are requested: one request with "
        "group_size choices (the prompt is prefilled once, one answer per group), or group_size requests")
    stream_rollouts: bool = Field(
        default=False, description="stream rollout tokens; the loop only uses whole completions, so by default "
        "each request gets one JSON answer (less HTTP work on the deployment and here)")
    adaptive_sampler_window: bool = Field(
        default=False, description="let the SDK's adaptive controller size the sampler's request window; by "
        "default the window is fixed at what admission already allows (max_concurrent_rollouts * group_size)")

    @model_validator(mode="after")
    def _sync_within_bound(self) -> RLConfig:
        if self.sync_every > self.max_steps_off_policy + 1:
            raise ValueError(f"sync_every: {self.sync_every} exceeds max_steps_off_policy + 1 = "
                             f"{self.max_steps_off_policy + 1}; rollouts would wait forever for fresh weights")
        return self


def group_datums(group: RolloutGroup, *, normalize: bool) -> list[Any]:
    """Datums of one group with group-relative advantages; constant-reward groups contribute none."""
    if is_constant(group.rewards):
        return []
    out = []
    for sample, adv in zip(group.samples, group_advantages(group.rewards, normalize_std=normalize), strict=True):
        if sample.sampling_logprobs is None or sample.completion_len == 0:
            continue
        out.append(rl_datum(sample.prompt_tokens, sample.completion_tokens, sample.sampling_logprobs, adv))
    return out


def sample_version(sample: Any, registry: PolicyVersionRegistry, admitted: int) -> int:
    """The oldest policy version among a completion's tokens (a hot-load may land mid-sequence)."""
    ids = sample.policy_versions or ([sample.policy_version] if sample.policy_version else [])
    known = [v for v in (registry.version_of(i) for i in ids) if v is not None]
    return min(known) if known else admitted


async def run_rl(cfg: RLConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
                 reward_fn: RewardFn, *, name: str, service: ServiceLike | None = None,
                 on_progress: ProgressFn | None = None) -> dict[str, Any]:
    # Admission already bounds the requests in flight (max_concurrent_rollouts groups of group_size), so
    # a second, adaptive limit only adds a ramp: it starts at 8 requests (one group at a time) and takes
    # ~7 steps to open up to one batch, throttling the early steps of every run.
    controller = None if cfg.adaptive_sampler_window else \
        FixedConcurrencyController(cfg.max_concurrent_rollouts * cfg.group_size)
    async with open_clients(cfg, name=name, deployment=True, service=service,
                            concurrency_controller=controller, fanout=cfg.sampler_fanout,
                            stream=cfg.stream_rollouts) as clients:
        return await _run(cfg, clients, rows, eval_rows, reward_fn, name=name, on_progress=on_progress)


async def _run(cfg: RLConfig, clients: Clients, rows: Sequence[Mapping[str, Any]],
               eval_rows: Sequence[Mapping[str, Any]], reward_fn: RewardFn, *, name: str,
               on_progress: ProgressFn | None) -> dict[str, Any]:
    training, sampler, tok = clients.training, clients.sampler, clients.tokenizer
    run = await start_rl_run(cfg, clients, len(rows), name=name)
    cursor, metrics, registry, pipeline = run.cursor, run.metrics, run.registry, run.pipeline
    adam, loss_config = run.adam, run.loss_config
    last_eval: dict[str, Any] = {}

    async def rollout(position: int, pv: PolicyVersion) -> RolloutGroup:
        started = time.monotonic()
        row = rows[cursor.index(position)]
        prompt = encode_prompt(tok, row["prompt"])
        samples = await sampler.sample_with_prompt_tokens(prompt, n=cfg.group_size, max_tokens=cfg.max_tokens,
                                                          temperature=cfg.temperature, stop=cfg.stop, logprobs=True)
        version = min(sample_version(s, registry, pv.version) for s in samples)
        rewards = [float(reward_fn(s.text, row)) for s in samples]
        # Phase timings for profiling (when the group was admitted, how long sampling took) and the
        # reward of the policy version that sampled it (reward per version, whatever step trains on it).
        metrics.log("rollout", None, position=position, admitted_version=pv.version, version=version,
                    sample_s=round(time.monotonic() - started, 4), reward=sum(rewards) / len(rewards))
        return RolloutGroup(position=position, version=version, samples=samples, rewards=rewards,
                            identity=pv.identity)

    async def train_step(step: int, batch: list[RolloutGroup]) -> None:
        data = [d for g in batch for d in group_datums(g, normalize=cfg.normalize_advantages)]
        if not data:  # every group had constant rewards: no gradient, the weights stay as they are
            metrics.log("no_signal_step", step + 1)
            return
        report_results(run, await pipeline.submit(step, data, adam, loss_fn=cfg.loss_fn, loss_fn_config=loss_config))

    async def evaluate(step: int, pv: PolicyVersion) -> None:
        prompts = [encode_prompt(tok, r["prompt"]) for r in eval_rows]
        groups = await anyio_gather([sampler.sample_with_prompt_tokens(
            p, n=1, max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, stop=cfg.stop) for p in prompts])
        rewards = [float(reward_fn(g[0].text, r)) for g, r in zip(groups, eval_rows, strict=True)]
        served = sorted({v for g in groups for v in (g[0].policy_versions or [g[0].policy_version]) if v})
        # Logged at the version evaluated (rollouts keep the deployment moving while evals queue).
        last_eval.update(metrics.record_eval(pv.version, [dict(r) for r in eval_rows], pv.identity,
                                             {"eval_reward": sum(rewards) / len(rewards), "served_by": served,
                                              "requested_step": step}))

    def on_step(rec: dict[str, Any]) -> None:
        if controller_step := getattr(sampler.concurrency_controller, "step_completed", None):
            metrics.log_controller(rec["step"], controller_step())
        if on_progress:
            on_progress(rec["step"], cfg.steps, {**rec, **last_eval})

    return await drive_rl(cfg, run, training, RecipeSteps(rollout, train_step, evaluate, on_step), name=name,
                          has_evals=bool(eval_rows), last_eval=last_eval)
