"""Custom losses on the client: the loss signature, and its linearisation into one weighted cross-entropy pass.

`forward_backward_custom` fetches per-token logprobs, runs the user's loss on leaf tensors with
autograd here, and sends `weights = -dLoss/dlogprob` back as a cross-entropy forward_backward
(CE is `sum(-lp * w)`, so the model gets exactly the custom loss's gradient).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch

from firetitan.errors import InvalidRequestError
from firetitan.types import Datum, ForwardBackwardOutput, TensorData

# The one signature of a custom loss (`forward_backward_custom`, the recipes' objectives): the datums
# and their per-token logprobs (leaf tensors with grad) -> (scalar loss, metrics).
CustomLossFn = Callable[[Sequence[Datum], Sequence[torch.Tensor]], tuple[torch.Tensor, Mapping[str, Any]]]
# `SeqOrderedCalls._call` and `._abandon` of the training client that runs the two passes.
CallFn = Callable[[str, dict[str, Any], int], Awaitable[dict[str, Any]]]
AbandonFn = Callable[[tuple[int, ...]], None]


def ce_datum(d: Datum, weights: torch.Tensor | None, i: int) -> Datum:
    """The datum reduced to what a cross-entropy pass needs; weights default to zeros (no gradient)."""
    target = d.loss_fn_inputs.get("target_tokens")
    if target is None:
        field = f"data[{i}].loss_fn_inputs.target_tokens"
        raise InvalidRequestError(f"{field}: required by forward_backward_custom", field=field)
    if weights is None:
        weights = torch.zeros(target.shape or [target.size], dtype=torch.float32)
    return Datum(model_input=d.model_input,
                 loss_fn_inputs={"target_tokens": target, "weights": TensorData.from_torch(weights.detach())})


def linearize(loss_fn: CustomLossFn, datums: list[Datum],
               fwd: ForwardBackwardOutput) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """Run the user's loss on leaf logprob tensors; return its value, metrics and d(loss)/d(logprobs)."""
    leaves = [out["logprobs"].to_torch().clone().requires_grad_(True) for out in fwd.loss_fn_outputs]
    loss, metrics = loss_fn(datums, leaves)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidRequestError("loss_fn must return (scalar tensor, metrics dict)", field="loss_fn")
    loss.backward()
    grads = [lp.grad if lp.grad is not None else torch.zeros_like(lp) for lp in leaves]
    clean = {str(k): float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in (metrics or {}).items()}
    return float(loss.detach()), clean, grads


def unsupported_options(loss_type_input: str, output: str, precomputed_forward: Any) -> InvalidRequestError | None:
    """The hosted custom-loss options firetitan does not serve (embedding heads, a reused forward)."""
    for field, value, valid in (("loss_type_input", loss_type_input, "logprobs"), ("output", output, "logprobs")):
        if value != valid:
            return InvalidRequestError(f"{field} {value!r} is not supported; only {valid!r} is", field=field)
    if precomputed_forward is not None:
        return InvalidRequestError("precomputed_forward is not supported; the custom loss runs its own forward",
                                   field="precomputed_forward")
    return None


async def run_custom(call: CallFn, abandon: AbandonFn, seq: int, datums: list[Datum],
                     fwd_wire: list[dict[str, Any]], loss_fn: CustomLossFn) -> ForwardBackwardOutput:
    """The two passes of `forward_backward_custom` on seq_ids `seq` and `seq + 1` (both reserved)."""
    second_started = False
    try:
        fwd = ForwardBackwardOutput.model_validate(
            await call("forward", {"forward_input": {"data": fwd_wire, "loss_fn": "cross_entropy"}}, seq))
        value, user_metrics, grads = await asyncio.to_thread(linearize, loss_fn, datums, fwd)
        bwd_wire = [ce_datum(d, -g, i).to_wire(compact=True) for i, (d, g) in enumerate(zip(datums, grads, strict=True))]
        second_started = True
        out = ForwardBackwardOutput.model_validate(await call(
            "forward_backward", {"forward_backward_input": {"data": bwd_wire, "loss_fn": "cross_entropy"}},
            seq + 1))
    finally:
        if not second_started:  # the second seq_id must still be given up, or later calls wait forever
            abandon((seq + 1,))
    metrics = dict(out.metrics)
    metrics["surrogate_loss:sum"] = metrics.pop("loss:sum", 0.0)
    metrics["loss:sum"] = value
    metrics.update(user_metrics)
    return ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type,
                                 loss_fn_outputs=out.loss_fn_outputs, metrics=metrics)
