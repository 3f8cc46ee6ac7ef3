"""PNG plots of sampling benchmark results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: dict[str, Any], path: str | Path) -> Path:
    """Window and in-flight over time, plus per-step throughput, for one run."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6))
    series = result.get("window_series") or []
    ax1.plot([s["t"] for s in series], [s["window"] for s in series], label="window")
    ax1.plot([s["t"] for s in series], [s["in_flight"] for s in series], label="in flight", alpha=0.6)
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel("requests")
    ax1.set_title(f"{result.get('label') or result.get('controller')}: concurrency")
    ax1.legend()
    steps = result.get("steps") or []
    ax2.bar([s["step"] for s in steps], [s["output_tokens_per_s"] for s in steps])
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("output tokens/s (wall)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_comparison(results: list[dict[str, Any]], path: str | Path, *, throughput_key: str = "output_tokens_per_s",
                    title: str = "controllers", time_label: str = "wall time (s)") -> Path:
    """Bar chart of throughput and prefill-queue p95 per controller, and each run's window over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = [r.get("label") or r.get("controller", "?") for r in results]
    axes[0].bar(labels, [r.get(throughput_key) or 0.0 for r in results])
    axes[0].set_ylabel(throughput_key.replace("_", " "))
    axes[0].set_title(f"{title}: throughput")
    axes[1].bar(labels, [(r.get("prefill_queue_s") or {}).get("p95") or 0.0 for r in results])
    axes[1].set_ylabel("prefill queue p95 (s)")
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[1].set_title("prefill queue p95")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=60)
    for r, label in zip(results, labels, strict=True):
        series = r.get("window_series") or []
        if series and not label.startswith("fixed"):
            axes[2].plot([s["t"] for s in series], [s["window"] for s in series], label=label)
    axes[2].set_xlabel(time_label)
    axes[2].set_ylabel("window")
    axes[2].set_title("adaptive windows over time")
    if axes[2].lines:
        axes[2].legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
