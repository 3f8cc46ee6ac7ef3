"""Teacher-forced scoring of trajectories through `forward`: IGPO's answer probabilities, a teacher's logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from firetitan.recipes.data import supervised_datum
from firetitan.recipes.text import masked_logprobs
from firetitan.recipes.turn_rewards import answer_probability
from firetitan.runtime.remote import call
from firetitan.runtime.trajectory import Trajectory
from firetitan.types import Datum, ModelInput, TensorData


def answer_datums(traj: Trajectory, answer_tokens: Sequence[int]) -> list[Datum]:
    """One datum per turn: the turn's prompt (the context before it) followed by the ground-truth answer."""
    return [supervised_datum(traj.prompt_of(k), answer_tokens) for k in range(len(traj.turns))]


async def answer_probabilities(client: Any, trajectories: Sequence[Trajectory], answers: Sequence[Sequence[int]],
                               *, timeout_s: float) -> list[list[float]]:
    """pi(answer | prompt of turn k) for every turn of every trajectory, in one `forward` call."""
    data, counts = [], []
    for traj, ans in zip(trajectories, answers, strict=True):
        d = answer_datums(traj, ans)
        data += d
        counts.append(len(d))
    if not data:
        return [[] for _ in trajectories]
    out = await call(client.forward(data, "cross_entropy"), timeout=timeout_s, what="IGPO answer scoring")
    probs = [answer_probability(masked_logprobs(o, d)) for o, d in zip(out.loss_fn_outputs, data, strict=True)]
    result, i = [], 0
    for n in counts:
        result.append(probs[i:i + n])
        i += n
    return result


def _tensor(values: Sequence[float] | Sequence[int], dtype: str) -> TensorData:
    return TensorData.model_validate({"data": list(values), "dtype": dtype, "shape": [len(values)]})


def scoring_datum(traj: Trajectory, prefix: Sequence[int] = ()) -> Datum:
    """`prefix + tokens` with weight 1 on the model's tokens: a teacher's logprobs of exactly what was sampled.

    `prefix` is a privileged context only the teacher sees (e.g. a system hint); it shifts nothing else.
    """
    tokens = [*prefix, *traj.tokens]
    mask = [0] * len(prefix) + traj.mask
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": _tensor(tokens[1:], "int64"),
                                 "weights": _tensor([float(m) for m in mask[1:]], "float32")})


async def model_token_logprobs(client: Any, trajectories: Sequence[Trajectory], *, prefix: Sequence[int] = (),
                               timeout_s: float) -> list[list[float]]:
    """`client`'s logprobs of each trajectory's model tokens (in order), one `forward` call."""
    data = [scoring_datum(t, prefix) for t in trajectories]
    if not data:
        return []
    out = await call(client.forward(data, "cross_entropy"), timeout=timeout_s, what="teacher scoring")
    return [masked_logprobs(o, d) for o, d in zip(out.loss_fn_outputs, data, strict=True)]
