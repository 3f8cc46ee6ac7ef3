"""Demonstration episodes for the SFT warm start: token-exact, played through the real environment, trained on model tokens only."""

from __future__ import annotations

import pytest

from firetitan.envs import LookupEnv, lookup_rows
from firetitan.envs.demos import lookup_demonstrations, play
from firetitan.models import load_tokenizer
from firetitan.recipes.sft import demonstration_datum
from firetitan.runtime.trajectory import ChatMLRenderer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("firetitan/nano-qwen3")


@pytest.mark.parametrize("call_format", ["initial", "tool_call"])
async def test_demonstrations_are_the_tokens_a_policy_would_sample(tok, call_format: str) -> None:
    demos = await lookup_demonstrations(6, tok, seed=3, call_format=call_format)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    render = ChatMLRenderer(tok)
    for demo, row in zip(demos, lookup_rows(6, seed=3), strict=True):
        call, answer = (t for t in demo.turns)
        # the whole conversation rendered independently, with the turns' own tokens, is the trajectory
        env = LookupEnv(row, call_format=call_format)
        messages = [m.as_dict() for m in await env.reset()]
        messages.append({"role": "assistant", "content": call.text, "tokens": demo.tokens[call.start:call.end]})
        messages.append({"role": "tool", "content": f"{row['key']}: {row['answer']}"})
        expected = render.render(messages, add_generation_prompt=True)
        assert demo.tokens[:answer.start] == expected
        # model tokens: exactly the two turns' text tokens, each ending with the model's own stop
        assert [i for i, m in enumerate(demo.mask) if m] == [*range(call.start, call.end),
                                                              *range(answer.start, answer.end)]
        for turn in (call, answer):
            assert demo.tokens[turn.start:turn.end] == [*tok.encode(turn.text, add_special_tokens=False), im_end]
        assert answer.text == row["answer"] and demo.rewards == [0.0, 1.0]


async def test_a_script_that_does_not_succeed_is_refused(tok) -> None:
    row = lookup_rows(1, seed=0)[0]
    traj, success = await play(LookupEnv(row), ChatMLRenderer(tok), tok, ["apple", "zzz"])
    assert not success and traj.rewards == [0.0, 0.0]
    with pytest.raises(ValueError, match="ended at turn 0"):
        await play(LookupEnv(row), ChatMLRenderer(tok), tok, ["zzz", "apple"])


async def test_demonstration_datum_trains_only_model_tokens(tok) -> None:
    demo = (await lookup_demonstrations(1, tok, seed=0))[0]
    d = demonstration_datum(demo.tokens, demo.mask, weight=2.0)
    weights = d.loss_fn_inputs["weights"].tolist()
    assert d.loss_fn_inputs["target_tokens"].tolist() == demo.tokens[1:]
    assert [w > 0 for w in weights] == [bool(m) for m in demo.mask[1:]]
    assert sum(weights) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mask"):
        demonstration_datum(demo.tokens, demo.mask[:-1])
