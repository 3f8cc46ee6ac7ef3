"""The training client's wire: user inputs into request bodies, answers into result types, errors into typed ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from firetitan.errors import ConflictError, InvalidRequestError, WorkerCrashedError
from firetitan.types import Datum, GetInfoResponse, SaveWeightsForSamplerResponse, coerce_datum


class TrainerInfo(GetInfoResponse):
    """`get_info()` result: Tinker's fields plus the trainer's counters."""

    lora_alpha: float | None = None
    num_params: int | None = None
    num_trainable_params: int | None = None
    step: int = 0
    policy_version: int = 0
    forward_only: bool = False
    vocab_size: int | None = None
    last_base_snapshot: str | None = None
    # Set when a restarted trainer restored the job's latest saved train state: the step it resumed
    # from, and how many steps past it were lost with the crash.
    restored_from_step: int | None = None
    steps_lost: int | None = None


class SamplerSnapshot(SaveWeightsForSamplerResponse):
    """`save_weights_for_sampler()` result; `path` is the public snapshot identity."""

    type: str = "save_weights_for_sampler"
    checkpoint_type: str | None = None
    previous_snapshot_identity: str | None = None
    size_bytes: int | None = None
    full_size_bytes: int | None = None
    checksum: str | None = None
    step: int | None = None
    policy_version: int | None = None


def invalid(exc: pydantic.ValidationError, prefix: str) -> InvalidRequestError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    field = f"{prefix}.{loc}" if loc else prefix
    return InvalidRequestError(f"{field}: {first.get('msg', exc)}", field=field)


def wire_data(data: Sequence[Any]) -> tuple[list[Datum], list[dict[str, Any]]]:
    datums: list[Datum] = []
    for i, d in enumerate(data):
        try:
            datums.append(coerce_datum(d))
        except pydantic.ValidationError as exc:
            raise invalid(exc, f"data[{i}]") from None
    return datums, [d.to_wire(compact=True) for d in datums]


def loss_config(config: Mapping[str, float | str] | None) -> dict[str, float | str] | None:
    return None if config is None else dict(config)


def worker_crashed(exc: ConflictError) -> WorkerCrashedError | None:
    """The control plane's gateway answers 409 on `rlorTrainerJobId` when the job is no longer
    running: the trainer died (mid-call or before it). Callers must tell that from a state conflict
    (a snapshot chain, a name taken), so it becomes `WorkerCrashedError`."""
    if exc.field == "rlorTrainerJobId" and type(exc) is ConflictError:
        return WorkerCrashedError(exc.message, field=exc.field, status_code=exc.status_code, body=exc.body)
    return None
