"""Logging: console vs JSON lines, levels from arguments and environment, idempotent setup."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from firetitan.logging import configure_logging, get_logger


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    yield buf
    configure_logging("info", "console", stream=sys.stderr)  # leave the default behind


def lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_bound_context(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    log = get_logger("firetitan.test", job_id="job-1")
    log.info("step_done", step=3, loss=0.5)
    (line,) = lines(stream)
    event = json.loads(line)
    assert event["event"] == "step_done" and event["level"] == "info"
    assert event["job_id"] == "job-1" and event["step"] == 3 and event["loss"] == 0.5
    assert event["logger"] == "firetitan.test" and event["timestamp"].endswith("Z")


def test_console_output_is_readable_and_plain_when_not_a_tty(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream=stream)
    get_logger("firetitan.test").warning("disk_low", free_gb=2)
    (line,) = lines(stream)
    assert "disk_low" in line and "free_gb=2" in line and "warning" in line
    assert "\x1b[" not in line  # no colour codes into a file or pipe
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_level_filters(stream: io.StringIO) -> None:
    configure_logging("warning", "json", stream=stream)
    log = get_logger("firetitan.test")
    log.info("hidden")
    log.debug("hidden")
    log.error("shown")
    assert [json.loads(line)["event"] for line in lines(stream)] == ["shown"]
    configure_logging("debug", "json", stream=stream)
    log.debug("now_shown")
    assert json.loads(lines(stream)[-1])["event"] == "now_shown"


def test_configure_is_idempotent(stream: io.StringIO) -> None:
    for _ in range(3):
        configure_logging("info", "json", stream=stream)
    get_logger("firetitan.test").info("once")
    assert len(lines(stream)) == 1


def test_exceptions_in_json_have_type_and_no_locals(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    secret = "ft-SECRET-KEY"  # a local that must not be logged
    try:
        raise KeyError(secret[:2])
    except KeyError:
        get_logger("firetitan.test").exception("failed")
    event = json.loads(lines(stream)[0])
    assert event["exception"][0]["exc_type"] == "KeyError"
    assert "SECRET" not in stream.getvalue()


def test_names_outside_the_package_still_reach_our_handler(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    get_logger("my_script").info("hello")
    assert json.loads(lines(stream)[0])["logger"] == "firetitan.my_script"


def test_capture_stdlib_routes_other_libraries(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream, capture_stdlib=True)
    try:
        logging.getLogger("aiohttp.access").warning("GET %s", "/health")
        get_logger("firetitan.test").info("ours")
        events = [json.loads(line) for line in lines(stream)]
        assert [(e["logger"], e["event"]) for e in events] == [
            ("aiohttp.access", "GET /health"),
            ("firetitan.test", "ours"),
        ]
    finally:
        configure_logging("info", "console", stream=sys.stderr)
    assert not [h for h in logging.getLogger().handlers if getattr(h, "_firetitan", False)]


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_environment_selects_json_and_level() -> None:
    code = (
        "from firetitan.logging import get_logger\n"
        "log = get_logger('firetitan.env', deployment_id='d1')\n"
        "log.debug('dbg'); log.info('inf')\n"
    )
    env = {**os.environ, "FIRETITAN_LOG_FORMAT": "json", "FIRETITAN_LOG_LEVEL": "debug"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["dbg", "inf"]
    assert all(e["deployment_id"] == "d1" for e in events)
    assert out.stdout == ""  # logs go to stderr only


def test_bad_environment_falls_back_and_global_structlog_is_untouched() -> None:
    code = (
        "import structlog\n"
        "from firetitan.logging import get_logger\n"
        "get_logger('firetitan.env').info('still_logs')\n"
        "print(structlog.is_configured())\n"
    )
    env = {**os.environ, "FIRETITAN_LOG_LEVEL": "loud"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "bad_logging_environment" in out.stderr and "still_logs" in out.stderr
    assert out.stdout.strip() == "False"  # the application's own structlog setup stays its own
