"""Per-attempt server telemetry (`ServerMetrics`) parsed from `fireworks-*` headers and SSE `perf_metrics`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Wire key -> dataclass field. Keys match case-insensitively, with or without a `fireworks-` prefix,
# and with `_` in place of `-` (some servers normalise header names that way).
_FLOAT_KEYS = {
    "prefill-queue-duration": "prefill_queue_duration",
    "generation-queue-duration": "generation_queue_duration",
    "server-time-to-first-token": "server_ttft",
    "server-processing-time": "server_processing_time",
    "tokenizer-queue-duration": "tokenizer_queue_duration",
    "tokenizer-duration": "tokenizer_duration",
    "prefill-duration": "prefill_duration",
    "generation-duration": "generation_duration",
}
_INT_KEYS = {
    "num-concurrent-requests": "num_concurrent_requests",
    "prompt-tokens": "prompt_tokens",
    "cached-prompt-tokens": "cached_prompt_tokens",
}
_STR_KEYS = {
    "backend-host": "backend_host",
    "deployment": "deployment",
    "x-request-id": "response_request_id",
    "pod-template-hash": "pod_template_hash",
}


@dataclasses.dataclass
class ServerMetrics:
    """What one sampling attempt told us about the server, plus what the client measured.

    Durations are seconds in the server's clock (for the simulated deployment: model seconds).
    """

    # The hosted SDK's fields, in its order (so positional construction means the same thing).
    num_concurrent_requests: int | None = None
    prefill_queue_duration: float | None = None
    generation_queue_duration: float | None = None
    server_ttft: float | None = None
    cached_prompt_tokens: int | None = None
    prompt_tokens: int | None = None
    server_processing_time: float | None = None
    tokenizer_queue_duration: float | None = None
    tokenizer_duration: float | None = None
    prefill_duration: float | None = None
    generation_duration: float | None = None
    client_ttft: float | None = None
    client_latency: float | None = None
    completion_tokens: int | None = None
    http_status_code: int | None = None
    transport_error: bool = False
    retry_attempt: int | None = None
    error: str | None = None
    response_request_id: str | None = None  # the server's `x-request-id` echo
    backend_host: str | None = None
    deployment: str | None = None
    pod_template_hash: str | None = None
    # firetitan's extras
    _: dataclasses.KW_ONLY
    request_id: str | None = None  # the logical request id this client sent (shared by its retries)
    start_time: float | None = None  # time.monotonic() when the attempt began

    @staticmethod
    def from_headers(headers: Mapping[str, object], client_ttft: float | None = None,
                     http_status_code: int | None = None, retry_attempt: int | None = None,
                     client_latency: float | None = None, completion_tokens: int | None = None) -> ServerMetrics:
        """The metrics in response headers alone (the official SDK's constructor of this type)."""
        return parse_server_metrics({str(k): str(v) for k, v in headers.items()}, None, client_ttft=client_ttft,
                                    http_status_code=http_status_code, retry_attempt=retry_attempt,
                                    client_latency=client_latency, completion_tokens=completion_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _normalise(key: str) -> str:
    k = key.strip().lower().replace("_", "-")
    return k[len("fireworks-"):] if k.startswith("fireworks-") else k


def parse_server_metrics(headers: Mapping[str, str] | None = None,
                         perf_metrics: Mapping[str, Any] | None = None,
                         **client_fields: Any) -> ServerMetrics:
    """Merge response headers with the final chunk's `perf_metrics` (the latter wins).

    Unparseable values are skipped rather than raised: telemetry must never fail a completion.
    """
    merged: dict[str, Any] = {}
    for source in (headers or {}, perf_metrics or {}):
        for key, value in source.items():
            merged[_normalise(str(key))] = value
    out = ServerMetrics(**client_fields)
    for table, conv in ((_FLOAT_KEYS, float), (_INT_KEYS, _to_int), (_STR_KEYS, str)):
        for wire, field in table.items():
            if wire in merged and merged[wire] is not None:
                try:
                    setattr(out, field, conv(merged[wire]))
                except (TypeError, ValueError):
                    continue
    return out


def _to_int(value: Any) -> int:
    return int(float(value))
