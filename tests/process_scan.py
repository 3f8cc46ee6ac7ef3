"""Live processes picked by their command line: how tests check that no daemon or worker outlived a run."""

from __future__ import annotations

from collections.abc import Callable

import psutil


def live_pids(match: Callable[[str], bool]) -> list[int]:
    """Pids of the live (not zombie) processes whose space-joined command line `match` accepts."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and match(" ".join(proc.info["cmdline"] or [])):
                found.append(proc.pid)
        except psutil.Error:
            continue  # gone between listing and reading it
    return found
