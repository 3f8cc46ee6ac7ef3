"""The built-in multi-turn environment: answer "what is the code of X?" by calling a lookup tool over a shipped KB.

The knowledge base (`data/lookup_kb.json`, 64 made-up entities -> code words) is not in the prompt and
the codes are random, so the answer is only reachable through the tool: an episode needs a lookup
turn, then an answer turn (at most `max_turns` turns).

Two stated call formats:
- `"tool_call"` (for real chat models): `<tool_call>{"name": "lookup", "arguments": {"key": "..."}}</tool_call>`
  (`firetitan.envs.tools`); the answer is correct when it contains the code word.
- `"initial"` (for the random-init built-in models, which cannot produce JSON by chance): a turn whose
  first word starts with a vowel is the call `lookup(<this episode's key>)`; any other turn is the
  answer, correct when it contains the code's first letter. The base rates (~1 turn in 4 is a call,
  ~1 answer in 3 holds the letter) make the task learnable from a few dozen RL steps; it exercises
  the multi-turn mechanics (call, then answer), not reading comprehension.

Either way the outcome reward is 1.0 only for a correct answer given *after* a successful lookup
(an unsupported guess earns nothing), else 0.0.
"""

from __future__ import annotations

import json
import random
from functools import cache
from importlib import resources
from typing import Any, Literal

from firetitan.envs.base import EnvStep, Message
from firetitan.envs.tools import format_tool_call, parse_tool_call

CallFormat = Literal["tool_call", "initial"]
EVAL_KEYS = 16  # the last 16 entities (sorted) are held out for evaluation


@cache
def knowledge_base() -> dict[str, str]:
    raw = json.loads(resources.files("firetitan.envs").joinpath("data/lookup_kb.json").read_text())
    return dict(raw["entries"])


def _split_keys(split: Literal["train", "eval"]) -> list[str]:
    keys = sorted(knowledge_base())
    return keys[:-EVAL_KEYS] if split == "train" else keys[-EVAL_KEYS:]


def _row(key: str) -> dict[str, str]:
    return {"prompt": f"Code of {key}?", "key": key, "answer": knowledge_base()[key]}


def lookup_rows(n: int, *, seed: int, split: Literal["train", "eval"] = "train") -> list[dict[str, str]]:
    """`n` rows `{"prompt", "key", "answer"}` over the train (48) or eval (16) entities."""
    pool = _split_keys(split)
    rng = random.Random(seed)
    return [_row(rng.choice(pool)) for _ in range(n)]


def every_key_rows(*, split: Literal["train", "eval"] = "train", repeats: int = 1) -> list[dict[str, str]]:
    """Every entity of the split, `repeats` times: a fixed evaluation set with no sampling noise in which keys.

    Success differs a lot between keys (a code's first letter is easier or harder to hit), so a score
    over randomly drawn rows varies with the draw; a sampled eval over every key is what to compare.
    """
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    return [_row(k) for k in _split_keys(split)] * repeats


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()[]{}").lower() for w in text.split()]


class LookupEnv:
    """One episode over a row `{"key", "answer"}` (see the module docstring for the rules)."""

    def __init__(self, row: dict[str, Any], *, call_format: CallFormat = "initial", max_turns: int = 3) -> None:
        if max_turns < 2:
            raise ValueError(f"max_turns: the task needs a lookup and an answer turn, so >= 2; got {max_turns}")
        self.key = str(row["key"])
        self.answer: str | None = str(row.get("answer") or knowledge_base()[self.key])
        self.call_format = call_format
        self.max_turns = max_turns
        self.turns = 0
        self.looked_up = False
        self.done = False

    def system_prompt(self) -> str:
        if self.call_format == "tool_call":
            return f"Tool lookup(key) returns an entity's code. Call it as {format_tool_call('lookup', {'key': 'K'})}."
        return "A reply starting with a vowel word calls lookup; any other reply is your answer."

    async def reset(self) -> list[Message]:
        return [Message(role="system", content=self.system_prompt()), Message(role="user", content=f"Code of {self.key}?")]

    def _lookup_key(self, text: str) -> tuple[bool, str | None, str | None]:
        """(is a call, key looked up or None, error)."""
        if self.call_format == "initial":
            words = [w for w in _words(text) if w[:1].isalpha()]
            return (bool(words) and words[0][0] in "aeiou"), self.key, None
        parsed = parse_tool_call(text)
        if not parsed.is_call:
            return False, None, None
        if parsed.call is None:
            return True, None, parsed.error
        if parsed.call.name != "lookup" or not isinstance(parsed.call.arguments.get("key"), str):
            return True, None, f"tool_call: unknown tool {parsed.call.name!r} or missing string 'key'"
        return True, parsed.call.arguments["key"], None

    def is_correct(self, text: str) -> bool:
        assert self.answer is not None
        words = _words(text)
        if self.call_format == "initial":
            return self.answer[0] in text.lower()
        return self.answer.lower() in words

    async def step(self, text: str) -> EnvStep:
        if self.done:
            raise RuntimeError("step: the episode is over (done was returned)")
        self.turns += 1
        is_call, key, error = self._lookup_key(text)
        if is_call:
            if self.turns >= self.max_turns:  # out of turns before answering
                self.done = True
                return EnvStep(reward=0.0, done=True, info={"success": False, "reason": "no answer"})
            if error is not None:
                return EnvStep(observation=[Message(role="tool", content=f"error: {error}")], info={"call": "error"})
            value = knowledge_base().get(key or "")
            self.looked_up = self.looked_up or key == self.key
            content = f"{key}: {value}" if value is not None else f"{key}: not found"
            return EnvStep(observation=[Message(role="tool", content=content)], info={"call": key})
        self.done = True
        success = self.looked_up and self.is_correct(text)
        return EnvStep(reward=1.0 if success else 0.0, done=True,
                       info={"success": success, "looked_up": self.looked_up})
