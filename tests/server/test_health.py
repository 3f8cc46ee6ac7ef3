"""The health listener answers off the main loop and turns 503 once that loop stops beating (issue 14, 9/24)."""

from __future__ import annotations

import json
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from firetitan.server.health import HealthListener
from firetitan.server.process import spawn_worker

KEY = "health-test-key"

WEDGING_WORKER = """
import argparse, asyncio, time
from aiohttp import web
from firetitan.server.common import add_common_args, make_app, serve_app
from firetitan.server.health import HEALTH_DETAIL

async def wedge(request):
    time.sleep(float(request.query["s"]))  # blocks the main event loop on purpose (a hung worker)
    return web.json_response({"woke": True})

p = argparse.ArgumentParser(); add_common_args(p); a = p.parse_args()
app = make_app(a.api_key); app.router.add_get("/wedge", wedge)
app[HEALTH_DETAIL] = lambda: {"status": "ignored", "deployment_id": "dep-x"}
asyncio.run(serve_app(app, a.host, a.port, a.ready_file))
"""


def _get(url: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _poll(url: str, status: int, tries: int = 300) -> dict[str, Any]:
    """Ask every 0.1 s until the answer has `status` (bounded: the test fails instead of hanging)."""
    seen = None
    for _ in range(tries):
        seen = _get(url, KEY)
        if seen[0] == status:
            return seen[1]
        time.sleep(0.1)
    raise AssertionError(f"health never answered {status}; last {seen}")


def _install_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "wedging_worker_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(WEDGING_WORKER))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


@pytest.fixture
def wedging_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    _install_worker(tmp_path, monkeypatch)
    worker = spawn_worker("wedging_worker_pkg", [], ready_timeout=60, log_path=tmp_path / "w.log",
                          env={"FIRETITAN_WORKER_API_KEY": KEY, "FIRETITAN_HEALTH_MAX_LAG_S": "0.5"})
    try:
        yield worker
    finally:
        worker.stop()


def test_wedged_main_loop_turns_health_503_after_the_bound_and_back(wedging_worker) -> None:  # type: ignore[no-untyped-def]
    health = wedging_worker.health_url
    assert health and health != wedging_worker.url  # its own port, published in the ready file
    assert _get(health + "/health") == (200, {"status": "ok"})  # keyless: alive, no more
    status, body = _get(health + "/health", KEY)
    assert status == 200 and body["deployment_id"] == "dep-x" and body["pid"] == wedging_worker.pid
    assert body["status"] == "ok" and body["max_lag_s"] == 0.5  # the app's detail cannot override the status

    # Wedge the main loop for 8 s (16x the bound): the listener, on its own thread, says so.
    woke: list[Any] = []
    blocker = threading.Thread(target=lambda: woke.append(_get(wedging_worker.url + "/wedge?s=8", KEY)))
    blocker.start()
    try:
        stalled = _poll(health + "/health", 503)
        assert stalled["status"] == "stalled" and stalled["loop_lag_s"] > 0.5
        assert _get(health + "/health") == (503, {"status": "stalled"})  # keyless: the status only
    finally:
        blocker.join(timeout=30)
    assert woke == [(200, {"woke": True})]
    # The loop runs again: healthy once more.
    assert _poll(health + "/health", 200)["status"] == "ok"


async def test_listener_keeps_answering_when_the_detail_fails() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("dictionary changed size during iteration")

    listener = HealthListener("127.0.0.1", KEY, detail=broken, max_lag_s=60.0)
    import asyncio

    url = await asyncio.to_thread(listener.start)
    try:
        status, body = await asyncio.to_thread(_get, url + "/api/v1/healthz", KEY)
        assert status == 200 and body["status"] == "ok" and body["detail_error"] == "RuntimeError"
        assert await asyncio.to_thread(_get, url + "/healthz", "wrong-key") == (200, {"status": "ok"})
    finally:
        await asyncio.to_thread(listener.stop)


async def test_a_lag_just_past_the_bound_reads_as_past_it() -> None:
    """The body's rounded lag agrees with its status: 0.5002 s over a 0.5 s bound is not reported as 0.5."""
    import asyncio

    listener = HealthListener("127.0.0.1", KEY, max_lag_s=0.5)
    url = await asyncio.to_thread(listener.start)
    try:
        for lag, status in ((0.5002, 503), (0.4999, 200), (0.5, 200)):
            listener.lag = lambda lag=lag: lag  # type: ignore[method-assign]
            code, body = await asyncio.to_thread(_get, url + "/health", KEY)
            assert code == status
            assert (body["loop_lag_s"] > body["max_lag_s"]) == (status == 503), body
    finally:
        await asyncio.to_thread(listener.stop)


def test_bad_bound_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan.errors import ConfigError

    monkeypatch.setenv("FIRETITAN_HEALTH_MAX_LAG_S", "-1")
    with pytest.raises(ConfigError, match="FIRETITAN_HEALTH_MAX_LAG_S"):
        HealthListener("127.0.0.1", None)


async def test_supervisor_stops_a_hung_worker_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor asks the health listener; a main loop wedged past the bound is a kill, with its reason."""
    import asyncio

    from firetitan.server.control_plane.supervisor import Supervisor, WorkerKey

    _install_worker(tmp_path, monkeypatch)
    lost: asyncio.Queue[tuple[WorkerKey, str]] = asyncio.Queue()

    async def on_exit(key: WorkerKey, reason: str) -> None:
        await lost.put((key, reason))

    sup = Supervisor(logs_dir=tmp_path / "logs", api_key=KEY, on_exit=on_exit, health_interval=0.2,
                     max_health_failures=3, worker_env={"FIRETITAN_HEALTH_MAX_LAG_S": "0.5"})
    key = WorkerKey("replica", "local", "hung")
    worker = await sup.start(key, "wedging_worker_pkg", [], threads=1)
    watch = asyncio.create_task(sup.run())
    try:
        assert worker.health_url
        await asyncio.sleep(1.0)  # five checks while the loop runs: no loss
        assert lost.empty() and sup.get(key) is worker
        blocker = asyncio.create_task(asyncio.to_thread(_wedge, worker.url + "/wedge?s=120"))
        got, reason = await asyncio.wait_for(lost.get(), timeout=60)
        assert got == key and "503" in reason and "stalled" in reason and worker.health_url in reason
        assert not worker.alive()
        await blocker  # the connection dropped with the stopped worker
    finally:
        watch.cancel()
        await sup.stop_all()


def _wedge(url: str) -> None:
    try:
        _get(url, KEY)
    except OSError:
        pass  # the worker was stopped mid-request: expected
