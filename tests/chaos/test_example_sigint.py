"""Chaos: SIGINT of examples/training_and_sampling.py at provisioning, at training and at sampling."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_home import ACCT, ChaosHome, wait_until

from firetitan.server.control_plane.home import read_api_key

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "training_and_sampling.py")
NO_WORKER_AFTER_S = 10.0  # from the SIGINT: the example closes its service and the daemon stops both workers


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _replica_metrics(home: ChaosHome, dep_id: str) -> str | None:
    status, dep = home.http()("GET", f"{ACCT}/deployments/{dep_id}")
    replicas = dep.get("replicas") or [] if status == 200 else []
    if not replicas or not replicas[0].get("url"):
        return None
    import urllib.request

    req = urllib.request.Request(replicas[0]["url"] + "/metrics",
                                 headers={"Authorization": f"Bearer {read_api_key(home.layout)}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read().decode()


def _at_provisioning(home: ChaosHome, out: Path, dep_id: str) -> Callable[[], bool]:
    # A worker process exists, and the example has not printed that it is ready.
    return lambda: bool(home.worker_pids()) and "ready after" not in out.read_text()


def _at_training(home: ChaosHome, out: Path, dep_id: str) -> Callable[[], bool]:
    # The step-0 eval is printed; the next eval is 1,000 steps away: only training runs now.
    seen: list[float] = []

    def ready() -> bool:
        if "'eval_score'" in out.read_text():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 1.0
    return ready


def _at_sampling(home: ChaosHome, out: Path, dep_id: str) -> Callable[[], bool]:
    # The replica has admitted a prompt of the step-0 eval (its first requests ever) and has not
    # finished all 25: the example is inside `sample_with_tokens`.
    def ready() -> bool:
        if "'trainer_job_id'" not in out.read_text():
            return False
        text = _replica_metrics(home, dep_id)
        return text is not None and _metric(text, "firetitan_prompt_tokens_total") > 0 \
            and _metric(text, "firetitan_requests_finished_total") < 25
    return ready


PHASES = {"provisioning": _at_provisioning, "training": _at_training, "sampling": _at_sampling}


def _sigint_by_default() -> None:
    # A process started with SIGINT ignored (anything run with `&` from a non-interactive shell, such as
    # a backgrounded `make test`) hands that on, and Python then keeps ignoring it: give the example the
    # default disposition, so Python installs its KeyboardInterrupt handler as under a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(home: ChaosHome, tmp_path: Path, phase: str) -> float:
    """Run the example, SIGINT it at `phase`; return the seconds until no worker of the home was left."""
    dep_id = f"sigint-{phase}"
    out = tmp_path / f"{phase}.out"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, EXAMPLE, "--base-model", "firetitan/nano-qwen3",
                                 "--steps", "100000", "--eval-interval", "1000", "--deployment-id", dep_id],
                                env=home.env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_sigint_by_default)
        try:
            reached = PHASES[phase](home, out, dep_id)
            assert wait_until(lambda: proc.poll() is None and reached(), 240, step=0.02), \
                f"{phase}: never reached (exit {proc.poll()}): {out.read_text()[-3000:]}"
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            # Workers are watched from the signal on, whether or not the example has exited yet.
            assert wait_until(lambda: home.worker_pids() == [], 120, step=0.05), \
                f"{phase}: workers {home.worker_pids()} still running, example exit code {proc.poll()} (None: still " \
                f"running, so the SIGINT was not acted on): {out.read_text()[-3000:]}"
            gone_after = time.monotonic() - sent
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = out.read_text()
    assert proc.returncode != 0, text[-3000:]
    if phase == "sampling":
        assert "'eval_score'" not in text, "the eval finished before the SIGINT: not at sampling"
    if phase == "provisioning":
        assert "ready after" not in text, "provisioning was over before the SIGINT"
    return gone_after


@pytest.mark.slow
def test_sigint_of_the_example_at_each_phase_leaves_no_worker(home: ChaosHome, tmp_path: Path) -> None:
    # One home for all three: the daemon starts once, as it would for a user's successive runs.
    timings = {phase: _interrupt(home, tmp_path, phase) for phase in PHASES}
    print(f"\nchaos SIGINT: seconds from SIGINT until no worker was left: {timings}")
    assert home.control_plane_pids(), "the daemon itself stays for the next run"
    late = {phase: t for phase, t in timings.items() if t > NO_WORKER_AFTER_S}
    assert not late, f"workers outlived the SIGINT by more than {NO_WORKER_AFTER_S}s: {late}"
