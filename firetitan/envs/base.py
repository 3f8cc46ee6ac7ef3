"""The multi-turn environment interface: reset -> observation messages, step(model turn) -> observation, reward, done."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    """One chat message. Assistant messages produced by the policy are never re-rendered from `content`:
    the trajectory assembler keeps the model's own sampled tokens for them."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class EnvStep(BaseModel):
    """What the environment answers to one model turn."""

    model_config = ConfigDict(extra="forbid")

    observation: list[Message] = Field(default_factory=list, description="messages appended before the next turn")
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = Field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One episode. `answer` is the ground truth IGPO teacher-forces (None where there is none)."""

    answer: str | None

    async def reset(self) -> list[Message]:
        """The opening messages (system prompt, task)."""
        ...

    async def step(self, text: str) -> EnvStep:
        """Consume the model's turn (its decoded text); `done=True` ends the episode."""
        ...


# Builds one fresh episode of a dataset row; a group is `group_size` calls with the same row.
EnvFactory = Callable[[Mapping[str, Any]], Env]


def make_group(factory: EnvFactory, row: Mapping[str, Any], group_size: int) -> list[Env]:
    """`group_size` independent episodes of the same prompt (group-relative advantages compare them)."""
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    return [factory(row) for _ in range(group_size)]
