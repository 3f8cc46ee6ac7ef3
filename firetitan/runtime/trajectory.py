"""Token-exact multi-turn trajectories: the model's own sampled tokens per turn, environment tokens between.

Each turn's prompt is rendered from the whole conversation and must *extend the previous context
token for token* (previous prompt + the tokens the model sampled). If the renderer would re-render an
earlier turn differently (a chat template that re-tokenizes the model's text, strips thinking, or
rewrites history), `TrajectoryError` names the turn and position instead of silently training on
tokens the model never produced. Loss masks cover only the model's tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from firetitan.errors import InvalidRequestError
from firetitan.types import Datum, ModelInput, TensorData


class TrajectoryError(InvalidRequestError):
    """The token-prefix invariant broke: `field` names the turn whose tokens would change."""


class Renderer(Protocol):
    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        """Token ids of the conversation; assistant messages may carry the exact `tokens` sampled."""
        ...


class ChatMLRenderer:
    """ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, the Qwen layout) rendered message by message.

    An assistant message with `tokens` is inserted verbatim (plus `<|im_end|>` when the model stopped
    without it), so the prefix invariant holds by construction: history is never re-tokenized.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.im_end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def _enc(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text, add_special_tokens=False)]

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        out: list[int] = []
        for m in messages:
            out += self._enc(f"<|im_start|>{m['role']}\n")
            if m["role"] == "assistant" and m.get("tokens") is not None:
                body = [int(t) for t in m["tokens"]]
                out += body if body[-1:] == [self.im_end] else [*body, self.im_end]
            else:
                out += [*self._enc(str(m["content"])), self.im_end]
            out += self._enc("\n")
        if add_generation_prompt:
            out += self._enc("<|im_start|>assistant\n")
        return out


class TemplateRenderer:
    """The tokenizer's own chat template over role/content (history re-rendered from text, so checked)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = self.tok.apply_chat_template(plain, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]


@dataclass
class Turn:
    """One model turn: `tokens[start:end]` of the trajectory; `tokens[:start]` was its prompt."""

    start: int
    end: int
    text: str


@dataclass
class Trajectory:
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the model (trained), 0 = prompt/environment
    logprobs: list[float] = field(default_factory=list)  # sampling logprobs at model tokens, 0.0 elsewhere
    turns: list[Turn] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # environment reward returned after each turn

    def prompt_of(self, turn: int) -> list[int]:
        return self.tokens[: self.turns[turn].start]

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)


class TrajectoryAssembler:
    """Builds one episode's `Trajectory`: `prompt(new_messages)` before every turn, `add_turn` after it."""

    def __init__(self, renderer: Renderer, *, max_tokens: int | None = None) -> None:
        self.renderer = renderer
        self.max_tokens = max_tokens
        self.messages: list[dict[str, Any]] = []
        self.traj = Trajectory()

    def _turn_at(self, position: int) -> str:
        for i, t in enumerate(self.traj.turns):
            if t.start <= position < t.end:
                return f"turns[{i}]"
            if position < t.start:
                return f"turns[{i}].prompt" if i else "prompt"
        return f"turns[{len(self.traj.turns) - 1}].after" if self.traj.turns else "prompt"

    def prompt(self, new_messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The next turn's prompt: everything so far plus `new_messages` (observations), rendered and checked."""
        self.messages.extend(dict(m) for m in new_messages)
        rendered = self.renderer.render(self.messages, add_generation_prompt=True)
        context = self.traj.tokens
        n = len(context)
        if rendered[:n] != context:
            pos = next((i for i, (a, b) in enumerate(zip(rendered, context, strict=False)) if a != b),
                       min(len(rendered), n))
            where = self._turn_at(pos)
            raise TrajectoryError(
                f"{where}: the renderer re-renders earlier tokens differently at position {pos} "
                f"(context has {context[pos:pos + 8]}, render gives {rendered[pos:pos + 8]}); the prompt of "
                f"turn {len(self.traj.turns)} must extend the previous context token for token",
                field=where)
        added = rendered[n:]
        if self.max_tokens is not None and len(rendered) > self.max_tokens:
            raise TrajectoryError(f"prompt: {len(rendered)} tokens exceed max_tokens={self.max_tokens}",
                                  field="max_tokens")
        self.traj.tokens += added
        self.traj.mask += [0] * len(added)
        self.traj.logprobs += [0.0] * len(added)
        return list(self.traj.tokens)

    def add_turn(self, tokens: Sequence[int], logprobs: Sequence[float], text: str) -> Turn:
        """Record the model's sampled `tokens` (with their sampling `logprobs`) as the next turn."""
        if len(tokens) != len(logprobs):
            raise TrajectoryError(f"logprobs: {len(logprobs)} values for {len(tokens)} sampled tokens",
                                  field=f"turns[{len(self.traj.turns)}].logprobs")
        if not self.traj.tokens:
            raise TrajectoryError("add_turn: call prompt() before the first turn", field="prompt")
        start = len(self.traj.tokens)
        self.traj.tokens += [int(t) for t in tokens]
        self.traj.mask += [1] * len(tokens)
        self.traj.logprobs += [float(x) for x in logprobs]
        turn = Turn(start, len(self.traj.tokens), text)
        self.traj.turns.append(turn)
        self.messages.append({"role": "assistant", "content": text, "tokens": [int(t) for t in tokens]})
        return turn

    def add_reward(self, reward: float) -> None:
        self.traj.rewards.append(float(reward))

    def finish(self) -> Trajectory:
        return self.traj


def _tensor(values: Sequence[float] | Sequence[int], dtype: str) -> TensorData:
    return TensorData.model_validate({"data": list(values), "dtype": dtype, "shape": [len(values)]})


def token_advantages(traj: Trajectory, turn_advantages: Sequence[float]) -> list[float]:
    """Per-token advantages: each model token gets its turn's value, every other token 0."""
    if len(turn_advantages) != len(traj.turns):
        raise ValueError(f"turn_advantages: {len(turn_advantages)} values for {len(traj.turns)} turns")
    out = [0.0] * len(traj.tokens)
    for turn, adv in zip(traj.turns, turn_advantages, strict=True):
        for i in range(turn.start, turn.end):
            out[i] = float(adv)
    return out


def trajectory_datum(traj: Trajectory, advantages: Sequence[float]) -> Datum:
    """Datum for `ppo` / `importance_sampling` / `cispo` with per-token `advantages` (len = len(tokens)).

    Environment and prompt positions carry advantage 0 (no gradient); targets are `tokens[1:]`.
    """
    if len(advantages) != len(traj.tokens):
        raise ValueError(f"advantages: {len(advantages)} values for {len(traj.tokens)} tokens")
    if any(a != 0.0 and m == 0 for a, m in zip(advantages, traj.mask, strict=True)):
        raise ValueError("advantages: non-zero advantage on a token the model did not sample")
    return Datum(model_input=ModelInput.from_ints(traj.tokens[:-1]),
                 loss_fn_inputs={"target_tokens": _tensor(traj.tokens[1:], "int64"),
                                 "logprobs": _tensor(traj.logprobs[1:], "float32"),
                                 "advantages": _tensor([float(a) for a in advantages[1:]], "float32")})
