"""Run every benchmark in turn (`make bench`); each writes its own JSON under benchmarks/results/."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (script, extra args). Order: cheap in-process ones first, multi-process ones last.
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("snapshot_size.py", []),
    ("weight_sync.py", []),
    ("trainer_step.py", []),
    ("engine_throughput.py", []),
    ("hotload_pause.py", []),
    ("controllers.py", ["--http"]),
    ("sampling_fanout.py", []),
    ("rl_pipeline.py", []),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="run only these scripts (e.g. trainer_step)")
    args = parser.parse_args()
    failed: list[str] = []
    for script, extra in BENCHMARKS:
        if args.names and Path(script).stem not in args.names:
            continue
        print(f"== {script} {' '.join(extra)}", flush=True)
        start = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / script), *extra])
        print(f"== {script}: exit {code} after {time.monotonic() - start:.0f}s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
