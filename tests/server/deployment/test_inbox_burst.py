"""An idle engine gathers a burst of requests before its first step, and waits no longer than its window."""

from __future__ import annotations

import threading
import time

import pytest

from firetitan.server.deployment.engine import inbox
from firetitan.server.deployment.engine.inbox import Abort, InboxEngine, Submit, Swap


class _Recording(InboxEngine):
    """Records what each `_drain_inbox` call handled; never runs a step loop."""

    def __init__(self) -> None:
        super().__init__()
        self.handled: list[str] = []

    def _handle(self, message: Submit | Abort | Swap) -> None:
        assert isinstance(message, Abort)
        self.handled.append(message.request_id)


def _send_later(engine: InboxEngine, names: list[str], gap_s: float) -> threading.Thread:
    def send() -> None:
        for name in names:
            time.sleep(gap_s)
            engine.abort(name)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_an_idle_engine_takes_a_burst_in_one_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages arriving within the gap of each other are all handled by the drain the first one woke."""
    monkeypatch.setattr(inbox, "BURST_GAP_S", 0.5)
    monkeypatch.setattr(inbox, "BURST_WINDOW_S", 5.0)
    engine = _Recording()
    sender = _send_later(engine, [f"r{i}" for i in range(5)], 0.01)
    engine._drain_inbox(block=True)
    sender.join()
    assert engine.handled == ["r0", "r1", "r2", "r3", "r4"]


def test_the_burst_ends_at_its_window_and_a_busy_engine_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message after the window is left for the next drain; a non-blocking drain (the engine has work)
    takes only what is queued."""
    monkeypatch.setattr(inbox, "BURST_GAP_S", 1.0)
    monkeypatch.setattr(inbox, "BURST_WINDOW_S", 0.05)
    engine = _Recording()
    sender = _send_later(engine, ["first", "late"], 0.3)
    engine._drain_inbox(block=True)
    assert engine.handled == ["first"]
    sender.join()
    engine.abort("queued")
    blocking_gets: list[float | None] = []
    queue = engine._inbox

    class _Watched:
        def get(self, timeout: float | None = None) -> object:
            blocking_gets.append(timeout)
            return queue.get(timeout=timeout)

        def get_nowait(self) -> object:
            return queue.get_nowait()

    monkeypatch.setattr(engine, "_inbox", _Watched())
    engine._drain_inbox(block=False)
    assert engine.handled == ["first", "late", "queued"]
    assert blocking_gets == []  # it never waited for more


def test_an_engine_starting_on_lone_requests_waits_again_once_a_burst_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start from idle that found one message makes the next start take only what is queued (a client in
    a loop never pays the gap); a start that finds several makes the one after it gather again."""
    monkeypatch.setattr(inbox, "BURST_GAP_S", 0.01)
    monkeypatch.setattr(inbox, "BURST_WINDOW_S", 0.02)
    engine = _Recording()
    engine.abort("lone")
    engine._drain_inbox(block=True)  # waits out its short window: nothing more comes
    monkeypatch.setattr(inbox, "BURST_GAP_S", 0.5)
    monkeypatch.setattr(inbox, "BURST_WINDOW_S", 5.0)
    engine.abort("b")
    sender = _send_later(engine, ["c"], 0.3)
    engine._drain_inbox(block=True)
    assert engine.handled == ["lone", "b"]  # did not wait for c
    sender.join()
    engine.abort("d")
    engine._drain_inbox(block=True)  # c and d were both queued: a burst
    assert engine.handled == ["lone", "b", "c", "d"]
    engine.abort("e")
    sender = _send_later(engine, ["f"], 0.05)
    engine._drain_inbox(block=True)
    sender.join()
    assert engine.handled[-2:] == ["e", "f"]  # waiting again
