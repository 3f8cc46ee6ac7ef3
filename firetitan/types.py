"""Tinker-shaped data types (pydantic v2) that also accept objects from the real `tinker` package."""

from __future__ import annotations

import base64
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    StrictBool,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "TensorDType",
    "TensorData",
    "coerce_adam_params",
    "coerce_datum",
    "coerce_model_input",
    "coerce_sampling_params",
]

StopReason: TypeAlias = Literal["length", "stop"]
TensorDType: TypeAlias = Literal["int64", "float32"]
# Fireworks' vendored Tinker list (reference/fireworks_api.md §2.9).
LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dapo", "gspo", "dppo", "reinforce"
]

_NP_DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}
# Little-endian on the wire regardless of the host, so b64 payloads are portable.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
# Context key understood by TensorData's serializer: `model_dump(context={COMPACT: True})`.
COMPACT_TENSORS = "compact_tensors"
# Datum.loss_fn_inputs keys whose raw values become int64; every other key becomes float32.
_INT_KEYS = frozenset({"target_tokens"})


def _is_torch_tensor(value: Any) -> bool:
    # Checked through sys.modules so importing firetitan.types never imports torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _foreign_fields(cls: type[BaseModel], value: Any) -> Any:
    """Turn an object that is not a dict (e.g. a `tinker` dataclass or pydantic model) into a field dict.

    Reads only the attributes named like our fields, so extra attributes a newer tinker adds are ignored.
    Values are left as they are; nested models convert themselves the same way.
    """
    if value is None or isinstance(value, Mapping | str | bytes | int | float | list | tuple | cls):
        return value
    fields = {name: getattr(value, name) for name in cls.model_fields if hasattr(value, name)}
    return fields if fields else value


class _Model(BaseModel):
    """Base for our types: accepts look-alike objects, and dumps to the wire with optional compact tensors."""

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")

    @model_validator(mode="before")
    @classmethod
    def _accept_foreign(cls, value: Any) -> Any:
        return _foreign_fields(cls, value)

    def to_wire(self, compact: bool = False) -> dict[str, Any]:
        """JSON-ready dict; with `compact=True` every TensorData inside travels as base64 bytes."""
        return self.model_dump(mode="json", context={COMPACT_TENSORS: compact})


class _Params(_Model):
    """Request/config types reject unknown fields, so a typo like `learning_rte` is a 400, not ignored."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


# ---------------------------------------------------------------------------------------------- inputs


# A token id on the wire: a non-negative int below 2^31 (every vocabulary fits; 10^20 would overflow).
TokenId: TypeAlias = Annotated[int, Field(ge=0, lt=2**31)]


class EncodedTextChunk(_Model):
    tokens: list[TokenId]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ModelInput(_Model):
    """A token sequence made of chunks; only text chunks exist here."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for chunk in self.chunks:
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end (self is unchanged)."""
        return ModelInput(chunks=[*self.chunks, EncodedTextChunk.model_validate(chunk)])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one more token, merged into the last text chunk."""
        if self.chunks:
            last = self.chunks[-1]
            return ModelInput(chunks=[*self.chunks[:-1], EncodedTextChunk(tokens=[*last.tokens, int(token)])])
        return ModelInput.from_ints([int(token)])


# ---------------------------------------------------------------------------------------------- tensors


def _dtype_for_kind(arr: np.ndarray) -> TensorDType:
    if arr.dtype.kind in "biu":
        return "int64"
    if arr.dtype.kind == "f":
        return "float32"
    raise ValueError(f"dtype: unsupported array dtype {arr.dtype}; expected an integer or float array")


def _to_array(data: Any, dtype: TensorDType) -> np.ndarray:
    """Cast list / numpy / torch data to a C-contiguous array of `dtype`, refusing lossy int casts."""
    if _is_torch_tensor(data):
        data = data.detach().cpu()
        if data.dtype.is_floating_point and data.dtype != _torch().float32:
            data = data.float()  # bf16/fp16 have no numpy twin; widening is exact
        data = data.numpy()
    try:
        arr = np.asarray(data)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"data: not a rectangular array ({exc})") from None
    if arr.dtype == object:
        raise ValueError("data: not a rectangular array of numbers")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=_NP_DTYPES[dtype])
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"data: expected numbers, got array of {arr.dtype}")
    if dtype == "int64" and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("data: int64 tensor got non-integer values")
    return np.ascontiguousarray(arr, dtype=_NP_DTYPES[dtype])


