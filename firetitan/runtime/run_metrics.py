"""Run metrics: step timings, idle ratios, staleness histogram and evals, as structlog + JSONL + a PNG."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # the package-wide logger when present; plain structlog otherwise
    from firetitan.logging import get_logger
except ImportError:  # pragma: no cover - depends on another module landing
    import structlog

    get_logger = structlog.get_logger

log = get_logger("firetitan.runtime")


class BusyTracker:
    """Wall time during which at least one unit of work was in flight, vs idle time since `start`.

    The trainer's tracker counts submitted-but-unfinished trainer calls; the sampler's counts
    rollouts in progress. idle_ratio = 1 - busy / wall.
    """

    def __init__(self) -> None:
        # enter/exit may come from the SDK's background thread (future done-callbacks)
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self._active = 0
        self._since: float | None = None
        self._busy = 0.0
        self.stopped: float | None = None

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = time.monotonic()
            self._active += 1

    def exit(self) -> None:
        with self._lock:
            if self._active <= 0:
                raise RuntimeError("BusyTracker.exit without a matching enter")
            self._active -= 1
            if self._active == 0 and self._since is not None:
                self._busy += time.monotonic() - self._since
                self._since = None

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()

    @property
    def active(self) -> int:
        return self._active

    def busy_seconds(self, now: float | None = None) -> float:
        now = now if now is not None else (self.stopped or time.monotonic())
        extra = now - self._since if self._since is not None else 0.0
        return self._busy + extra

    def idle_ratio(self, now: float | None = None) -> float:
        now = now if now is not None else (self.stopped or time.monotonic())
        wall = now - self.started
        if wall <= 0:
            return 0.0
        return max(0.0, min(1.0, 1.0 - self.busy_seconds(now) / wall))

    def stop(self) -> None:
        self.stopped = time.monotonic()


class StalenessHistogram:
    """Counts of trained samples per staleness (steps off-policy), plus drops of stale ones."""

    def __init__(self) -> None:
        self.trained: Counter[int] = Counter()
        self.dropped = 0

    def add(self, staleness: int, n: int = 1) -> None:
        self.trained[staleness] += n

    def summary(self) -> dict[str, Any]:
        total = sum(self.trained.values())
        mean = sum(k * v for k, v in self.trained.items()) / total if total else 0.0
        return {"histogram": {str(k): v for k, v in sorted(self.trained.items())},
                "max": max(self.trained) if self.trained else 0, "mean": mean, "dropped": self.dropped}


def prompt_set_digest(prompts: Sequence[Any]) -> tuple[str, bytes]:
    """sha256 of the canonical JSON of an eval prompt set, and those bytes."""
    payload = json.dumps(list(prompts), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest(), payload


class RunMetrics:
    """One run's metrics: every event goes to structlog and appends one JSON line to `metrics.jsonl`."""

    def __init__(self, run_dir: Path, *, run_name: str = "run", resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_name = run_name
        self.trainer = BusyTracker()
        self.sampler = BusyTracker()
        self.staleness = StalenessHistogram()
        self.started = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        # A resumed run rewrites the steps after its checkpoint; keeping both would double-count them.
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") is None or rec["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, event: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        rec = {"event": event, "run": self.run_name, "step": step, "t": round(time.monotonic() - self.started, 4),
               **fields}
        log.info(event, **{k: v for k, v in rec.items() if k != "event"})
        if not self._fh.closed:
            self._fh.write(json.dumps(rec, default=_jsonable) + "\n")
            self._fh.flush()
        return rec

    def log_step(self, step: int, **fields: Any) -> dict[str, Any]:
        rec = self.log("train_step", step, **fields,
                       trainer_idle_ratio=round(self.trainer.idle_ratio(), 4),
                       sampler_idle_ratio=round(self.sampler.idle_ratio(), 4))
        self.steps.append(rec)
        return rec

    def record_eval(self, step: int, prompts: Sequence[Any], snapshot_identity: str | None,
                    results: dict[str, Any]) -> dict[str, Any]:
        """Log an evaluation with the exact prompt set (a file named by its sha256) and the snapshot."""
        digest, payload = prompt_set_digest(prompts)
        prompt_file = self.run_dir / "evals" / f"prompts-{digest[:16]}.json"
        if not prompt_file.exists():
            prompt_file.parent.mkdir(parents=True, exist_ok=True)
            prompt_file.write_bytes(payload)
        rec = self.log("eval", step, snapshot_identity=snapshot_identity, prompt_file=str(prompt_file),
                       prompt_sha256=digest, num_prompts=len(prompts), **results)
        self.evals.append(rec)
        return rec

    def log_controller(self, step: int, summary: dict[str, Any] | None) -> None:
        if summary:
            self.log("controller_window", step, **summary)

    def summary(self) -> dict[str, Any]:
        self.trainer.stop()
        self.sampler.stop()
        wall = time.monotonic() - self.started
        step_times = [s["step_time_s"] for s in self.steps if "step_time_s" in s]
        return {"wall_s": wall, "steps": len(self.steps),
                "mean_step_time_s": sum(step_times) / len(step_times) if step_times else None,
                "trainer_idle_ratio": self.trainer.idle_ratio(), "sampler_idle_ratio": self.sampler.idle_ratio(),
                "staleness": self.staleness.summary()}

    def plot(self, path: Path | None = None) -> Path:
        """A PNG of reward (or loss) and step time per step, plus eval points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path) if path else self.run_dir / "metrics.png"
        steps = [s["step"] for s in self.steps]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for key in ("reward", "loss"):
            ys = [s.get(key) for s in self.steps]
            if any(y is not None for y in ys):
                ax1.plot(steps, [y if y is not None else float("nan") for y in ys], label=f"train {key}")
        for key in sorted({k for e in self.evals for k in e if k.startswith("eval_")}):
            ax1.plot([e["step"] for e in self.evals], [e.get(key, float("nan")) for e in self.evals], "o-", label=key)
        ax1.legend(loc="best")
        ax1.set_ylabel("metric")
        ax2.plot(steps, [s.get("step_time_s", float("nan")) for s in self.steps], label="step time (s)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("seconds")
        ax2.legend(loc="best")
        fig.suptitle(self.run_name)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    def try_plot(self) -> str | None:
        """`plot`, but a plotting failure is logged instead of masking how the run ended."""
        try:
            return str(self.plot())
        except Exception as exc:
            log.warning("plot_failed", error=repr(exc))
            return None

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, Path):
        return str(value)
    return repr(value)
