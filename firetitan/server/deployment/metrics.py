"""Prometheus text exposition of the engine's gauges, counters and the prefill-queue histogram."""

from __future__ import annotations

from firetitan.server.deployment.backend import EngineBackend
from firetitan.server.deployment.engine import PREFILL_QUEUE_BUCKETS


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(engine: EngineBackend, deployment_id: str, current_identity: str | None) -> str:
    stats = engine.stats
    label = f'deployment="{_esc(deployment_id)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{{{label}{labels}}} {value}")

    metric("firetitan_requests_waiting", "gauge", "Requests queued for admission.", [("", engine.num_waiting)])
    metric("firetitan_requests_running", "gauge", "Requests in the decode batch.", [("", engine.num_running)])
    metric("firetitan_kv_cache_used_tokens", "gauge", "KV cache positions held by running requests.",
           [("", engine.cached_tokens)])
    metric("firetitan_kv_cache_reserved_tokens", "gauge", "Worst-case tokens reserved by admitted requests.",
           [("", engine.reserved_tokens)])
    metric("firetitan_kv_cache_capacity_tokens", "gauge", "Admission budget of cached tokens.",
           [("", engine.max_cached_tokens)])
    metric("firetitan_generation_tokens_per_second", "gauge", "Output tokens per second over the last 10 s.",
           [("", round(stats.tokens_per_second(), 3))])
    metric("firetitan_generation_tokens_total", "counter", "Output tokens generated.",
           [("", stats.generated_tokens)])
    metric("firetitan_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prompt_tokens)])
    metric("firetitan_prompt_tokens_cached_total", "counter", "Prompt tokens served from a shared prompt.",
           [("", stats.cached_prompt_tokens)])
    metric("firetitan_engine_steps_total", "counter", "Engine iterations run.", [("", stats.steps)])
    metric("firetitan_requests_finished_total", "counter", "Requests that left the engine, by reason.",
           [(f',reason="{_esc(k)}"', v) for k, v in sorted(stats.finished.items())])
    name = "firetitan_prefill_queue_duration_seconds"
    lines.append(f"# HELP {name} Arrival to start of prefill.")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, count in zip((*PREFILL_QUEUE_BUCKETS, float("inf")), stats.prefill_queue_counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{{label},le="{le}"}} {cumulative}')
    lines.append(f"{name}_sum{{{label}}} {stats.prefill_queue_sum}")
    lines.append(f"{name}_count{{{label}}} {stats.prefill_queue_count}")
    metric("firetitan_hot_load_swaps_total", "counter", "Weight swaps applied.", [("", stats.swaps)])
    metric("firetitan_hot_load_last_swap_seconds", "gauge", "Engine pause of the last swap.",
           [("", round(stats.last_swap_seconds, 6))])
    metric("firetitan_hot_load_info", "gauge", "The served policy version (snapshot identity).",
           [(f',policy_version="{_esc(engine.policy_version)}",identity="{_esc(current_identity or "")}"', 1)])
    return "\n".join(lines) + "\n"
