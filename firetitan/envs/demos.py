"""Demonstration episodes: scripted turns played through a real environment, assembled token-exactly.

A demonstration is the trajectory a policy would produce if it sampled exactly the scripted turns:
each turn's tokens are the text's tokens plus `<|im_end|>` (the model's own stop), the environment's
replies come from `env.step`, and everything is rendered by the same renderer and prefix-checked
assembler the recipes sample with. SFT on these (`firetitan.recipes.sft.demonstration_datum`) trains
exactly the tokens an RL run later samples, which is what a warm start needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from firetitan.envs.base import Env
from firetitan.envs.lookup import CallFormat, LookupEnv, lookup_rows
from firetitan.envs.tools import format_tool_call
from firetitan.runtime.trajectory import ChatMLRenderer, Renderer, Trajectory, TrajectoryAssembler

# Vowel-initial words: in the `initial` format any of them is the lookup call.
CALL_WORDS = ("apple", "open", "ask", "echo", "under", "orbit", "inside", "every")


async def play(env: Env, renderer: Renderer, tokenizer: Any, turns: Sequence[str]) -> tuple[Trajectory, bool]:
    """Play `turns` (texts) through `env`; returns the trajectory and whether the episode succeeded."""
    im_end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    asm = TrajectoryAssembler(renderer)
    observation = [m.as_dict() for m in await env.reset()]
    success = False
    for k, text in enumerate(turns):
        asm.prompt(observation)
        tokens = [*(int(t) for t in tokenizer.encode(text, add_special_tokens=False)), im_end]
        asm.add_turn(tokens, [0.0] * len(tokens), text)
        step = await env.step(text)
        asm.add_reward(step.reward)
        success = bool(step.info.get("success", success))
        if step.done:
            if k != len(turns) - 1:
                raise ValueError(f"turns: the episode ended at turn {k}, {len(turns) - k - 1} scripted turns unplayed")
            break
        observation = [m.as_dict() for m in step.observation]
    return asm.finish(), success


def lookup_script(row: dict[str, str], call_format: CallFormat, rng: random.Random) -> list[str]:
    """The correct play of a lookup episode: the call, then the code word read from the tool's reply."""
    call = rng.choice(CALL_WORDS) if call_format == "initial" else format_tool_call("lookup", {"key": row["key"]})
    return [call, row["answer"]]


async def lookup_demonstrations(n: int, tokenizer: Any, *, seed: int = 0, call_format: CallFormat = "initial",
                                max_turns: int = 3,
                                renderer: Callable[[Any], Renderer] = ChatMLRenderer) -> list[Trajectory]:
    """`n` successful demonstration episodes of `LookupEnv` on train rows (fails if one does not succeed)."""
    rng = random.Random(seed)
    render = renderer(tokenizer)
    out = []
    for i, row in enumerate(lookup_rows(n, seed=seed)):
        traj, success = await play(LookupEnv(row, call_format=call_format, max_turns=max_turns), render, tokenizer,
                                   lookup_script(row, call_format, rng))
        if not success:
            raise ValueError(f"rows[{i}]: the scripted episode for key {row['key']!r} did not succeed")
        out.append(traj)
    return out
