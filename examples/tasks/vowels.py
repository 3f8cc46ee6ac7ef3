"""A dense toy RL reward a random-init model can learn in a few dozen steps: write words that start with a vowel.

Base rate on the built-in tokenizer is about 23% of tokens, so every group of samples has reward
variance from the first step and the curve moves quickly; the point is to exercise the RL runtime.
"""

from __future__ import annotations

import random

SUBJECTS = ["the kettle", "a river", "the garden", "an old map", "the morning", "a small boat", "the museum",
            "a quiet street", "the orchard", "an owl", "the market", "a letter", "the lighthouse", "an island"]
FRAMES = ["Write about {}:", "Describe {}:", "Tell me about {}:", "A few words on {}:"]


def rl_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(FRAMES).format(rng.choice(SUBJECTS))} for _ in range(n)]


def reward(completion: str, row: dict[str, str]) -> float:
    """Share of the completion's words that start with a vowel (0 for an empty completion)."""
    words = [w for w in completion.split() if w[:1].isalpha()]
    if not words:
        return 0.0
    return sum(w[0].lower() in "aeiou" for w in words) / len(words)
