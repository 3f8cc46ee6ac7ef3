"""The tool-call parser and the built-in lookup environment's rules."""

from __future__ import annotations

import anyio
import pytest

from firetitan.envs import LookupEnv, every_key_rows, knowledge_base, lookup_rows, make_group, parse_tool_call
from firetitan.envs.tools import format_tool_call


def test_parse_tool_call_formats() -> None:
    ok = parse_tool_call("let me check " + format_tool_call("lookup", {"key": "kaloo"}) + " thanks")
    assert ok.call is not None and ok.call.name == "lookup" and ok.call.arguments == {"key": "kaloo"}
    assert not parse_tool_call("the answer is salt").is_call
    broken = parse_tool_call('<tool_call>{"name": "lookup", "arguments": ')
    assert broken.is_call and broken.call is None and "not JSON" in (broken.error or "")
    assert "arguments" in (parse_tool_call('<tool_call>{"name": "x", "arguments": [1]}</tool_call>').error or "")


def test_kb_and_rows_split() -> None:
    kb = knowledge_base()
    assert len(kb) == 64
    train, ev = lookup_rows(200, seed=0), lookup_rows(50, seed=1, split="eval")
    assert {r["key"] for r in train}.isdisjoint({r["key"] for r in ev})
    assert all(kb[r["key"]] == r["answer"] and r["key"] not in r["answer"] for r in train)


def test_every_key_rows_cover_each_split_key_equally() -> None:
    kb = knowledge_base()
    train, ev = every_key_rows(repeats=3), every_key_rows(split="eval")
    train_keys = [r["key"] for r in train]
    assert len(set(train_keys)) == len(kb) - 16 and all(train_keys.count(k) == 3 for k in set(train_keys))
    assert {r["key"] for r in ev} == {r["key"] for r in lookup_rows(400, seed=1, split="eval")}
    assert {r["key"] for r in ev}.isdisjoint(train_keys) and all(kb[r["key"]] == r["answer"] for r in train + ev)
    with pytest.raises(ValueError, match="repeats"):
        every_key_rows(repeats=0)


def run(env: LookupEnv, turns: list[str]) -> list:
    async def go() -> list:
        await env.reset()
        return [await env.step(t) for t in turns]

    return anyio.run(go)


def test_tool_call_format_needs_lookup_then_answer() -> None:
    row = lookup_rows(1, seed=3)[0]
    steps = run(LookupEnv(row, call_format="tool_call"),
                [format_tool_call("lookup", {"key": row["key"]}), f"It is {row['answer']}."])
    assert steps[0].observation[0].content == f"{row['key']}: {row['answer']}" and not steps[0].done
    assert steps[1].done and steps[1].reward == 1.0 and steps[1].info["success"]
    guess = run(LookupEnv(row, call_format="tool_call"), [f"It is {row['answer']}."])
    assert guess[0].done and guess[0].reward == 0.0, "an answer without a lookup earns nothing"
    wrong = run(LookupEnv(row, call_format="tool_call"), [format_tool_call("lookup", {"key": "nokey"}), row["answer"]])
    assert "not found" in wrong[0].observation[0].content and wrong[1].reward == 0.0


def test_initial_format_and_turn_limit() -> None:
    row = {"key": "kaloo", "answer": "salt"}
    steps = run(LookupEnv(row), ["apple pie", "the best"])
    assert not steps[0].done and steps[1].reward == 1.0, "vowel word = call; then an answer holding 's'"
    assert run(LookupEnv(row), ["apple", "xyz"])[1].reward == 0.0
    assert run(LookupEnv(row), ["the best"])[0].reward == 0.0, "no lookup, no reward"
    out = run(LookupEnv(row, max_turns=2), ["apple", "east"])
    assert out[1].done and out[1].reward == 0.0 and out[1].info["reason"] == "no answer"
    env = LookupEnv(row)
    run(env, ["banana"])
    with pytest.raises(RuntimeError, match="over"):
        anyio.run(env.step, "more")
    assert len(make_group(lambda r: LookupEnv(r), row, 4)) == 4
