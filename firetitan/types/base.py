"""Base classes and helpers shared by firetitan's wire types: look-alike (tinker) input, compact tensor dumps."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Context key understood by TensorData's serializer: `model_dump(context={COMPACT: True})`.
COMPACT_TENSORS = "compact_tensors"


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
