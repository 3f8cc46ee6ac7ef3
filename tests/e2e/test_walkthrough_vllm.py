"""The seed walkthrough served by vLLM learns as it does on the embedded engine (issue 17).

The example trains nano-qwen3 with the same seed twice: once behind the embedded engine, once behind a
`engine: vllm` deployment. The trainer is the same deterministic process both times, and every eval is
greedy, so the two eval curves may differ only where float differences between the engines flip an
argmax: at most one of the 25 letters per eval. Runs where the vLLM environment exists (`make vllm-env`,
which `make test` builds).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from process_scan import live_pids
from vllm_env import needs_vllm

Home = Any  # the `home` fixture (tests/e2e/conftest.py)
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "training_and_sampling.py")
# 40 steps take nano-qwen3 from 0 to 1.0 on the embedded engine (0, 0.04, 0.32, 0.84, 1.0 when measured).
ARGS = ["--base-model", "firetitan/nano-qwen3", "--steps", "40", "--eval-interval", "10", "--target-score", "2"]
ONE_LETTER = 1 / 25


def _eval_scores(home: Home, *extra: str) -> list[float]:
    proc = subprocess.run([sys.executable, EXAMPLE, *ARGS, *extra], env=home.env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [float(x) for x in re.findall(r"'eval_score': ([0-9.]+)", proc.stdout)]


@pytest.mark.slow
@needs_vllm
def test_walkthrough_on_vllm_learns_as_on_the_embedded_engine(home: Home) -> None:
    engine_cores_before = set(live_pids(_vllm_engine_core))
    embedded = _eval_scores(home, "--deployment-id", "walk-embedded")
    served_by_vllm = _eval_scores(home, "--deployment-id", "walk-vllm", "--deployment-engine", "vllm")

    assert len(embedded) == len(served_by_vllm) == 5, (embedded, served_by_vllm)
    assert embedded[0] <= ONE_LETTER and embedded[-1] >= 0.8, embedded  # it learned
    for step, (a, b) in enumerate(zip(embedded, served_by_vllm, strict=True)):
        assert abs(a - b) <= ONE_LETTER + 1e-9, f"eval {step}: embedded {a} vs vLLM {b}"

    call = home.http()
    status, dep = call("GET", "/v1/accounts/local/deployments/walk-vllm")
    assert status == 200 and dep["engine"] == "vllm" and dep["replicaCount"] == 0  # scaled to zero on close
    # No worker, no `vllm serve` child and no vLLM engine-core process outlives the example's close().
    assert home.worker_pids() == []
    assert live_pids(lambda cmd: " serve " in cmd and str(home.root) in cmd) == []
    assert set(live_pids(_vllm_engine_core)) <= engine_cores_before


def _vllm_engine_core(cmd: str) -> bool:
    return "EngineCore" in cmd  # vLLM names its engine-core process VLLM::EngineCore