def _torch() -> Any:
    import torch

    return torch


class TensorData(BaseModel):
    """A dense int64/float32 tensor: `{"data": [...flat...], "dtype", "shape"}` or `{"b64", "dtype", "shape"}`.

    Backed by a numpy array (like Tinker 0.38), so large tensors never round-trip through Python lists
    unless `.data`/`.tolist()` is asked for. Treat instances as immutable.
    """

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")

    dtype: TensorDType
    shape: list[int] | None = None
    _array: np.ndarray = PrivateAttr()

    @model_validator(mode="wrap")
    @classmethod
    def _parse(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> TensorData:
        if isinstance(value, cls):
            return value
        if isinstance(value, np.ndarray) or _is_torch_tensor(value):
            return cls.from_numpy(value) if isinstance(value, np.ndarray) else cls.from_torch(value)
        if not isinstance(value, Mapping):
            value = _foreign_tensor(value)
        if not isinstance(value, Mapping):
            raise ValueError(
                f"expected a tensor dict with data/b64, dtype, shape; got {type(value).__name__}"
            )
        meta = handler({k: value[k] for k in ("dtype", "shape") if k in value})
        if "b64" in value and value["b64"] is not None:
            arr = _decode_b64(value["b64"], meta.dtype)
        elif "data" in value:
            arr = _to_array(value["data"], meta.dtype)
        else:
            raise ValueError("data: missing; a tensor needs `data` (a list) or `b64` (base64 bytes)")
        if meta.shape is not None:
            if any(d < 0 for d in meta.shape):
                raise ValueError(f"shape: dimensions must be >= 0, got {meta.shape}")
            if math.prod(meta.shape) != arr.size:
                raise ValueError(
                    f"shape: {meta.shape} holds {math.prod(meta.shape)} values but data has {arr.size}"
                )
        elif arr.ndim > 1:  # nested list without shape: keep its shape
            object.__setattr__(meta, "shape", list(arr.shape))
        meta.__pydantic_private__ = {"_array": arr.reshape(-1)}
        return meta

    @model_serializer(mode="plain")
    def _serialize(self, info: SerializationInfo) -> dict[str, Any]:
        compact = bool((info.context or {}).get(COMPACT_TENSORS))
        return self.to_wire(compact=compact)

    def to_wire(self, compact: bool = False) -> dict[str, Any]:
        """Tinker's JSON form, or the compact `{"b64": ...}` form (little-endian raw bytes)."""
        if compact:
            raw = self._array.astype(_WIRE_DTYPES[self.dtype], copy=False).tobytes()
            return {"b64": base64.b64encode(raw).decode("ascii"), "dtype": self.dtype, "shape": self.shape}
        return {"data": self._array.tolist(), "dtype": self.dtype, "shape": self.shape}

    # -- constructors
    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: TensorDType | None = None) -> TensorData:
        """Float kinds become float32 and integer/bool kinds int64, unless `dtype` says otherwise."""
        array = np.asarray(array)
        dtype = dtype or _dtype_for_kind(array)
        return cls._build(_to_array(array, dtype), dtype, list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any, dtype: TensorDType | None = None) -> TensorData:
        """bf16/fp16 widen to float32; integer/bool tensors become int64."""
        if dtype is None:
            dtype = "float32" if tensor.dtype.is_floating_point else "int64"
            if tensor.dtype.is_complex:
                raise ValueError(f"dtype: unsupported tensor dtype {tensor.dtype}")
        return cls._build(_to_array(tensor, dtype), dtype, list(tensor.shape))

    @classmethod
    def from_list(cls, data: Sequence[Any], dtype: TensorDType) -> TensorData:
        arr = _to_array(data, dtype)
        return cls._build(arr, dtype, list(arr.shape))

    @classmethod
    def _build(cls, arr: np.ndarray, dtype: TensorDType, shape: list[int]) -> TensorData:
        out = cls.model_construct(dtype=dtype, shape=shape)
        out.__pydantic_private__ = {"_array": arr.reshape(-1)}
        return out

    # -- views
    @property
    def data(self) -> list[Any]:
        """The flattened values as a Python list (Tinker's `data`)."""
        return self._array.tolist()

    @property
    def size(self) -> int:
        return int(self._array.size)

    def to_numpy(self) -> np.ndarray:
        """A copy shaped by `shape` (1-D when shape is None)."""
        arr = self._array.copy()
        return arr.reshape(self.shape) if self.shape is not None else arr

    def to_torch(self) -> Any:
        return _torch().from_numpy(self.to_numpy())

    def tolist(self) -> Any:
        """Nested lists following `shape`."""
        return self.to_numpy().tolist()

    def __eq__(self, other: object) -> bool:
        # Bitwise equality, so NaNs compare equal to themselves and -0.0 differs from 0.0.
        if not isinstance(other, TensorData):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and self._array.tobytes() == other._array.tobytes()
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        preview = self._array[:8].tolist()
        more = "..." if self._array.size > 8 else ""
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}, data={preview}{more})"


