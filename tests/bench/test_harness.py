"""The sampling benchmark harness, the discrete-event runner, the hosted baseline and `firetitan bench sample`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from firetitan.bench.des import run_des
from firetitan.bench.harness import BenchOptions, run_benchmark
from firetitan.bench.load import RLLoad, step_groups
from firetitan.bench.plot import plot_comparison, plot_run
from firetitan.bench.simulated_deployment import InProcessSimulation, SimConfig
from firetitan.client.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
from firetitan.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.baselines.hosted_aimd import HostedAIMDController, hosted_next_window

SMALL = RLLoad(steps=2, groups=4, samples_per_group=3, prompt_len_min=4, prompt_len_max=12, max_tokens_median=6,
               max_tokens_max=20)


def test_load_is_rl_shaped_and_deterministic() -> None:
    groups = step_groups(SMALL, 0)
    assert len(groups) == 4 and all(len(g.max_tokens) == 3 for g in groups)
    assert step_groups(SMALL, 0) == groups and step_groups(SMALL, 1) != groups
    long = RLLoad(groups=200, samples_per_group=8, max_tokens_median=64, max_tokens_max=4096)
    lengths = sorted(mt for g in step_groups(long, 0) for mt in g.max_tokens)
    assert lengths[len(lengths) // 2] < 100 < lengths[-1] / 2  # a long tail above the median
    with pytest.raises(ConfigError):
        RLLoad(groups=0)


async def test_harness_reports_and_plots(tmp_path: Path) -> None:
    async with InProcessSimulation(SimConfig(capacity=4, time_scale=0.001)) as sim:
        result = await run_benchmark(BenchOptions(sim.url, progress=False, label="fixed-4"), SMALL,
                                     FixedConcurrencyController(4))
    assert result["requests"] == 24 and result["failed_requests"] == 0
    assert result["output_tokens"] == sum(mt for s in range(2) for g in step_groups(SMALL, s) for mt in g.max_tokens)
    assert result["simulation"] is True and result["output_tokens_per_sim_s"] > 0
    assert result["prefill_queue_s"]["p95"] is not None and len(result["steps"]) == 2
    assert all(p["window"] == 4 and p["in_flight"] <= 4 for p in result["window_series"])
    json.dumps(result)
    png = plot_run(result, tmp_path / "run.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    png2 = plot_comparison([result, {**result, "label": "adaptive"}], tmp_path / "cmp.png")
    assert png2.stat().st_size > 0


def test_hosted_rule_matches_its_documented_arithmetic() -> None:
    # Queue near zero: +1 x min(0.5/0.001, 4) = +4.
    assert hosted_next_window(8.0, None, [0.0, 0.0]) == (12.0, 0.0)
    # EMA 0.3*0.25 + 0.7*0.25 = 0.25 -> headroom 2 -> +2.
    assert hosted_next_window(10.0, 0.25, [0.25]) == (12.0, pytest.approx(0.25))
    # Over target: halve.
    w, ema = hosted_next_window(10.0, 0.5, [2.0])
    assert w == 5.0 and ema == pytest.approx(0.3 * 2.0 + 0.7 * 0.5)
    assert hosted_next_window(1.0, 5.0, [5.0])[0] == 1.0  # clamped at min
    assert hosted_next_window(7.0, 0.1, []) == (7.0, 0.1)  # no samples: unchanged


async def test_adaptive_settles_near_capacity_and_beats_the_hosted_rule() -> None:
    config = SimConfig(capacity=32)
    load = RLLoad(steps=4, groups=64, samples_per_group=8, max_tokens_median=64, max_tokens_max=256)
    adaptive = await run_des(config, load, AdaptiveConcurrencyController(initial_window=8))
    hosted = await run_des(config, load, HostedAIMDController(initial_window=8))
    best = await run_des(config, load, FixedConcurrencyController(32))
    final = adaptive["steps"][-1]["controller"]
    assert 24 <= final["window"] <= 48
    assert adaptive["prefill_queue_s"]["p95"] <= 0.5
    assert adaptive["output_tokens_per_sim_s"] >= 0.8 * best["output_tokens_per_sim_s"]
    assert adaptive["output_tokens_per_sim_s"] > hosted["output_tokens_per_sim_s"]


def test_bench_sample_cli_writes_json_and_png(tmp_path: Path) -> None:
    from firetitan.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "sample", "--sim", "--capacity", "4", "--time-scale", "0.002", "--steps", "1",
                 "--groups", "3", "--samples", "2", "--max-tokens-median", "4", "--max-tokens-max", "8",
                 "--prompt-len-min", "4", "--prompt-len-max", "16", "--controller", "fixed:2", "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 6 and result["simulation"] is True
    assert out.with_suffix(".png").exists()
