"""IGPO turn rewards and distillation advantages against direct computations with separate forward passes.

The batched path (`firetitan.recipes.scoring`) goes through a `forward(data)` over a real local model
that pads a batch into one pass, exactly what a trainer's forward returns; the direct computation runs
one unpadded forward per context.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import anyio
import pytest
import torch

from firetitan.models import load_model, load_tokenizer
from firetitan.recipes.distill import distill_token_advantages, student_logprobs
from firetitan.recipes.scoring import answer_probabilities, model_token_logprobs
from firetitan.recipes.turn_rewards import (
    answer_probability,
    distill_advantages,
    igpo_advantages,
    igpo_turn_rewards,
    reverse_kl,
)
from firetitan.runtime.trajectory import ChatMLRenderer, TrajectoryAssembler


class BatchedForward:
    """`forward(data)`: one right-padded batch through `model`, target-token logprobs per datum."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    async def _run(self, data: list) -> SimpleNamespace:
        inputs = [d.model_input.to_ints() for d in data]
        width = max(map(len, inputs))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.double(), -1)
        outs = []
        for i, d in enumerate(data):
            tgt = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
            outs.append({"logprobs": logp[i, : len(tgt)].gather(-1, tgt[:, None])[:, 0]})
        return SimpleNamespace(loss_fn_outputs=outs)

    def forward(self, data: list, loss_fn: str = "cross_entropy"):
        return self._run(list(data))


def direct_logprobs(model: torch.nn.Module, context: list[int], continuation: list[int]) -> list[float]:
    """log p(continuation | context), token by token, from one forward over exactly these tokens."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double()[0], -1)
    return [float(logp[len(context) - 1 + j, t]) for j, t in enumerate(continuation)]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("firetitan/nano-qwen3")
    return tok, load_model("firetitan/nano-qwen3").eval(), load_model("firetitan/tiny-qwen3").eval()


def three_turn_trajectory(tok, turns: list[str]):
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    asm = TrajectoryAssembler(ChatMLRenderer(tok))
    asm.prompt([{"role": "user", "content": "Code of kaloo?"}])
    for i, text in enumerate(turns):
        toks = enc(text)
        asm.add_turn(toks, [-0.1 * (j + 1) - i for j in range(len(toks))], text)
        if i < len(turns) - 1:
            asm.prompt([{"role": "tool", "content": f"kaloo: {'salt' if i else 'not yet'}"}])
    return asm.finish()


def test_igpo_turn_rewards_equal_separate_forward_passes(setup) -> None:
    tok, model, _ = setup
    trajs = [three_turn_trajectory(tok, ["apple one", "orange", "salt it is"]),
             three_turn_trajectory(tok, ["east", "the salt"])]
    answer = list(tok.encode("salt", add_special_tokens=False)) + list(tok.encode(" mine", add_special_tokens=False))
    outcomes = [1.0, 0.0]
    probs = anyio.run(lambda: answer_probabilities(BatchedForward(model), trajs, [answer, answer], timeout_s=60))
    rewards = [igpo_turn_rewards(p, o) for p, o in zip(probs, outcomes, strict=True)]

    for traj, p, r, outcome in zip(trajs, probs, rewards, outcomes, strict=True):
        direct = [math.exp(sum(lp) / len(lp)) for lp in
                  (direct_logprobs(model, traj.prompt_of(k), answer) for k in range(len(traj.turns)))]
        assert p == pytest.approx(direct, rel=1e-5)
        gains = [direct[k + 1] - direct[k] for k in range(len(direct) - 1)]
        assert r == pytest.approx([*gains, outcome], abs=1e-5)
        assert r[:-1] == pytest.approx(gains, rel=1e-3, abs=1e-9), "the gains themselves, not just ~0"
    assert len(rewards[0]) == 3 and len(rewards[1]) == 2


def test_igpo_advantages_normalise_the_group_and_sum_later_turns() -> None:
    group = [[0.2, 0.1, 1.0], [0.0, 0.0]]
    flat = [0.2, 0.1, 1.0, 0.0, 0.0]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 5)
    z = [(x - mean) / (std + 1e-6) for x in flat]
    adv = igpo_advantages(group, gamma=0.5)
    assert adv[0] == pytest.approx([z[0] + 0.5 * z[1] + 0.25 * z[2], z[1] + 0.5 * z[2], z[2]])
    assert adv[1] == pytest.approx([z[3] + 0.5 * z[4], z[4]])
    assert igpo_advantages([[1.0, 1.0], [1.0]]) == [[0.0, 0.0], [0.0]]
    assert answer_probability([math.log(0.25), math.log(0.5)]) == pytest.approx(math.sqrt(0.125))


def test_distill_advantages_are_teacher_minus_student_sampled_logprobs(setup) -> None:
    tok, student, teacher = setup
    traj = three_turn_trajectory(tok, ["apple one", "orange", "salt it is"])
    # The student's sampling logprobs: what the student itself gives its tokens (one pass per turn).
    for t in traj.turns:
        traj.logprobs[t.start:t.end] = direct_logprobs(student, traj.tokens[:t.start], traj.tokens[t.start:t.end])
    prefix = list(tok.encode("The code is salt.", add_special_tokens=False))
    teacher_lp = anyio.run(lambda: model_token_logprobs(BatchedForward(teacher), [traj], prefix=prefix,
                                                        timeout_s=60))[0]
    direct_teacher = [x for t in traj.turns for x in
                      direct_logprobs(teacher, prefix + traj.tokens[:t.start], traj.tokens[t.start:t.end])]
    assert teacher_lp == pytest.approx(direct_teacher, rel=1e-6)
    adv = distill_token_advantages(traj, teacher_lp, coef=1.0)
    sampled = [i for i, m in enumerate(traj.mask) if m]
    assert [adv[i] for i in sampled] == pytest.approx(
        [direct_teacher[j] - traj.logprobs[i] for j, i in enumerate(sampled)], abs=1e-6)
    assert all(a == 0.0 for i, a in enumerate(adv) if not traj.mask[i])
    assert reverse_kl(student_logprobs(traj), teacher_lp) == pytest.approx(
        -sum(adv[i] for i in sampled) / len(sampled))
    assert distill_advantages([-1.0], [-3.0], coef=0.5) == [-1.0]
    with pytest.raises(ValueError, match="teacher_logprobs"):
        distill_advantages([-1.0], [])
