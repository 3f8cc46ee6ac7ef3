"""Model inputs and training data: token chunks, ModelInput, Datum, and their coercion from tinker objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
from pydantic import Field, model_validator

from firetitan.types.base import _foreign_fields, _is_torch_tensor, _Model
from firetitan.types.tensors import TensorData, TensorDType, _to_array

# Datum.loss_fn_inputs keys whose raw values become int64; every other key becomes float32.
_INT_KEYS = frozenset({"target_tokens"})


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
