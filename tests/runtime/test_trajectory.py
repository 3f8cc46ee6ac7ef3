"""Token-exact trajectories: exact tokens and masks of a scripted two-turn episode; re-rendering fails closed."""

from __future__ import annotations

import pytest

from firetitan.models import load_tokenizer
from firetitan.runtime.trajectory import (
    ChatMLRenderer,
    TemplateRenderer,
    TrajectoryAssembler,
    TrajectoryError,
    token_advantages,
    trajectory_datum,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("firetitan/nano-qwen3")


def enc(tok, s: str) -> list[int]:
    return list(tok.encode(s, add_special_tokens=False))


OPENING = [{"role": "system", "content": "Find the code."}, {"role": "user", "content": "Code of kaloo?"}]


def test_two_turn_episode_exact_tokens_and_masks(tok) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    turn1 = enc(tok, " ap") + enc(tok, "ple")  # not how the tokenizer would spell " apple": kept as sampled
    assert enc(tok, " apple") != turn1
    turn2 = [*enc(tok, "salt"), im_end]  # stopped on its own end-of-turn token
    asm = TrajectoryAssembler(ChatMLRenderer(tok))
    p1 = asm.prompt(OPENING)
    # The first prompt is exactly what the tokenizer's own chat template gives.
    assert p1 == TemplateRenderer(tok).render(OPENING, add_generation_prompt=True)
    lp1 = [-1.0 - i for i in range(len(turn1))]
    asm.add_turn(turn1, lp1, " apple")
    p2 = asm.prompt([{"role": "tool", "content": "kaloo: salt"}])
    asm.add_turn(turn2, [-0.5] * len(turn2), "salt")
    traj = asm.finish()

    head = enc(tok, "<|im_start|>system\nFind the code.<|im_end|>\n<|im_start|>user\nCode of kaloo?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    middle = enc(tok, "<|im_end|>\n<|im_start|>tool\nkaloo: salt<|im_end|>\n<|im_start|>assistant\n")
    assert traj.tokens == head + turn1 + middle + turn2
    assert traj.mask == [0] * len(head) + [1] * len(turn1) + [0] * len(middle) + [1] * len(turn2)
    assert traj.logprobs == [0.0] * len(head) + lp1 + [0.0] * len(middle) + [-0.5] * len(turn2)
    assert p1 == head and p2 == head + turn1 + middle
    assert traj.prompt_of(0) == p1 and traj.prompt_of(1) == p2
    assert [(t.start, t.end) for t in traj.turns] == [(len(head), len(head) + len(turn1)),
                                                       (len(p2), len(p2) + len(turn2))]

    adv = token_advantages(traj, [0.5, -1.0])
    d = trajectory_datum(traj, adv)
    assert d.model_input.to_ints() == traj.tokens[:-1]
    assert d.loss_fn_inputs["target_tokens"].tolist() == traj.tokens[1:]
    a = d.loss_fn_inputs["advantages"].tolist()
    # Target position i predicts tokens[i + 1]: only the model's own tokens carry advantage.
    assert [i + 1 for i, x in enumerate(a) if x != 0.0] == [i for i, m in enumerate(traj.mask) if m]
    assert a[len(head) - 1: len(head) + len(turn1) - 1] == [0.5] * len(turn1) and a[-1] == -1.0
    with pytest.raises(ValueError, match="did not sample"):
        trajectory_datum(traj, [1.0] * len(traj.tokens))


def test_template_re_rendering_an_earlier_turn_fails_closed(tok) -> None:
    asm = TrajectoryAssembler(TemplateRenderer(tok))
    asm.prompt(OPENING)
    sampled = enc(tok, " ap") + enc(tok, "ple")  # the template re-tokenizes the text " apple" as one token
    asm.add_turn(sampled, [-1.0] * len(sampled), " apple")
    with pytest.raises(TrajectoryError, match=r"turns\[0\]") as err:
        asm.prompt([{"role": "user", "content": "kaloo: salt"}])
    assert err.value.field == "turns[0]"


def test_template_that_matches_history_passes(tok) -> None:
    asm = TrajectoryAssembler(TemplateRenderer(tok))
    asm.prompt(OPENING)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    toks = [*enc(tok, "hello"), im_end]
    asm.add_turn(toks, [-1.0] * len(toks), "hello")
    p2 = asm.prompt([{"role": "user", "content": "more"}])
    assert p2[-3:] == enc(tok, "<|im_start|>assistant\n")


class _RewritingRenderer(ChatMLRenderer):
    """Drops earlier assistant turns' content, the way templates that strip reasoning do."""

    def render(self, messages, *, add_generation_prompt):
        last = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
        kept = [m if m["role"] != "assistant" or i > last else {"role": "assistant", "content": ""}
                for i, m in enumerate(messages)]
        return super().render(kept, add_generation_prompt=add_generation_prompt)


def test_history_rewrite_names_the_turn(tok) -> None:
    asm = TrajectoryAssembler(_RewritingRenderer(tok))
    asm.prompt(OPENING)
    asm.add_turn(enc(tok, "first"), [-1.0] * len(enc(tok, "first")), "first")
    with pytest.raises(TrajectoryError) as err:
        asm.prompt([{"role": "tool", "content": "x"}])
    assert err.value.field == "turns[0]" and "token for token" in str(err.value)


def test_bad_logprobs_and_order(tok) -> None:
    asm = TrajectoryAssembler(ChatMLRenderer(tok))
    with pytest.raises(TrajectoryError, match="prompt"):
        asm.add_turn([1], [0.0], "x")
    asm.prompt(OPENING)
    with pytest.raises(TrajectoryError, match="logprobs"):
        asm.add_turn([1, 2], [0.0], "x")
