"""Starting the local control plane: many clients at once share one daemon, stale discovery is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_scan import live_pids

from firetitan.client.provision import ensure_control_plane
from firetitan.server.control_plane.home import HomeLayout, read_api_key, read_discovery, write_discovery
from firetitan.server.process import pid_alive, stop_pid

PYTHON = sys.executable
N_CLIENTS = 4

# Each client imports everything first, then waits for the go file, so all four ask at the same moment.
CLIENT = """
import json, os, sys, time
from firetitan.client.provision import ensure_control_plane
from firetitan.server.control_plane.home import HomeLayout, read_discovery
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.005)
url, key = ensure_control_plane(os.environ["FIRETITAN_HOME"])
info = read_discovery(HomeLayout(__import__("pathlib").Path(os.environ["FIRETITAN_HOME"]).resolve()))
print(json.dumps({"url": url, "key": key, "pid": info and info["pid"]}))
"""


def control_plane_pids(root: Path) -> list[int]:
    """Live (non-zombie) control-plane processes started for this state directory."""
    # Whole arguments, not substrings: another test's state directory may start with this one's path.
    return live_pids(lambda cmd: {"firetitan.server.control_plane", str(root)} <= set(cmd.split()))


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HomeLayout]:
    root = (tmp_path / "ft-home").resolve()
    monkeypatch.setenv("FIRETITAN_HOME", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield HomeLayout(root)
    finally:
        for pid in control_plane_pids(root):
            stop_pid(pid, timeout=20)
        assert control_plane_pids(root) == []


def start_clients(layout: HomeLayout, go: Path, n: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "FIRETITAN_HOME": str(layout.root), "HF_HUB_OFFLINE": "1"}
    return [subprocess.Popen([PYTHON, "-c", CLIENT, str(go)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(n)]


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"a client failed (code {proc.returncode}):\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_clients_starting_at_once_share_one_control_plane(layout: HomeLayout, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = start_clients(layout, go, N_CLIENTS)
    time.sleep(3.0)  # let every client finish importing and reach the go loop
    go.touch()
    results = collect(procs)
    urls = {r["url"] for r in results}
    pids = {r["pid"] for r in results}
    assert len(urls) == 1 and len(pids) == 1, results
    assert {r["key"] for r in results} == {read_api_key(layout)}
    assert control_plane_pids(layout.root) == [next(iter(pids))]
    info = read_discovery(layout)
    assert info is not None and info["url"] == next(iter(urls))
    # A later client finds the same daemon instead of starting one.
    assert ensure_control_plane(layout.root)[0] == info["url"]
    assert control_plane_pids(layout.root) == [info["pid"]]


def test_stale_discovery_with_dead_pid_is_replaced(layout: HomeLayout) -> None:
    layout.ensure()
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    write_discovery(layout, "http://127.0.0.1:9", dead.pid)  # a daemon that was SIGKILLed
    url, key = ensure_control_plane(layout.root)
    info = read_discovery(layout)
    assert info is not None and info["url"] == url and url != "http://127.0.0.1:9"
    assert control_plane_pids(layout.root) == [info["pid"]]
    assert key == read_api_key(layout)


def test_clients_racing_a_daemon_started_by_hand_all_connect(layout: HomeLayout, tmp_path: Path) -> None:
    """A daemon started outside the SDK (as `firetitan serve` would) at the same moment as clients:
    whichever daemon wins the single-instance lock, every client connects to it."""
    go = tmp_path / "go"
    procs = start_clients(layout, go, N_CLIENTS - 1)
    env = {**os.environ, "FIRETITAN_HOME": str(layout.root), "HF_HUB_OFFLINE": "1"}
    by_hand = subprocess.Popen([PYTHON, "-m", "firetitan.server.control_plane", "--home", str(layout.root)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        time.sleep(1.5)  # the clients are importing; the hand-started daemon is about to take the lock
        go.touch()
        results = collect(procs)
        assert len({r["url"] for r in results}) == 1, results
        assert len({r["pid"] for r in results}) == 1, results
        assert control_plane_pids(layout.root) == [results[0]["pid"]]
    finally:
        stop_pid(by_hand.pid, timeout=20, popen=by_hand)  # type: ignore[arg-type]


def test_a_daemon_holding_the_lock_but_not_yet_discoverable_is_waited_for(layout: HomeLayout) -> None:
    """The window behind the reported failure: a control plane that holds the single-instance lock
    but has no (or a withdrawn) discovery file, as while it starts or stops. A client must wait for it
    rather than start a second daemon, which could only lose the lock and exit."""
    import fcntl
    import threading

    layout.ensure()
    holder = open(layout.instance_lock_file, "a+")  # stands where a starting daemon would
    fcntl.flock(holder, fcntl.LOCK_EX)
    result: dict[str, object] = {}

    def client() -> None:
        try:
            result["url"] = ensure_control_plane(layout.root, timeout=60)[0]
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=client)
    try:
        thread.start()
        time.sleep(1.5)
        assert "error" not in result, result
        assert control_plane_pids(layout.root) == []  # no second daemon while the lock is held
        assert thread.is_alive()
    finally:
        holder.close()  # the "daemon" exits: its lock goes with it
    thread.join(timeout=120)
    assert "error" not in result, result
    info = read_discovery(layout)
    assert info is not None and result["url"] == info["url"]
    assert control_plane_pids(layout.root) == [info["pid"]]


def test_clients_starting_while_the_old_daemon_stops_share_one_new_one(layout: HomeLayout, tmp_path: Path) -> None:
    """A stopping daemon withdraws its discovery file before it stops its workers and lets go of
    its lock: clients arriving then wait it out and start exactly one successor."""
    import signal

    ensure_control_plane(layout.root)  # started by this process, so reaped here below
    info = read_discovery(layout)
    assert info is not None
    old = int(info["pid"])
    go = tmp_path / "go"
    procs = start_clients(layout, go, N_CLIENTS)
    time.sleep(3.0)
    os.kill(old, signal.SIGTERM)
    while read_discovery(layout) is not None:  # withdrawn: the old daemon is stopping, lock still held
        time.sleep(0.005)
    go.touch()
    results = collect(procs)
    try:  # it is this process's child: reap it so no zombie is left
        os.waitpid(old, 0)
    except ChildProcessError:
        pass  # subprocess already reaped it when its (discarded) Popen was collected
    assert not pid_alive(old)
    assert len({r["url"] for r in results}) == 1, results
    pids = {r["pid"] for r in results}
    assert len(pids) == 1 and old not in pids, results
    assert control_plane_pids(layout.root) == [next(iter(pids))]
