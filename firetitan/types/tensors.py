"""TensorData: a dense int64/float32 tensor on the wire (flat list or little-endian base64), backed by numpy."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    SerializationInfo,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from firetitan.types.base import COMPACT_TENSORS, _is_torch_tensor

TensorDType: TypeAlias = Literal["int64", "float32"]

_NP_DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}
# Little-endian on the wire regardless of the host, so b64 payloads are portable.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}


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
