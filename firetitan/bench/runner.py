"""Helpers shared by the bench CLI and scripts: controller specs and a simulated deployment in a subprocess."""

from __future__ import annotations

from firetitan.bench.simulated_deployment import SimConfig
from firetitan.client.concurrency import (
    AdaptiveConcurrencyController,
    ConcurrencyController,
    FixedConcurrencyController,
)
from firetitan.errors import ConfigError
from firetitan.process import WorkerProcess, spawn_worker

SIM_MODULE = "firetitan.bench.simulated_deployment"


def make_controller(spec: str, *, prefill_queue_target: float = 0.5) -> ConcurrencyController:
    """`fixed:N`, `adaptive` or `adaptive:INITIAL` (same target for all adaptive ones)."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "fixed":
            return FixedConcurrencyController(int(arg))
        if kind == "adaptive":
            return AdaptiveConcurrencyController(initial_window=int(arg or 8),
                                                 prefill_queue_target=prefill_queue_target)
    except ValueError as exc:
        raise ConfigError(f"bad controller spec {spec!r}: {exc}", field="controller") from exc
    raise ConfigError(f"controller must be fixed:N, adaptive or adaptive:INITIAL, got {spec!r}", field="controller")


def start_simulation(config: SimConfig, *, ready_timeout: float = 60.0) -> WorkerProcess:
    """A `SimulatedDeployment` in its own process (so its CPU does not compete with the client's GIL)."""
    return spawn_worker(SIM_MODULE, ["--config-json", config.model_dump_json()], ready_timeout=ready_timeout)