def _decode_b64(payload: Any, dtype: TensorDType) -> np.ndarray:
    if not isinstance(payload, str | bytes):
        raise ValueError("b64: expected a base64 string")
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise ValueError(f"b64: not valid base64 ({exc})") from None
    wire = _WIRE_DTYPES[dtype]
    if len(raw) % wire.itemsize:
        raise ValueError(f"b64: {len(raw)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype=wire).astype(_NP_DTYPES[dtype])  # astype copies: writable, native order


def _foreign_tensor(value: Any) -> Any:
    """A tinker TensorData (or anything with dtype + to_numpy/data) as a field dict."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return value
    dtype = getattr(dtype, "value", dtype)  # enum-valued dtypes
    shape = getattr(value, "shape", None)
    if callable(getattr(value, "to_numpy", None)):
        arr = np.asarray(value.to_numpy())
        return {"data": arr.reshape(-1), "dtype": str(dtype), "shape": list(arr.shape) if shape else shape}
    return {"data": getattr(value, "data", None), "dtype": str(dtype), "shape": shape}


def _coerce_loss_input(key: str, value: Any) -> Any:
    """Raw list / numpy / torch values get the dtype Tinker assigns to their key."""
    if isinstance(value, list | tuple | np.ndarray) or _is_torch_tensor(value):
        dtype: TensorDType = "int64" if key in _INT_KEYS else "float32"
        arr = _to_array(value, dtype)
        return TensorData._build(arr, dtype, list(arr.shape))
    return value


class Datum(_Model):
    """One training example: the input tokens and per-token loss inputs (`target_tokens`, `weights`, ...)."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _coerce_inputs(cls, value: Any) -> Any:
        value = _foreign_fields(cls, value)
        if isinstance(value, Mapping) and isinstance(value.get("loss_fn_inputs"), Mapping):
            value = dict(value)
            value["loss_fn_inputs"] = {
                str(k): _coerce_loss_input(str(k), v) for k, v in value["loss_fn_inputs"].items()
            }
        return value


# ---------------------------------------------------------------------------------------------- params


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


# ---------------------------------------------------------------------------------------------- outputs


class SampledSequence(_Model):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(_Model):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


class ForwardBackwardOutput(_Model):
    """Per-datum outputs (each has `logprobs`) in input order, and metrics keyed `name:reduction`."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(_Model):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(_Model):
    path: str


class SaveWeightsForSamplerResponse(_Model):
    path: str


class LoadWeightsResponse(_Model):
    path: str | None = None
    model_id: str | None = None


class ModelData(_Model):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Model):
    model_id: str
    model_name: str | None = None
    model_data: ModelData | None = None
    is_lora: bool = False
    lora_rank: int | None = None
    optimizer_config: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- coercion


def coerce_model_input(value: Any) -> ModelInput:
    """A ModelInput from ours, a `tinker.ModelInput`, its dict form, or a plain list of token ids."""
    if isinstance(value, ModelInput):
        return value
    if isinstance(value, list | tuple) and all(isinstance(t, int) for t in value):
        return ModelInput.from_ints(value)
    return ModelInput.model_validate(value)


def coerce_datum(value: Any) -> Datum:
    """A Datum from ours, a `tinker.Datum`, or its dict form."""
    return value if isinstance(value, Datum) else Datum.model_validate(value)


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
