"""RL-shaped sampling load: per step, G prompts fanned out to n samples each, with long-tailed max_tokens."""

from __future__ import annotations

import dataclasses
import math
import random

from firetitan.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RLLoad:
    """One RL step = `groups` prompts x `samples_per_group` completions, all submitted at once.

    Output lengths are log-normal (median `max_tokens_median`, shape `max_tokens_sigma`) clipped to
    [`max_tokens_min`, `max_tokens_max`]: most rollouts are short and a few run long, which is what
    leaves a GRPO step waiting on its tail.
    """

    steps: int = 4
    groups: int = 64
    samples_per_group: int = 8
    prompt_len_min: int = 32
    prompt_len_max: int = 256
    max_tokens_median: int = 128
    max_tokens_sigma: float = 0.8
    max_tokens_min: int = 8
    max_tokens_max: int = 1024
    token_id_low: int = 100
    token_id_high: int = 3000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "groups", "samples_per_group", "prompt_len_min", "max_tokens_min",
                     "max_tokens_median"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.prompt_len_max < self.prompt_len_min:
            raise ConfigError("prompt_len_max must be >= prompt_len_min", field="prompt_len_max")
        if self.max_tokens_max < self.max_tokens_min:
            raise ConfigError("max_tokens_max must be >= max_tokens_min", field="max_tokens_max")
        if self.token_id_high <= self.token_id_low:
            raise ConfigError("token_id_high must be > token_id_low", field="token_id_high")

    @property
    def requests_per_step(self) -> int:
        return self.groups * self.samples_per_group


@dataclasses.dataclass(frozen=True)
class PromptGroup:
    prompt: list[int]
    max_tokens: list[int]  # one per sample


def draw_max_tokens(rng: random.Random, load: RLLoad) -> int:
    value = rng.lognormvariate(math.log(load.max_tokens_median), load.max_tokens_sigma)
    return int(min(load.max_tokens_max, max(load.max_tokens_min, round(value))))


def step_groups(load: RLLoad, step: int) -> list[PromptGroup]:
    """The prompt groups of one step; deterministic in (seed, step)."""
    rng = random.Random(load.seed * 1_000_003 + step)
    groups = []
    for _ in range(load.groups):
        length = rng.randint(load.prompt_len_min, load.prompt_len_max)
        prompt = [rng.randrange(load.token_id_low, load.token_id_high) for _ in range(length)]
        groups.append(PromptGroup(prompt, [draw_max_tokens(rng, load) for _ in range(load.samples_per_group)]))
    return groups
