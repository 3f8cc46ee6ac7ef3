"""Request parameters with their bounds: AdamParams, SamplingParams, LoraConfig, and the loss function names."""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from pydantic import Field, StrictBool, ValidationInfo, field_validator

from firetitan.types.base import _Params

# Fireworks' vendored Tinker list (reference/fireworks_api.md §2.9).
LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dapo", "gspo", "dppo", "reinforce"
]


# Bounds of AdamParams (docs/trainer.md "Bounds"): beyond them one step can turn every weight into
# NaN/inf for good (a learning rate of 1e308 did), so they are refused with a 400 naming the field.
MAX_LEARNING_RATE = 10.0
MIN_ADAM_EPS = 1e-30  # smaller underflows to 0 in float32/bfloat16: m / (sqrt(v) + 0) is 0/0 = NaN
MAX_ADAM_EPS = 1.0
MAX_WEIGHT_DECAY = 10.0
MAX_GRAD_CLIP_NORM = 1e12
# LoRA ranks above this are refused (a rank of 1e9 used to pass validation and exhaust memory).
MAX_LORA_RANK = 1024
_FINITE = {"allow_inf_nan": False, "strict": True}


class AdamParams(_Params):
    """AdamW hyperparameters with Tinker's defaults (weight decay is decoupled; 0 clip norm = no clipping).

    Every value must be a finite number (a JSON bool or string is refused) inside its stated range.
    """

    learning_rate: float = Field(default=1e-4, ge=0.0, le=MAX_LEARNING_RATE, **_FINITE)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, **_FINITE)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0, **_FINITE)
    eps: float = Field(default=1e-12, ge=MIN_ADAM_EPS, le=MAX_ADAM_EPS, **_FINITE)
    weight_decay: float = Field(default=0.0, ge=0.0, le=MAX_WEIGHT_DECAY, **_FINITE)
    grad_clip_norm: float = Field(default=0.0, ge=0.0, le=MAX_GRAD_CLIP_NORM, **_FINITE)
    # The official SDK sends a level name or a bool; the trainer always reports grad_norm.
    emit_grad_norm_metrics: Literal["off", "basic", "detailed"] | StrictBool | None = None

    @field_validator("weight_decay")
    @classmethod
    def _decay_keeps_sign(cls, value: float, info: ValidationInfo) -> float:
        # Decoupled decay multiplies every weight by (1 - lr * wd): above 1 it flips their signs.
        lr = info.data.get("learning_rate")
        if lr is not None and lr * value > 1.0:
            raise ValueError(f"learning_rate * weight_decay = {lr * value:g} must be <= 1 (decoupled decay "
                             "would flip the sign of every weight)")
        return value


class SamplingParams(_Params):
    """Decoding settings. `stop=None` keeps EOS stopping; `stop=[]` turns every stop off, EOS included."""

    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_k: int = Field(default=-1, ge=-1)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class LoraConfig(_Params):
    """LoRA adapter settings; `alpha=None` means 32."""

    rank: int = Field(ge=1, le=MAX_LORA_RANK, strict=True)
    alpha: float | None = Field(default=None, gt=0.0, le=1e6, allow_inf_nan=False, strict=True)
    seed: int | None = Field(default=None, ge=0, lt=2**63, strict=True)
    train_unembed: StrictBool = True
    train_mlp: StrictBool = True
    train_attn: StrictBool = True
    # The official SDK may name the adapter init; only the standard (peft's Kaiming) one exists here.
    init_method: Literal["kaiming"] | None = None

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 32.0


def coerce_adam_params(value: Any = None) -> AdamParams:
    """AdamParams from ours, a `tinker.AdamParams`, a dict, or None (Tinker defaults)."""
    if value is None:
        return AdamParams()
    return value if isinstance(value, AdamParams) else AdamParams.model_validate(value)


def coerce_sampling_params(value: Any = None) -> SamplingParams:
    """SamplingParams from ours, a `tinker.SamplingParams`, a dict, or None (defaults)."""
    if value is None:
        return SamplingParams()
    return value if isinstance(value, SamplingParams) else SamplingParams.model_validate(value)
