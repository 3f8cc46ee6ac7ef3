"""The built-in losses against values and gradients worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from firetitan.errors import InvalidRequestError
from firetitan.losses import compute_loss, resolve_config


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def leaf(*values: float) -> torch.Tensor:
    return t(*values).requires_grad_(True)


TT = torch.tensor([1, 2, 3])


def test_cross_entropy_is_weighted_sum_of_negative_logprobs() -> None:
    lp = leaf(-1.0, -2.0, -0.5)
    loss, metrics = compute_loss("cross_entropy", lp, {"target_tokens": TT, "weights": t(1.0, 0.0, 2.0)})
    # -( -1*1 + -2*0 + -0.5*2 ) = 2
    assert loss.item() == pytest.approx(2.0)
    assert metrics == {"loss:sum": pytest.approx(2.0)}
    loss.backward()
    assert lp.grad.tolist() == [-1.0, -0.0, -2.0]


def test_cross_entropy_without_weights_counts_every_token_and_allows_negative_weights() -> None:
    loss, _ = compute_loss("cross_entropy", t(-1.0, -2.0, -0.5), {"target_tokens": TT})
    assert loss.item() == pytest.approx(3.5)
    loss, _ = compute_loss("cross_entropy", t(-1.0, -2.0, -0.5), {"target_tokens": TT, "weights": t(-1, 0.5, 0)})
    assert loss.item() == pytest.approx(-1.0 + 1.0)


def test_importance_sampling_value_and_gradient() -> None:
    lp = leaf(-1.0, -2.0, -3.0)
    q, adv = t(-1.5, -2.0, -3.0), t(2.0, -1.0, 0.0)
    loss, metrics = compute_loss("importance_sampling", lp, {"target_tokens": TT, "logprobs": q, "advantages": adv})
    expected = -(math.exp(0.5) * 2.0 + 1.0 * -1.0)
    assert loss.item() == pytest.approx(expected)
    assert metrics["loss:sum"] == pytest.approx(expected)
    loss.backward()
    # d/dlp of -exp(lp - q) * A is -exp(lp - q) * A
    assert lp.grad.tolist() == pytest.approx([-math.exp(0.5) * 2.0, 1.0, 0.0])


def test_ppo_clips_with_default_thresholds() -> None:
    # ratios: e^0.5 = 1.6487 (A>0: clipped to 1.2), e^-0.5 = 0.6065 (A<0: clipped to 0.8),
    # 1.0 (inside), e^0.5 with A<0 (unclipped term is smaller: -1.6487 < -1.2).
    lp = leaf(0.5, -0.5, 0.0, 0.5)
    q = t(0.0, 0.0, 0.0, 0.0)
    adv = t(1.0, -1.0, 3.0, -1.0)
    loss, metrics = compute_loss("ppo", lp, {"target_tokens": torch.arange(4), "logprobs": q, "advantages": adv})
    r = [math.exp(0.5), math.exp(-0.5), 1.0, math.exp(0.5)]
    objective = [min(r[0] * 1, 1.2 * 1), min(r[1] * -1, 0.8 * -1), 3.0, min(r[3] * -1, 1.2 * -1)]
    assert loss.item() == pytest.approx(-sum(objective))
    assert metrics["clip_fraction:mean"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; unclipped ones get -r * A
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, -3.0, r[3]])


def test_ppo_thresholds_come_from_config() -> None:
    lp, q, adv = t(0.5), t(0.0), t(1.0)
    loss, _ = compute_loss("ppo", lp, {"target_tokens": TT[:1], "logprobs": q, "advantages": adv},
                           {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5})
    assert loss.item() == pytest.approx(-1.5)


def test_cispo_detaches_the_clipped_ratio() -> None:
    lp = leaf(math.log(5.0), math.log(0.5))
    q, adv = t(0.0, 0.0), t(1.0, 2.0)
    loss, _ = compute_loss("cispo", lp, {"target_tokens": TT[:2], "logprobs": q, "advantages": adv})
    # ratios 5 (clipped to the default high 4.0) and 0.5 (inside [0, 4])
    expected = -(4.0 * math.log(5.0) * 1.0 + 0.5 * math.log(0.5) * 2.0)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-4.0, -1.0])  # -sg(clip(r)) * A


def test_dro_value_gradient_and_required_beta() -> None:
    lp = leaf(-1.0, -2.0)
    q, adv = t(-1.5, -1.0), t(1.0, 0.0)
    loss, _ = compute_loss("dro", lp, {"target_tokens": TT[:2], "logprobs": q, "advantages": adv}, {"beta": 0.1})
    expected = -((-1.0 * 1.0 - 0.05 * 0.25) + (0.0 - 0.05 * 1.0))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dlp = -(A - beta * (lp - q))
    assert lp.grad.tolist() == pytest.approx([-(1.0 - 0.1 * 0.5), -(0.0 - 0.1 * -1.0)])
    with pytest.raises(InvalidRequestError) as err:
        compute_loss("dro", t(-1.0), {"target_tokens": TT[:1], "logprobs": t(-1.0), "advantages": t(1.0)})
    assert err.value.field == "loss_fn_config.beta"


@pytest.mark.parametrize(
    ("name", "inputs", "config", "field"),
    [
        ("nope", {"target_tokens": TT}, None, "loss_fn"),
        ("importance_sampling", {"target_tokens": TT, "logprobs": t(0, 0, 0)}, None, "loss_fn_inputs.advantages"),
        ("ppo", {"target_tokens": TT, "logprobs": t(0, 0, 0), "advantages": t(0, 0, 0)}, {"clip": 0.2},
         "loss_fn_config.clip"),
        ("dro", {"target_tokens": TT, "logprobs": t(0, 0, 0), "advantages": t(0, 0, 0), "weights": t(1, 1, 1)},
         {"beta": 0.1}, "loss_fn_inputs.weights"),
        ("cross_entropy", {"target_tokens": TT, "weights": t(1, 1)}, None, "loss_fn_inputs.weights"),
    ],
)
def test_bad_inputs_name_the_field(name: str, inputs: dict, config: dict | None, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        compute_loss(name, t(-1.0, -1.0, -1.0), inputs, config)
    assert err.value.field == field


def test_config_defaults() -> None:
    assert resolve_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_config("cispo", {}) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert resolve_config("cross_entropy", None) == {}
