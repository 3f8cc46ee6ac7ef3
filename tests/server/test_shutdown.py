"""A stopping server cancels its long-polls at once but lets real work in flight finish, and the
key's two spellings (tml-/fw_) authenticate the same secret."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from firetitan.home import fireworks_api_key, key_spellings
from firetitan.server.process import pid_alive, spawn_worker

SERVE = """
import argparse, asyncio, sys
from aiohttp import web
from firetitan.server.common import add_common_args, make_app, serve_app

EVENTS = sys.argv[sys.argv.index("--events") + 1]
del sys.argv[sys.argv.index("--events"):sys.argv.index("--events") + 2]

def note(line):
    with open(EVENTS, "a") as fh:
        fh.write(line + "\\n")

async def retrieve_future(request):
    note("poll started")
    try:
        await asyncio.sleep(3600)  # a future that never completes
    except asyncio.CancelledError:
        note("poll cancelled")
        raise
    return web.json_response({})

async def work(request):
    note("work started")
    await asyncio.sleep(1.5)
    note("work finished")
    return web.json_response({"done": True})

p = argparse.ArgumentParser(); add_common_args(p); a = p.parse_args()
app = make_app(a.api_key)
app.router.add_post("/api/v1/retrieve_future", retrieve_future)
app.router.add_post("/work", work)
asyncio.run(serve_app(app, a.host, a.port, a.ready_file))
"""


def _module(tmp_path: Path) -> str:
    pkg = tmp_path / "shutdown_worker_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(SERVE))
    return "shutdown_worker_pkg"


def _wait_for(path: Path, line: str) -> None:
    import time

    for _ in range(400):
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.05)
    raise AssertionError(f"{line!r} never appeared in {path.read_text() if path.exists() else '(no file)'}")


def test_shutdown_cancels_long_polls_first_and_lets_work_finish(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    events = tmp_path / "events.txt"
    worker = spawn_worker(module, ["--events", str(events)], ready_timeout=60, log_path=tmp_path / "w.log")
    answers: dict[str, object] = {}

    def call(path: str) -> None:
        req = urllib.request.Request(worker.url + path, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                answers[path] = json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError) as exc:
            answers[path] = exc

    threads = [threading.Thread(target=call, args=(p,)) for p in ("/api/v1/retrieve_future", "/work")]
    try:
        threads[0].start()
        _wait_for(events, "poll started")
        threads[1].start()
        _wait_for(events, "work started")
        os.kill(worker.pid, signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        worker.popen.wait(timeout=60)
    finally:
        worker.stop()
    lines = events.read_text().splitlines()
    # The poll was cancelled by the shutdown itself, before the work in flight ended (not after the grace).
    assert lines.index("poll cancelled") < lines.index("work finished"), lines
    assert answers["/work"] == {"done": True}
    assert isinstance(answers["/api/v1/retrieve_future"], Exception)
    assert not pid_alive(worker.pid)


def test_key_spellings() -> None:
    assert key_spellings("tml-abc") == ("tml-abc", "fw_abc")
    assert key_spellings("fw_abc") == ("fw_abc", "tml-abc")
    assert key_spellings("ft-abc") == ("ft-abc",)
    assert key_spellings("tml-") == ("tml-",)
    assert fireworks_api_key("tml-abc") == "fw_abc"
    assert fireworks_api_key("ft-abc") == "ft-abc"
