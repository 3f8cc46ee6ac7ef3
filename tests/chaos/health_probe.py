"""Samples a worker's keyless /health latency and its RSS every 0.1 s until a stop file appears.

Runs as its own process so that the flood's client loop cannot delay (and inflate) the measurement.
Prints one JSON object: {"health": [seconds...], "rss": [bytes...], "errors": [text...]}.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def main() -> None:
    url, pid, stop = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    proc = psutil.Process(pid)
    health: list[float] = []
    rss: list[int] = []
    errors: list[str] = []
    while not stop.exists():
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as resp:
                body = json.loads(resp.read())
            if resp.status != 200 or body != {"status": "ok"}:
                errors.append(f"{resp.status} {body}")
        except Exception as exc:  # recorded: the test asserts there are none
            errors.append(repr(exc))
        health.append(time.monotonic() - started)
        rss.append(proc.memory_info().rss)
        time.sleep(0.1)
    print(json.dumps({"health": health, "rss": rss, "errors": errors}))


if __name__ == "__main__":
    main()
