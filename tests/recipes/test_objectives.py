"""DPO / ORPO objectives and datum builders against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from firetitan.recipes.data import rl_datum, supervised_datum
from firetitan.recipes.objectives import dpo_loss, log_odds, orpo_loss
from firetitan.recipes.rl import group_datums
from firetitan.runtime.rollouts import RolloutGroup


def _pair():
    c = supervised_datum([5, 6, 7], [8, 9])
    r = supervised_datum([5, 6, 7], [10, 11, 12])
    return [c, r]


def test_supervised_datum_masks_prompt() -> None:
    d = supervised_datum([5, 6, 7], [8, 9], weight=2.0)
    assert d.model_input.to_ints() == [5, 6, 7, 8]
    assert d.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8, 9]
    assert d.loss_fn_inputs["weights"].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="completion"):
        supervised_datum([1], [])


def test_rl_datum_zero_advantage_on_prompt() -> None:
    d = rl_datum([1, 2, 3], [4, 5], [-0.5, -1.5], 0.25)
    assert d.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, 0.25, 0.25]
    assert d.loss_fn_inputs["logprobs"].tolist() == [0.0, 0.0, -0.5, -1.5]
    with pytest.raises(ValueError, match="sampling_logprobs"):
        rl_datum([1, 2], [3], [-1.0, -2.0], 1.0)


def test_dpo_loss_matches_formula() -> None:
    data = _pair()
    lp = [torch.tensor([-9.0, -9.0, -1.0, -2.0], requires_grad=True),
          torch.tensor([-9.0, -9.0, -1.0, -1.0, -1.0], requires_grad=True)]
    ref = [-4.0, -2.0]
    loss, m = dpo_loss(ref, beta=0.5)(data, lp)
    margin = (-3.0 - -4.0) - (-3.0 - -2.0)  # = 2
    assert float(loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * margin))), rel=1e-5)
    assert m["accuracy"] == 1.0 and m["margin"] == pytest.approx(2.0)
    loss.backward()
    assert lp[0].grad[:2].abs().sum() == 0, "prompt positions get no gradient"
    assert lp[0].grad[2] < 0 and lp[1].grad[2] > 0, "raise chosen, lower rejected"


def test_orpo_loss_matches_formula() -> None:
    data = _pair()
    lp = [torch.tensor([0.0, 0.0, -0.5, -1.5]), torch.tensor([0.0, 0.0, -2.0, -2.0, -2.0])]
    loss, m = orpo_loss(lam=0.5)(data, lp)
    c, r = -1.0, -2.0
    odds = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731
    expected = -c + 0.5 * -math.log(1 / (1 + math.exp(-(odds(c) - odds(r)))))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert m["sft_nll"] == pytest.approx(1.0) and m["accuracy"] == 1.0
    assert float(log_odds(torch.tensor(-1e-9))) > 10, "stable near p = 1"


class _Sample:
    def __init__(self, logprobs):
        self.prompt_tokens, self.completion_tokens = [1, 2], [3, 4]
        self.sampling_logprobs, self.completion_len = logprobs, 2


def test_group_datums_skip_constant_groups() -> None:
    flat = RolloutGroup(position=0, version=0, samples=[_Sample([-1.0, -1.0])] * 2, rewards=[1.0, 1.0])
    assert group_datums(flat, normalize=False) == []
    g = RolloutGroup(position=0, version=0, samples=[_Sample([-1.0, -1.0]), _Sample([-2.0, -2.0])],
                     rewards=[1.0, 0.0])
    adv = [d.loss_fn_inputs["advantages"].tolist()[-1] for d in group_datums(g, normalize=False)]
    assert adv == [0.5, -0.5]
