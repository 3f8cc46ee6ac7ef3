"""Single-digit addition in the corpus' "Q: ... A: ..." format: SFT rows, preference pairs, RL prompts + reward."""

from __future__ import annotations

import random
import re

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def problems(n: int, *, seed: int, max_operand: int = 9) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(n)]


def prompt(a: int, b: int) -> str:
    return f"Q: What is {a} + {b}? A:"


def sft_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    return [{"prompt": prompt(a, b), "completion": f" {a + b}"} for a, b in problems(n, seed=seed)]


def preference_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    """Chosen: the answer in digits; rejected: the answer spelled out (a style preference to learn)."""
    return [{"prompt": prompt(a, b), "chosen": f" {a + b}", "rejected": f" {WORDS[a + b]}"}
            for a, b in problems(n, seed=seed)]


def rl_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    return [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in problems(n, seed=seed)]


def reward(completion: str, row: dict[str, str]) -> float:
    """Dense shaping: the share of digit characters in the answer, plus 1 when the first number is right."""
    text = completion.strip()
    if not text:
        return 0.0
    chars = [c for c in text if not c.isspace()]
    digits = sum(c.isdigit() for c in chars) / len(chars)
    first = re.search(r"\d+", text)
    return digits + (1.0 if first and first.group() == row["answer"] else 0.0)
