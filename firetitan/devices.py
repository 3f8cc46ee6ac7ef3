"""Device and dtype settings: validate `device` / `dtype` values and resolve them to torch objects.

One resolver for every place that takes these settings (trainer jobs, deployments, training shapes,
worker flags, `firetitan serve`, the SDK config), so `auto` means the same thing everywhere and an
invalid value fails with the same error naming its field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import AfterValidator

from firetitan.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

DTypeName: TypeAlias = Literal["float32", "bfloat16"]

DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE: DTypeName = "float32"

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$")
_VALID_DEVICES = "auto, cpu, cuda, cuda:<index> or mps"


def check_device(value: Any, field: str = "device") -> str:
    """`value` if it is a device setting (`auto|cpu|cuda[:i]|mps`), else `InvalidRequestError` naming `field`."""
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip().lower()):
        raise InvalidRequestError(f"{field}: {str(value)[:60]!r} is not a device; use one of {_VALID_DEVICES}",
                                  field=field)
    return value.strip().lower()


def check_dtype(value: Any, field: str = "dtype") -> DTypeName:
    """`value` if it is a dtype setting (`float32|bfloat16`, `fp32`/`bf16` accepted), else an error naming `field`."""
    name = str(value).strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(name or "", name)
    if name not in DTYPES:
        raise InvalidRequestError(f"{field}: {str(value)[:60]!r} is not a supported dtype; use one of "
                                  f"{', '.join(DTYPES)}", field=field)
    return name  # type: ignore[return-value]


# Pydantic field types for request bodies and configs: a bad value is a 400 naming the field.
DeviceSetting = Annotated[str, AfterValidator(check_device)]
DTypeSetting = Annotated[str, AfterValidator(check_dtype)]


def resolve_device(value: str = DEFAULT_DEVICE, field: str = "device") -> str:
    """The concrete device a setting names: `auto` is cuda when present, else mps when present, else cpu.

    An explicit `cuda[:i]` or `mps` on a machine without it is an error here, at startup, rather than a
    crash at the first tensor.
    """
    import torch

    device = check_device(value, field)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= count:
            raise InvalidRequestError(f"{field}: {device!r} is not available here ({count} CUDA device(s)); "
                                      "use device 'auto' or 'cpu'", field=field)
    if device == "mps" and not _mps_available():
        raise InvalidRequestError(f"{field}: 'mps' is not available on this machine; use 'auto' or 'cpu'",
                                  field=field)
    return device


def torch_dtype(value: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a dtype setting."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[check_dtype(value, field)]


def device_type(device: str) -> str:
    """`cuda:1` -> `cuda`: what `torch.autocast` takes."""
    return device.split(":", 1)[0]


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def dtype_works(device: str, dtype: str) -> tuple[bool, str]:
    """Whether a matmul and its backward run in `dtype` on `device` (what `firetitan doctor` reports)."""
    import torch

    try:
        a = torch.randn(8, 8, device=device, dtype=torch_dtype(dtype), requires_grad=True)
        (a @ a).float().sum().backward()
        with torch.autocast(device_type(device), dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            torch.nn.functional.linear(torch.randn(2, 8, device=device), torch.randn(4, 8, device=device))
    except Exception as exc:  # any failure is the answer: this dtype does not work here
        return False, f"{type(exc).__name__}: {str(exc)[:120]}"
    return True, "ok"


def doctor_report() -> dict[str, Any]:
    """What `auto` resolves to on this machine and which dtypes work on it."""
    import torch

    device = resolve_device("auto")
    return {"torch": torch.__version__, "auto_device": device,
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "cuda_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            "mps": _mps_available(),
            "dtypes": {d: dtype_works(device, d)[1] for d in DTYPES}}
