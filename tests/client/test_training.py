"""TrainingClient pieces that need no trainer: the turn gate, the custom-loss linearization, input errors.

End-to-end behaviour against a real trainer worker is in tests/server/trainer/.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from firetitan.client.custom_loss import linearize
from firetitan.client.seq_calls import TurnGate as _TurnGate
from firetitan.client.training import TrainingClient
from firetitan.errors import InvalidRequestError
from firetitan.types import Datum, ForwardBackwardOutput, ModelInput, TensorData

# Nothing listens here: every test below must fail (or finish) before any request is sent.
UNUSED_URL = "http://127.0.0.1:9"


async def test_turn_gate_releases_in_seq_order_even_when_finished_out_of_order() -> None:
    gate = _TurnGate(first=1)
    order: list[int] = []

    async def take(seq: int) -> None:
        await gate.wait(seq)
        order.append(seq)

    tasks = [asyncio.create_task(take(s)) for s in (4, 3)]
    await asyncio.sleep(0.01)
    gate.finish(2)  # seq 2 given up (e.g. a custom loss whose forward failed) before seq 1 is done
    await asyncio.sleep(0.01)
    assert order == []  # seq 3 still waits for seq 1
    gate.finish(1)
    await asyncio.sleep(0.01)
    assert order == [3]
    gate.finish(3)
    await asyncio.gather(*tasks)
    assert order == [3, 4]
    await gate.wait(2)  # already passed: returns at once


def test_linearize_returns_the_gradient_of_the_user_loss() -> None:
    lp_a, lp_b = [-1.0, -2.0], [-0.5, -0.25, -3.0]
    fwd = ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": TensorData.from_list(lp_a, "float32")},
                                                 {"logprobs": TensorData.from_list(lp_b, "float32")}])
    data = [Datum(model_input=ModelInput.from_ints([1, 2])), Datum(model_input=ModelInput.from_ints([1, 2, 3]))]

    def pairwise(ds: list[Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        margin = lps[0].sum() - lps[1].sum()  # DPO-like: mixes datums
        return -torch.nn.functional.logsigmoid(margin), {"margin:mean": margin}

    value, metrics, grads = linearize(pairwise, data, fwd)
    margin = sum(lp_a) - sum(lp_b)
    sig = torch.sigmoid(torch.tensor(-margin)).item()  # d/dm of -logsigmoid(m) is -sigmoid(-m)
    assert value == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(margin)).item())
    assert metrics == {"margin:mean": pytest.approx(margin)}
    assert grads[0].tolist() == pytest.approx([-sig] * 2)
    assert grads[1].tolist() == pytest.approx([sig] * 3)


def test_linearize_rejects_a_non_scalar_loss() -> None:
    fwd = ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": TensorData.from_list([-1.0, -2.0], "float32")}])
    with pytest.raises(InvalidRequestError):
        linearize(lambda ds, lps: (lps[0] * 2, {}), [Datum(model_input=ModelInput.from_ints([1, 2]))], fwd)


def test_malformed_inputs_fail_the_future_before_anything_is_sent() -> None:
    tc = TrainingClient(UNUSED_URL, "m")
    try:
        with pytest.raises(InvalidRequestError) as err:
            tc.forward([{"model_input": {"chunks": [{"tokens": ["x"]}]}}]).result(5)
        assert err.value.field.startswith("data[0]")
        no_target = Datum(model_input=ModelInput.from_ints([1, 2]))
        with pytest.raises(InvalidRequestError) as err:
            tc.forward_backward_custom([no_target], lambda ds, lps: (lps[0].sum(), {})).result(5)
        assert err.value.field == "data[0].loss_fn_inputs.target_tokens"
        with pytest.raises(InvalidRequestError) as err:
            tc.optim_step({"learning_rte": 1e-3}).result(5)
        assert err.value.field == "adam_params.learning_rte"
        # No seq_id was spent on the failures, so the next real call would be seq 1.
        assert tc._next_seq == 1
    finally:
        tc.close()
        tc.close()  # idempotent
