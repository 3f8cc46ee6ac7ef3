"""Secrets never reach output: env dumps, log lines (through the real logging pipeline), error text."""

from __future__ import annotations

import io

import pytest

from firetitan.logging import configure_logging, get_logger
from firetitan.redaction import redact_env, redact_event, redact_text

KEY = "ft-abcdefghijklmnopqrstuvwxyz012345"


def test_env_dump_masks_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_WORKER_API_KEY", KEY)
    out = redact_env({"FIRETITAN_API_KEY": KEY, "FIRETITAN_HOME": "/tmp/h", "HF_TOKEN": "hf_x",
                      "FIRETITAN_URL": f"http://u:{KEY}@h"})
    assert out["FIRETITAN_HOME"] == "/tmp/h"
    assert KEY not in str(out) and "hf_x" not in str(out)
    assert out["FIRETITAN_API_KEY"] == f"<redacted, {len(KEY)} chars>"


def test_text_masks_bearer_tokens_and_known_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_API_KEY", KEY)
    assert redact_text(f"Authorization: Bearer {KEY}") == "Authorization: Bearer <redacted>"
    assert KEY not in redact_text(f"cmd --api-key {KEY} --port 1")
    assert redact_text("a short key like abc stays") == "a short key like abc stays"


def test_log_events_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_WORKER_API_KEY", KEY)
    event = redact_event(None, "info", {"event": "spawn", "api_key": KEY, "args": f"--api-key {KEY}", "n": 3})
    assert KEY not in str(event) and event["n"] == 3


def test_doctor_and_logger_print_no_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The real `firetitan doctor` and logger (hooked up in firetitan/cli.py and firetitan/logging.py)."""
    from firetitan.cli import main

    monkeypatch.setenv("FIRETITAN_WORKER_API_KEY", KEY)
    main(["doctor"])
    out = capsys.readouterr().out
    assert "FIRETITAN_WORKER_API_KEY" in out and KEY not in out
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger("firetitan.test").info("worker_started", api_key=KEY, cmd=f"x --api-key {KEY}")
    assert "worker_started" in stream.getvalue() and KEY not in stream.getvalue()
