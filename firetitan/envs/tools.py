"""Tool calls parsed from a model's text in one stated format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

This is the Hermes/Qwen convention: the first `<tool_call>` block of a turn is the call; its body must
be a JSON object with a string `name` and an object `arguments`. Text without the opening tag is not
a call (it is an answer); a block that is present but malformed is reported as an error, so an
environment can tell "no call" from "broken call".
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallParse(BaseModel):
    """`call` when the turn holds a well-formed call; `error` when it holds a malformed one; neither otherwise."""

    call: ToolCall | None = None
    error: str | None = None

    @property
    def is_call(self) -> bool:
        return self.call is not None or self.error is not None


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    return f"{OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CLOSE}"


def parse_tool_call(text: str) -> ToolCallParse:
    m = _BLOCK.search(text)
    if m is None:
        return ToolCallParse()
    body = m.group(1).strip()
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCallParse(error=f"tool_call: body is not JSON ({exc.msg} at {exc.pos}): {body[:80]!r}")
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return ToolCallParse(error=f"tool_call: expected an object with a string 'name', got {body[:80]!r}")
    args = raw.get("arguments", {})
    if not isinstance(args, dict):
        return ToolCallParse(error=f"tool_call.arguments: expected an object, got {type(args).__name__}")
    return ToolCallParse(call=ToolCall(name=raw["name"], arguments=args))
