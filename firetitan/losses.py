"""Tinker's built-in token-level losses as pure functions over target logprobs and loss inputs.

Every loss is a **sum** over tokens (Tinker convention); to average, scale `weights`/`advantages`.
Each function takes the learner's target-token logprobs `lp` (any shape, usually flat over all
tokens of a batch), the other `loss_fn_inputs` as tensors of the same shape, and a validated
`loss_fn_config`, and returns `(loss, metrics)` where `loss` is a scalar tensor carrying the graph
and `metrics` maps `name:reduction` keys to floats.

Notation (reference/tinker_api.md §3): `q` = `logprobs` (sampler), `A` = `advantages`,
`w` = `weights`, `r = exp(lp - q)`, `sg` = stop-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from firetitan.errors import InvalidRequestError

Tensor = torch.Tensor
LossResult = tuple[Tensor, dict[str, float]]


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs: required/optional `loss_fn_inputs` keys and `loss_fn_config` defaults."""

    fn: Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], LossResult]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config_defaults: Mapping[str, float | None] = field(default_factory=dict)


def _clip_bounds(inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor | float, Tensor | float]:
    # Per-token thresholds (Tinker's Datum maps these keys to float32 tensors) win over the config.
    low = inputs.get("clip_low_threshold", config["clip_low_threshold"])
    high = inputs.get("clip_high_threshold", config["clip_high_threshold"])
    return low, high


def _masked(per_token: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    w = inputs.get("weights")
    return per_token if w is None else per_token * w


def _frac(mask: Tensor, active: Tensor) -> float:
    n = int(active.sum())
    return float((mask & active).sum()) / n if n else 0.0


def cross_entropy(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> LossResult:
    """`sum(-lp * w)`; `w` defaults to ones. Negative and fractional weights are allowed."""
    w = inputs.get("weights")
    per_token = -lp if w is None else -lp * w
    loss = per_token.sum()
    return loss, {"loss:sum": float(loss.detach())}


def importance_sampling(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> LossResult:
    """`sum(-exp(lp - q) * A)` (times optional `weights`)."""
    ratio = torch.exp(lp - inputs["logprobs"])
    loss = _masked(-(ratio * inputs["advantages"]), inputs).sum()
    active = inputs["advantages"] != 0
    return loss, {"loss:sum": float(loss.detach()), **_ratio_metrics(ratio, active)}


def ppo(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> LossResult:
    """`sum(-min(r * A, clip(r, lo, hi) * A))`, defaults lo=0.8, hi=1.2."""
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    low, high = _clip_bounds(inputs, config)
    clipped = torch.clamp(ratio, min=low, max=high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    loss = _masked(-objective, inputs).sum()
    active = adv != 0
    was_clipped = (clipped * adv < ratio * adv).detach()
    return loss, {"loss:sum": float(loss.detach()), "clip_fraction:mean": _frac(was_clipped, active),
                  **_ratio_metrics(ratio, active)}


def cispo(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> LossResult:
    """`sum(-sg(clip(r, lo, hi)) * lp * A)`, defaults lo=0.0, hi=4.0."""
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    low, high = _clip_bounds(inputs, config)
    coef = torch.clamp(ratio, min=low, max=high).detach()
    loss = _masked(-(coef * lp * adv), inputs).sum()
    active = adv != 0
    was_clipped = (coef != ratio.detach())
    return loss, {"loss:sum": float(loss.detach()), "clip_fraction:mean": _frac(was_clipped, active),
                  **_ratio_metrics(ratio, active)}


def dro(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> LossResult:
    """`sum(-(lp * A - 0.5 * beta * (lp - q)^2))`; the penalty applies at every token (no masking)."""
    diff = lp - inputs["logprobs"]
    loss = -(lp * inputs["advantages"] - 0.5 * config["beta"] * diff.pow(2)).sum()
    return loss, {"loss:sum": float(loss.detach())}


def _ratio_metrics(ratio: Tensor, active: Tensor) -> dict[str, float]:
    r = ratio.detach()[active]
    if r.numel() == 0:
        return {}
    return {"ratio:mean": float(r.mean()), "ratio:min": float(r.min()), "ratio:max": float(r.max())}


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_INPUTS = ("weights", "clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=("target_tokens",), optional=("weights",)),
    "importance_sampling": LossSpec(importance_sampling, required=_RL_INPUTS, optional=("weights",)),
    "ppo": LossSpec(ppo, required=_RL_INPUTS, optional=_CLIP_INPUTS,
                    config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(cispo, required=_RL_INPUTS, optional=_CLIP_INPUTS,
                      config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    # beta has no documented default; None marks it required.
    "dro": LossSpec(dro, required=_RL_INPUTS, config_defaults={"beta": None}),
}


def get_loss(name: str) -> LossSpec:
    """The spec of a built-in loss, or an InvalidRequestError naming `loss_fn`."""
    spec = LOSSES.get(name)
    if spec is None:
        raise InvalidRequestError(
            f"loss_fn: unknown loss {name!r}; expected one of {sorted(LOSSES)}", field="loss_fn"
        )
    return spec


def resolve_config(name: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """Fill defaults into `loss_fn_config` and reject unknown keys, non-numbers and missing values."""
    spec = get_loss(name)
    given = dict(config or {})
    unknown = sorted(set(given) - set(spec.config_defaults))
    if unknown:
        allowed = sorted(spec.config_defaults) or "none"
        raise InvalidRequestError(
            f"loss_fn_config.{unknown[0]}: not a parameter of {name!r} (allowed: {allowed})",
            field=f"loss_fn_config.{unknown[0]}",
        )
    out: dict[str, float] = {}
    for key, default in spec.config_defaults.items():
        value = given.get(key, default)
        if value is None:
            raise InvalidRequestError(f"loss_fn_config.{key}: required by {name!r}",
                                      field=f"loss_fn_config.{key}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"loss_fn_config.{key}: expected a number, got {value!r}",
                                      field=f"loss_fn_config.{key}") from None
    return out


def check_inputs(name: str, keys: set[str], where: str = "loss_fn_inputs") -> None:
    """Raise InvalidRequestError naming the first missing required or unsupported input key."""
    spec = get_loss(name)
    for key in spec.required:
        if key not in keys:
            raise InvalidRequestError(f"{where}.{key}: required by loss {name!r}", field=f"{where}.{key}")
    allowed = set(spec.required) | set(spec.optional)
    for key in sorted(keys - allowed):
        raise InvalidRequestError(
            f"{where}.{key}: not accepted by loss {name!r} (accepted: {sorted(allowed)})",
            field=f"{where}.{key}",
        )


def compute_loss(name: str, lp: Tensor, inputs: Mapping[str, Tensor],
                 config: Mapping[str, float | str] | None = None) -> LossResult:
    """Validate and evaluate loss `name`; `inputs` excludes nothing (`target_tokens` is ignored here)."""
    spec = get_loss(name)
    check_inputs(name, set(inputs))
    resolved = resolve_config(name, config)
    tensors = {k: v.to(lp.dtype) for k, v in inputs.items() if k != "target_tokens"}
    for key, value in tensors.items():
        if value.shape != lp.shape:
            raise InvalidRequestError(
                f"loss_fn_inputs.{key}: shape {list(value.shape)} differs from target_tokens {list(lp.shape)}",
                field=f"loss_fn_inputs.{key}",
            )
    return spec.fn(lp, tensors, resolved)
