"""Turning token sequences into training datums: supervised (weighted targets) and RL (advantages)."""

from __future__ import annotations

from collections.abc import Sequence

from firetitan.types import Datum, ModelInput, TensorData


def _tensor(values: Sequence[float] | Sequence[int], dtype: str) -> TensorData:
    return TensorData.model_validate({"data": list(values), "dtype": dtype, "shape": [len(values)]})


def supervised_datum(prompt: Sequence[int], completion: Sequence[int], *, weight: float = 1.0) -> Datum:
    """Next-token datum over `prompt + completion` that trains only the completion tokens.

    Each completion token gets `weight / len(completion)`, so the summed CE is the example's mean
    token NLL times `weight` (losses are sums, Tinker convention).
    """
    if not completion:
        raise ValueError("completion: at least one token is needed to train on")
    tokens = [*prompt, *completion]
    per_token = weight / len(completion)
    weights = [0.0] * (len(prompt) - 1) + [per_token] * len(completion)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": _tensor(tokens[1:], "int64"),
                                 "weights": _tensor(weights, "float32")})


def rl_datum(prompt: Sequence[int], completion: Sequence[int], sampling_logprobs: Sequence[float],
             advantage: float) -> Datum:
    """Datum for `ppo` / `importance_sampling`: prompt positions carry zero advantage and logprob."""
    if len(sampling_logprobs) != len(completion):
        raise ValueError(
            f"sampling_logprobs: {len(sampling_logprobs)} values for {len(completion)} completion tokens"
        )
    tokens = [*prompt, *completion]
    pad = len(prompt) - 1
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": _tensor(tokens[1:], "int64"),
                                 "logprobs": _tensor([0.0] * pad + [float(x) for x in sampling_logprobs], "float32"),
                                 "advantages": _tensor([0.0] * pad + [float(advantage)] * len(completion), "float32")})


def weights_of(datum: Datum) -> list[float]:
    return [float(x) for x in datum.loss_fn_inputs["weights"].tolist()]
