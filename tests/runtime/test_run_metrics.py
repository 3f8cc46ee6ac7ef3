"""Run metrics: JSONL records, eval prompt-set files + sha256, resume truncation, idle ratios, the plot."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from firetitan.runtime.run_metrics import BusyTracker, RunMetrics, StalenessHistogram


def test_eval_records_prompt_file_and_snapshot(tmp_path: Path) -> None:
    m = RunMetrics(tmp_path, run_name="t")
    prompts = [{"prompt": "Q: 1 + 1?"}, {"prompt": "Q: 2 + 2?"}]
    rec = m.record_eval(3, prompts, "snap-3-abc", {"eval_reward": 0.5})
    data = Path(rec["prompt_file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == rec["prompt_sha256"]
    assert json.loads(data) == prompts and rec["snapshot_identity"] == "snap-3-abc"
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "eval" and lines[-1]["eval_reward"] == 0.5


def test_resume_truncates_steps_after_checkpoint(tmp_path: Path) -> None:
    m = RunMetrics(tmp_path)
    for s in range(1, 7):
        m.log_step(s, reward=float(s), step_time_s=0.1)
    m.close()
    m2 = RunMetrics(tmp_path, resume_step=4)
    m2.log_step(5, reward=50.0, step_time_s=0.1)
    m2.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_busy_tracker_idle_ratio() -> None:
    b = BusyTracker()
    b.enter()
    b.enter()
    time.sleep(0.05)
    b.exit()
    b.exit()
    time.sleep(0.05)
    b.stop()
    assert 0.3 < b.idle_ratio() < 0.7
    assert b.active == 0


def test_staleness_histogram_and_plot(tmp_path: Path) -> None:
    h = StalenessHistogram()
    h.add(0, 3)
    h.add(1)
    h.dropped += 2
    assert h.summary() == {"histogram": {"0": 3, "1": 1}, "max": 1, "mean": 0.25, "dropped": 2}
    m = RunMetrics(tmp_path)
    for s in range(1, 4):
        m.log_step(s, reward=s / 3, step_time_s=0.2)
    m.record_eval(3, ["p"], "snap", {"eval_reward": 1.0})
    png = m.plot()
    assert png.read_bytes()[:4] == b"\x89PNG"
    m.close()
