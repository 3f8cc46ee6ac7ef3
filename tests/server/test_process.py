"""spawn_worker starts a real worker process, learns its port, and stops it without orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from firetitan.errors import ConfigError, WorkerCrashedError
from firetitan.server.process import pid_alive, spawn_worker


def _write_module(tmp_path: Path, body: str) -> str:
    pkg = tmp_path / "fake_worker_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    return "fake_worker_pkg"


SERVE = """
import argparse, asyncio
from aiohttp import web
from firetitan.server.common import add_common_args, make_app, serve_app

async def ping(request):
    return web.json_response({"pong": True})

p = argparse.ArgumentParser(); add_common_args(p); a = p.parse_args()
app = make_app(a.api_key); app.router.add_get("/health", ping)
asyncio.run(serve_app(app, a.host, a.port, a.ready_file))
"""


def test_spawn_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _write_module(tmp_path, SERVE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    worker = spawn_worker(module, [], ready_timeout=60, log_path=tmp_path / "w.log")
    try:
        import urllib.request

        with urllib.request.urlopen(f"{worker.url}/health", timeout=10) as resp:
            assert resp.status == 200
        assert worker.alive()
    finally:
        worker.stop()
    assert not pid_alive(worker.pid)


def test_crash_before_ready_is_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _write_module(tmp_path, "raise SystemExit('cannot start: bad flag')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(WorkerCrashedError, match="cannot start"):
        spawn_worker(module, [], ready_timeout=30, log_path=tmp_path / "w.log")


def test_no_worker_listens_off_loopback_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _write_module(tmp_path, SERVE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("FIRETITAN_WORKER_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:  # refused before a process starts
        spawn_worker(module, [], ready_timeout=30, host="0.0.0.0")
    assert info.value.field == "api_key"
    # started by hand, the worker itself refuses (serve_app) and says why
    proc = subprocess.run([sys.executable, "-m", module, "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0 and "reachable from other machines" in proc.stderr


def test_the_key_reaches_the_worker_through_its_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import urllib.error
    import urllib.request

    module = _write_module(tmp_path, SERVE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    worker = spawn_worker(module, [], ready_timeout=60, env={"FIRETITAN_WORKER_API_KEY": "k-123"})
    try:
        assert "k-123" not in " ".join(worker.popen.args)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{worker.url}/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}  # keyless: alive and no more
        req = urllib.request.Request(f"{worker.url}/health", headers={"Authorization": "Bearer k-123"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read()) == {"pong": True}
    finally:
        worker.stop()
